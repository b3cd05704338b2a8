"""The seams between Gatekeeper's layers, as zope interfaces and the plain values they pass.

Everything here is small on purpose: an implementation (the file key store, an LDAP
directory, the network upstream) and its in-package fake must both be easy to write.
"""

from __future__ import annotations

import datetime

import attrs
from cryptography import x509
from zope.interface import Interface


@attrs.frozen
class StoredKey:
    """One of a user's key pairs as kept at rest.

    ``sealed`` is a PKCS#12 file whose private key only the user's password decrypts;
    ``certificate`` is the same certificate in the clear, so that listing users and
    publishing certificates never needs a password.
    """

    key_id: str
    certificate: x509.Certificate
    sealed: bytes
    created: datetime.datetime
    retired: bool = False


@attrs.frozen
class PendingKey:
    """A key pair made without the user's password (an administrator's rotation).

    ``wrapped`` is the new private key encrypted to the public key of the stored key
    ``sealed_to`` (see :mod:`gatekeeper.keys.accounts`); the next login, which knows
    the password, seals it like the others and makes it the current key.
    """

    key_id: str
    certificate: x509.Certificate
    wrapped: bytes
    sealed_to: str
    created: datetime.datetime


@attrs.frozen
class StoredUser:
    """A user of the gateway and all their key pairs, the current one first.

    ``pending`` holds rotations waiting for the next login (newest first); while there
    are any, the newest pending certificate is the one to publish and encrypt to.
    """

    address: str
    keys: tuple[StoredKey, ...]
    created: datetime.datetime
    pending: tuple[PendingKey, ...] = ()
    last_login: datetime.datetime | None = None

    @property
    def current(self) -> StoredKey:
        """The key pair used for signing and for new mail."""
        return self.keys[0]


class IKeyStore(Interface):
    """Where users' key pairs are kept, encrypted under their passwords.

    Implementations are synchronous and fast (small reads and atomic writes); they never
    decrypt anything and never see a password.
    """

    def list_users() -> list[str]:
        """Return the normalised addresses of all users, sorted."""

    def get_user(address: str) -> StoredUser | None:
        """Return the user with this address (matched case-insensitively), or None."""

    def put_user(user: StoredUser) -> None:
        """Create or replace a user record atomically (all keys at once)."""

    def delete_user(address: str) -> None:
        """Remove the user and every key file; raises UnknownUser if absent."""

    def put_user_if_unchanged(expected: StoredUser, user: StoredUser) -> bool:
        """Write ``user`` only if the stored record still equals ``expected``; report whether it did."""


class IKeySource(Interface):
    """One place certificates for recipients can be found (the key ring, LDAP, DNS)."""

    name: str

    def find(address: str) -> object:
        """Return a Deferred firing with a list of candidate certificates.

        "Not found" is an empty list; an outage or a timeout fails the Deferred with
        :class:`~gatekeeper.errors.SourceUnavailable`.
        """


class ICertificatePublisher(Interface):
    """Somewhere users' certificates are published for others to find (the PKI directory).

    Publishing is separate from lookups: a lookup never writes.
    """

    def publish(address: str, certificate: x509.Certificate) -> None:
        """Publish ``certificate`` as the current certificate of ``address`` (synchronous)."""

    def unpublish(address: str) -> None:
        """Remove every certificate published for ``address`` (synchronous)."""

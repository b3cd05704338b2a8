"""The seams between Gatekeeper's layers, as zope interfaces and the plain values they pass.

Everything here is small on purpose: an implementation (the file key store, an LDAP
directory, the network upstream) and its in-package fake must both be easy to write.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

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


# -- the maildrop behind the POP3 proxy ---------------------------------------------------
#
# The POP3 proxy (gatekeeper/pop3.py) serves one IPop3Maildrop per session: the upstream
# POP3 server (gatekeeper/upstream/pop3.py) or, for the embedded default, a local store.


@attrs.frozen(repr=False)
class UpstreamLogin:
    """Who to log in as upstream for a gateway user: ``address`` (the gateway login) and the upstream name and password.

    The password is the user's own (pass-through) or their stored upstream password
    (:mod:`gatekeeper.upstream.credentials`); an embedded store only uses ``address``.
    """

    address: str
    user: str
    password: str

    def __repr__(self) -> str:
        return f"<UpstreamLogin {self.address} as {self.user}>"


@attrs.frozen
class MaildropEntry:
    """One message of a maildrop: its unique id (UIDL, stable across sessions) and its stored size in octets."""

    uid: bytes
    size: int


class IPop3Upstream(Interface):
    """Where the POP3 proxy opens users' maildrops."""

    async def open(login: UpstreamLogin) -> IPop3Maildrop:
        """Open ``login.address``'s maildrop and return the session.

        Raises :class:`~gatekeeper.errors.UpstreamUnavailable` (temporary: down, slow,
        TLS failure) or :class:`~gatekeeper.errors.UpstreamRefused` (what the server
        said, with its RFC 3206 code: ``AUTH`` for refused credentials, ``IN-USE``...).
        """


class IPop3Maildrop(Interface):
    """One open maildrop session (POP3's TRANSACTION state).

    The message list is fixed when the session opens (:attr:`entries`, POP3's
    numbering); methods name messages by their 0-based index in it. Deletion is kept by
    the caller (RSET may undo it) and happens only at :meth:`commit`: a session that
    ends any other way, or fails, deletes nothing. Coroutines fail with
    :class:`~gatekeeper.errors.UpstreamUnavailable` or
    :class:`~gatekeeper.errors.UpstreamRefused` as for :meth:`IPop3Upstream.open`.
    """

    entries: Sequence[MaildropEntry]

    async def retrieve(index: int) -> bytes:
        """The whole message, as stored (CRLF line ends)."""

    async def top(index: int, lines: int) -> bytes:
        """The message's header and the first ``lines`` lines of its body, as stored."""

    async def commit(deleted: Sequence[int]) -> None:
        """Delete exactly these messages and end the session (POP3's UPDATE state).

        Returns once the deletions are permanent; raises if that cannot be confirmed.
        """

    def close() -> None:
        """End the session at once, deleting nothing (the client went away)."""

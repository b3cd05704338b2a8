"""Which name and password a gateway user logs in to the upstream mail server with.

By default the proxies pass the user's own login through (``[upstream] pass_through``):
the upstream server knows the same address and password. Where it does not, an
administrator stores per-user upstream credentials (``gatekeeper upstream set``); they
are kept in ``<key store>/upstream-logins/`` as a CMS EnvelopedData (AES-256-GCM)
encrypted to the user's own certificates, so only the user's unlocked keys (that is,
a login with the user's password) can open them: the gateway's disk never holds them in
the clear, and the administrator cannot read them back.

:class:`LoginResolver` is what the POP3 and IMAP proxies call after a login; opening the
stored credentials is a private-key operation, so it runs in the worker pool
(:func:`open_sealed`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from gatekeeper.address import normalize_address
from gatekeeper.cms.enveloped import Recipient, decrypt, envelope
from gatekeeper.errors import KeyStoreError, UpstreamRefused
from gatekeeper.interfaces import UpstreamLogin
from gatekeeper.keys.identity import Identity
from gatekeeper.keys.store import atomic_write, private_directory, safe_name
from gatekeeper.keys.unlocking import WireIdentity, identity_to_wire, worker_identities
from gatekeeper.smime import SMIMEError

MAX_FIELD = 1024
_MAX_SEALED = 1024 * 1024


class CredentialStore:
    """Per-user upstream credentials, sealed to the user's certificates, one file each (0600 in a 0700 directory)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, address: str) -> Path:
        return self.root / f"{safe_name(address)}.p7m"

    def put(self, address: str, certificates: Sequence[x509.Certificate], user: str, password: str) -> None:
        """Seal ``user`` and ``password`` to ``certificates`` (the user's keys) and store them for ``address``."""
        if not certificates:
            raise KeyStoreError("no certificate to seal the upstream credentials to")
        for name, value in (("user name", user), ("password", password)):
            if not value or len(value) > MAX_FIELD or "\0" in value or "\n" in value or "\r" in value:
                raise KeyStoreError(f"the upstream {name} must be 1 to {MAX_FIELD} characters on one line")
        document = json.dumps({"address": normalize_address(address), "user": user, "password": password})
        sealed = envelope(document.encode("utf-8"), [Recipient(c) for c in certificates], cipher="aes256-gcm")
        atomic_write(private_directory(self.root) / self._path(address).name, sealed)

    def sealed(self, address: str) -> bytes | None:
        """The sealed credentials of ``address``, or None when none are stored."""
        try:
            with self._path(address).open("rb") as handle:
                return handle.read(_MAX_SEALED)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise KeyStoreError(f"cannot read the upstream credentials: {error.strerror}") from None

    def remove(self, address: str) -> bool:
        """Forget ``address``'s credentials; returns whether there were any."""
        try:
            os.unlink(self._path(address))
        except FileNotFoundError:
            return False
        except OSError as error:
            raise KeyStoreError(f"cannot remove the upstream credentials: {error.strerror}") from None
        return True


def open_sealed(wire: WireIdentity, sealed: bytes) -> tuple[str, str]:
    """Decrypt stored credentials with the user's keys (a worker job); returns (user, password)."""
    identity = worker_identities.get(wire)
    try:
        document = json.loads(decrypt(sealed, identity.keys).content)
        user, password = document["user"], document["password"]
        if document["address"].casefold() != identity.address.casefold():
            raise ValueError("sealed for another user")
    except (SMIMEError, ValueError, KeyError, TypeError):
        raise UpstreamRefused(
            "the stored upstream login cannot be opened with your keys; the administrator must set it again",
            code="SYS/PERM",
        ) from None
    if not isinstance(user, str) or not isinstance(password, str):
        raise UpstreamRefused("the stored upstream login is damaged", code="SYS/PERM")
    return user, password


Runner = Callable[..., Awaitable[Any]]


class LoginResolver:
    """Chooses the upstream login for a gateway user who just logged in with ``password``.

    Stored credentials win; without them the user's own login is passed through, unless
    ``pass_through`` is off (then the login is refused with ``[SYS/PERM]``).
    ``run`` runs a worker job (``WorkerPool.run``).
    """

    def __init__(self, store: CredentialStore | None, run: Runner, *, pass_through: bool = True) -> None:
        self.store = store
        self._run = run
        self.pass_through = pass_through

    async def resolve(self, identity: Identity, password: str) -> UpstreamLogin:
        """The :class:`UpstreamLogin` for ``identity``."""
        sealed = self.store.sealed(identity.address) if self.store is not None else None
        if sealed is not None:
            user, stored = await self._run(open_sealed, identity_to_wire(identity), sealed)
            return UpstreamLogin(identity.address, user, stored)
        if not self.pass_through:
            raise UpstreamRefused("no upstream login is configured for you; ask the administrator", code="SYS/PERM")
        return UpstreamLogin(identity.address, identity.address, password)

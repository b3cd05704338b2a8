"""What each correspondent's mail client can read, remembered from their signatures.

RFC 8551 section 2.7.1: a sender learns a recipient's algorithms from the
SMIMECapabilities in the recipient's last verified signed message. Gatekeeper keeps
them per address (:class:`ICapabilityStore`, :class:`FileCapabilityStore`) and
:func:`choose_algorithms` picks the strongest algorithms every recipient of a message
can read: AES-GCM only when all advertise it, RSA-OAEP only when all advertise it or
the policy asks for it, AES-256-CBC and RSA PKCS#1 v1.5 otherwise (what every peer
reads).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs
from zope.interface import Interface, implementer

from gatekeeper.address import address_key, normalize_address
from gatekeeper.errors import KeyStoreError

MAX_CAPABILITIES = 64
_CIPHER_PREFERENCE = ("aes256-gcm", "aes128-gcm", "aes256-cbc", "aes128-cbc")
DEFAULT_CIPHER = "aes256-cbc"
DEFAULT_KEY_TRANSPORT = "rsa-pkcs1v15"


@attrs.frozen
class Capabilities:
    """The algorithm names a correspondent advertised, strongest first, and when (signing time)."""

    address: str
    algorithms: tuple[str, ...]
    updated: datetime.datetime


class ICapabilityStore(Interface):
    """Remembers, per correspondent, the capabilities from their last verified signature."""

    def get(address: str) -> Capabilities | None:
        """The capabilities remembered for ``address`` (case-insensitive), or None."""

    def remember(address: str, algorithms: Sequence[str], when: datetime.datetime) -> bool:
        """Store ``algorithms`` for ``address`` unless something newer is already known.

        Returns whether the record was written. ``when`` is the signing time of the
        message they came from, so that an old message read late does not undo a newer one.
        """


@implementer(ICapabilityStore)
class FileCapabilityStore:
    """One small JSON file per correspondent in ``directory`` (mode 0700), written atomically, 0600.

    File names are a hash of the address, so that the directory listing does not show
    who the organisation corresponds with.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, address: str) -> Path:
        key = address_key(normalize_address(address))
        return self.directory / (hashlib.sha256(key.encode("utf-8")).hexdigest()[:40] + ".json")

    def get(self, address: str) -> Capabilities | None:
        """See :meth:`ICapabilityStore.get`; a damaged file counts as nothing remembered."""
        try:
            record = json.loads(self._path(address).read_text(encoding="utf-8"))
            algorithms = record["algorithms"]
            if not isinstance(algorithms, list) or not all(isinstance(a, str) for a in algorithms):
                return None
            return Capabilities(
                address=str(record["address"]),
                algorithms=tuple(algorithms[:MAX_CAPABILITIES]),
                updated=datetime.datetime.fromisoformat(record["updated"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remember(self, address: str, algorithms: Sequence[str], when: datetime.datetime) -> bool:
        """See :meth:`ICapabilityStore.remember`."""
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        known = self.get(address)
        if known is not None and known.updated >= when:
            return False
        record = {
            "address": normalize_address(address),
            "algorithms": [str(a)[:80] for a in algorithms[:MAX_CAPABILITIES]],
            "updated": when.isoformat(),
        }
        path = self._path(address)
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                os.fchmod(stream.fileno(), 0o600)
                json.dump(record, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise KeyStoreError(f"cannot write the capability record: {error.strerror}") from None
        return True


@attrs.frozen
class Choice:
    """The algorithms to encrypt one message with."""

    cipher: str = DEFAULT_CIPHER
    key_transport: str = DEFAULT_KEY_TRANSPORT


def choose_algorithms(known: Sequence[Capabilities | None], *, oaep: bool = False) -> Choice:
    """The strongest cipher and key transport that every recipient of one message reads.

    ``known`` has one entry per recipient (None: nothing remembered, so only the
    defaults are safe). ``oaep`` is the policy's request for RSA-OAEP regardless of
    what was advertised.
    """
    if not known or any(k is None for k in known):
        return Choice(DEFAULT_CIPHER, "rsa-oaep" if oaep else DEFAULT_KEY_TRANSPORT)
    advertised = [set(k.algorithms) for k in known if k is not None]
    cipher = DEFAULT_CIPHER
    for candidate in _CIPHER_PREFERENCE:
        if all(candidate in algorithms for algorithms in advertised):
            cipher = candidate
            break
    # A correspondent that advertises CBC only at 128 bits still reads AES-256-CBC in
    # practice (RFC 8551 makes it mandatory), so CBC never drops below the default.
    if cipher == "aes128-cbc":
        cipher = DEFAULT_CIPHER
    wants_oaep = oaep or all("rsa-oaep" in algorithms for algorithms in advertised)
    return Choice(cipher, "rsa-oaep" if wants_oaep else DEFAULT_KEY_TRANSPORT)

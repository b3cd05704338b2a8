"""The login's key work, shaped to run in a worker process.

Measured (``bench/login.py``): with the KDF in a thread of the reactor's process, 20
logins/s made NOOPs on other sessions stall for 4-15 ms at p99. PBKDF2 itself releases
the GIL, but everything around it (reading the user record, parsing the PKCS#12 files,
checking the key, writing the last-login time) holds it, and a busy background thread
holding the GIL is exactly what the reactor waits for. So the whole login runs in a
worker process (:func:`unlock_from_store`), and the reactor's process only turns the
result back into key objects (:func:`identity_from_wire`, a few microseconds a key).

The decrypted private keys cross the worker's pipe as PKCS#8 DER, in memory only.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gatekeeper.errors import BadPassword, KeyStoreError
from gatekeeper.keys.accounts import dummy_unlock, unlock
from gatekeeper.keys.identity import Identity, UnlockedKey
from gatekeeper.keys.store import FileKeyStore
from gatekeeper.worker_process import IDLE_SECONDS, on_idle


@attrs.frozen(repr=False)
class WireKey:
    """One unlocked key pair as picklable bytes."""

    key_id: str
    certificate: bytes
    private_key: bytes = attrs.field(repr=False)
    chain: tuple[bytes, ...]


@attrs.frozen(repr=False)
class WireIdentity:
    """An unlocked identity as picklable bytes (what a worker sends back)."""

    address: str
    keys: tuple[WireKey, ...]

    def __repr__(self) -> str:
        return f"<WireIdentity {self.address} keys={len(self.keys)}>"


def identity_to_wire(identity: Identity) -> WireIdentity:
    """Serialise an identity for the trip back from a worker."""
    der = serialization.Encoding.DER
    return WireIdentity(
        identity.address,
        tuple(
            WireKey(
                key.key_id,
                key.certificate.public_bytes(der),
                key.private_key.private_bytes(der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
                tuple(c.public_bytes(der) for c in key.chain),
            )
            for key in identity.keys
        ),
    )


def identity_from_wire(wire: WireIdentity) -> Identity:
    """Rebuild the key objects in the reactor's process.

    The worker has already checked every key against its certificate, so the expensive
    RSA validation (about 55 ms of GIL-holding time) is skipped here.
    """
    keys = []
    for key in wire.keys:
        private_key = serialization.load_der_private_key(key.private_key, None, unsafe_skip_rsa_key_validation=True)
        if not isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise KeyStoreError("unsupported key type")
        keys.append(
            UnlockedKey(
                key.key_id,
                x509.load_der_x509_certificate(key.certificate),
                private_key,
                tuple(x509.load_der_x509_certificate(c) for c in key.chain),
            )
        )
    return Identity(wire.address, tuple(keys))


class WorkerIdentities:
    """Identities rebuilt in a worker process, kept while they are in use.

    Rebuilding costs more than loading: a fresh RSA-3072 key object's first private
    operation costs 0.75 ms more than the next ones (measured: 1.74 against 0.98 ms),
    and fresh certificate objects parse their fields again. So a worker keeps the key
    objects of the identities it serves, but only while they are used: at most ``size``
    of them, none longer than ``seconds`` after its last use, and none once the worker
    has been idle that long (:func:`gatekeeper.worker_process.on_idle`). The reactor's
    unlock cache, not this, decides how long a login stays valid.
    """

    def __init__(self, *, size: int = 16, seconds: float = IDLE_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.size = size
        self.seconds = seconds
        self._clock = clock
        self._entries: OrderedDict[WireIdentity, tuple[Identity, float]] = OrderedDict()

    def get(self, wire: WireIdentity) -> Identity:
        """The identity for ``wire``, rebuilt unless it was used within ``seconds``."""
        now = self._clock()
        while self._entries:  # least recently used first: stop at the first one still fresh
            oldest, (_, used) = next(iter(self._entries.items()))
            if now - used <= self.seconds:
                break
            del self._entries[oldest]
        found = self._entries.pop(wire, None)
        identity = found[0] if found is not None else identity_from_wire(wire)
        self._entries[wire] = (identity, now)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return identity

    def clear(self) -> None:
        """Forget every identity."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


worker_identities = WorkerIdentities()
"""The worker process's identities (jobs call ``worker_identities.get(wire)``)."""
on_idle(worker_identities.clear)


def unlock_from_store(
    store_root: str, address: str | None, password: str | None, dummy_iterations: int
) -> WireIdentity:
    """The whole login, in a worker: read the record, unlock it, write back, record the time.

    An unknown user (or a user name or password that cannot be valid) runs
    :func:`~gatekeeper.keys.accounts.dummy_unlock` instead, so it costs the same time,
    and fails with the same :class:`BadPassword`. A completed pending rotation is
    written back only if nobody changed the record meanwhile.
    """
    store = FileKeyStore(Path(store_root))
    user = store.get_user(address) if address is not None else None
    if user is None or password is None:
        dummy_unlock(dummy_iterations)
        raise BadPassword("authentication failed")
    try:
        result = unlock(user, password)
    except BadPassword:
        raise BadPassword("authentication failed") from None  # word for word as for an unknown user
    if result.updated_user is not None:
        store.put_user_if_unchanged(user, result.updated_user)
    with contextlib.suppress(OSError, KeyStoreError):  # a last-login time must never fail a login
        store.record_login(user.address)
    return identity_to_wire(result.identity)

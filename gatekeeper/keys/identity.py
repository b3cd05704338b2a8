"""What a successful login yields: the user's private keys, decrypted, in memory only."""

from __future__ import annotations

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@attrs.frozen(repr=False)
class UnlockedKey:
    """One decrypted key pair: the private key, its certificate and the chain above it."""

    key_id: str
    certificate: x509.Certificate
    private_key: PrivateKey = attrs.field(repr=False)
    chain: tuple[x509.Certificate, ...] = ()

    def __repr__(self) -> str:
        return f"<UnlockedKey {self.key_id}>"


@attrs.frozen(repr=False)
class Identity:
    """A logged-in user: the normalised address and every key pair, the current one first.

    Retired keys stay here so that mail encrypted to them can still be read.
    """

    address: str
    keys: tuple[UnlockedKey, ...]

    @property
    def current(self) -> UnlockedKey:
        """The key pair used for signing and new mail."""
        return self.keys[0]

    def __repr__(self) -> str:
        return f"<Identity {self.address} keys={len(self.keys)}>"

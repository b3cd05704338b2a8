"""Helpers for the key store, CA, accounts and CLI tests: fast parameters, cached keys, openssl.

Nothing here writes an unencrypted private key to disk: keys handed to ``openssl`` go
through an encrypted PEM, and openssl's decrypted output is read from its stdout.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gatekeeper.config import KeysConfig
from gatekeeper.keys.ca import CertificateAuthority
from gatekeeper.keys.identity import PrivateKey
from gatekeeper.testing.pki import make_key

CA_PASSPHRASE = "test CA passphrase"
# Unit tests seal with few PBKDF2 rounds; the 600,000-round default is tested on its own.
FAST_ITERATIONS = 1000


def key_generator(start: int = 0) -> Callable[[str], PrivateKey]:
    """Return a stand-in for ``generate_private_key``: distinct keys, cached per process."""
    counter = itertools.count(start)

    def generate(key_type: str) -> PrivateKey:
        return make_key(key_type, index=3000 + next(counter))

    return generate


def keys_config(root: Path, *, key_type: str = "p256", iterations: int = FAST_ITERATIONS) -> KeysConfig:
    """A ``[keys]`` section for a store under ``root``."""
    return KeysConfig(store=root, kdf_iterations=iterations, key_type=key_type)


def make_ca(directory: Path, *, key_type: str = "p256") -> CertificateAuthority:
    """A fresh CA in ``directory`` (fast: p256 and few KDF rounds)."""
    return CertificateAuthority.create(
        directory, CA_PASSPHRASE, common_name="Test Gatekeeper CA", key_type=key_type, iterations=FAST_ITERATIONS
    )


def openssl(arguments: Sequence[str], *, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``openssl`` with ``arguments``; never raises on a non-zero exit."""
    return subprocess.run(["openssl", *arguments], input=input, capture_output=True, timeout=60, check=False)


def write_pem(path: Path, *certificates: x509.Certificate) -> Path:
    """Write certificates as PEM and return the path."""
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    return path


def write_encrypted_key(path: Path, key: PrivateKey, passphrase: str) -> Path:
    """Write ``key`` as an encrypted PKCS#8 PEM (never unencrypted) and return the path."""
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase.encode("utf-8")),
        )
    )
    return path


def private_der(key: PrivateKey) -> bytes:
    """The unencrypted PKCS#8 DER of ``key`` (in memory, to search files for it)."""
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def files_containing(root: Path, needle: bytes) -> list[Path]:
    """Every file under ``root`` whose bytes contain ``needle``."""
    return [path for path in root.rglob("*") if path.is_file() and needle in path.read_bytes()]

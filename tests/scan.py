"""After the suite: no unencrypted private key in any test key store, no test password in a log.

Run by ``make test`` on trial's temporary directory::

    python tests/scan.py _trial_temp

Key stores are recognised by their layout (a ``users/`` directory); every file in them
is checked for unencrypted private keys in PEM, DER (PKCS#8 or traditional) or PKCS#12
form. The test passwords are every string literal the
test modules assign to a name containing ``password`` or ``passphrase`` (or pass as such
a keyword argument); every ``*.log`` file under the directory is searched for them.
Exits non-zero and names each finding.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_der_private_key, pkcs12

# Built from pieces so that this file itself does not look like a key to a repository scan.
PEM_MARKERS = tuple(b"-----BEGIN " + kind + b"PRIVATE KEY-----" for kind in (b"", b"RSA ", b"EC "))
MIN_SECRET = 8
TESTS = Path(__file__).resolve().parent


def key_stores(root: Path) -> Iterator[Path]:
    """Directories under ``root`` laid out as a Gatekeeper key store (they have ``users/``)."""
    for users in root.rglob("users"):
        if users.is_dir():
            yield users.parent


def unencrypted_key(data: bytes) -> str | None:
    """Say how ``data`` holds an unencrypted private key, or None."""
    for marker in PEM_MARKERS:
        if marker in data:
            return f"PEM {marker.decode().strip('-')}"
    if data[:1] == b"\x30" and len(data) < 20_000:
        try:
            load_der_private_key(data, None, unsafe_skip_rsa_key_validation=True)
        except (ValueError, TypeError):
            pass
        else:
            return "DER private key"
        for password in (None, b""):
            try:
                key, _, _ = pkcs12.load_key_and_certificates(data, password)
            except (ValueError, TypeError):
                continue
            if key is not None:
                return "PKCS#12 without a password"
    return None


def test_passwords() -> set[str]:
    """String literals the tests use as passwords or passphrases."""
    secrets: set[str] = set()
    for path in TESTS.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            value: ast.AST | None = None
            if isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                value = node.value
            elif isinstance(node, ast.keyword) and node.arg:
                names, value = [node.arg], node.value
            if not any("password" in n.lower() or "passphrase" in n.lower() for n in names):
                continue
            if isinstance(value, ast.Constant) and isinstance(value.value, str) and len(value.value) >= MIN_SECRET:
                secrets.add(value.value)
    return secrets


def scan(root: Path) -> list[str]:
    """Return one line per finding under ``root``."""
    findings = []
    stores = list(key_stores(root))
    for store in stores:
        for path in store.rglob("*"):
            if path.is_file():
                how = unencrypted_key(path.read_bytes())
                if how:
                    findings.append(f"unencrypted private key ({how}) in {path}")
    secrets = test_passwords()
    logs = list(root.rglob("*.log"))
    for log in logs:
        text = log.read_text(encoding="utf-8", errors="replace")
        for secret in secrets:
            if secret in text:
                findings.append(f"a test password ({secret[:3]}...) in {log}")
    print(f"scan: {len(stores)} key stores, {len(logs)} logs, {len(secrets)} test passwords checked")
    return findings


def main() -> int:
    """Scan the directory named on the command line."""
    root = Path(sys.argv[1])
    if not root.is_dir():
        print(f"scan: no directory {root}")
        return 1
    findings = scan(root)
    for finding in findings:
        print(f"scan: {finding}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())

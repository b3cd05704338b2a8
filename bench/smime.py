"""Throughput of the S/MIME engine next to the bare primitives, measured in the same run.

Run: ``.venv/bin/python bench/smime.py`` (about a minute). For every size it prints
messages per second for sign, encrypt, sign+encrypt and decrypt+verify, and the cost
of the bare primitives on the same bytes (SHA-256 + RSA sign + AES-256-CBC + RSA key
transport), with the users' keys of the gateway's default type (RSA-3072; ``--key``
picks another). The last lines are the targets, one per line:
``ratio NAME = VALUE (target OP VALUE)``.
"""

# The timed closures are called within the iteration that defines them: late binding is intended.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gatekeeper import smime
from gatekeeper.keys.identity import UnlockedKey
from gatekeeper.testing.pki import TestPKI
from gatekeeper.trust import TrustValidator

SIZES = {"4k": 4 * 1024, "64k": 64 * 1024, "1m": 1024 * 1024}
TARGET = 1.5


def message(size: int) -> bytes:
    head = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: bench\r\nContent-Type: text/plain\r\n\r\n"
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * (size // len(line) + 1)
    return head + body[: size - len(head)]


def best_of(function: Callable[[], object], *, budget: float = 1.0, rounds: int = 5) -> float:
    """Seconds per call: the best of ``rounds`` batches, each of about budget/rounds seconds."""
    function()
    start = time.perf_counter()
    function()
    once = max(time.perf_counter() - start, 1e-6)
    per_batch = max(1, int(budget / rounds / once))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_batch):
            function()
        best = min(best, (time.perf_counter() - start) / per_batch)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--key",
        default="rsa3072",
        choices=("rsa2048", "rsa3072", "rsa4096"),
        help="the users' key type (default: the gateway's default, [keys] key_type = rsa3072)",
    )
    args = parser.parse_args()
    print(f"user keys: {args.key}")
    pki = TestPKI("Bench CA")
    alice = pki.user("alice@example.org", key_kind=args.key)
    bob = pki.user("bob@example.org", key_kind=args.key, key_index=1)
    alice_key, bob_key = alice.key, bob.key
    assert isinstance(alice_key, rsa.RSAPrivateKey) and isinstance(bob_key, rsa.RSAPrivateKey)
    signer = UnlockedKey("alice", alice.certificate, alice.key, alice.chain)
    reader = UnlockedKey("bob", bob.certificate, bob.key, bob.chain)
    validator = TrustValidator([pki.certificate])
    public = bob_key.public_key()
    ratios = {}
    print(f"{'size':>5} {'operation':<16} {'msg/s':>9} {'ms/msg':>8} {'primitives ms':>14} {'ratio':>6}")
    for label, size in SIZES.items():
        data = message(size)
        protected = smime.sign_and_encrypt(data, signer, [bob.certificate])

        def primitives_sign(data: bytes = data) -> None:
            digest = hashes.Hash(hashes.SHA256())
            digest.update(data)
            alice_key.sign(digest.finalize(), padding.PKCS1v15(), hashes.SHA256())

        def primitives_encrypt(data: bytes = data) -> None:
            key, iv = os.urandom(32), os.urandom(16)
            encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
            encryptor.update(data + b"\x10" * 16)
            encryptor.finalize()
            public.encrypt(key, padding.PKCS1v15())

        def primitives_decrypt(data: bytes = data) -> None:
            key, iv = os.urandom(32), os.urandom(16)
            decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
            decryptor.update(data + b"\x10" * 16)
            decryptor.finalize()
            digest = hashes.Hash(hashes.SHA256())
            digest.update(data)
            digest.finalize()

        encrypted_key = public.encrypt(os.urandom(32), padding.PKCS1v15())
        bob_private = bob_key
        alice_public = alice_key.public_key()
        signature = alice_key.sign(b"x" * 200, padding.PKCS1v15(), hashes.SHA256())

        def primitives_open(data: bytes = data) -> None:
            bob_private.decrypt(encrypted_key, padding.PKCS1v15())
            primitives_decrypt(data)
            alice_public.verify(signature, b"x" * 200, padding.PKCS1v15(), hashes.SHA256())

        cases = {
            "sign": (lambda: smime.sign(data, signer), [primitives_sign]),
            "encrypt": (lambda: smime.encrypt(data, [bob.certificate]), [primitives_encrypt]),
            "sign+encrypt": (
                lambda: smime.sign_and_encrypt(data, signer, [bob.certificate]),
                [primitives_sign, primitives_encrypt],
            ),
            "decrypt+verify": (
                lambda: smime.open_message(protected, [reader], validator, "alice@example.org"),
                [primitives_open],
            ),
        }
        for name, (operation, primitives) in cases.items():
            # Interleave the measurements so that both see the same machine state.
            cost = best_of(operation)
            bare = sum(best_of(p) for p in primitives)
            cost = min(cost, best_of(operation))
            ratio = cost / bare
            ratios[(name, label)] = ratio
            print(f"{label:>5} {name:<16} {1 / cost:9.0f} {cost * 1000:8.3f} {bare * 1000:14.3f} {ratio:6.2f}")
    print(f"ratio sign_encrypt_64k_vs_primitives = {ratios[('sign+encrypt', '64k')]:.2f} (target <= {TARGET})")


if __name__ == "__main__":
    main()

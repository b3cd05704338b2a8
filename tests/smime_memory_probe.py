"""Run in a child process by test_smime_memory: peak memory of 50 MB through the engine.

Prints one line ``size extra_sign_encrypt extra_open`` (bytes): the peak resident memory
above what the process held just before each call (the input message included in that).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gatekeeper import smime
from gatekeeper.keys.identity import UnlockedKey
from gatekeeper.testing.pki import TestPKI
from gatekeeper.trust import TrustValidator

SIZE = 50 * 1024 * 1024


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    pki = TestPKI("Memory CA")
    alice, bob = pki.user("alice@example.org"), pki.user("bob@example.org", key_index=1)
    signer = UnlockedKey("a", alice.certificate, alice.key, alice.chain)
    reader = UnlockedKey("b", bob.certificate, bob.key, bob.chain)
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvw\r\n"
    message = b"From: alice@example.org\r\nContent-Type: text/plain\r\n\r\n" + line * (SIZE // len(line))
    reset_peak()
    before = status("VmRSS")
    protected = smime.sign_and_encrypt(message, signer, [bob.certificate])
    extra_protect = status("VmHWM") - before
    del message
    reset_peak()
    before = status("VmRSS")
    opened = smime.open_message(protected, [reader], TrustValidator([pki.certificate]), "alice@example.org")
    extra_open = status("VmHWM") - before
    assert opened.signatures[0].trust.ok and len(opened.content) >= SIZE - 100
    print(SIZE, extra_protect, extra_open)


if __name__ == "__main__":
    main()

"""``gatekeeper demo`` end to end, as ``make demo`` runs it: a subprocess on a clean directory, its output checked.

The demo runs its own gateway (``twistd``) with a CA, two users and the embedded store.
The test reads what the demo printed and the files it kept (``--directory``): the
stored message is ``application/pkcs7-mime`` and holds nothing in clear, what bob's
clients received through IMAP and POP3 holds the original text and the attachment
byte for byte, and the report says decrypted and signature valid.
"""

from __future__ import annotations

import email
import email.policy
import re
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.fixtures.process import wait_for_port_closed

GATEKEEPER = Path(sys.executable).parent / "gatekeeper"


def attachment_of(data: bytes) -> bytes | None:
    message = email.message_from_bytes(data, policy=email.policy.default)
    for part in message.walk():
        if part.get_filename() == "figures.bin":
            payload = part.get_payload(decode=True)
            return payload if isinstance(payload, bytes) else None
    return None


class DemoTests(SynchronousTestCase):
    def test_the_demo_sends_stores_encrypted_and_reads_decrypted(self) -> None:
        work = Path(self.mktemp()).absolute()
        work.mkdir()
        kept = work / "demo"
        result = subprocess.run(
            [str(GATEKEEPER), "demo", "--directory", str(kept)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=work,  # no etc/gatekeeper.toml here: the demo needs none and touches none
        )
        output = result.stdout
        self.assertEqual(result.returncode, 0, output + result.stderr)
        self.assertEqual(result.stderr, "")
        self.assertIn("All checks passed", output)
        # the passwords, generated, printed once
        passwords = dict(re.findall(r"(\w+@example\.org) +password: (\S+)", output))
        self.assertEqual(sorted(passwords), ["alice@example.org", "bob@example.org"])
        for password in passwords.values():
            self.assertEqual(output.count(password), 1)
        self.assertNotEqual(passwords["alice@example.org"], passwords["bob@example.org"])
        # what the store holds: ciphertext
        self.assertIn("Content-Type: application/pkcs7-mime; smime-type=enveloped-data", output)
        stored = (kept / "stored.eml").read_bytes()
        self.assertIn(b"application/pkcs7-mime", stored.partition(b"\r\n\r\n")[0])
        sent = (kept / "sent.eml").read_bytes()
        original = attachment_of(sent)
        assert original is not None
        self.assertNotIn(b"Only you can read this.", stored)
        self.assertNotIn(original[:64], stored)
        # what bob's clients received: the text, the attachment byte for byte, the report
        for name in ("received-imap.eml", "received-pop3.eml"):
            received = (kept / name).read_bytes()
            self.assertIn(b"Only you can read this.", received, name)
            self.assertEqual(attachment_of(received), original, name)
            self.assertIn(b"X-Gatekeeper-Security: decrypted=yes; signature=valid; signer=alice@example.org", received)
            self.assertIn(b"Summary: encrypted to you and decrypted; signature valid", received)
        digests = re.findall(r"sha256 ([0-9a-f]{64})", output)
        self.assertEqual(len(digests), 2)
        self.assertEqual(digests[0], digests[1])
        self.assertIn("identical: yes", output)
        # the settings for Thunderbird, on the ports the gateway used
        ports = dict(re.findall(r"(IMAP|POP3|SMTP), server 127\.0\.0\.1, port (\d+)", output))
        self.assertEqual(sorted(ports), ["IMAP", "POP3", "SMTP"])
        self.assertIn("SSL/TLS", output)
        self.assertIn("STARTTLS", output)
        self.assertIn(str(kept / "keys" / "ca" / "ca.pem"), output)
        # and a clean stop
        self.assertIn("The gateway stopped cleanly.", output)
        for port in ports.values():
            wait_for_port_closed(int(port))
        log = (kept / "gatekeeper.log").read_text()
        self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)
        for password in passwords.values():
            self.assertNotIn(password, log)
        self.assertFalse((work / "keys").exists())
        self.assertFalse((work / "mail").exists())

"""The inbound pipeline on messages made by real peers: ``openssl cms`` (3.0) and ``gpgsm`` (2.2).

The peers, their PKI and GNUPGHOME are those of the S/MIME interop tests (made once per
process). Each message gets ordinary header fields, and some a forged verdict, before
``reveal`` sees it, as it would arrive from upstream.
"""

from __future__ import annotations

from twisted.trial import unittest

from gatekeeper.inbound import Report, reveal
from gatekeeper.keys.identity import Identity
from tests.test_inbound import parts, report_text
from tests.test_smime_interop import ENTITY, PASSWORD, Peers, mime, multipart_signed, peers

HEADERS = (
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\nSubject: from a real peer\r\n"
    b"Message-ID: <peer@example.org>\r\n"
)
FORGED = b"X-Gatekeeper-Security: decrypted=yes; signature=valid; signer=ceo@example.org\r\n"


def with_headers(smime_output: bytes, extra: bytes = b"") -> bytes:
    """Peer output (its own MIME-Version and Content-Type, maybe bare LF) under a mail header."""
    return HEADERS + extra + smime_output


class InteropRevealTests(unittest.TestCase):
    def setUp(self) -> None:
        self.p: Peers = peers()
        self.p.write("entity.txt", ENTITY)
        self.bob = Identity("bob@example.org", (self.p.key("bob"),))

    def reveal(self, message: bytes) -> tuple[bytes, Report]:
        return reveal(self.bob, message, validator=self.p.validator)

    def openssl_sign(self, source: str = "entity.txt", *extra: str) -> bytes:
        return self.p.ssl(
            "-sign", "-in", self.p.path(source), "-signer", self.p.path("alice.pem"),
            "-inkey", self.p.path("alice.key"), *extra,
        ).stdout  # fmt: skip

    def test_openssl_signed_then_encrypted(self) -> None:
        self.p.write("signed.eml", self.openssl_sign("entity.txt", "-binary"))
        encrypted = self.p.ssl(
            "-encrypt", "-binary", "-aes-256-gcm", "-in", self.p.path("signed.eml"), self.p.path("bob.pem")
        ).stdout
        revealed, report = self.reveal(with_headers(encrypted))
        self.assertEqual(report.summary, "decrypted=yes; signature=valid; signer=alice@example.org")
        self.assertEqual(parts(revealed)[1][0], ENTITY)
        self.assertIn("AES-256-GCM", report_text(revealed))
        self.assertEqual(len(report.harvest), 1)

    def test_openssl_oaep_encryption(self) -> None:
        encrypted = self.p.ssl(
            "-encrypt", "-binary", "-aes256", "-in", self.p.path("entity.txt"),
            "-recip", self.p.path("bob.pem"), "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256",
        ).stdout  # fmt: skip
        revealed, report = self.reveal(with_headers(encrypted))
        self.assertEqual(report.summary, "decrypted=yes; signature=none")
        self.assertIn("RSA-OAEP", report_text(revealed))
        self.assertEqual(parts(revealed)[1][0], ENTITY)

    def test_openssl_signed_with_a_forged_verdict(self) -> None:
        signed = self.openssl_sign("entity.txt")
        revealed, report = self.reveal(with_headers(signed, FORGED))
        self.assertEqual(report.summary, "decrypted=no; signature=valid; signer=alice@example.org")
        head = revealed.partition(b"\r\n\r\n")[0]
        self.assertNotIn(b"ceo@example.org", head)
        self.assertEqual(report.removed, ("a forged X-Gatekeeper-Security header field",))
        self.assertEqual(parts(revealed)[1][0], ENTITY)

    def test_openssl_signed_by_someone_else_than_the_sender(self) -> None:
        signed = self.openssl_sign("entity.txt")
        revealed, report = self.reveal(with_headers(signed).replace(b"alice@example.org>", b"ceo@example.org>", 1))
        self.assertEqual((report.signature, report.harvest), ("mismatch", ()))
        self.assertIn("MISMATCH", report_text(revealed))

    def test_gpgsm_detached_signature(self) -> None:
        signature = self.p.gpg(
            ["--pinentry-mode", "loopback", "--passphrase-fd", "0", "-u", "alice@example.org",
             "--detach-sign", self.p.path("entity.txt")],
            PASSWORD.encode(),
        ).stdout  # fmt: skip
        revealed, report = self.reveal(with_headers(b"MIME-Version: 1.0\r\n" + multipart_signed(ENTITY, signature)))
        self.assertEqual(report.summary, "decrypted=no; signature=valid; signer=alice@example.org")
        self.assertEqual(parts(revealed)[1][0], ENTITY)

    def test_gpgsm_encrypted_for_bob_and_for_someone_else(self) -> None:
        for_bob = self.p.gpg(
            ["-r", "bob@example.org", "--cipher-algo", "AES256", "--encrypt", self.p.path("entity.txt")]
        ).stdout
        revealed, report = self.reveal(with_headers(b"MIME-Version: 1.0\r\n" + mime(for_bob, "enveloped-data")))
        self.assertEqual(report.summary, "decrypted=yes; signature=none")
        self.assertEqual(parts(revealed)[1][0], ENTITY)
        for_alice = self.p.gpg(["-r", "alice@example.org", "--encrypt", self.p.path("entity.txt")]).stdout
        original = with_headers(b"MIME-Version: 1.0\r\n" + mime(for_alice, "enveloped-data", FORGED))
        revealed, report = self.reveal(original)
        self.assertEqual(report.summary, "decrypted=failed; signature=none; error=not-for-me")
        # delivered unchanged: the encrypted part is there, byte for byte, for a client that can open it
        self.assertIn(original.partition(b"\r\n\r\n")[2], revealed)
        self.assertNotIn(b"ceo@example.org", revealed.partition(b"\r\n\r\n")[0])

"""The post-suite scan finds what it is there to find."""

from __future__ import annotations

import shutil
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.keys.store import FileKeyStore
from gatekeeper.testing.pki import make_key
from tests import scan

A_PASSWORD = "scan-test secret password"


class ScanTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.store = FileKeyStore(self.root / "keys")
        # What these tests plant must not be found again by the scan after the suite.
        self.addCleanup(shutil.rmtree, self.root)

    def test_clean_store_and_log(self) -> None:
        (self.root / "keys" / "ca.pem").write_bytes(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n...")
        (self.root / "test.log").write_text("login ok: alice@example.org\n")
        self.assertEqual(scan.scan(self.root), [])

    def test_finds_unencrypted_pem_der_and_pkcs12(self) -> None:
        key = make_key("p256")
        clear = (serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        (self.root / "keys" / "a.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, *clear))
        (self.root / "keys" / "users" / "b.der").write_bytes(key.private_bytes(serialization.Encoding.DER, *clear))
        (self.root / "keys" / "c.p12").write_bytes(
            serialization.pkcs12.serialize_key_and_certificates(None, key, None, None, serialization.NoEncryption())
        )
        findings = scan.scan(self.root)
        self.assertEqual(len(findings), 3, findings)
        self.assertTrue(any("PKCS#12" in f for f in findings))

    def test_finds_a_test_password_in_a_log(self) -> None:
        self.assertIn(A_PASSWORD, scan.test_passwords())
        (self.root / "0").mkdir()
        (self.root / "0" / "test.log").write_text(f"oops {A_PASSWORD}\n")
        [finding] = scan.scan(self.root)
        self.assertIn("test password", finding)
        self.assertNotIn(A_PASSWORD, finding)

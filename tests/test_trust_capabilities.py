"""Trust validation (chains, CRLs, key usage, addresses) and the capability memory."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.trial import unittest

from gatekeeper.capabilities import Capabilities, FileCapabilityStore, choose_algorithms
from gatekeeper.config import parse_config_text
from gatekeeper.testing.pki import TestPKI
from gatekeeper.trust import TrustStatus, TrustValidator, certificate_addresses, validator_from_config

ROOT = TestPKI("Trust Root", key_index=40)
SUB = ROOT.intermediate("Trust Sub", key_index=41)
USER = SUB.user("Eve@Example.ORG", key_index=40, email_in_subject=True)
EC_USER = SUB.user("ec@example.org", key_kind="p256", key_index=41)


class TrustTests(unittest.TestCase):
    def test_chain_through_intermediate(self) -> None:
        validator = TrustValidator([ROOT.certificate])
        without = validator.validate(USER.certificate, purpose="sign")
        self.assertEqual(without.status, TrustStatus.UNTRUSTED)
        result = validator.validate(USER.certificate, purpose="sign", extra_intermediates=[SUB.certificate])
        self.assertTrue(result.ok, result.reasons)
        self.assertEqual(result.chain, (USER.certificate, SUB.certificate, ROOT.certificate))
        configured = TrustValidator([ROOT.certificate], intermediates=[SUB.certificate])
        self.assertTrue(configured.validate(USER.certificate, purpose="encrypt", address="eve@example.org").ok)

    def test_revoked_by_local_crl(self) -> None:
        validator = TrustValidator(
            [ROOT.certificate], intermediates=[SUB.certificate], crls=[SUB.crl([USER.certificate])]
        )
        result = validator.validate(USER.certificate, purpose="sign")
        self.assertEqual(result.status, TrustStatus.REVOKED)
        forged = TrustValidator(
            [ROOT.certificate], intermediates=[SUB.certificate], crls=[ROOT.crl([USER.certificate])]
        )
        self.assertTrue(forged.validate(USER.certificate, purpose="sign").ok)  # another issuer's CRL does not count

    def test_time_and_purpose(self) -> None:
        validator = TrustValidator([ROOT.certificate], intermediates=[SUB.certificate])
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=800)
        self.assertEqual(validator.validate(USER.certificate, purpose="sign", at=later).status, TrustStatus.EXPIRED)
        signing_only = SUB.user(
            "s@example.org",
            key_index=42,
            key_usage=x509.KeyUsage(True, False, False, False, False, False, False, False, False),
        )
        self.assertEqual(validator.validate(signing_only.certificate, purpose="encrypt").status, TrustStatus.UNUSABLE)
        self.assertTrue(validator.validate(signing_only.certificate, purpose="sign").ok)
        self.assertTrue(validator.validate(EC_USER.certificate, purpose="encrypt").ok)
        self.assertEqual(validator.validate(SUB.certificate, purpose="sign").status, TrustStatus.UNUSABLE)

    def test_addresses(self) -> None:
        self.assertEqual(certificate_addresses(USER.certificate), ["Eve@example.org"])
        validator = TrustValidator([ROOT.certificate], intermediates=[SUB.certificate])
        self.assertTrue(validator.validate(USER.certificate, purpose="sign", address="EVE@EXAMPLE.org").ok)
        mismatch = validator.validate(USER.certificate, purpose="sign", address="adam@example.org")
        self.assertEqual(mismatch.status, TrustStatus.MISMATCH)
        self.assertTrue(mismatch.trusted is False and mismatch.reasons)
        self.assertEqual(mismatch.to_json()["status"], "mismatch")

    def test_from_config(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "root.pem").write_bytes(ROOT.cert_pem())
        (directory / "sub.crl").write_bytes(SUB.crl([USER.certificate]).public_bytes(Encoding.DER))
        config = parse_config_text('[trust]\nanchor_dirs = ["."]\ncrls = ["sub.crl"]\n', directory)
        validator = validator_from_config(config.trust, intermediates=[SUB.certificate])
        self.assertEqual(validator.anchors, (ROOT.certificate,))
        self.assertEqual(validator.validate(USER.certificate, purpose="sign").status, TrustStatus.REVOKED)


class CapabilityTests(unittest.TestCase):
    def test_file_store(self) -> None:
        store = FileCapabilityStore(Path(self.mktemp()))
        now = datetime.datetime.now(datetime.UTC)
        self.assertIsNone(store.get("bob@example.org"))
        self.assertTrue(store.remember("Bob@Example.org", ["aes256-gcm", "rsa-oaep"], now))
        self.assertFalse(store.remember("bob@example.org", ["aes128-cbc"], now - datetime.timedelta(days=1)))
        known = store.get("BOB@example.org")
        assert known is not None
        self.assertEqual(known.algorithms, ("aes256-gcm", "rsa-oaep"))
        files = list(store.directory.iterdir())
        self.assertEqual(len(files), 1)
        self.assertNotIn("bob", files[0].name)
        self.assertEqual(stat.S_IMODE(os.stat(files[0]).st_mode), 0o600)
        files[0].write_text("{broken")
        self.assertIsNone(store.get("bob@example.org"))

    def test_choice(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        gcm = Capabilities("a@example.org", ("aes256-gcm", "aes256-cbc", "rsa-oaep"), now)
        cbc = Capabilities("b@example.org", ("aes256-cbc", "aes128-cbc"), now)
        self.assertEqual(
            (choose_algorithms([gcm]).cipher, choose_algorithms([gcm]).key_transport), ("aes256-gcm", "rsa-oaep")
        )
        both = choose_algorithms([gcm, cbc])
        self.assertEqual((both.cipher, both.key_transport), ("aes256-cbc", "rsa-pkcs1v15"))
        unknown = choose_algorithms([gcm, None], oaep=True)
        self.assertEqual((unknown.cipher, unknown.key_transport), ("aes256-cbc", "rsa-oaep"))

"""Trust validation (chains, CRLs, key usage, addresses) and the capability memory."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path
from unittest import mock

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.trial import unittest

from gatekeeper import trust
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


class PathMemoTests(unittest.TestCase):
    """A validator builds each certification path once; every other check runs on every call."""

    def test_a_path_is_built_once_and_dates_are_still_checked(self) -> None:
        validator = TrustValidator([ROOT.certificate], intermediates=[SUB.certificate])
        with mock.patch.object(trust, "_issuer_candidates", wraps=trust._issuer_candidates) as candidates:
            first = validator.validate(USER.certificate, purpose="sign")
            built = candidates.call_count
            copy = x509.load_der_x509_certificate(USER.certificate.public_bytes(Encoding.DER))
            again = validator.validate(copy, purpose="sign", address="eve@example.org")
            later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=800)
            expired = validator.validate(copy, purpose="sign", at=later)
        self.assertEqual(built, 2)  # the user's issuer, then the intermediate's
        self.assertEqual(candidates.call_count, built)
        self.assertTrue(first.ok and again.ok, (first.reasons, again.reasons))
        self.assertEqual(again.chain, (USER.certificate, SUB.certificate, ROOT.certificate))
        self.assertEqual(expired.status, TrustStatus.EXPIRED)

    def test_a_path_not_found_is_remembered_for_that_pool_only(self) -> None:
        validator = TrustValidator([ROOT.certificate])
        self.assertEqual(validator.validate(USER.certificate, purpose="sign").status, TrustStatus.UNTRUSTED)
        with_sub = validator.validate(USER.certificate, purpose="sign", extra_intermediates=[SUB.certificate])
        self.assertTrue(with_sub.ok, with_sub.reasons)

    def test_the_memo_is_bounded(self) -> None:
        validator = TrustValidator([ROOT.certificate], intermediates=[SUB.certificate])
        users = [SUB.user(f"u{n}@example.org", key_kind="p256", key_index=41) for n in range(5)]
        with mock.patch.object(trust, "PATH_MEMO_SIZE", 3):
            for user in users:
                self.assertTrue(validator.validate(user.certificate, purpose="sign").ok)
        self.assertEqual(len(validator._paths), 3)
        self.assertEqual({key[0] for key in validator._paths}, {u.certificate for u in users[2:]})


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

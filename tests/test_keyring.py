"""Tests for the local key ring and its key source (files only, no sockets)."""

from __future__ import annotations

import datetime
import json
import os
import stat
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gatekeeper.errors import GatekeeperError, InvalidAddress, PermanentError
from gatekeeper.interfaces import IKeySource, IKeyStore, StoredKey, StoredUser
from gatekeeper.keys.keyring import (
    CertificateFormatError,
    KeyRing,
    KeyRingSource,
    certificate_addresses,
    fingerprint,
    load_certificates,
)
from gatekeeper.testing.pki import TestPKI

PKI = TestPKI("Keyring Test CA")
SUB = PKI.intermediate("Keyring Sub CA")
ALICE = PKI.user("Alice@Example.org")
BOB = SUB.user("bob@example.org", key_index=1)
CAROL = PKI.user("carol@example.net", san=False, email_in_subject=True, key_index=2)


@implementer(IKeyStore)
class MemoryKeyStore:
    """Just enough of a key store: users with a current certificate."""

    def __init__(self, users: dict[str, x509.Certificate]) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.users = {
            address.casefold(): StoredUser(address, (StoredKey("k1", cert, b"sealed", now),), now)
            for address, cert in users.items()
        }
        self.asked: list[str] = []

    def list_users(self) -> list[str]:
        return sorted(user.address for user in self.users.values())

    def get_user(self, address: str) -> StoredUser | None:
        self.asked.append(address)
        return self.users.get(address.casefold())

    def put_user(self, user: StoredUser) -> None:
        raise NotImplementedError

    def delete_user(self, address: str) -> None:
        raise NotImplementedError


class KeyRingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="gk-keyring-"))
        self.addCleanup(lambda: __import__("shutil").rmtree(self.base, ignore_errors=True))
        self.root = self.base / "ring"
        self.ring = KeyRing(self.root)

    def test_import_pem_and_find_case_insensitive(self) -> None:
        imported = self.ring.import_certificates(ALICE.cert_pem())
        self.assertEqual(imported, [ALICE.certificate])
        self.assertEqual(self.ring.find("alice@EXAMPLE.ORG"), [ALICE.certificate])
        self.assertEqual(self.ring.find("ALICE@example.org"), [ALICE.certificate])
        self.assertEqual(self.ring.find("bob@example.org"), [])

    def test_import_der(self) -> None:
        self.ring.import_certificates(BOB.cert_der())
        self.assertEqual(self.ring.certificates(), [BOB.certificate])

    def test_import_pkcs7_bundle_keeps_chain(self) -> None:
        bundle = pkcs7.serialize_certificates([BOB.certificate, SUB.certificate], serialization.Encoding.DER)
        imported = self.ring.import_certificates(bundle)
        self.assertEqual(set(map(fingerprint, imported)), {fingerprint(BOB.certificate), fingerprint(SUB.certificate)})
        (entry,) = self.ring.find_entries("bob@example.org")
        self.assertEqual(entry.chain, (SUB.certificate,))
        self.assertEqual(entry.origin, "imported")

    def test_import_pem_pkcs7_and_multiple_pem(self) -> None:
        bundle = pkcs7.serialize_certificates([ALICE.certificate], serialization.Encoding.PEM)
        self.assertEqual(self.ring.import_certificates(bundle), [ALICE.certificate])
        both = BOB.cert_pem() + CAROL.cert_pem()
        self.assertEqual(len(self.ring.import_certificates(both)), 2)
        self.assertEqual(len(self.ring.certificates()), 3)

    def test_subject_email_address_is_found(self) -> None:
        self.ring.import_certificates(CAROL.cert_pem())
        self.assertEqual(self.ring.find("Carol@example.net"), [CAROL.certificate])
        self.assertEqual(certificate_addresses(CAROL.certificate), ("carol@example.net",))

    def test_bad_input_is_a_clear_permanent_error(self) -> None:
        for data in (b"", b"   \n", b"hello world", b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"):
            error = self.assertRaises(CertificateFormatError, self.ring.import_certificates, data)
            self.assertIsInstance(error, PermanentError)
            self.assertIsInstance(error, GatekeeperError)
            self.assertTrue(str(error))
        error = self.assertRaises(CertificateFormatError, load_certificates, b"-----BEGIN PUBLIC KEY-----\n")
        self.assertIn("no CERTIFICATE", str(error))
        self.assertFalse(self.root.exists() and list(self.root.iterdir()))

    def test_invalid_address_raises(self) -> None:
        self.assertRaises(InvalidAddress, self.ring.find, "not an address")

    def test_remove(self) -> None:
        self.ring.import_certificates(ALICE.cert_pem())
        fp = fingerprint(ALICE.certificate)
        self.assertFalse(self.ring.remove("00" * 32))
        self.assertFalse(self.ring.remove("../../etc/passwd"))
        colons = ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)).upper()
        self.assertTrue(self.ring.remove(colons))
        self.assertEqual(self.ring.find("alice@example.org"), [])
        self.assertFalse(self.ring.remove(fp))

    def test_permissions_and_no_temporary_files(self) -> None:
        self.ring.import_certificates(ALICE.cert_pem() + BOB.cert_pem())
        self.assertEqual(stat.S_IMODE(self.root.stat().st_mode), 0o700)
        names = sorted(p.name for p in self.root.iterdir())
        self.assertEqual(len(names), 2)
        for path in self.root.iterdir():
            self.assertTrue(path.name.endswith(".json"))
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)

    def test_harvest_records_chain_and_capabilities(self) -> None:
        entry = self.ring.harvest(BOB.certificate, chain=(SUB.certificate,), capabilities=b"\x30\x00")
        self.assertEqual(entry.origin, "harvested")
        again = KeyRing(self.root).find_entries("bob@example.org")
        self.assertEqual([e.certificate for e in again], [BOB.certificate])
        self.assertEqual(again[0].chain, (SUB.certificate,))
        self.assertEqual(again[0].capabilities, b"\x30\x00")
        # A later message updates the capabilities but keeps origin and date.
        later = self.ring.harvest(BOB.certificate, capabilities=b"\x30\x03\x06\x01\x01")
        self.assertEqual(later.added, entry.added)
        self.assertEqual(later.chain, (SUB.certificate,))
        self.assertEqual(later.capabilities, b"\x30\x03\x06\x01\x01")

    def test_harvest_keeps_imported_origin(self) -> None:
        self.ring.import_certificates(ALICE.cert_pem())
        entry = self.ring.harvest(ALICE.certificate)
        self.assertEqual(entry.origin, "imported")

    def test_other_writer_is_seen(self) -> None:
        """The daemon's key ring sees what the admin CLI (another KeyRing object) wrote."""
        self.assertEqual(self.ring.find("alice@example.org"), [])
        KeyRing(self.root).import_certificates(ALICE.cert_pem())
        self.assertEqual(self.ring.find("alice@example.org"), [ALICE.certificate])
        KeyRing(self.root).remove(fingerprint(ALICE.certificate))
        self.assertEqual(self.ring.find("alice@example.org"), [])

    def test_damaged_file_does_not_hide_others(self) -> None:
        self.ring.import_certificates(ALICE.cert_pem())
        (self.root / ("ab" * 32 + ".json")).write_text("{not json")
        self.assertEqual(KeyRing(self.root).certificates(), [ALICE.certificate])

    def test_stored_format_is_json_with_pem(self) -> None:
        self.ring.import_certificates(ALICE.cert_pem())
        document = json.loads((self.root / f"{fingerprint(ALICE.certificate)}.json").read_text())
        self.assertEqual(document["origin"], "imported")
        self.assertTrue(document["certificate"].startswith("-----BEGIN CERTIFICATE-----"))

    def test_missing_root_is_empty(self) -> None:
        self.assertEqual(KeyRing(self.base / "nowhere").certificates(), [])
        self.assertFalse(os.path.exists(self.base / "nowhere"))


class KeyRingSourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="gk-keyring-"))
        self.addCleanup(lambda: __import__("shutil").rmtree(base, ignore_errors=True))
        self.ring = KeyRing(base)
        self.store = MemoryKeyStore({"dave@example.org": PKI.user("dave@example.org", key_index=3).certificate})
        self.source = KeyRingSource(self.ring, self.store)

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IKeySource, self.source))
        self.assertEqual(self.source.name, "keyring")

    def test_own_users_current_certificate(self) -> None:
        found = self.successResultOf(self.source.find("DAVE@example.org"))
        self.assertEqual(found, [self.store.users["dave@example.org"].current.certificate])
        self.assertEqual(self.source.users(), ["dave@example.org"])

    def test_entries_with_chain(self) -> None:
        self.ring.harvest(BOB.certificate, chain=(SUB.certificate,))
        found = self.successResultOf(self.source.find("bob@example.org"))
        self.assertEqual(found, [BOB.certificate, SUB.certificate])

    def test_not_found_is_empty(self) -> None:
        self.assertEqual(self.successResultOf(self.source.find("nobody@example.org")), [])

    def test_invalid_address_fails_the_deferred(self) -> None:
        self.failureResultOf(self.source.find("nope"), InvalidAddress)

"""Tests for gatekeeper.keys.pkcs12: our MAC-less PBES2 PKCS#12 files and their interoperability."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from cryptography.hazmat.primitives.serialization import pkcs12 as crypto_pkcs12
from pyasn1.codec.der import decoder
from pyasn1.type import char, univ
from pyasn1_modules import rfc5652, rfc5958, rfc7292, rfc8018
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.errors import BadPassword, KeyStoreError
from gatekeeper.keys import pkcs12
from gatekeeper.keys.identity import PrivateKey
from gatekeeper.testing.pki import Issued, TestPKI, make_key
from tests.keys_support import FAST_ITERATIONS, openssl, write_encrypted_key, write_pem

PASSWORD = "correct hörse battery"  # non-ASCII on purpose: PBES2 passwords are UTF-8

_pki: TestPKI | None = None


def pki() -> TestPKI:
    global _pki
    if _pki is None:
        _pki = TestPKI("PKCS12 Test CA", key_kind="p256", key_index=7)
    return _pki


def sealed_for(issued: Issued, password: str = PASSWORD, iterations: int = FAST_ITERATIONS) -> bytes:
    parameters = pkcs12.new_kdf_parameters(iterations)
    return pkcs12.seal(
        issued.key,
        issued.certificate,
        issued.chain,
        derived_key=pkcs12.derive_key(password, parameters.salt, parameters.iterations),
        salt=parameters.salt,
        iterations=parameters.iterations,
        friendly_name="alice@example.org",
    )


def same_key(left: PrivateKey, right: PrivateKey) -> bool:
    return left.private_numbers() == right.private_numbers()  # type: ignore[comparison-overlap]


class DeriveKeyTests(SynchronousTestCase):
    def test_pbkdf2_hmac_sha256_of_utf8(self) -> None:
        salt = b"s" * 16
        expected = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode("utf-8"), salt, 1000, 32)
        self.assertEqual(pkcs12.derive_key(PASSWORD, salt, 1000), expected)

    def test_salt_and_iterations_matter(self) -> None:
        base = pkcs12.derive_key("pw", b"a" * 16, 1000)
        self.assertNotEqual(base, pkcs12.derive_key("pw", b"b" * 16, 1000))
        self.assertNotEqual(base, pkcs12.derive_key("pw", b"a" * 16, 1001))

    def test_bad_parameters(self) -> None:
        self.assertRaises(KeyStoreError, pkcs12.derive_key, "pw", b"short", 1000)
        self.assertRaises(KeyStoreError, pkcs12.derive_key, "pw", b"a" * 16, 0)
        self.assertRaises(KeyStoreError, pkcs12.derive_key, "pw", b"a" * 16, pkcs12.MAX_ITERATIONS + 1)
        self.assertRaises(TypeError, pkcs12.derive_key, b"pw", b"a" * 16, 1000)

    def test_new_parameters_are_random(self) -> None:
        first, second = pkcs12.new_kdf_parameters(600_000), pkcs12.new_kdf_parameters(600_000)
        self.assertEqual(len(first.salt), 16)
        self.assertNotEqual(first.salt, second.salt)
        self.assertEqual(first.iterations, 600_000)


class RoundTripTests(SynchronousTestCase):
    def check_round_trip(self, kind: str) -> None:
        issued = pki().user("alice@example.org", key_kind=kind)
        sealed = sealed_for(issued)
        parameters = pkcs12.kdf_parameters(sealed)
        self.assertEqual(parameters.iterations, FAST_ITERATIONS)
        unlocked = pkcs12.unseal(sealed, pkcs12.derive_key(PASSWORD, parameters.salt, parameters.iterations))
        self.assertTrue(same_key(unlocked.private_key, issued.key))
        self.assertEqual(unlocked.certificate, issued.certificate)
        self.assertEqual(unlocked.chain, (pki().certificate,))
        self.assertEqual(unlocked.key_id, pkcs12.key_id_for(issued.certificate))

    def test_p256(self) -> None:
        self.check_round_trip("p256")

    def test_p384(self) -> None:
        self.check_round_trip("p384")

    def test_rsa2048(self) -> None:
        self.check_round_trip("rsa2048")

    def test_wrong_key_is_bad_password(self) -> None:
        # Many random keys: some decrypt to valid padding by chance, and must still fail.
        sealed = sealed_for(pki().user("alice@example.org", key_kind="p256"))
        for _ in range(300):
            self.assertRaises(BadPassword, pkcs12.unseal, sealed, os.urandom(32))

    def test_wrong_password(self) -> None:
        sealed = sealed_for(pki().user("alice@example.org", key_kind="rsa2048"))
        parameters = pkcs12.kdf_parameters(sealed)
        derived = pkcs12.derive_key("wrong", parameters.salt, parameters.iterations)
        self.assertRaises(BadPassword, pkcs12.unseal, sealed, derived)

    def test_messages_carry_no_secrets(self) -> None:
        sealed = sealed_for(pki().user("alice@example.org", key_kind="p256"))
        error = self.assertRaises(BadPassword, pkcs12.unseal, sealed, b"\x01" * 32)
        self.assertNotIn(PASSWORD, str(error))
        self.assertNotIn("01" * 8, str(error))


class FormatTests(SynchronousTestCase):
    """The file's structure: no MAC, PBES2/PBKDF2-SHA256/AES-256-CBC, clear certificates."""

    def setUp(self) -> None:
        self.issued = pki().user("alice@example.org", key_kind="p256")
        self.sealed = sealed_for(self.issued, iterations=4321)
        self.pfx, rest = decoder.decode(self.sealed, asn1Spec=rfc7292.PFX())
        self.assertEqual(rest, b"")

    def safes(self) -> list[rfc7292.SafeContents]:
        content, _ = decoder.decode(bytes(self.pfx["authSafe"]["content"]), asn1Spec=univ.OctetString())
        authenticated, _ = decoder.decode(bytes(content), asn1Spec=rfc7292.AuthenticatedSafe())
        result = []
        for info in authenticated:
            self.assertEqual(info["contentType"], rfc5652.id_data)  # nothing encrypted but the key
            payload, _ = decoder.decode(bytes(info["content"]), asn1Spec=univ.OctetString())
            contents, _ = decoder.decode(bytes(payload), asn1Spec=rfc7292.SafeContents())
            result.append(contents)
        return result

    def test_no_mac(self) -> None:
        self.assertEqual(int(self.pfx["version"]), 3)
        self.assertFalse(self.pfx["macData"].isValue)

    def test_key_bag_is_pbes2_sha256_aes256(self) -> None:
        key_bags = [bag for safe in self.safes() for bag in safe if bag["bagId"] == rfc7292.id_pkcs8ShroudedKeyBag]
        self.assertEqual(len(key_bags), 1)
        shrouded, _ = decoder.decode(bytes(key_bags[0]["bagValue"]), asn1Spec=rfc5958.EncryptedPrivateKeyInfo())
        algorithm = shrouded["encryptionAlgorithm"]
        self.assertEqual(algorithm["algorithm"], rfc8018.id_PBES2)
        params, _ = decoder.decode(bytes(algorithm["parameters"]), asn1Spec=rfc8018.PBES2_params())
        self.assertEqual(params["keyDerivationFunc"]["algorithm"], rfc8018.id_PBKDF2)
        self.assertEqual(params["encryptionScheme"]["algorithm"], rfc8018.aes256_CBC_PAD)
        kdf, _ = decoder.decode(bytes(params["keyDerivationFunc"]["parameters"]), asn1Spec=rfc8018.PBKDF2_params())
        self.assertEqual(int(kdf["iterationCount"]), 4321)
        self.assertEqual(len(kdf["salt"]["specified"]), 16)
        self.assertEqual(kdf["prf"]["algorithm"], rfc8018.id_hmacWithSHA256)
        self.assertEqual(pkcs12.kdf_parameters(self.sealed).salt, bytes(kdf["salt"]["specified"]))

    def test_certificates_in_clear_with_attributes(self) -> None:
        cert_bags = [bag for safe in self.safes() for bag in safe if bag["bagId"] == rfc7292.id_certBag]
        self.assertEqual(len(cert_bags), 2)  # the user's and the CA's
        attributes = {attribute["attrType"]: attribute["attrValues"][0] for attribute in cert_bags[0]["bagAttributes"]}
        name, _ = decoder.decode(bytes(attributes[rfc7292.pkcs_9_at_friendlyName]), asn1Spec=char.BMPString())
        self.assertEqual(str(name), "alice@example.org")
        self.assertIn(rfc7292.pkcs_9_at_localKeyId, attributes)
        self.assertIn(self.issued.cert_der(), self.sealed)

    def test_two_seals_differ(self) -> None:
        self.assertNotEqual(sealed_for(self.issued), sealed_for(self.issued))  # salt and IV are random


class DamageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.issued = pki().user("alice@example.org", key_kind="p256")
        self.sealed = sealed_for(self.issued)
        parameters = pkcs12.kdf_parameters(self.sealed)
        self.derived = pkcs12.derive_key(PASSWORD, parameters.salt, parameters.iterations)

    def test_garbage(self) -> None:
        for data in (b"", b"not a pfx", b"\x30\x03\x02\x01\x03", self.sealed[:-40]):
            self.assertRaises(KeyStoreError, pkcs12.kdf_parameters, data)
            self.assertRaises(KeyStoreError, pkcs12.unseal, data, self.derived)

    def test_trailing_data(self) -> None:
        self.assertRaises(KeyStoreError, pkcs12.unseal, self.sealed + b"\0", self.derived)

    def test_altered_ciphertext(self) -> None:
        # PBES2-CBC has no integrity check: what catches an altered key is the parse and
        # the consistency check against the certificate.
        (key_bag,) = [bag for bag in pkcs12._parse(self.sealed).bags if bag.shrouded_key is not None]
        assert key_bag.shrouded_key is not None
        ciphertext = key_bag.shrouded_key.ciphertext
        for offset in (0, 40, len(ciphertext) // 2, len(ciphertext) - 20):
            altered = bytearray(self.sealed)
            altered[self.sealed.index(ciphertext) + offset] ^= 0x40
            self.assertRaises(BadPassword, pkcs12.unseal, bytes(altered), self.derived)

    def test_key_of_another_certificate(self) -> None:
        other = pki().user("bob@example.org", key_kind="p256", key_index=1)
        self.assertRaises(
            BadPassword,
            pkcs12.seal,
            other.key,
            self.issued.certificate,
            (),
            derived_key=self.derived,
            salt=b"s" * 16,
            iterations=1000,
            friendly_name="x",
        )

    def test_refuses_absurd_iterations(self) -> None:
        self.assertRaises(
            KeyStoreError,
            pkcs12.seal,
            self.issued.key,
            self.issued.certificate,
            (),
            derived_key=self.derived,
            salt=b"s" * 16,
            iterations=pkcs12.MAX_ITERATIONS + 1,
            friendly_name="x",
        )

    def test_derived_key_length(self) -> None:
        self.assertRaises(KeyStoreError, pkcs12.unseal, self.sealed, self.derived[:16])


class KeyConsistencyTests(SynchronousTestCase):
    """check_key_matches stands in for the RSA validation skipped at load."""

    def test_rsa_crt_fault_detected(self) -> None:
        issued = pki().user("alice@example.org", key_kind="rsa2048")
        assert isinstance(issued.key, rsa.RSAPrivateKey)
        numbers = issued.key.private_numbers()
        faulty = rsa.RSAPrivateNumbers(
            numbers.p, numbers.q, numbers.d, numbers.dmp1 ^ 2, numbers.dmq1, numbers.iqmp, numbers.public_numbers
        ).private_key(unsafe_skip_rsa_key_validation=True)
        self.assertRaises(BadPassword, pkcs12.check_key_matches, faulty, issued.certificate)
        pkcs12.check_key_matches(issued.key, issued.certificate)

    def test_ec_other_curve_or_key(self) -> None:
        issued = pki().user("alice@example.org", key_kind="p256")
        self.assertRaises(BadPassword, pkcs12.check_key_matches, make_key("p384", index=77), issued.certificate)
        self.assertRaises(BadPassword, pkcs12.check_key_matches, make_key("p256", index=78), issued.certificate)
        self.assertRaises(BadPassword, pkcs12.check_key_matches, make_key("rsa2048"), issued.certificate)


class InteropTests(SynchronousTestCase):
    """OpenSSL 3.0 and cryptography read our files; we read OpenSSL's."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.password_file = self.dir / "password"
        self.password_file.write_text(PASSWORD, encoding="utf-8")

    def test_openssl_reads_ours_without_nomacver(self) -> None:
        for kind in ("p256", "rsa2048"):
            issued = pki().user("alice@example.org", key_kind=kind)
            path = self.dir / f"alice-{kind}.p12"
            path.write_bytes(sealed_for(issued))
            result = openssl(["pkcs12", "-in", str(path), "-passin", f"file:{self.password_file}", "-nodes"])
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(b"MAC is absent", result.stderr)  # a warning, not an error, in OpenSSL 3.0
            key = serialization.load_pem_private_key(result.stdout, None)
            assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
            self.assertTrue(same_key(key, issued.key))
            self.assertEqual(result.stdout.count(b"BEGIN CERTIFICATE"), 2)
            self.assertIn(b"friendlyName: alice@example.org", result.stdout)

    def test_openssl_wrong_password_fails(self) -> None:
        path = self.dir / "alice.p12"
        path.write_bytes(sealed_for(pki().user("alice@example.org", key_kind="p256")))
        result = openssl(["pkcs12", "-in", str(path), "-passin", "pass:wrong", "-nodes", "-nomacver"])
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn(b"PRIVATE KEY", result.stdout)

    def test_cryptography_reads_ours(self) -> None:
        issued = pki().user("alice@example.org", key_kind="rsa2048")
        loaded = crypto_pkcs12.load_pkcs12(sealed_for(issued), PASSWORD.encode("utf-8"))
        assert loaded.key is not None and loaded.cert is not None
        self.assertTrue(same_key(loaded.key, issued.key))  # type: ignore[arg-type]
        self.assertEqual(loaded.cert.certificate, issued.certificate)
        self.assertEqual(loaded.cert.friendly_name, b"alice@example.org")
        self.assertEqual([c.certificate for c in loaded.additional_certs], [pki().certificate])

    def export_with_openssl(self, issued: Issued, *options: str) -> bytes:
        certificate = write_pem(self.dir / "cert.pem", issued.certificate)
        chain = write_pem(self.dir / "chain.pem", *issued.chain)
        key = write_encrypted_key(self.dir / "key.pem", issued.key, "input key passphrase")
        # Read from stdout: one of the variants holds an unencrypted key, never written to disk.
        arguments = ["pkcs12", "-export", "-in", str(certificate), "-certfile", str(chain), "-inkey", str(key)]
        arguments += ["-passin", "pass:input key passphrase", "-passout", f"file:{self.password_file}", *options]
        result = openssl(arguments)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_unseal_reads_openssl_export_with_clear_certificates(self) -> None:
        issued = pki().user("alice@example.org", key_kind="p256")
        exported = self.export_with_openssl(issued, "-certpbe", "NONE", "-keypbe", "AES-256-CBC", "-iter", "5000")
        parameters = pkcs12.kdf_parameters(exported)  # the MAC that openssl wrote is ignored
        self.assertEqual(parameters.iterations, 5000)
        unlocked = pkcs12.unseal(exported, pkcs12.derive_key(PASSWORD, parameters.salt, parameters.iterations))
        self.assertTrue(same_key(unlocked.private_key, issued.key))
        self.assertEqual(unlocked.certificate, issued.certificate)
        self.assertEqual(unlocked.chain, (pki().certificate,))

    def test_open_reads_default_openssl_export(self) -> None:
        issued = pki().user("alice@example.org", key_kind="rsa2048")
        exported = self.export_with_openssl(issued)  # OpenSSL 3 default: PBES2/AES-256 for key and certificates
        unlocked = pkcs12.open_pkcs12(exported, PASSWORD)
        self.assertTrue(same_key(unlocked.private_key, issued.key))
        self.assertEqual(unlocked.certificate, issued.certificate)
        self.assertEqual(unlocked.chain, (pki().certificate,))
        self.assertRaises(BadPassword, pkcs12.open_pkcs12, exported, "wrong")
        # The derived-key path cannot open parts sealed under another salt, and says so.
        parameters = pkcs12.kdf_parameters(exported)
        derived = pkcs12.derive_key(PASSWORD, parameters.salt, parameters.iterations)
        self.assertRaises(KeyStoreError, pkcs12.unseal, exported, derived)

    def test_open_reads_legacy_3des_export(self) -> None:
        issued = pki().user("alice@example.org", key_kind="p256")
        exported = self.export_with_openssl(
            issued, "-keypbe", "PBE-SHA1-3DES", "-certpbe", "PBE-SHA1-3DES", "-macalg", "sha1"
        )
        unlocked = pkcs12.open_pkcs12(exported, PASSWORD)
        self.assertTrue(same_key(unlocked.private_key, issued.key))
        self.assertRaises(BadPassword, pkcs12.open_pkcs12, exported, "wrong")
        self.assertRaises(KeyStoreError, pkcs12.kdf_parameters, exported)

    def test_refuses_unencrypted_key_bag(self) -> None:
        issued = pki().user("alice@example.org", key_kind="p256")
        exported = self.export_with_openssl(issued, "-keypbe", "NONE", "-certpbe", "NONE")
        self.assertRaises(KeyStoreError, pkcs12.open_pkcs12, exported, PASSWORD)
        self.assertRaises(KeyStoreError, pkcs12.kdf_parameters, exported)


def legacy_file(issued: Issued, password: str, rounds: int = 2048) -> bytes:
    """A PBE-SHA1-3DES PKCS#12 file with fresh random salts, as cryptography writes it."""
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(rounds)
        .key_cert_algorithm(crypto_pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
        .hmac_hash(hashes.SHA1())  # noqa: S303 - the legacy form under test
        .build(password.encode("utf-8"))
    )
    return crypto_pkcs12.serialize_key_and_certificates(b"k", issued.key, issued.certificate, None, encryption)


def key_bag(data: bytes) -> rfc5958.EncryptedPrivateKeyInfo:
    """The shrouded key bag of a PKCS#12 file."""
    for content_type, payload in pkcs12._authenticated_safe(data):
        if content_type == rfc5652.id_data:
            contents, _ = decoder.decode(payload, asn1Spec=rfc7292.SafeContents())
            for bag in contents:
                if bag["bagId"] == rfc7292.id_pkcs8ShroudedKeyBag:
                    value = bytes(bag["bagValue"])
                    return decoder.decode(value, asn1Spec=rfc5958.EncryptedPrivateKeyInfo())[0]
    raise AssertionError("no key bag")


class GnuPG22Tests(SynchronousTestCase):
    """The legacy files GnuPG 2.2 cannot open, found from their salts (gpgsm itself: test_smime_interop)."""

    def setUp(self) -> None:
        self.issued = pki().user("alice@example.org", key_kind="p256")

    def test_the_derivation_is_rfc_7292(self) -> None:
        password = "pässword 1"  # non-ASCII: the derivation takes it as a BMPString
        shrouded = key_bag(legacy_file(self.issued, password))
        params, _ = decoder.decode(
            bytes(shrouded["encryptionAlgorithm"]["parameters"]), asn1Spec=rfc7292.Pkcs_12PbeParams()
        )
        salt, iterations = bytes(params["salt"]), int(params["iterations"])
        key, _ = pkcs12.pkcs12_kdf(password, salt, iterations, 1, 24)
        iv, _ = pkcs12.pkcs12_kdf(password, salt, iterations, 2, 8)
        decryptor = Cipher(TripleDES(key), modes.CBC(iv)).decryptor()
        padded = decryptor.update(bytes(shrouded["encryptedData"])) + decryptor.finalize()
        unpadder = padding.PKCS7(64).unpadder()
        loaded = serialization.load_der_private_key(unpadder.update(padded) + unpadder.finalize(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        self.assertTrue(same_key(loaded, self.issued.key))

    def test_some_salts_trip_gnupg_and_most_do_not(self) -> None:
        results = [pkcs12.trips_gnupg_22(legacy_file(self.issued, PASSWORD), PASSWORD) for _ in range(400)]
        self.assertTrue(any(results), "no file of 400 would trip GnuPG 2.2 (about 6 expected)")
        self.assertLess(sum(results), 40)

    def test_files_of_today_are_not_affected(self) -> None:
        self.assertFalse(pkcs12.trips_gnupg_22(sealed_for(self.issued), PASSWORD))

    def test_only_files_like_ours(self) -> None:
        with self.assertRaises(KeyStoreError):  # a Python loop of a million SHA-1 rounds: refused
            pkcs12.trips_gnupg_22(legacy_file(self.issued, PASSWORD, rounds=1_000_000), PASSWORD)
        with self.assertRaises(KeyStoreError):
            pkcs12.trips_gnupg_22(b"not a PKCS#12 file", PASSWORD)

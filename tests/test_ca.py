"""Tests for gatekeeper.keys.ca: the built-in CA, checked with ``openssl verify``."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.config import Config, parse_config_text
from gatekeeper.errors import BadPassword, ConfigError, KeyStoreError
from gatekeeper.keys import ca as ca_module
from gatekeeper.keys.ca import (
    CertificateAuthority,
    initialize,
    load_tls_private_key,
    open_ca,
    read_ca_passphrase,
)
from gatekeeper.testing.pki import TestPKI, make_key
from tests.keys_support import CA_PASSPHRASE, FAST_ITERATIONS, make_ca, openssl, write_pem


def openssl_verify(ca: CertificateAuthority, certificate: x509.Certificate, *options: str) -> tuple[int, str]:
    # Next to the key store, not in it: the store's own files are checked for their modes.
    work = ca.directory.parent.parent / "verify"
    work.mkdir(exist_ok=True)
    path = write_pem(work / f"cert-{certificate.serial_number:x}.pem", certificate)
    result = openssl(["verify", "-CAfile", str(ca.certificate_path), *options, str(path)])
    return result.returncode, (result.stdout + result.stderr).decode()


class CreateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.ca = make_ca(self.root / "ca")

    def test_files_and_modes(self) -> None:
        names = sorted(p.name for p in self.ca.directory.iterdir())
        self.assertEqual(names, [".lock", "ca.p12", "ca.pem", "crl.pem", "index.json"])
        self.assertEqual(stat.S_IMODE(self.ca.directory.stat().st_mode), 0o700)
        for path in self.ca.directory.iterdir():
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600, path.name)

    def test_key_sealed_at_rest(self) -> None:
        sealed = (self.ca.directory / "ca.p12").read_bytes()
        self.assertNotIn(b"PRIVATE KEY", sealed)
        key_der = self.ca._key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        for path in self.ca.directory.iterdir():
            self.assertNotIn(key_der, path.read_bytes())

    def test_load(self) -> None:
        loaded = CertificateAuthority.load(self.ca.directory, CA_PASSPHRASE)
        self.assertEqual(loaded.certificate, self.ca.certificate)
        self.assertRaises(BadPassword, CertificateAuthority.load, self.ca.directory, "wrong")
        self.assertRaises(KeyStoreError, CertificateAuthority.load, self.root / "nothing", CA_PASSPHRASE)

    def test_not_twice(self) -> None:
        self.assertRaises(KeyStoreError, make_ca, self.ca.directory)

    def test_ca_certificate(self) -> None:
        certificate = self.ca.certificate
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.key_cert_sign and usage.crl_sign)
        self.assertEqual(certificate.issuer, certificate.subject)


class IssueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.ca = make_ca(self.root / "ca")

    def issue(self, kind: str, address: str = "alice@example.org", days: int = 730) -> x509.Certificate:
        key = make_key(kind, index=40)
        assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        return self.ca.issue_user_certificate(address, key.public_key(), days=days)

    def check_profile(self, certificate: x509.Certificate, *, rsa_key: bool) -> None:
        extensions = certificate.extensions
        usage = extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(usage.critical)
        self.assertTrue(usage.value.digital_signature)
        self.assertEqual(usage.value.key_encipherment, rsa_key)
        self.assertEqual(usage.value.key_agreement, not rsa_key)
        self.assertFalse(usage.value.key_cert_sign)
        eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.EMAIL_PROTECTION])
        constraints = extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertFalse(constraints.value.ca)
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.RFC822Name), ["alice@example.org"])
        ski = self.ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        self.assertEqual(aki.key_identifier, ski.digest)
        self.assertIsNotNone(extensions.get_extension_for_class(x509.SubjectKeyIdentifier))

    def test_rsa_profile_and_openssl(self) -> None:
        certificate = self.issue("rsa2048")
        self.check_profile(certificate, rsa_key=True)
        for purpose in ("smimesign", "smimeencrypt"):
            code, text = openssl_verify(self.ca, certificate, "-purpose", purpose)
            self.assertEqual(code, 0, text)

    def test_ec_profile_and_openssl(self) -> None:
        for kind in ("p256", "p384"):
            certificate = self.issue(kind)
            self.check_profile(certificate, rsa_key=False)
            code, text = openssl_verify(self.ca, certificate, "-purpose", "smimesign")
            self.assertEqual(code, 0, text)
            # OpenSSL's smimeencrypt purpose demands keyEncipherment, which ECDH keys do not have.
            code, _ = openssl_verify(self.ca, certificate, "-purpose", "smimeencrypt")
            self.assertNotEqual(code, 0)

    def test_rsa_ca(self) -> None:
        ca = make_ca(self.root / "rsa-ca", key_type="rsa2048")
        key = make_key("p256", index=41)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        certificate = ca.issue_user_certificate("bob@example.org", key.public_key(), days=10)
        code, text = openssl_verify(ca, certificate, "-purpose", "smimesign")
        self.assertEqual(code, 0, text)

    def test_lifetime_and_serials(self) -> None:
        before = datetime.datetime.now(datetime.UTC)
        first, second = self.issue("p256", days=30), self.issue("p256", days=30)
        lifetime = first.not_valid_after_utc - first.not_valid_before_utc
        self.assertEqual(lifetime, datetime.timedelta(days=30, minutes=5))
        self.assertLessEqual(first.not_valid_before_utc, before)
        self.assertNotEqual(first.serial_number, second.serial_number)
        self.assertGreater(first.serial_number.bit_length(), 64)
        self.assertEqual(len(self.ca.issued()), 2)

    def test_capped_at_ca_expiry(self) -> None:
        certificate = self.issue("p256", days=100 * 365)
        self.assertEqual(certificate.not_valid_after_utc, self.ca.certificate.not_valid_after_utc)

    def test_server_certificate(self) -> None:
        key = make_key("p256", index=42)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        certificate = self.ca.issue_server_certificate(["gw.example.org", "localhost", "127.0.0.1"], key.public_key())
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["gw.example.org", "localhost"])
        self.assertEqual([str(ip) for ip in san.get_values_for_type(x509.IPAddress)], ["127.0.0.1"])
        code, text = openssl_verify(self.ca, certificate, "-purpose", "sslserver", "-verify_hostname", "gw.example.org")
        self.assertEqual(code, 0, text)


class RevocationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.ca = make_ca(self.root / "ca")
        key = make_key("rsa2048", index=43)
        assert isinstance(key, rsa.RSAPrivateKey)
        self.revoked = self.ca.issue_user_certificate("alice@example.org", key.public_key(), days=30)
        self.kept = self.ca.issue_user_certificate("bob@example.org", key.public_key(), days=30)

    def test_crl_and_openssl(self) -> None:
        crl = self.ca.revoke([self.revoked])
        self.assertIsNotNone(crl.get_revoked_certificate_by_serial_number(self.revoked.serial_number))
        self.assertIsNone(crl.get_revoked_certificate_by_serial_number(self.kept.serial_number))
        self.assertEqual(x509.load_pem_x509_crl(self.ca.crl_path.read_bytes()), crl)
        self.assertTrue(crl.is_signature_valid(self.ca.certificate.public_key()))  # type: ignore[arg-type]
        options = ["-crl_check", "-CRLfile", str(self.ca.crl_path), "-purpose", "smimeencrypt"]
        code, text = openssl_verify(self.ca, self.revoked, *options)
        self.assertNotEqual(code, 0)
        self.assertIn("revoked", text)
        code, text = openssl_verify(self.ca, self.kept, *options)
        self.assertEqual(code, 0, text)
        self.assertEqual(self.ca.revoked_serials(), {self.revoked.serial_number})

    def test_crl_number_grows_and_first_date_kept(self) -> None:
        first = self.ca.revoke([self.revoked])
        second = self.ca.revoke([self.revoked, self.kept])
        number = lambda crl: crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number  # noqa: E731
        self.assertGreater(number(second), number(first))
        dates = {
            entry.serial_number: entry.revocation_date_utc
            for entry in second  # type: ignore[attr-defined]
        }
        first_entry = first.get_revoked_certificate_by_serial_number(self.revoked.serial_number)
        assert first_entry is not None
        self.assertEqual(dates[self.revoked.serial_number], first_entry.revocation_date_utc)

    def test_foreign_certificate_refused(self) -> None:
        foreign = TestPKI("Another CA", key_kind="p256", key_index=9).user("eve@example.org", key_kind="p256")
        self.assertRaises(KeyStoreError, self.ca.revoke, [foreign.certificate])
        self.assertEqual(self.ca.revoked_serials(), set())

    def test_crl_due(self) -> None:
        self.assertFalse(self.ca.crl_due())
        later = CertificateAuthority(
            self.ca.directory,
            self.ca.certificate,
            self.ca._key,
            now=lambda: datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=25),
        )
        self.assertTrue(later.crl_due())
        later.write_crl()
        self.assertFalse(later.crl_due())


def config_for(root: Path, extra: str = "", keys: str = "") -> Config:
    text = f"""
[server]
hostname = "gw.example.org"
[keys]
store = "store"
key_type = "p256"
{keys}
[tls]
certificate = "tls/server.crt"
key = "tls/server.key"
{extra}
"""
    config = parse_config_text(text, root)
    # Few KDF rounds for speed; the 600,000 default is exercised by the CLI tests.
    return attrs.evolve(config, keys=attrs.evolve(config.keys, kdf_iterations=FAST_ITERATIONS))


class PassphraseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.root.mkdir()

    def test_environment(self) -> None:
        config = config_for(self.root, keys='ca_passphrase_env = "GK_TEST_CA_PASSPHRASE"')
        self.patch(os, "environ", {"GK_TEST_CA_PASSPHRASE": "from the environment"})
        self.assertEqual(read_ca_passphrase(config.keys), "from the environment")
        self.patch(os, "environ", {})
        error = self.assertRaises(ConfigError, read_ca_passphrase, config.keys)
        self.assertEqual(error.path, "[keys] ca_passphrase_env")

    def test_file(self) -> None:
        path = self.root / "ca-passphrase"
        config = config_for(self.root, keys=f'ca_passphrase_file = "{path}"')
        self.assertRaises(ConfigError, read_ca_passphrase, config.keys)  # missing
        path.write_text("from a file\n")
        path.chmod(0o644)
        error = self.assertRaises(ConfigError, read_ca_passphrase, config.keys)
        self.assertIn("chmod 600", str(error))
        path.chmod(0o600)
        self.assertEqual(read_ca_passphrase(config.keys), "from a file")
        path.write_text("\n")
        self.assertRaises(ConfigError, read_ca_passphrase, config.keys)

    def test_both_refused(self) -> None:
        config = config_for(self.root, keys='ca_passphrase_env = "X"\nca_passphrase_file = "f"')
        self.assertRaises(ConfigError, read_ca_passphrase, config.keys)

    def test_generated(self) -> None:
        config = config_for(self.root)
        self.assertRaises(ConfigError, read_ca_passphrase, config.keys)
        generated = read_ca_passphrase(config.keys, create=True)
        self.assertGreaterEqual(len(generated), 40)
        path = self.root / "store" / "ca" / "passphrase"
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(read_ca_passphrase(config.keys), generated)
        self.assertEqual(read_ca_passphrase(config.keys, create=True), generated)  # not replaced


class InitializeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.root.mkdir()
        self.config = config_for(self.root)

    def test_first_run(self) -> None:
        done = initialize(self.config)
        self.assertEqual(len(done), 3, done)  # passphrase, CA, TLS certificate
        store = self.root / "store"
        self.assertTrue((store / "users").is_dir())
        ca = open_ca(self.config.keys)
        chain = x509.load_pem_x509_certificates((self.root / "tls" / "server.crt").read_bytes())
        self.assertEqual(chain[1], ca.certificate)
        key_pem = (self.root / "tls" / "server.key").read_bytes()
        self.assertIn(b"BEGIN ENCRYPTED PRIVATE KEY", key_pem)
        key = load_tls_private_key(self.config)
        self.assertEqual(key.public_key().public_numbers(), chain[0].public_key().public_numbers())
        code, text = openssl_verify(ca, chain[0], "-purpose", "sslserver", "-verify_hostname", "gw.example.org")
        self.assertEqual(code, 0, text)
        for path in [store, *store.rglob("*"), self.root / "tls", *(self.root / "tls").iterdir()]:
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o700 if path.is_dir() else 0o600, path)

    def test_tls_key_usable_by_the_server(self) -> None:
        from gatekeeper.tls import server_tls_options

        initialize(self.config)
        options = server_tls_options(self.config.tls.certificate.read_bytes(), load_tls_private_key(self.config))
        self.assertIsNotNone(options.getContext())

    def test_if_absent(self) -> None:
        initialize(self.config)
        certificate = self.config.tls.certificate.read_bytes()
        self.assertRaises(KeyStoreError, initialize, self.config)
        self.assertEqual(initialize(self.config, if_absent=True), [])
        self.config.tls.certificate.unlink()
        self.config.tls.key.unlink()
        done = initialize(self.config, if_absent=True)
        self.assertEqual(len(done), 1)
        self.assertNotEqual(self.config.tls.certificate.read_bytes(), certificate)

    def test_keeps_admin_tls_files(self) -> None:
        tls = self.root / "tls"
        tls.mkdir()
        self.config.tls.certificate.write_bytes(b"admin's certificate")
        self.config.tls.key.write_bytes(b"admin's key")
        initialize(self.config)
        self.assertEqual(self.config.tls.certificate.read_bytes(), b"admin's certificate")

    def test_half_tls_pair(self) -> None:
        (self.root / "tls").mkdir()
        self.config.tls.certificate.write_bytes(b"only a certificate")
        error = self.assertRaises(ConfigError, initialize, self.config)
        self.assertEqual(error.path, "[tls] key")

    def test_renews_expiring_crl(self) -> None:
        initialize(self.config)
        crl_path = self.root / "store" / "ca" / "crl.pem"
        before = crl_path.read_bytes()
        self.assertEqual(initialize(self.config, if_absent=True), [])
        later = lambda: datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=28)  # noqa: E731
        done = initialize(self.config, if_absent=True, now=later)
        self.assertEqual(len(done), 1, done)
        self.assertNotEqual(crl_path.read_bytes(), before)

    def test_configured_passphrase_file_created(self) -> None:
        path = self.root / "secrets" / "ca-passphrase"
        config = config_for(self.root, keys=f'ca_passphrase_file = "{path}"')
        done = initialize(config)
        self.assertIn(f"generated the CA passphrase in {path}", done)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertFalse((self.root / "store" / "ca" / ca_module.PASSPHRASE_FILE).exists())
        CertificateAuthority.load(self.root / "store" / "ca", path.read_text().strip())

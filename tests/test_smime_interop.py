"""Interoperability with real peers, both directions: ``openssl cms`` (3.0) and ``gpgsm`` (2.2).

One PKI and one throw-away GNUPGHOME (loopback pinentry, PKCS#12 imported in 3DES form)
are made once for the module. Every peer is run as a command; nothing is skipped.
"""

from __future__ import annotations

import atexit
import base64
import datetime
import shutil
import subprocess
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import PrivateFormat, pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.trial import unittest

from gatekeeper import smime
from gatekeeper.keys import pkcs12 as gk_pkcs12
from gatekeeper.keys.accounts import Accounts
from gatekeeper.keys.identity import UnlockedKey
from gatekeeper.keys.store import FileKeyStore
from gatekeeper.testing.pki import Issued, TestPKI
from gatekeeper.trust import TrustStatus, TrustValidator
from tests.fixtures.process import require_program
from tests.keys_support import key_generator, keys_config, make_ca

PASSWORD = "interop-pass"
ENTITY = (
    b'Content-Type: multipart/mixed; boundary="mix"\r\n'
    b"\r\n"
    b"--mix\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln  \r\n"
    b"From the gateway\r\n"
    b"--mix\r\n"
    b"Content-Type: application/pdf; name=report.pdf\r\n"
    b"Content-Disposition: attachment; filename=report.pdf\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K\r\n"
    b"--mix--\r\n"
)
MESSAGE = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: interop\r\n" + ENTITY


class Peers:
    """The module's PKI, files and GNUPGHOME, made once."""

    def __init__(self) -> None:
        self.openssl = require_program("openssl")
        self.gpgsm = require_program("gpgsm")
        self.dir = Path(tempfile.mkdtemp(prefix="gk-smime-", dir="/tmp"))
        self.pki = TestPKI("Interop CA", key_index=20)
        self.stranger_ca = TestPKI("Stranger CA", key_index=21)
        self.alice = self.pki.user("alice@example.org", key_index=20)
        self.bob = self.pki.user("bob@example.org", key_index=21)
        self.carol = self.pki.user("carol@example.org", key_kind="p256", key_index=22)
        self.stranger = self.stranger_ca.user("alice@example.org", key_index=23)
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=40)
        self.expired = self.pki.user("alice@example.org", key_index=24, not_before=past, days=10)
        self.web = self.pki.user("alice@example.org", key_index=25, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
        self.validator = TrustValidator([self.pki.certificate])
        self.write("ca.pem", self.pki.cert_pem())
        for name in ("alice", "bob", "carol", "stranger", "expired", "web"):
            issued = getattr(self, name)
            self.write(f"{name}.pem", issued.cert_pem())
            self.write(f"{name}.key", issued.key_pem())
        self.gnupghome = self.dir / "gnupg"
        self.gnupghome.mkdir(mode=0o700)
        (self.gnupghome / "gpg-agent.conf").write_text("allow-loopback-pinentry\n")
        (self.gnupghome / "gpgsm.conf").write_text("disable-crl-checks\n")
        self.gpg(["--import", str(self.dir / "ca.pem")])
        for name in ("alice", "bob"):
            self.import_secret_key(name)
        fingerprint = self.pki.certificate.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 - gpgsm names CAs so
        (self.gnupghome / "trustlist.txt").write_text(f"{fingerprint} S relax\n")

    def import_secret_key(self, name: str) -> None:
        """Give gpgsm the user's key, as a legacy PKCS#12 file with salts GnuPG 2.2 can use.

        About one such file in 70 has salts that make gpgsm 2.2 refuse the right password
        (see :func:`gatekeeper.keys.gk_pkcs12.trips_gnupg_22`, which the export uses too): the
        import must then work the first time.
        """
        data = p12_3des(getattr(self, name), self.pki)
        while gk_pkcs12.trips_gnupg_22(data, PASSWORD):
            data = p12_3des(getattr(self, name), self.pki)
        self.write(f"{name}.p12", data)
        argv = ["--pinentry-mode", "loopback", "--passphrase-fd", "0", "--import", str(self.dir / f"{name}.p12")]
        self.gpg(argv, stdin=PASSWORD.encode())

    def write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def key(self, name: str) -> UnlockedKey:
        issued = getattr(self, name)
        return UnlockedKey(name, issued.certificate, issued.key, issued.chain)

    def run(self, argv: list[str], stdin: bytes = b"", *, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(argv, input=stdin, capture_output=True, timeout=60, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv[:3]} failed ({result.returncode}): {result.stderr[-800:]!r}")
        return result

    def ssl(self, *args: str, stdin: bytes = b"", check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return self.run([self.openssl, "cms", *args], stdin, check=check)

    def gpg(self, args: list[str], stdin: bytes = b"", *, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return self.run([self.gpgsm, "--homedir", str(self.gnupghome), "--batch", *args], stdin, check=check)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def close(self) -> None:
        subprocess.run(
            ["gpgconf", "--homedir", str(self.gnupghome), "--kill", "gpg-agent"], check=False, capture_output=True
        )
        shutil.rmtree(self.dir, ignore_errors=True)


def p12_3des(issued: Issued, pki: TestPKI) -> bytes:
    """PKCS#12 in the legacy 3DES/SHA-1 form that gpgsm 2.2 imports."""
    encryption = (
        PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(2048)
        .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
        .hmac_hash(hashes.SHA1())  # noqa: S303 - the legacy form gpgsm 2.2 reads
        .build(PASSWORD.encode())
    )
    return pkcs12.serialize_key_and_certificates(b"key", issued.key, issued.certificate, [pki.certificate], encryption)


_PEERS: Peers | None = None


def peers() -> Peers:
    global _PEERS
    if _PEERS is None:
        _PEERS = Peers()
        atexit.register(_PEERS.close)
    return _PEERS


def mime(der: bytes, smime_type: str, headers: bytes = b"") -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"\r\n")
    return (
        headers
        + (
            f"Content-Type: application/pkcs7-mime; smime-type={smime_type}; name=smime.p7m\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        + body
    )


def multipart_signed(content: bytes, signature: bytes) -> bytes:
    return (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; boundary="sig"\r\n'
        b"\r\n--sig\r\n" + content + b"\r\n--sig\r\nContent-Type: application/pkcs7-signature\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(signature).replace(b"\n", b"\r\n")
        + b"--sig--\r\n"
    )


def signed_parts(message: bytes) -> tuple[bytes, bytes]:
    """The signed content and the DER signature of a multipart/signed message made by us."""
    boundary = message.split(b'boundary="', 1)[1].split(b'"', 1)[0]
    delimiter = b"\r\n--" + boundary
    body = message.split(b"\r\n\r\n", 1)[1]
    first = body.index(b"--" + boundary + b"\r\n") + len(boundary) + 4
    end = body.index(delimiter, first)
    signature_part = body[end + len(delimiter) + 2 : body.index(delimiter + b"--")]
    return body[first:end], base64.b64decode(signature_part.split(b"\r\n\r\n", 1)[1])


class OpenSSLProducesTests(unittest.TestCase):
    """Messages written by ``openssl cms`` open in Gatekeeper."""

    def setUp(self) -> None:
        self.p = peers()
        self.p.write("entity.txt", ENTITY)

    def sign(self, *extra: str, signer: str = "alice") -> bytes:
        return self.p.ssl(
            "-sign",
            "-binary",
            "-in",
            self.p.path("entity.txt"),
            "-signer",
            self.p.path(f"{signer}.pem"),
            "-inkey",
            self.p.path(f"{signer}.key"),
            *extra,
        ).stdout

    def encrypt(self, *extra: str, recipients: tuple[str, ...] = ("bob",), data: str = "entity.txt") -> bytes:
        return self.p.ssl(
            "-encrypt", "-binary", "-in", self.p.path(data), *extra, *[self.p.path(f"{r}.pem") for r in recipients]
        ).stdout

    def test_signed(self) -> None:
        for extra, signer, algorithm, detached in [
            ((), "alice", "rsa-pkcs1v15", True),
            (("-nodetach",), "alice", "rsa-pkcs1v15", False),
            (("-keyopt", "rsa_padding_mode:pss"), "alice", "rsa-pss", True),
            (("-md", "sha384"), "carol", "ecdsa", True),
        ]:
            opened = smime.open_message(self.sign(*extra, signer=signer), [], self.p.validator, f"{signer}@example.org")
            signature = opened.signatures[0]
            self.assertEqual(signature.trust.status, TrustStatus.VALID, (extra, signature.trust.reasons))
            self.assertEqual((signature.signature_algorithm, signature.detached), (algorithm, detached))
            self.assertEqual(opened.content, ENTITY)

    def test_enveloped(self) -> None:
        for extra, reader, cipher, method in [
            (("-aes256",), "bob", "aes256-cbc", "rsa-pkcs1v15"),
            (("-aes128",), "bob", "aes128-cbc", "rsa-pkcs1v15"),
            (("-aes192",), "bob", "aes192-cbc", "rsa-pkcs1v15"),
            (("-des3",), "bob", "des3-cbc", "rsa-pkcs1v15"),
            (("-aes-256-gcm",), "bob", "aes256-gcm", "rsa-pkcs1v15"),
            (("-aes-128-gcm", "-keyid"), "bob", "aes128-gcm", "rsa-pkcs1v15"),
            (
                ("-aes256", "-recip", "bob.pem", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"),
                "bob",
                "aes256-cbc",
                "rsa-oaep",
            ),
            (("-aes256", "-stream"), "bob", "aes256-cbc", "rsa-pkcs1v15"),
        ]:
            if "-recip" in extra:  # -keyopt applies to the -recip before it
                extra = tuple(self.p.path(a) if a.endswith(".pem") else a for a in extra)
                message = self.p.ssl("-encrypt", "-binary", "-in", self.p.path("entity.txt"), *extra).stdout
            else:
                message = self.encrypt(*extra)
            opened = smime.open_message(message, [self.p.key(reader)], self.p.validator, None)
            self.assertEqual(opened.content, ENTITY, extra)
            self.assertEqual((opened.decryptions[0].cipher, opened.decryptions[0].key_encryption), (cipher, method))

    def test_ecdh_and_many_recipients(self) -> None:
        message = self.encrypt("-aes256", recipients=("alice", "bob", "carol"))
        for reader in ("alice", "bob", "carol"):
            opened = smime.open_message(message, [self.p.key(reader)], self.p.validator, None)
            self.assertEqual(opened.content, ENTITY)
            self.assertEqual(opened.decryptions[0].recipient_count, 3)
        self.assertEqual(
            smime.open_message(message, [self.p.key("carol")], self.p.validator, None).decryptions[0].key_encryption,
            "ecdh-sha1",
        )

    def test_sign_then_encrypt(self) -> None:
        self.p.write("signed.eml", self.sign())
        message = self.encrypt("-aes256", data="signed.eml")
        opened = smime.open_message(message, [self.p.key("bob")], self.p.validator, "alice@example.org")
        self.assertEqual(opened.layers, ("enveloped", "signed"))
        self.assertTrue(opened.signatures[0].trust.ok)
        self.assertEqual(opened.content, ENTITY)

    def test_negative(self) -> None:
        untrusted = smime.open_message(self.sign(signer="stranger"), [], self.p.validator, "alice@example.org")
        self.assertEqual(untrusted.signatures[0].trust.status, TrustStatus.UNTRUSTED)
        expired = smime.open_message(self.sign(signer="expired"), [], self.p.validator, "alice@example.org")
        self.assertEqual(expired.signatures[0].trust.status, TrustStatus.EXPIRED)
        wrong_eku = smime.open_message(self.sign(signer="web"), [], self.p.validator, "alice@example.org")
        self.assertEqual(wrong_eku.signatures[0].trust.status, TrustStatus.UNUSABLE)
        mismatch = smime.open_message(self.sign(), [], self.p.validator, "bob@example.org")
        self.assertEqual(mismatch.signatures[0].trust.status, TrustStatus.MISMATCH)
        tampered = self.sign().replace(b"From the gateway", b"From the attacker")
        bad = smime.open_message(tampered, [], self.p.validator, "alice@example.org")
        self.assertEqual(bad.signatures[0].trust.status, TrustStatus.BAD_SIGNATURE)
        self.assertRaises(
            smime.NotForMe, smime.open_message, self.encrypt("-aes256"), [self.p.key("alice")], self.p.validator, None
        )


class OpenSSLReadsTests(unittest.TestCase):
    """Messages written by Gatekeeper decrypt and verify with ``openssl cms``."""

    def setUp(self) -> None:
        self.p = peers()

    def verify(self, message: bytes) -> bytes:
        self.p.write("in.eml", message)
        return self.p.ssl("-verify", "-in", self.p.path("in.eml"), "-CAfile", self.p.path("ca.pem")).stdout

    def decrypt(self, message: bytes, reader: str) -> bytes:
        self.p.write("in.eml", message)
        return self.p.ssl(
            "-decrypt",
            "-in",
            self.p.path("in.eml"),
            "-recip",
            self.p.path(f"{reader}.pem"),
            "-inkey",
            self.p.path(f"{reader}.key"),
        ).stdout

    def test_signed(self) -> None:
        for signer, options in [
            ("alice", {}),
            ("alice", {"detached": False}),
            ("alice", {"scheme": "pss", "digest": "sha512"}),
            ("carol", {"digest": "sha384"}),
        ]:
            signed = smime.sign(MESSAGE, self.p.key(signer), **options)  # type: ignore[arg-type]
            self.assertEqual(self.verify(signed), ENTITY, options)

    def test_enveloped(self) -> None:
        for cipher in ("aes256-cbc", "aes128-cbc", "aes256-gcm", "aes128-gcm"):
            for transport in ("rsa-pkcs1v15", "rsa-oaep"):
                message = smime.encrypt(
                    MESSAGE, [self.p.bob.certificate, self.p.carol.certificate], cipher=cipher, key_transport=transport
                )
                self.assertEqual(self.decrypt(message, "bob"), ENTITY, (cipher, transport))
                self.assertEqual(self.decrypt(message, "carol"), ENTITY, (cipher, transport))

    def test_sign_and_encrypt(self) -> None:
        message = smime.sign_and_encrypt(MESSAGE, self.p.key("alice"), [self.p.bob.certificate], cipher="aes256-gcm")
        self.assertEqual(self.verify(self.decrypt(message, "bob")), ENTITY)


class GpgsmProducesTests(unittest.TestCase):
    """Messages written by ``gpgsm`` (BER with indefinite lengths) open in Gatekeeper."""

    def setUp(self) -> None:
        self.p = peers()
        self.p.write("entity.txt", ENTITY)

    def test_signed_detached(self) -> None:
        signature = self.p.gpg(
            [
                "--pinentry-mode",
                "loopback",
                "--passphrase-fd",
                "0",
                "-u",
                "alice@example.org",
                "--detach-sign",
                self.p.path("entity.txt"),
            ],
            PASSWORD.encode(),
        ).stdout
        opened = smime.open_message(multipart_signed(ENTITY, signature), [], self.p.validator, "alice@example.org")
        self.assertEqual(opened.signatures[0].trust.status, TrustStatus.VALID, opened.signatures[0].trust.reasons)
        self.assertEqual(opened.content, ENTITY)

    def test_signed_opaque(self) -> None:
        signed = self.p.gpg(
            [
                "--pinentry-mode",
                "loopback",
                "--passphrase-fd",
                "0",
                "-u",
                "alice@example.org",
                "--sign",
                self.p.path("entity.txt"),
            ],
            PASSWORD.encode(),
        ).stdout
        opened = smime.open_message(mime(signed, "signed-data"), [], self.p.validator, "alice@example.org")
        self.assertTrue(opened.signatures[0].trust.ok)
        self.assertEqual(opened.content, ENTITY)

    def test_enveloped(self) -> None:
        for algorithm, cipher in (("AES256", "aes256-cbc"), ("AES", "aes128-cbc"), ("3DES", "des3-cbc")):
            der = self.p.gpg(
                [
                    "-r",
                    "alice@example.org",
                    "-r",
                    "bob@example.org",
                    "--cipher-algo",
                    algorithm,
                    "--encrypt",
                    self.p.path("entity.txt"),
                ]
            ).stdout
            self.assertEqual(der[:2], b"\x30\x80")  # BER, indefinite length
            for reader in ("alice", "bob"):
                opened = smime.open_message(mime(der, "enveloped-data"), [self.p.key(reader)], self.p.validator, None)
                self.assertEqual(opened.content, ENTITY)
                self.assertEqual(opened.decryptions[0].cipher, cipher)


class GpgsmReadsTests(unittest.TestCase):
    """Messages written by Gatekeeper decrypt and verify with ``gpgsm`` (RSA v1.5 + AES-CBC)."""

    def setUp(self) -> None:
        self.p = peers()

    def decrypt(self, message: bytes) -> bytes:
        der = base64.b64decode(message.split(b"\r\n\r\n", 1)[1])
        self.p.write("in.der", der)
        return self.p.gpg(
            ["--pinentry-mode", "loopback", "--passphrase-fd", "0", "--decrypt", self.p.path("in.der")],
            PASSWORD.encode(),
        ).stdout

    def test_enveloped(self) -> None:
        for cipher in ("aes256-cbc", "aes128-cbc"):
            message = smime.encrypt(MESSAGE, [self.p.bob.certificate, self.p.alice.certificate], cipher=cipher)
            self.assertEqual(self.decrypt(message), ENTITY)

    def test_a_legacy_export_imports_and_decrypts(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="gk-export-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, root, True)
        # RSA: gpgsm 2.2.40 crashes (SIGSEGV) importing an EC key from a PKCS#12 file.
        config = keys_config(root / "store", key_type="rsa2048")
        accounts = Accounts(FileKeyStore(root / "store"), make_ca(root / "ca"), config, generate_key=key_generator(800))
        accounts.add("dora@example.org", "dora's password 1")
        exported = accounts.export("dora@example.org", "dora's password 1", PASSWORD, legacy=True)
        self.assertFalse(gk_pkcs12.trips_gnupg_22(exported, PASSWORD))
        self.p.write("dora.p12", exported)
        self.p.gpg(
            ["--pinentry-mode", "loopback", "--passphrase-fd", "0", "--import", self.p.path("dora.p12")],
            PASSWORD.encode(),
        )
        dora = accounts.get("dora@example.org").current.certificate
        self.assertEqual(self.decrypt(smime.encrypt(MESSAGE, [dora])), ENTITY)

    def test_signed_detached_and_opaque(self) -> None:
        content, signature = signed_parts(smime.sign(MESSAGE, self.p.key("alice")))
        self.p.write("content.txt", content)
        self.p.write("sig.der", signature)
        result = self.p.gpg(["--verify", self.p.path("sig.der"), self.p.path("content.txt")])
        self.assertIn(b"Good signature", result.stderr)
        opaque = smime.sign(MESSAGE, self.p.key("alice"), detached=False)
        self.p.write("opaque.der", base64.b64decode(opaque.split(b"\r\n\r\n", 1)[1]))
        result = self.p.gpg(["--verify", "-o", self.p.path("out.txt"), self.p.path("opaque.der")])
        self.assertIn(b"Good signature", result.stderr)
        self.assertEqual((self.p.dir / "out.txt").read_bytes(), ENTITY)

    def test_sign_and_encrypt(self) -> None:
        message = smime.sign_and_encrypt(MESSAGE, self.p.key("alice"), [self.p.bob.certificate])
        signed = self.decrypt(message)
        content, signature = signed_parts(signed)
        self.assertEqual(content, ENTITY)
        self.p.write("content.txt", content)
        self.p.write("sig.der", signature)
        self.assertIn(
            b"Good signature", self.p.gpg(["--verify", self.p.path("sig.der"), self.p.path("content.txt")]).stderr
        )

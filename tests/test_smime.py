"""The S/MIME engine on its own: round trips, canonical bytes, negative cases, limits."""

from __future__ import annotations

import base64
import datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from pyasn1.codec.ber import decoder as ber_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_modules import rfc4055, rfc5083, rfc5652
from twisted.trial import unittest

from gatekeeper import cms, smime
from gatekeeper.cms import algorithms as alg
from gatekeeper.cms import der
from gatekeeper.cms.signed import _parse_time, _read_capabilities
from gatekeeper.keys.identity import UnlockedKey
from gatekeeper.testing.pki import TestPKI
from gatekeeper.trust import TrustStatus, TrustValidator

PKI = TestPKI("S/MIME Unit CA")
OTHER = TestPKI("Unrelated CA", key_index=7)
ALICE = PKI.user("alice@example.org")
BOB = PKI.user("bob@example.org", key_index=1)
CAROL = PKI.user("carol@example.org", key_kind="p256")
DAVE = PKI.user("dave@example.org", key_kind="p384")


def key(issued: object, key_id: str) -> UnlockedKey:
    return UnlockedKey(key_id, issued.certificate, issued.key, issued.chain)  # type: ignore[attr-defined]


A, B, C, D = key(ALICE, "alice-1"), key(BOB, "bob-1"), key(CAROL, "carol-1"), key(DAVE, "dave-1")
VALIDATOR = TrustValidator([PKI.certificate])
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"From the start of a line, and trailing spaces   \r\n"
    b"--b1\r\n"
    b"Content-Type: application/octet-stream; name=a.bin\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"AAECAwQF\r\n"
    b"--b1--\r\n"
)


def inner_entity(message: bytes) -> bytes:
    """The Content-* fields and body of a message, as the engine protects them."""
    head, _, body = message.partition(b"\r\n\r\n")
    fields = [f for f in head.split(b"\r\n") if f.lower().startswith(b"content-")]
    return b"\r\n".join(fields) + b"\r\n\r\n" + body


class RoundTripTests(unittest.TestCase):
    def test_sign_detached_verifies_and_keeps_bytes(self) -> None:
        signed = smime.sign(MESSAGE, A)
        self.assertIn(b"multipart/signed", signed)
        self.assertIn(b"micalg=sha-256", signed)
        self.assertIn(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n", signed)
        opened = smime.open_message(signed, [], VALIDATOR, "alice@example.org")
        self.assertEqual(opened.layers, ("signed",))
        self.assertEqual(opened.content, inner_entity(MESSAGE))
        signature = opened.signatures[0]
        self.assertEqual(signature.trust.status, TrustStatus.VALID, signature.trust.reasons)
        self.assertEqual(signature.certificate, ALICE.certificate)
        self.assertEqual(signature.digest_algorithm, "sha256")
        self.assertIn("aes256-gcm", signature.capabilities or ())
        self.assertIsNotNone(signature.signing_time)
        self.assertIn(b"Message-ID: <1@example.org>\r\n", opened.message)

    def test_a_correspondent_s_certificate_is_parsed_once(self) -> None:
        first = smime.open_message(smime.sign(MESSAGE, A), [], VALIDATOR, "alice@example.org").signatures[0]
        second = smime.open_message(smime.sign(MESSAGE, A), [], VALIDATOR, "alice@example.org").signatures[0]
        self.assertIs(first.certificate, second.certificate)
        self.assertEqual(first.certificate, ALICE.certificate)

    def test_sign_variants(self) -> None:
        for signer, options, algorithm in [
            (A, {"digest": "sha384"}, "rsa-pkcs1v15"),
            (A, {"digest": "sha512", "scheme": "pss"}, "rsa-pss"),
            (A, {"scheme": "pss", "detached": False}, "rsa-pss"),
            (C, {}, "ecdsa"),
            (D, {"digest": "sha384", "detached": False}, "ecdsa"),
        ]:
            signed = smime.sign(MESSAGE, signer, **options)  # type: ignore[arg-type]
            sender = f"{signer.key_id.split('-')[0]}@example.org"
            opened = smime.open_message(signed, [], VALIDATOR, sender)
            signature = opened.signatures[0]
            self.assertEqual(signature.trust.status, TrustStatus.VALID, (options, signature.trust.reasons))
            self.assertEqual(signature.signature_algorithm, algorithm)
            self.assertEqual(signature.detached, options.get("detached", True))
            self.assertEqual(opened.content, inner_entity(MESSAGE))

    def test_opaque_is_pkcs7_mime(self) -> None:
        signed = smime.sign(MESSAGE, A, detached=False)
        self.assertIn(b"application/pkcs7-mime; smime-type=signed-data", signed)
        self.assertEqual(smime.classify(signed), "signed")

    def test_encrypt_every_cipher_and_transport(self) -> None:
        for cipher in ("aes256-cbc", "aes128-cbc", "aes256-gcm", "aes128-gcm"):
            for transport in ("rsa-pkcs1v15", "rsa-oaep"):
                encrypted = smime.encrypt(
                    MESSAGE, [BOB.certificate, CAROL.certificate], cipher=cipher, key_transport=transport
                )
                self.assertEqual(smime.classify(encrypted), "encrypted")
                for reader, method in ((B, transport), (C, "ecdh-sha256")):
                    opened = smime.open_message(encrypted, [reader], VALIDATOR, None)
                    self.assertEqual(opened.content, inner_entity(MESSAGE))
                    decryption = opened.decryptions[0]
                    self.assertEqual((decryption.cipher, decryption.key_encryption), (cipher, method))
                    self.assertEqual(decryption.key_id, reader.key_id)
                    self.assertEqual(decryption.recipient_count, 2)
                    self.assertEqual(decryption.layer, "auth-enveloped" if "gcm" in cipher else "enveloped")

    def test_ecdh_p384_and_key_identifier(self) -> None:
        encrypted = smime.encrypt(
            MESSAGE,
            [cms.Recipient(DAVE.certificate, by_key_identifier=True), cms.Recipient(BOB.certificate, "rsa-oaep", True)],
        )
        self.assertEqual(smime.open_message(encrypted, [D], VALIDATOR, None).content, inner_entity(MESSAGE))
        self.assertEqual(smime.open_message(encrypted, [B], VALIDATOR, None).content, inner_entity(MESSAGE))

    def test_sign_and_encrypt_reports_both_layers(self) -> None:
        protected = smime.sign_and_encrypt(MESSAGE, A, [BOB.certificate, ALICE.certificate], cipher="aes256-gcm")
        self.assertNotIn(b"trailing spaces", protected)
        opened = smime.open_message(protected, [B], VALIDATOR, "alice@example.org")
        self.assertEqual(opened.layers, ("auth-enveloped", "signed"))
        self.assertEqual(opened.signatures[0].trust.status, TrustStatus.VALID)
        self.assertEqual(opened.content, inner_entity(MESSAGE))

    def test_triple_wrapped(self) -> None:
        inner = smime.sign(MESSAGE, A)
        outer = smime.sign(smime.encrypt(inner, [BOB.certificate]), A, detached=False)
        opened = smime.open_message(outer, [B], VALIDATOR, "alice@example.org")
        self.assertEqual(opened.layers, ("signed", "enveloped", "signed"))
        self.assertTrue(all(s.trust.ok for s in opened.signatures))
        self.assertEqual(opened.content, inner_entity(MESSAGE))

    def test_retired_key_decrypts(self) -> None:
        encrypted = smime.encrypt(MESSAGE, [BOB.certificate])
        opened = smime.open_message(encrypted, [A, B], VALIDATOR, None)
        self.assertEqual(opened.decryptions[0].key_id, "bob-1")

    def test_plain_message_has_no_layers(self) -> None:
        opened = smime.open_message(MESSAGE, [B], VALIDATOR, "alice@example.org")
        self.assertEqual(opened.layers, ())
        self.assertFalse(opened.signed or opened.encrypted)
        self.assertEqual(opened.content, inner_entity(MESSAGE))
        self.assertIsNone(smime.classify(MESSAGE))


class CanonicalTests(unittest.TestCase):
    def test_lf_input_becomes_crlf_and_verifies(self) -> None:
        lf = MESSAGE.replace(b"\r\n", b"\n")
        signed = smime.sign(lf, A)
        self.assertNotIn(b"\n", signed.replace(b"\r\n", b""))
        opened = smime.open_message(signed, [], VALIDATOR, "alice@example.org")
        self.assertEqual(opened.content, inner_entity(MESSAGE))
        self.assertTrue(opened.signatures[0].trust.ok)

    def test_eight_bit_parts_are_encoded_before_signing(self) -> None:
        message = (
            b"From: alice@example.org\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            b"Gr\xc3\xbc\xc3\x9fe  \r\nFrom here\r\n--x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: binary\r\n\r\n\x00\xff\xfe\r\n--x--\r\n"
        )
        signed = smime.sign(message, A)
        self.assertTrue(signed.isascii())
        opened = smime.open_message(signed, [], VALIDATOR, "alice@example.org")
        self.assertTrue(opened.signatures[0].trust.ok)
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe =20\r\n", opened.content)
        self.assertIn(b"Content-Transfer-Encoding: base64\r\n\r\nAP/+\r\n", opened.content)

    def test_canonicalize(self) -> None:
        self.assertEqual(smime.canonicalize(b"a\nb\r\nc\rd"), b"a\r\nb\r\nc\r\nd")
        data = b"x\r\ny\r\n"
        self.assertIs(smime.canonicalize(data), data)

    def test_canonicalize_in_chunks(self) -> None:
        # Large messages are checked a chunk at a time; a chunk must never split a CRLF.
        self.patch(smime, "_CANONICAL_CHUNK", 5)
        for data, expected in [
            (b"\r\nbbaa\r\na", None),
            (b"abcdefgh\r\nij\nk", b"abcdefgh\r\nij\r\nk"),
            (b"abcd\r\r\nx", b"abcd\r\n\r\nx"),
        ]:
            self.assertEqual(smime.canonicalize(data), expected or data)
            self.assertEqual(smime._has_bare_lf(memoryview(bytearray(data))), expected is not None)

    def test_output_lines(self) -> None:
        encrypted = smime.encrypt(MESSAGE * 50, [BOB.certificate])
        body = encrypted.split(b"\r\n\r\n", 1)[1]
        lines = body.split(b"\r\n")
        self.assertEqual(lines[-1], b"")
        self.assertTrue(all(len(line) == 76 for line in lines[:-2]))
        self.assertIn(b'name="smime.p7m"', encrypted)


class StructureTests(unittest.TestCase):
    """The hand-built DER must be what the pyasn1-modules ASN.1 specifications describe."""

    def test_signed_data_decodes_with_rfc5652(self) -> None:
        data = cms.sign(b"hello", ALICE.certificate, ALICE.key, chain=ALICE.chain, detached=False)
        info, rest = ber_decoder.decode(data, asn1Spec=rfc5652.ContentInfo())
        self.assertEqual(rest, b"")
        signed, _ = ber_decoder.decode(info["content"], asn1Spec=rfc5652.SignedData())
        self.assertEqual(bytes(signed["encapContentInfo"]["eContent"]), b"hello")
        self.assertEqual(len(signed["certificates"]), 2)
        attributes = {str(a["attrType"]) for a in signed["signerInfos"][0]["signedAttrs"]}
        self.assertIn("1.2.840.113549.1.9.15", attributes)
        self.assertIn("1.2.840.113549.1.9.16.2.47", attributes)

    def test_auth_enveloped_decodes_with_rfc5083(self) -> None:
        data = cms.envelope(b"hello", [cms.Recipient(BOB.certificate)], cipher="aes128-gcm")
        info, _ = ber_decoder.decode(data, asn1Spec=rfc5652.ContentInfo())
        self.assertEqual(str(info["contentType"]), "1.2.840.113549.1.9.16.1.23")
        envelope, rest = ber_decoder.decode(info["content"], asn1Spec=rfc5083.AuthEnvelopedData())
        self.assertEqual(rest, b"")
        self.assertEqual(len(bytes(envelope["mac"])), 16)

    def test_ber_indefinite_lengths_are_read(self) -> None:
        data = cms.envelope(b"x" * 3000, [cms.Recipient(BOB.certificate)])
        self.assertEqual(cms.decrypt(to_indefinite(data), [B]).content, b"x" * 3000)


def to_indefinite(data: bytes) -> bytes:
    """Re-encode DER as BER: indefinite lengths and the encrypted content in 1000-byte chunks."""
    buf, element = der.parse(data)
    return _ber(buf, element)


def _ber(buf: memoryview, element: der.Element) -> bytes:
    if element.tag == 0x80 and element.length > 1000:  # [0] IMPLICIT encryptedContent
        value = bytes(buf[element.start : element.end])
        chunks = [der.octet_string(value[i : i + 1000]) for i in range(0, len(value), 1000)]
        return b"\xa0\x80" + b"".join(chunks) + b"\x00\x00"
    if not element.constructed or element.tag in (0x31,):
        return der.raw(buf, element)
    inner = b"".join(_ber(buf, child) for child in der.children(buf, element))
    return bytes((element.tag,)) + b"\x80" + inner + b"\x00\x00"


class NegativeTests(unittest.TestCase):
    def test_not_for_me(self) -> None:
        encrypted = smime.encrypt(MESSAGE, [BOB.certificate])
        self.assertRaises(smime.NotForMe, smime.open_message, encrypted, [A, C], VALIDATOR, None)

    def test_tampered_gcm(self) -> None:
        encrypted = smime.encrypt(MESSAGE, [BOB.certificate], cipher="aes256-gcm")
        self.assertRaises(smime.Tampered, smime.open_message, flip_base64(encrypted, 40), [B], VALIDATOR, None)

    def test_tampered_signed_body_is_bad_signature(self) -> None:
        signed = smime.sign(MESSAGE, A).replace(b"trailing spaces", b"trailing Spaces")
        opened = smime.open_message(signed, [], VALIDATOR, "alice@example.org")
        self.assertEqual(opened.signatures[0].trust.status, TrustStatus.BAD_SIGNATURE)
        self.assertFalse(opened.signatures[0].trust.trusted)

    def test_tampered_opaque_is_bad_signature(self) -> None:
        signed = smime.sign(MESSAGE, A, detached=False)
        der_bytes = decode_body(signed)
        index = der_bytes.find(b"trailing spaces")
        damaged = der_bytes[:index] + b"T" + der_bytes[index + 1 :]
        opened = smime.open_message(wrap(damaged, "signed-data"), [], VALIDATOR, "alice@example.org")
        self.assertEqual(opened.signatures[0].trust.status, TrustStatus.BAD_SIGNATURE)

    def test_untrusted_and_mismatch(self) -> None:
        stranger = OTHER.user("alice@example.org", key_index=3)
        signed = smime.sign(MESSAGE, key(stranger, "s"))
        opened = smime.open_message(signed, [], VALIDATOR, "alice@example.org")
        self.assertEqual(opened.signatures[0].trust.status, TrustStatus.UNTRUSTED)
        mismatch = smime.open_message(smime.sign(MESSAGE, A), [], VALIDATOR, "mallory@example.org")
        self.assertEqual(mismatch.signatures[0].trust.status, TrustStatus.MISMATCH)

    def test_expired_and_wrong_eku(self) -> None:
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        expired = PKI.user("old@example.org", key_index=4, not_before=past, days=10)
        opened = smime.open_message(smime.sign(MESSAGE, key(expired, "o")), [], VALIDATOR, "old@example.org")
        self.assertEqual(opened.signatures[0].trust.status, TrustStatus.EXPIRED)
        server_only = PKI.user("web@example.org", key_index=5, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
        opened = smime.open_message(smime.sign(MESSAGE, key(server_only, "w")), [], VALIDATOR, "web@example.org")
        self.assertEqual(opened.signatures[0].trust.status, TrustStatus.UNUSABLE)

    def test_malformed_inputs(self) -> None:
        cases = [
            wrap(b"\x30\x80\x06\x09", "enveloped-data"),
            wrap(b"\x30\x84\xff\xff\xff\xff", "enveloped-data"),
            wrap(b"\x30" * 200 + b"\x00", "enveloped-data"),
            wrap(b"\x30\x80" * 100, "enveloped-data"),
            smime.encrypt(MESSAGE, [BOB.certificate])[:-300],
            b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary=x\r\n\r\n--x\r\n',
        ]
        for case in cases:
            self.assertRaises(smime.Malformed, smime.open_message, case, [B], VALIDATOR, None)

    def test_unsupported_algorithm(self) -> None:
        self.assertRaises(smime.UnsupportedAlgorithm, smime.encrypt, MESSAGE, [BOB.certificate], cipher="rc2")
        self.assertRaises(smime.UnsupportedAlgorithm, smime.sign, MESSAGE, A, digest="sha1")
        self.assertRaises(smime.UnsupportedAlgorithm, smime.sign, MESSAGE, A, digest="md5")

    def test_errors_do_not_show_content(self) -> None:
        secret = b"Content-Type: text/plain\r\n\r\nmy secret is 1234\r\n"
        encrypted = smime.encrypt(secret, [BOB.certificate], cipher="aes128-gcm")
        try:
            smime.open_message(flip_base64(encrypted, 60), [B], VALIDATOR, None)
        except smime.SMIMEError as error:
            self.assertNotIn("1234", str(error))
            self.assertIsInstance(error, smime.Tampered)
        else:
            self.fail("a tampered message was accepted")


def decode_body(message: bytes) -> bytes:
    return base64.b64decode(message.split(b"\r\n\r\n", 1)[1])


def wrap(der_bytes: bytes, smime_type: str) -> bytes:
    """A pkcs7-mime message around DER bytes, as a peer would send it."""
    body = base64.encodebytes(der_bytes).replace(b"\n", b"\r\n")
    return (
        f"Content-Type: application/pkcs7-mime; smime-type={smime_type}; name=smime.p7m\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + body


def flip_base64(message: bytes, from_end: int) -> bytes:
    """Flip one bit of the decoded body ``from_end`` bytes before its end."""
    data = bytearray(decode_body(message))
    data[-from_end] ^= 0x01
    return wrap(bytes(data), "enveloped-data")


class CertificateParsingTests(unittest.TestCase):
    def test_signer_named_by_issuer_and_serial(self) -> None:
        data = cms.sign(b"x", BOB.certificate, BOB.key)
        result = cms.verify(data, detached_content=[b"x"])
        self.assertEqual(result.signers[0].certificate, BOB.certificate)
        self.assertIsInstance(result.certificates[0], x509.Certificate)
        self.assertFalse(cms.verify(data, detached_content=[b"y"]).signers[0].verified)


class CapabilityReadingTests(unittest.TestCase):
    """SMIMECapabilities as a signer's attribute: what a correspondent says it can read."""

    def read(self, value: bytes) -> tuple[str, ...] | None:
        return _read_capabilities(der.parse(value))

    def test_names_parameters_and_unknown_algorithms(self) -> None:
        oaep_sha384 = der_encoder.encode(rfc4055.rSAES_OAEP_SHA384_Params)
        rc2 = der.algorithm("1.2.840.113549.3.2", der.integer(128))
        value = der.sequence(
            der.algorithm(alg.CIPHERS["aes256-gcm"].oid),
            alg.OAEP_SHA256_IDENTIFIER,
            der.algorithm(alg.RSAES_OAEP, oaep_sha384),
            der.algorithm(alg.RSAES_OAEP, b"\x05\x00"),  # parameters that are not OAEP's: plain OAEP
            rc2,
            der.sequence(der.oid("1.2.3.4")),
        )
        self.assertEqual(
            self.read(value),
            ("aes256-gcm", "rsa-oaep", "rsa-oaep-sha384", "rsa-oaep", "1.2.840.113549.3.2", "1.2.3.4"),
        )
        self.assertEqual(self.read(der.sequence()), ())

    def test_at_most_64_are_read(self) -> None:
        many = der.sequence(*[der.algorithm(alg.DIGESTS["sha256"].oid)] * 100)
        self.assertEqual(self.read(many), ("sha256",) * 64)

    def test_malformed(self) -> None:
        for value in (
            der.integer(1),  # not a SEQUENCE
            der.sequence(der.integer(1)),  # an entry that is not a SEQUENCE
            der.sequence(der.sequence()),  # an entry without its OID
            der.sequence(der.sequence(der.integer(1))),  # the OID is not one
            der.sequence(der.sequence(der.oid("1.2.3"), der.integer(1), der.integer(2))),  # three fields
        ):
            with self.assertRaises(cms.Malformed, msg=value.hex()):
                self.read(value)


class SigningTimeTests(unittest.TestCase):
    """signingTime as UTCTime or GeneralizedTime, read the way RFC 5280 says."""

    def test_der_forms(self) -> None:
        utc = datetime.UTC
        self.assertEqual(_parse_time("260301100005Z", "%y%m%d"), datetime.datetime(2026, 3, 1, 10, 0, 5, tzinfo=utc))
        last = datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=utc)
        self.assertEqual(_parse_time("491231235959Z", "%y%m%d"), last)
        self.assertEqual(_parse_time("500101000000Z", "%y%m%d"), datetime.datetime(1950, 1, 1, tzinfo=utc))
        self.assertEqual(_parse_time("20510101000000Z", "%Y%m%d"), datetime.datetime(2051, 1, 1, tzinfo=utc))

    def test_other_forms(self) -> None:
        utc = datetime.UTC
        self.assertEqual(_parse_time("2603011000Z", "%y%m%d"), datetime.datetime(2026, 3, 1, 10, 0, tzinfo=utc))
        self.assertEqual(_parse_time("260301100000+0100", "%y%m%d"), datetime.datetime(2026, 3, 1, 9, 0, tzinfo=utc))
        self.assertEqual(_parse_time("550101000000+0000", "%y%m%d"), datetime.datetime(1955, 1, 1, tzinfo=utc))
        self.assertEqual(_parse_time("20260301100000.25Z", "%Y%m%d"), datetime.datetime(2026, 3, 1, 10, 0, tzinfo=utc))

    def test_impossible_dates(self) -> None:
        for text, form in (("261301000000Z", "%y%m%d"), ("20260230000000Z", "%Y%m%d"), ("2603011000", "%y%m%d")):
            with self.assertRaises(ValueError, msg=text):
                _parse_time(text, form)

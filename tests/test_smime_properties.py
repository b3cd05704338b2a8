"""Property tests: round trips over random MIME entities; garbage never raises anything but SMIMEError."""

from __future__ import annotations

import base64
import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from gatekeeper import cms, smime
from gatekeeper.keys.identity import UnlockedKey
from gatekeeper.testing.pki import TestPKI
from gatekeeper.trust import TrustValidator

PKI = TestPKI("Property CA", key_index=30)
ALICE = PKI.user("alice@example.org", key_index=30)
BOB = PKI.user("bob@example.org", key_kind="p256", key_index=31)
A = UnlockedKey("a", ALICE.certificate, ALICE.key, ALICE.chain)
B = UnlockedKey("b", BOB.certificate, BOB.key, BOB.chain)
VALIDATOR = TrustValidator([PKI.certificate])
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_line = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=90).map(lambda t: t.encode())
_text = st.lists(_line, max_size=12).map(lambda lines: b"\r\n".join(lines) + b"\r\n")
_binary = st.binary(max_size=600)


@st.composite
def entities(draw: st.DrawFn) -> bytes:
    """A text part, a binary part, or a multipart/mixed of both, with random content."""
    text = draw(_text)
    kind = draw(st.sampled_from(["text", "binary", "mixed"]))
    plain = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + text
    if kind == "text":
        return plain
    attachment = (
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(draw(_binary)).replace(b"\n", b"\r\n")
    )
    if kind == "binary":
        return attachment
    return (
        b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\n"
        + plain
        + b"\r\n--zz\r\n"
        + attachment
        + b"\r\n--zz--\r\n"
    )


def header(entity: bytes) -> bytes:
    return b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: p\r\n" + entity


class RoundTripProperties(unittest.TestCase):
    @SETTINGS
    @given(entities(), st.sampled_from(["aes256-cbc", "aes128-gcm", "aes256-gcm"]))
    def test_encrypt_decrypt(self, entity: bytes, cipher: str) -> None:
        opened = smime.open_message(
            smime.encrypt(header(entity), [BOB.certificate], cipher=cipher), [B], VALIDATOR, None
        )
        self.assertEqual(opened.content, entity)

    @SETTINGS
    @given(entities(), st.booleans())
    def test_sign_verify(self, entity: bytes, detached: bool) -> None:
        opened = smime.open_message(
            smime.sign(header(entity), A, detached=detached), [], VALIDATOR, "alice@example.org"
        )
        self.assertTrue(opened.signatures[0].trust.ok, opened.signatures[0].trust.reasons)
        if entity.isascii():
            self.assertEqual(opened.content, entity)  # 7-bit content is never touched


VALID = cms.envelope(b"Content-Type: text/plain\r\n\r\nhi\r\n", [cms.Recipient(ALICE.certificate)])
VALID_SIGNED = cms.sign(b"hello", ALICE.certificate, ALICE.key, detached=False)


def as_message(der: bytes, smime_type: str) -> bytes:
    return (
        f"Content-Type: application/pkcs7-mime; smime-type={smime_type}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + base64.encodebytes(der).replace(b"\n", b"\r\n")


class RobustnessProperties(unittest.TestCase):
    def check(self, message: bytes) -> None:
        with contextlib.suppress(smime.SMIMEError):
            smime.open_message(message, [A], VALIDATOR, None)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=400))
    def test_random_bytes(self, data: bytes) -> None:
        self.check(as_message(data, "enveloped-data"))
        self.check(as_message(data, "signed-data"))
        self.check(data)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from([VALID, VALID_SIGNED]), st.data())
    def test_mutated_cms(self, original: bytes, data: st.DataObject) -> None:
        mutated = bytearray(original)
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(mutated) - 1))
            mutated[position] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
        self.check(as_message(bytes(mutated), "enveloped-data"))
        with contextlib.suppress(smime.SMIMEError):
            cms.decrypt(bytes(mutated), [A])
        with contextlib.suppress(smime.SMIMEError):
            cms.verify(bytes(mutated))

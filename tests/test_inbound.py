"""The inbound pipeline without sockets: decrypt, verify, strip forged verdicts, report (gatekeeper/inbound.py)."""

from __future__ import annotations

import base64
import email
import email.policy
import pickle
import re
from pathlib import Path
from typing import Any
from unittest import mock

from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper import inbound, smime
from gatekeeper.capabilities import FileCapabilityStore
from gatekeeper.config import TrustConfig
from gatekeeper.inbound import Revealer, RevealOptions, TrustSpec, reveal, reveal_job
from gatekeeper.keys.identity import Identity, UnlockedKey
from gatekeeper.keys.keyring import KeyRing, fingerprint
from gatekeeper.keys.unlocking import identity_to_wire
from gatekeeper.testing.pki import TestPKI
from gatekeeper.trust import TrustValidator
from gatekeeper.workers import InlineWorkerPool

ALICE, BOB = "alice@a.example", "bob@b.example"
ENTITY = (
    b'Content-Type: multipart/alternative; boundary="alt"\r\n'
    b"\r\n"
    b"--alt\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Gr=C3=BC=C3=9Fe, Bob.  \r\n"
    b".a line with a leading dot\r\n"
    b"--alt\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<p>Hello</p>\r\n"
    b"--alt--\r\n"
)


def message(sender: str = ALICE, entity: bytes = ENTITY, extra: bytes = b"") -> bytes:
    return (
        (
            f"From: Alice <{sender}>\r\nTo: Bob <{BOB}>\r\nSubject: the plan\r\n"
            "Date: Sun, 01 Mar 2026 10:00:00 +0000\r\nMessage-ID: <plan@a.example>\r\nMIME-Version: 1.0\r\n"
        ).encode()
        + extra
        + entity
    )


class World:
    """Two correspondents under one CA, a stranger under another, and bob with a current and a retired key."""

    def __init__(self) -> None:
        self.pki = TestPKI("Inbound CA", key_index=60)
        self.other_ca = TestPKI("Stranger CA", key_index=61)
        self.alice = self.pki.user(ALICE, key_index=60)
        self.bob_old = self.pki.user(BOB, key_index=61)
        self.bob_new = self.pki.user(BOB, key_index=62)
        self.carol = self.pki.user("carol@b.example", key_index=63)
        self.stranger = self.other_ca.user(ALICE, key_index=64)
        self.validator = TrustValidator([self.pki.certificate])
        self.bob = Identity(
            BOB,
            (
                UnlockedKey("k-new", self.bob_new.certificate, self.bob_new.key, self.bob_new.chain),
                UnlockedKey("k-old", self.bob_old.certificate, self.bob_old.key, self.bob_old.chain),
            ),
        )

    def signer(self, name: str = "alice") -> UnlockedKey:
        issued = getattr(self, name)
        return UnlockedKey(name, issued.certificate, issued.key, issued.chain)


_WORLD: World | None = None


def world() -> World:
    global _WORLD
    if _WORLD is None:
        _WORLD = World()
    return _WORLD


def parts(revealed: bytes) -> tuple[bytes, list[bytes]]:
    """The header block and the raw parts of a revealed message (multipart/mixed)."""
    head, _, body = revealed.partition(b"\r\n\r\n")
    boundary = re.search(rb'boundary="([^"]+)"', head)
    assert boundary, head
    delimiter = b"--" + boundary.group(1)
    pieces = body.split(b"\r\n" + delimiter)
    first = pieces[0]
    assert first.startswith(delimiter + b"\r\n"), first[:80]
    found = [first[len(delimiter) + 2 :]] + [p[2:] for p in pieces[1:-1]]
    assert pieces[-1] == b"--\r\n", pieces[-1]
    return head + b"\r\n", found


def report_text(revealed: bytes) -> str:
    parsed = email.message_from_bytes(revealed, policy=email.policy.default)
    reports = [p for p in parsed.walk() if p.get_filename() == "gatekeeper-report.txt"]
    assert len(reports) == 1, [p.get_filename() for p in parsed.walk()]
    return str(reports[0].get_content())


class RevealTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.w = world()

    def reveal(self, data: bytes, **options: Any) -> tuple[bytes, inbound.Report]:
        return reveal(self.w.bob, data, validator=self.w.validator, options=RevealOptions(**options))

    def test_encrypted_and_signed_is_decrypted_verified_and_reported(self) -> None:
        protected = smime.sign_and_encrypt(message(), self.w.signer(), [self.w.bob_new.certificate])
        revealed, report = self.reveal(protected)
        self.assertEqual(report.summary, f"decrypted=yes; signature=valid; signer={ALICE}")
        self.assertTrue(revealed.startswith(b"X-Gatekeeper-Security: " + report.summary.encode() + b"\r\n"))
        head, found = parts(revealed)
        self.assertEqual(found[0], ENTITY)  # the revealed entity, byte for byte
        self.assertIn(b"Subject: the plan\r\n", head)
        self.assertIn(b"multipart/mixed", head)
        self.assertEqual(head.count(b"MIME-Version"), 1)
        text = report_text(revealed)
        self.assertIn("Decrypted with your current key (k-new)", text)
        self.assertIn("VALID", text)
        self.assertIn(f"Signer: {ALICE}", text)
        self.assertIn("'Inbound CA'", text)
        self.assertEqual((report.key_ids, report.layers), (("k-new",), ("enveloped", "signed")))
        self.assertEqual(report.message_id, "<plan@a.example>")
        self.assertEqual(
            [x509.load_der_x509_certificate(h.certificate) for h in report.harvest], [self.w.alice.certificate]
        )
        self.assertEqual(report.harvest[0].address, ALICE)
        self.assertIn("aes256-gcm", report.harvest[0].capabilities or ())

    def test_a_retired_key_still_decrypts(self) -> None:
        protected = smime.encrypt(message(), [self.w.bob_old.certificate], cipher="aes128-gcm")
        revealed, report = self.reveal(protected)
        self.assertEqual(report.summary, "decrypted=yes; signature=none")
        self.assertEqual(report.key_ids, ("k-old",))
        self.assertIn("one of your earlier keys (k-old)", report_text(revealed))
        self.assertIn("AES-128-GCM (authenticated)", report_text(revealed))
        self.assertEqual(parts(revealed)[1][0], ENTITY)

    def test_mail_for_someone_else_is_delivered_unchanged_with_the_reason(self) -> None:
        protected = smime.encrypt(message(), [self.w.carol.certificate])
        revealed, report = self.reveal(protected)
        self.assertEqual(report.summary, "decrypted=failed; signature=none; error=not-for-me")
        _, found = parts(revealed)
        original_head, _, original_body = protected.partition(b"\r\n\r\n")
        content = [line for line in original_head.split(b"\r\n") if line.lower().startswith(b"content-")]
        self.assertEqual(found[0], b"\r\n".join(content) + b"\r\n\r\n" + original_body)
        self.assertIn("COULD NOT BE OPENED", report_text(revealed))
        self.assertEqual(report.harvest, ())

    def test_damaged_mail_is_delivered_unchanged(self) -> None:
        protected = smime.encrypt(message(), [self.w.bob_new.certificate], cipher="aes256-gcm")
        head, _, body = protected.partition(b"\r\n\r\n")
        der = bytearray(base64.b64decode(body))
        der[-40] ^= 0x01  # inside the ciphertext: the GCM tag no longer matches
        tampered = head + b"\r\n\r\n" + base64.encodebytes(bytes(der)).replace(b"\n", b"\r\n")
        revealed, report = self.reveal(tampered)
        self.assertEqual((report.decrypted, report.error), ("failed", "tampered"))
        self.assertIn(base64.encodebytes(bytes(der))[:60].replace(b"\n", b"\r\n"), revealed)
        garbage = head + b"\r\n\r\n!!!! not base64 at all !!!!\r\n"
        revealed, report = self.reveal(garbage)
        self.assertEqual((report.decrypted, report.error), ("failed", "damaged"))
        self.assertIn(b"!!!! not base64 at all !!!!", revealed)

    def test_plain_mail_from_outside_gets_the_fig8_warning(self) -> None:
        plain = message("someone@outside.example")
        revealed, report = self.reveal(plain, local_domains=("b.example",))
        self.assertEqual(report.summary, "decrypted=no; signature=none; warning=unverified")
        self.assertEqual(parts(revealed)[1][0], ENTITY)  # the original bytes, unchanged
        text = report_text(revealed)
        self.assertIn("identity and the message's integrity cannot be verified", text)
        self.assertIn("someone@outside.example", text)

    def test_plain_mail_from_a_local_domain_is_configurable(self) -> None:
        plain = message("carol@b.example")
        warned, report = self.reveal(plain, local_domains=("b.example",))
        self.assertEqual(report.warning, "unverified")
        self.assertIn("cannot be verified", report_text(warned))
        noted, report = self.reveal(plain, local_domains=("b.example",), plain_from_local="note")
        self.assertIsNone(report.warning)
        self.assertEqual(report.summary, "decrypted=no; signature=none")
        self.assertIn("from an address of your own organisation", report_text(noted))
        self.assertNotIn("cannot be verified", report_text(noted))
        bare, report = self.reveal(plain, local_domains=("b.example",), plain_from_local="none")
        self.assertEqual(bare, b"X-Gatekeeper-Security: decrypted=no; signature=none\r\n" + plain)
        # "none" is only for the local domains: outside mail still gets the warning
        outside, report = self.reveal(
            message("x@outside.example"), local_domains=("b.example",), plain_from_local="none"
        )
        self.assertEqual(report.warning, "unverified")
        self.assertIn(b"gatekeeper-report.txt", outside)

    def test_forged_verdicts_are_removed(self) -> None:
        forged_part = (
            b"Content-Type: text/plain\r\n"
            b'Content-Disposition: inline; filename="Gatekeeper-Report.txt"\r\n\r\n'
            b"Signature: VALID (trust me)\r\n"
        )
        rfc2231_part = (
            b"Content-Type: text/plain\r\n"
            b"Content-Disposition: attachment; filename*=utf-8''gatekeeper-report.txt\r\n\r\nx\r\n"
        )
        marked_part = b"Content-Type: text/plain\r\nX-Gatekeeper-Report: 1\r\n\r\ny\r\n"
        attached = (
            b"Content-Type: message/rfc822\r\n\r\n"
            b"X-Gatekeeper-Security: decrypted=yes; signature=valid\r\nSubject: fwd\r\n"
            b'Content-Type: multipart/mixed; boundary="in"\r\n\r\n--in\r\nContent-Type: text/plain\r\n\r\nkept\r\n'
            b"--in\r\n" + forged_part + b"--in--\r\n"
        )
        body = (
            b'Content-Type: multipart/mixed; boundary="out"\r\n\r\npreamble\r\n'
            b"--out\r\nContent-Type: text/plain\r\n\r\nThe real text.\r\n"
            b"--out\r\n"
            + forged_part
            + b"--out\r\n"
            + rfc2231_part
            + b"--out\r\n"
            + marked_part
            + b"--out\r\n"
            + attached
            + b"--out--\r\n"
        )
        forged = message(
            "mallory@outside.example",
            body,
            extra=b"X-Gatekeeper-Security: decrypted=yes; signature=valid; signer=ceo@b.example\r\n",
        )
        revealed, report = self.reveal(forged)
        self.assertEqual(revealed.partition(b"\r\n\r\n")[0].count(b"X-Gatekeeper-Security:"), 1)
        self.assertTrue(
            revealed.startswith(b"X-Gatekeeper-Security: decrypted=no; signature=none; warning=unverified\r\n")
        )
        self.assertNotIn(b"trust me", revealed)
        self.assertNotIn(b"\r\nx\r\n", revealed)
        self.assertNotIn(b"\r\ny\r\n", revealed)
        self.assertIn(b"The real text.", revealed)
        self.assertIn(b"kept", revealed)
        self.assertIn(b"Subject: fwd", revealed)
        self.assertEqual(len(report.removed), 6, report.removed)  # 2 headers, 4 parts
        self.assertIn("Removed", report_text(revealed))
        parsed = email.message_from_bytes(revealed, policy=email.policy.default)
        names = [p.get_filename() for p in parsed.walk() if p.get_filename()]
        self.assertEqual(names, ["gatekeeper-report.txt"])  # ours, and only ours

    def test_forged_verdicts_inside_an_encrypted_message_are_removed(self) -> None:
        inner = (
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n'
            b'--b\r\nContent-Type: text/plain; name="gatekeeper-report.txt"\r\n\r\nSignature: VALID\r\n--b--\r\n'
        )
        protected = smime.sign_and_encrypt(message(entity=inner), self.w.signer(), [self.w.bob_new.certificate])
        revealed, report = self.reveal(protected)
        self.assertEqual(report.signature, "valid")
        self.assertNotIn(b"Signature: VALID\r\n", revealed)
        self.assertEqual(report.removed, ("a forged Gatekeeper report part",))

    def test_signer_not_the_sender_is_a_mismatch_and_not_harvested(self) -> None:
        signed = smime.sign(message("mallory@a.example"), self.w.signer())
        _, report = self.reveal(signed)
        self.assertEqual(report.summary, f"decrypted=no; signature=mismatch; signer={ALICE}")
        self.assertEqual(report.harvest, ())

    def test_untrusted_and_altered_signatures(self) -> None:
        untrusted = smime.sign(message(), self.w.signer("stranger"))
        revealed, report = self.reveal(untrusted)
        self.assertEqual((report.signature, report.harvest), ("untrusted", ()))
        self.assertIn("NOT TRUSTED", report_text(revealed))
        altered = smime.sign(message(), self.w.signer()).replace(b"Bob.  ", b"Eve.  ")
        revealed, report = self.reveal(altered)
        self.assertEqual((report.signature, report.harvest), ("invalid", ()))
        self.assertIn("INVALID", report_text(revealed))

    def test_triple_wrapped(self) -> None:
        inner = smime.sign(message(), self.w.signer())
        outer = smime.sign(smime.encrypt(inner, [self.w.bob_new.certificate]), self.w.signer())
        revealed, report = self.reveal(outer)
        self.assertEqual(report.layers, ("signed", "enveloped", "signed"))
        self.assertEqual(report.summary, f"decrypted=yes; signature=valid; signer={ALICE}")
        self.assertEqual(len(report.signers), 2)
        text = report_text(revealed)
        self.assertIn("Signature 1 of 2 (outer)", text)
        self.assertIn("Signature 2 of 2 (inner)", text)
        self.assertEqual(parts(revealed)[1][0], ENTITY)

    def test_the_result_depends_on_the_input_alone(self) -> None:
        protected = smime.sign_and_encrypt(message(), self.w.signer(), [self.w.bob_new.certificate])
        self.assertEqual(self.reveal(protected)[0], self.reveal(protected)[0])
        one, _ = self.reveal(message(entity=b"Content-Type: text/plain\r\n\r\none\r\n"))
        two, _ = self.reveal(message(entity=b"Content-Type: text/plain\r\n\r\ntwo\r\n"))
        self.assertNotEqual(re.search(rb'boundary="[^"]+"', one), re.search(rb'boundary="[^"]+"', two))

    def test_a_boundary_found_in_the_content_is_not_used(self) -> None:
        # Only the length and both ends of the content choose the boundary: a middle that
        # happens to hold the first choice must get another one.
        head, tail = b"Content-Type: text/plain\r\n\r\n" + b"a" * 70000, b"b" * 70000 + b"\r\n"
        first = inbound._boundary(head + b"-" * 47 + tail, "report")
        tricky = head + b"--" + first + tail
        self.assertEqual(len(tricky), len(head) + 47 + len(tail))
        second = inbound._boundary(tricky, "report")
        self.assertNotEqual(second, first)
        self.assertNotIn(b"--" + second, tricky)

    def test_bare_line_feeds_become_crlf(self) -> None:
        revealed, report = self.reveal(message().replace(b"\r\n", b"\n"))
        self.assertTrue(report.plain)
        self.assertNotIn(b"\n", revealed.replace(b"\r\n", b""))
        self.assertEqual(parts(revealed)[1][0], ENTITY)

    def test_no_from_means_nothing_is_harvested(self) -> None:
        signed = smime.sign(
            b"To: bob@b.example\r\nSubject: x\r\nContent-Type: text/plain\r\n\r\nhi\r\n", self.w.signer()
        )
        revealed, report = self.reveal(signed)
        self.assertEqual((report.signature, report.sender, report.harvest), ("valid", None, ()))
        self.assertIn("no usable From address", report_text(revealed))

    def test_an_internal_error_delivers_the_message_unchanged(self) -> None:
        with mock.patch.object(smime, "open_canonical", side_effect=RuntimeError("boom")):
            revealed, report = self.reveal(message())
        self.assertEqual((report.decrypted, report.error), ("failed", "internal"))
        self.assertNotIn("boom", report.text)
        self.assertEqual(parts(revealed)[1][0], ENTITY)

    def test_a_header_too_large_to_read_is_shown_as_text(self) -> None:
        huge = b"X-Padding: " + b"p" * (1024 * 1024 + 100) + b"\r\n" + message()
        revealed, report = self.reveal(huge)
        self.assertEqual((report.decrypted, report.error), ("failed", "too-large"))
        self.assertIn(huge, revealed)

    def test_a_report_with_non_ascii_text_is_quoted_printable(self) -> None:
        umlaut_ca = TestPKI("Bürger CA", key_index=66)
        issued = umlaut_ca.user(ALICE, key_index=60)
        signed = smime.sign(message(), UnlockedKey("u", issued.certificate, issued.key, issued.chain))
        revealed, report = self.reveal(signed)
        self.assertEqual(report.signature, "untrusted")
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable", revealed)
        self.assertIn("Bürger CA", report_text(revealed))

    def test_options_are_checked(self) -> None:
        self.assertRaises(ValueError, RevealOptions, plain_from_local="maybe")


class WorkerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.w = world()

    def test_trust_spec_and_job_arguments_pickle(self) -> None:
        spec = TrustSpec.of([self.w.pki.certificate], crls=[self.w.pki.crl()])
        protected = smime.sign_and_encrypt(message(), self.w.signer(), [self.w.bob_new.certificate])
        arguments = pickle.dumps((identity_to_wire(self.w.bob), protected, spec, RevealOptions()))
        _, report = reveal_job(*pickle.loads(arguments))  # noqa: S301 - our own bytes
        self.assertEqual(report.summary, f"decrypted=yes; signature=valid; signer={ALICE}")
        self.assertEqual(pickle.loads(pickle.dumps(report)), report)  # noqa: S301 - our own bytes
        copy = pickle.loads(pickle.dumps(spec))  # noqa: S301 - our own bytes
        self.assertIs(spec.validator(), copy.validator())  # built once per process

    def test_a_revoked_signer_through_the_spec(self) -> None:
        spec = TrustSpec.of([self.w.pki.certificate], crls=[self.w.pki.crl([self.w.alice.certificate])])
        signed = smime.sign(message(), self.w.signer())
        _, report = reveal_job(identity_to_wire(self.w.bob), signed, spec, RevealOptions())
        self.assertEqual((report.signature, report.harvest), ("revoked", ()))

    def test_spec_from_the_trust_configuration(self) -> None:
        anchors = Path(self.mktemp())
        anchors.write_bytes(self.w.other_ca.cert_pem())
        spec = TrustSpec.load(TrustConfig(anchors=(anchors,)), extra_anchors=[self.w.pki.certificate])
        self.assertEqual(
            [x509.load_der_x509_certificate(d) for d in spec.anchors],
            [self.w.pki.certificate, self.w.other_ca.certificate],
        )


class RevealerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.w = world()
        self.clock = Clock()
        self.keyring = KeyRing(Path(self.mktemp()))
        self.capabilities = FileCapabilityStore(Path(self.mktemp()))
        self.revealer = Revealer(
            InlineWorkerPool(),
            TrustSpec.of([self.w.pki.certificate]),
            clock=self.clock,
            keyring=self.keyring,
            capabilities=self.capabilities,
        )
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def run_reveal(self, data: bytes) -> tuple[bytes, inbound.Report]:
        d = Deferred.fromCoroutine(self.revealer.reveal(self.w.bob, data, protocol="pop3", session=3, peer="192.0.2.1"))
        return self.successResultOf(d)

    def test_trusted_signers_are_harvested_once(self) -> None:
        protected = smime.sign_and_encrypt(message(), self.w.signer(), [self.w.bob_new.certificate])
        self.run_reveal(protected)
        entry = self.keyring.entry(fingerprint(self.w.alice.certificate))
        assert entry is not None
        self.assertEqual(entry.origin, "harvested")
        self.assertEqual(entry.chain, (self.w.pki.certificate,))
        remembered = self.capabilities.get(ALICE)
        assert remembered is not None
        self.assertIn("aes256-gcm", remembered.algorithms)
        with (
            mock.patch.object(KeyRing, "harvest") as harvest,
            mock.patch.object(FileCapabilityStore, "remember") as remember,
        ):
            self.run_reveal(protected)  # the same again: nothing to write
            self.clock.advance(7200)
            self.run_reveal(protected)  # later: checked again, still nothing new
        self.assertEqual((harvest.call_count, remember.call_count), (0, 0))

    def test_untrusted_signers_are_not_harvested(self) -> None:
        self.run_reveal(smime.sign(message(), self.w.signer("stranger")))
        self.run_reveal(smime.sign(message("mallory@a.example"), self.w.signer()))
        self.assertEqual((self.keyring.entries(), self.capabilities.get(ALICE)), ([], None))

    def test_events(self) -> None:
        self.run_reveal(smime.encrypt(message(), [self.w.bob_new.certificate]))
        self.run_reveal(message("x@outside.example"))
        reveals = [e for e in self.events if e.get("gk_event") == "reveal"]
        self.assertEqual([(e["decrypted"], e["signature"]) for e in reveals], [("yes", "none"), ("no", "none")])
        self.assertEqual({(e["user"], e["protocol"], e["session"]) for e in reveals}, {(BOB, "pop3", 3)})
        uses = [e for e in self.events if e.get("gk_event") == "key_use"]
        self.assertEqual(len(uses), 1)
        self.assertEqual((uses[0]["operation"], uses[0]["peer"], uses[0]["gk_audit"]), ("decrypt", "192.0.2.1", True))
        self.assertEqual(uses[0]["message_id"], "<plan@a.example>")

    def test_a_failing_key_ring_does_not_stop_the_message(self) -> None:
        blocked = Path(self.mktemp())
        blocked.write_text("a file where the key ring's directory should be")
        self.revealer = Revealer(
            InlineWorkerPool(), TrustSpec.of([self.w.pki.certificate]), clock=self.clock, keyring=KeyRing(blocked)
        )
        revealed, report = self.run_reveal(smime.sign(message(), self.w.signer()))
        self.assertEqual(report.signature, "valid")
        self.assertIn(b"gatekeeper-report.txt", revealed)
        self.assertTrue([e for e in self.events if "could not remember" in e.get("log_format", "")])

    def test_identities_are_serialised_once(self) -> None:
        with mock.patch.object(inbound, "identity_to_wire", wraps=identity_to_wire) as spy:
            self.run_reveal(message())
            self.run_reveal(message())
        self.assertEqual(spy.call_count, 1)

    def test_small_plain_single_parts_are_revealed_without_a_worker(self) -> None:
        pool = InlineWorkerPool()
        self.revealer = Revealer(pool, TrustSpec.of([self.w.pki.certificate]), clock=self.clock, inline_bytes=4096)
        plain = message("carol@outside.example", TEXT)
        revealed, report = self.run_reveal(plain)
        self.assertEqual(pool.jobs, 0)
        self.assertEqual(
            (revealed, report), reveal(self.w.bob, plain, validator=TrustValidator([self.w.pki.certificate]))
        )
        self.assertIn(b"cannot be verified", revealed)
        self.assertEqual([e["decrypted"] for e in self.events if e.get("gk_event") == "reveal"], ["no"])
        for other in (
            message("carol@outside.example"),  # multipart
            smime.encrypt(plain, [self.w.bob_new.certificate]),
            smime.sign(plain, self.w.signer()),
            message("carol@outside.example", TEXT + b"x" * 4096),  # over inline_bytes
        ):
            self.run_reveal(other)
        self.assertEqual(pool.jobs, 4)

    def test_revealing_on_the_reactor_can_be_switched_off(self) -> None:
        pool = InlineWorkerPool()
        self.revealer = Revealer(pool, TrustSpec.of([self.w.pki.certificate]), clock=self.clock, inline_bytes=0)
        self.run_reveal(message("carol@outside.example", TEXT))
        self.assertEqual(pool.jobs, 1)


TEXT = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nSee you at noon.\r\n"


class PlainSinglePartTests(SynchronousTestCase):
    """Which messages :class:`Revealer` may reveal on the reactor: their header alone decides."""

    def test_text_single_parts(self) -> None:
        for entity in (
            TEXT,
            b"\r\nno Content-Type: text/plain by default\r\n",
            b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>See you at noon.</p>\r\n",
            TEXT.replace(b"\r\n", b"\n"),
        ):
            self.assertTrue(inbound.is_plain_single_part(message(entity=entity)), entity)
        self.assertTrue(inbound.is_plain_single_part(b"Subject: only a header\r\n"))

    def test_containers_smime_other_types_and_long_headers_are_not(self) -> None:
        w = world()
        for data in (
            message(),  # multipart/alternative
            message(entity=b"Content-Type: message/rfc822\r\n\r\n" + message(entity=TEXT)),
            smime.encrypt(message(entity=TEXT), [w.bob_new.certificate]),
            smime.sign(message(entity=TEXT), w.signer()),
            message(entity=b"Content-Type: application/octet-stream; name=smime.p7m\r\n\r\nMIA=\r\n"),
            message(entity=b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n"),
            message(extra=b"X-Padding: " + b"p" * 20000 + b"\r\n", entity=TEXT),
        ):
            self.assertFalse(inbound.is_plain_single_part(data), data[:300])

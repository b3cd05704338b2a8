"""The outbound pipeline: the copies protect() builds, its repairs and refusals, and the reactor side.

The copies are opened again with the S/MIME engine (each recipient's key, and the
sender's for encrypt-to-self) and their signatures checked against the test CA.
"""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gatekeeper import smime
from gatekeeper.config import PolicyConfig, PolicyRule
from gatekeeper.errors import MessageRejected, PolicyRejected, RelayRefused, SourceUnavailable, UpstreamUnavailable
from gatekeeper.interfaces import RelayReply
from gatekeeper.keys.directory import LookupResult, SourceOutcome, SourceState
from gatekeeper.keys.identity import Identity, UnlockedKey
from gatekeeper.keys.unlocking import identity_to_wire
from gatekeeper.outbound import (
    KIND_ENCRYPTED,
    KIND_PASSED,
    KIND_PLAIN,
    KIND_SIGNED,
    OutboundPipeline,
    ProtectRequest,
    RecipientPlan,
    Submission,
    protect,
    received_header,
)
from gatekeeper.policy import Action
from gatekeeper.testing.pki import Issued, TestPKI
from gatekeeper.testing.relay import MemoryRelay
from gatekeeper.trust import TrustStatus, TrustValidator
from gatekeeper.workers import InlineWorkerPool

PKI = TestPKI("Outbound Test CA")
VALIDATOR = TrustValidator([PKI.certificate])
USERS: dict[str, Issued] = {
    address: PKI.user(address, key_kind="p256", key_index=index)
    for index, address in enumerate(
        ["alice@example.org", "bob@example.org", "carol@example.org", "grace@example.org", "dave@example.net"]
    )
}
ALICE = Identity(
    "alice@example.org",
    (
        UnlockedKey(
            "k1",
            USERS["alice@example.org"].certificate,
            USERS["alice@example.org"].key,
            USERS["alice@example.org"].chain,
        ),
    ),
)
RECEIVED = received_header(
    helo="client.example", client_ip="192.0.2.7", hostname="gk.example.org", protocol="ESMTPSA", transaction_id="t1"
)


def key(address: str) -> UnlockedKey:
    issued = USERS[address]
    return UnlockedKey(address, issued.certificate, issued.key, issued.chain)


def der(address: str) -> bytes:
    return USERS[address].certificate.public_bytes(Encoding.DER)


def plan(address: str, action: Action) -> RecipientPlan:
    return RecipientPlan(address, action, (der(address),) if action.encrypts else ())


def request(message: bytes, *plans: RecipientPlan, **options: object) -> ProtectRequest:
    return ProtectRequest(
        sender="alice@example.org",
        signer=identity_to_wire(ALICE),
        recipients=plans,
        message=message,
        received=RECEIVED,
        hostname="gk.example.org",
        **options,  # type: ignore[arg-type]
    )


MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\nCc: carol@example.org\r\n"
    b"Bcc: grace@example.org, dave@example.net\r\nSubject: plans\r\nDate: Sun, 01 Mar 2026 10:00:00 +0000\r\n"
    b"Message-ID: <plans@example.org>\r\n\r\nMeet at noon.\r\n"
)


def headers(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


class CopiesTests(SynchronousTestCase):
    def open(self, data: bytes, address: str) -> smime.Opened:
        return smime.open_message(data, [key(address)], VALIDATOR, "alice@example.org")

    def test_to_and_cc_share_one_copy_encrypted_to_them_and_the_sender(self) -> None:
        result = protect(
            request(
                MESSAGE,
                plan("bob@example.org", Action.ENCRYPT_AND_SIGN),
                plan("carol@example.org", Action.ENCRYPT_AND_SIGN),
            )
        )
        [copy] = result.deliveries
        self.assertEqual(
            (copy.kind, copy.recipients, copy.signed), (KIND_ENCRYPTED, ("bob@example.org", "carol@example.org"), True)
        )
        assert isinstance(copy.message, bytes)
        for reader in ("bob@example.org", "carol@example.org", "alice@example.org"):
            opened = self.open(copy.message, reader)
            self.assertEqual(opened.layers, ("enveloped", "signed"))
            self.assertTrue(opened.content.endswith(b"Meet at noon.\r\n"))
            self.assertIs(opened.signatures[0].trust.status, TrustStatus.VALID)
        with self.assertRaises(smime.NotForMe):
            self.open(copy.message, "grace@example.org")
        self.assertEqual(result.message_id, "<plans@example.org>")

    def test_each_bcc_recipient_gets_its_own_copy(self) -> None:
        result = protect(
            request(
                MESSAGE,
                plan("bob@example.org", Action.ENCRYPT_AND_SIGN),
                plan("grace@example.org", Action.ENCRYPT_AND_SIGN),
                plan("dave@example.net", Action.SIGN),
            )
        )
        by_recipients = {d.recipients: d for d in result.deliveries}
        self.assertEqual(set(by_recipients), {("bob@example.org",), ("grace@example.org",), ("dave@example.net",)})
        bob, grace = by_recipients[("bob@example.org",)], by_recipients[("grace@example.org",)]
        assert isinstance(bob.message, bytes) and isinstance(grace.message, bytes)
        # Grace's copy names grace and alice only; bob's copy cannot be opened by grace, nor grace's by bob.
        self.open(grace.message, "grace@example.org")
        self.open(grace.message, "alice@example.org")
        with self.assertRaises(smime.NotForMe):
            self.open(grace.message, "bob@example.org")
        with self.assertRaises(smime.NotForMe):
            self.open(bob.message, "grace@example.org")
        self.assertEqual(by_recipients[("dave@example.net",)].kind, KIND_SIGNED)
        for delivery in result.deliveries:
            assert isinstance(delivery.message, bytes)
            self.assertNotIn(b"Bcc:", headers(delivery.message))
            self.assertNotIn(b"grace@", headers(delivery.message))

    def test_signed_only_and_plain_copies(self) -> None:
        result = protect(
            request(MESSAGE, plan("bob@example.org", Action.SIGN), plan("carol@example.org", Action.PLAIN))
        )
        signed, plain = result.deliveries
        self.assertEqual((signed.kind, signed.recipients), (KIND_SIGNED, ("bob@example.org",)))
        self.assertEqual((plain.kind, plain.recipients, plain.signed), (KIND_PLAIN, ("carol@example.org",), False))
        assert isinstance(signed.message, bytes) and isinstance(plain.message, bytes)
        opened = self.open(signed.message, "bob@example.org")
        self.assertEqual(opened.layers, ("signed",))
        self.assertIs(opened.signatures[0].trust.status, TrustStatus.VALID)
        self.assertTrue(plain.message.endswith(b"\r\n\r\nMeet at noon.\r\n"))
        self.assertNotIn(b"Bcc:", plain.message)

    def test_encrypt_without_signing(self) -> None:
        [copy] = protect(request(MESSAGE, plan("bob@example.org", Action.ENCRYPT))).deliveries
        assert isinstance(copy.message, bytes)
        self.assertFalse(copy.signed)
        self.assertEqual(self.open(copy.message, "bob@example.org").layers, ("enveloped",))

    def test_received_comes_first_and_names_no_recipient(self) -> None:
        [copy] = protect(request(MESSAGE, plan("bob@example.org", Action.SIGN))).deliveries
        assert isinstance(copy.message, bytes)
        self.assertTrue(copy.message.startswith(b"Received: from client.example ([192.0.2.7])\r\n\tby gk.example.org"))
        self.assertNotIn(b"bob@", copy.message[: len(RECEIVED)])
        self.assertEqual(copy.message[: len(RECEIVED)].count(b"\r\n"), 3)

    def test_outbound_header_counts_that_copy_only(self) -> None:
        result = protect(
            request(
                MESSAGE,
                plan("bob@example.org", Action.ENCRYPT_AND_SIGN),
                plan("carol@example.org", Action.ENCRYPT_AND_SIGN),
                plan("dave@example.net", Action.SIGN),
                outbound_header=True,
            )
        )
        found = [headers(d.message) for d in result.deliveries]  # type: ignore[arg-type]
        self.assertIn(b"X-Gatekeeper-Outbound: encrypted=2\r\n", found[0])
        self.assertIn(b"X-Gatekeeper-Outbound: signed-only=1\r\n", found[1])
        self.assertNotIn(
            b"X-Gatekeeper", protect(request(MESSAGE, plan("bob@example.org", Action.SIGN))).deliveries[0].message
        )  # type: ignore[operator]

    def test_spooled_copies_are_private_files(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        source = directory / "in.eml"
        source.write_bytes(MESSAGE)
        result = protect(request(source, plan("bob@example.org", Action.SIGN), spool=True, spool_directory=directory))
        [copy] = result.deliveries
        assert isinstance(copy.message, Path)
        self.assertEqual(copy.message.parent, directory)
        self.assertEqual(stat.S_IMODE(copy.message.stat().st_mode), 0o600)
        self.assertIs(
            self.open(copy.message.read_bytes(), "bob@example.org").signatures[0].trust.status, TrustStatus.VALID
        )


class PassThroughTests(SynchronousTestCase):
    def check_unchanged(self, message: bytes) -> None:
        result = protect(
            request(message, plan("bob@example.org", Action.ENCRYPT_AND_SIGN), plan("dave@example.net", Action.SIGN))
        )
        [copy] = result.deliveries
        self.assertEqual((copy.kind, copy.recipients), (KIND_PASSED, ("bob@example.org", "dave@example.net")))
        assert isinstance(copy.message, bytes)
        self.assertTrue(copy.message.startswith(RECEIVED))
        self.assertEqual(copy.message.split(b"\r\n\r\n", 1)[1], message.split(b"\r\n\r\n", 1)[1])

    def test_smime_encrypted_is_not_encrypted_again(self) -> None:
        inner = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: s\r\n\r\nsecret\r\n"
        self.check_unchanged(smime.encrypt(inner, [USERS["bob@example.org"].certificate]))

    def test_smime_signed_is_left_alone(self) -> None:
        inner = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: s\r\n\r\nsigned by the client\r\n"
        self.check_unchanged(smime.sign(inner, key("alice@example.org")))

    def test_pgp_mime(self) -> None:
        self.check_unchanged(
            b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n--b\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n-----BEGIN PGP MESSAGE-----\r\nhQ\r\n"
            b"-----END PGP MESSAGE-----\r\n--b--\r\n"
        )

    def test_inline_pgp(self) -> None:
        self.check_unchanged(
            b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: s\r\n\r\n"
            b"-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA\r\n-----END PGP MESSAGE-----\r\n"
        )

    def test_a_passed_through_message_with_long_lines_is_refused(self) -> None:
        message = smime.encrypt(b"Subject: s\r\n\r\nx\r\n", [USERS["bob@example.org"].certificate])
        with self.assertRaises(MessageRejected) as caught:
            protect(request(message + b"y" * 1200 + b"\r\n", plan("bob@example.org", Action.SIGN)))
        self.assertIn("998", str(caught.exception))


class RepairTests(SynchronousTestCase):
    def copy(self, message: bytes, **options: object) -> tuple[bytes, tuple[str, ...]]:
        result = protect(request(message, plan("carol@example.org", Action.PLAIN), **options))
        data = result.deliveries[0].message
        assert isinstance(data, bytes)
        return data, result.repairs

    def test_bare_line_feeds(self) -> None:
        data, repairs = self.copy(b"From: a@example.org\nTo: carol@example.org\nSubject: s\n\nline one\nline two\n")
        self.assertIn("line ends made CRLF", repairs)
        self.assertTrue(data.endswith(b"\r\n\r\nline one\r\nline two\r\n"))
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))

    def test_missing_date_message_id_and_from_are_added(self) -> None:
        data, repairs = self.copy(b"To: carol@example.org\r\nSubject: s\r\n\r\nhi\r\n")
        self.assertEqual(
            set(repairs) & {"Date added", "Message-ID added", "From added"},
            {"Date added", "Message-ID added", "From added"},
        )
        head = headers(data)
        self.assertIn(b"\r\nDate: ", head)
        self.assertIn(b"\r\nMessage-ID: <", head)
        self.assertIn(b"\r\nFrom: <alice@example.org>\r\n", head)

    def test_a_message_without_any_header(self) -> None:
        data, repairs = self.copy(b"just a body line\r\nand another\r\n")
        self.assertIn("header added to a message without one", repairs)
        self.assertTrue(data.endswith(b"\r\n\r\njust a body line\r\nand another\r\n"))

    def test_8bit_without_8bitmime_becomes_quoted_printable(self) -> None:
        data, repairs = self.copy(
            b"From: a@example.org\r\nTo: carol@example.org\r\nSubject: s\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
        )
        self.assertIn("8-bit content without BODY=8BITMIME", repairs)
        self.assertTrue(data.isascii())
        self.assertIn(b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable", data)
        self.assertIn(b"MIME-Version: 1.0\r\n", data)
        self.assertTrue(data.endswith(b"\r\n\r\nGr=C3=BC=C3=9Fe\r\n"))

    def test_long_lines_and_nul_in_a_text_part(self) -> None:
        data, repairs = self.copy(
            b"From: a@example.org\r\nTo: carol@example.org\r\nSubject: s\r\nContent-Type: text/plain\r\n\r\n"
            + b"a\x00b "
            + b"x" * 2000
            + b"\r\n"
        )
        self.assertIn("long lines transfer-encoded", repairs)
        self.assertIn("NUL characters transfer-encoded", repairs)
        self.assertLessEqual(max(map(len, data.split(b"\r\n"))), 998)
        self.assertIn(b"a=00b ", data)

    def test_only_the_dirty_part_of_a_multipart_is_encoded(self) -> None:
        clean = b"Content-Type: text/plain\r\n\r\nclean part\r\n"
        dirty = b"Content-Type: application/octet-stream\r\n\r\n\x00\x01\xff binary\r\n"
        message = (
            b"From: a@example.org\r\nTo: carol@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n--zz\r\n'
            + clean
            + b"--zz\r\n"
            + dirty
            + b"--zz--\r\n"
        )
        data, _ = self.copy(message)
        self.assertIn(b"--zz\r\n" + clean + b"--zz\r\n", data)
        self.assertIn(
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"AAH/IGJpbmFyeQ==\r\n\r\n--zz--",
            data,
        )
        self.assertTrue(data.endswith(b"--zz--\r\n"))

    def test_a_long_header_is_folded(self) -> None:
        words = b" ".join(b"word%d" % i for i in range(300))
        data, repairs = self.copy(
            b"From: a@example.org\r\nTo: carol@example.org\r\nSubject: " + words + b"\r\n\r\nhi\r\n"
        )
        self.assertIn("long header lines folded", repairs)
        self.assertLessEqual(max(map(len, data.split(b"\r\n"))), 998)
        self.assertIn(b"word299", data)

    def test_an_unfoldable_header_is_refused(self) -> None:
        with self.assertRaises(MessageRejected) as caught:
            self.copy(b"From: a@example.org\r\nSubject: " + b"x" * 1500 + b"\r\n\r\nhi\r\n")
        self.assertIn("998", str(caught.exception))
        self.assertEqual(caught.exception.status, "5.6.0")

    def test_nul_in_a_header_is_refused(self) -> None:
        with self.assertRaises(MessageRejected) as caught:
            self.copy(b"From: a@example.org\r\nSubject: a\x00b\r\n\r\nhi\r\n")
        self.assertIn("NUL", str(caught.exception))

    def test_clean_7bit_message_is_kept_byte_for_byte(self) -> None:
        data, repairs = self.copy(MESSAGE.replace(b"Bcc: grace@example.org, dave@example.net\r\n", b""))
        self.assertEqual(repairs, ())
        self.assertEqual(data, RECEIVED + MESSAGE.replace(b"Bcc: grace@example.org, dave@example.net\r\n", b""))


# -- the reactor side ---------------------------------------------------------------------


class FakeKeys:
    def __init__(self, certificates: dict[str, x509.Certificate], down: bool = False) -> None:
        self.certificates = certificates
        self.down = down
        self.asked: list[str] = []

    def lookup(self, address: str) -> Deferred[LookupResult]:
        self.asked.append(address)
        if self.down:
            outcome = SourceOutcome("ldap", SourceState.UNAVAILABLE, detail="down")
            return succeed(LookupResult(address, (), (), None, (outcome,), (), True))
        certificate = self.certificates.get(address.lower())
        if certificate is None:
            return succeed(
                LookupResult(address, (), (), None, (SourceOutcome("keyring", SourceState.NOT_FOUND),), (), False)
            )
        outcome = SourceOutcome("keyring", SourceState.FOUND, 1, 1)
        return succeed(LookupResult(address, (certificate,), (), "keyring", (outcome,), (), False))


def pipeline(relay: MemoryRelay, keys: FakeKeys | None = None, **policy: object) -> OutboundPipeline:
    return OutboundPipeline(
        key_manager=keys or FakeKeys({"bob@example.org": USERS["bob@example.org"].certificate}),
        workers=InlineWorkerPool(),
        relay=relay,
        policy=PolicyConfig(**policy),  # type: ignore[arg-type]
        hostname="gk.example.org",
    )


class PipelineTests(TestCase):
    async def test_recipient_checks(self) -> None:
        relay = MemoryRelay()
        relay.refuse["nobody@example.org"] = RelayReply(550, "5.1.1 <nobody@example.org>: user unknown")
        outbound = pipeline(relay, domains=(PolicyRule("secure.example", encryption="mandatory"),))
        decision = await outbound.check_recipient(ALICE, 1, "alice@example.org", "Bob@Example.org")
        self.assertIs(decision.action, Action.ENCRYPT_AND_SIGN)
        self.assertEqual(
            (await outbound.check_recipient(ALICE, 1, "alice@example.org", "x@other.example")).action, Action.SIGN
        )
        with self.assertRaises(PolicyRejected) as rejected:
            await outbound.check_recipient(ALICE, 1, "alice@example.org", "frank@secure.example")
        self.assertIn("frank@secure.example", str(rejected.exception))
        with self.assertRaises(RelayRefused) as refused:
            await outbound.check_recipient(ALICE, 1, "alice@example.org", "nobody@example.org")
        self.assertEqual((refused.exception.code, refused.exception.status), (550, "5.1.1"))
        relay.down = True
        with self.assertRaises(UpstreamUnavailable):
            await outbound.check_recipient(ALICE, 1, "alice@example.org", "bob@example.org")

    async def test_mandatory_with_a_source_down_is_temporary(self) -> None:
        outbound = pipeline(MemoryRelay(), FakeKeys({}, down=True), default="mandatory")
        with self.assertRaises(SourceUnavailable):
            await outbound.check_recipient(ALICE, 1, "alice@example.org", "bob@example.org")

    async def submit(self, outbound: OutboundPipeline, *recipients: str, message: bytes = MESSAGE) -> object:
        decisions = [await outbound.check_recipient(ALICE, 1, "alice@example.org", r) for r in recipients]
        return await outbound.submit(
            Submission(ALICE, 1, "192.0.2.7", "alice@example.org", tuple(decisions), message, RECEIVED)
        )

    async def test_submit_relays_every_copy(self) -> None:
        relay = MemoryRelay()
        submitted = await self.submit(pipeline(relay), "bob@example.org", "dave@example.net")
        self.assertEqual(sorted(c.recipients for c in relay.delivered), [("bob@example.org",), ("dave@example.net",)])
        self.assertEqual(submitted.refused, ())  # type: ignore[attr-defined]

    async def test_upstream_down_keeps_nothing(self) -> None:
        relay = MemoryRelay()
        outbound = pipeline(relay)
        decisions = [await outbound.check_recipient(ALICE, 1, "alice@example.org", "bob@example.org")]
        relay.down = True
        with self.assertRaises(UpstreamUnavailable):
            await outbound.submit(Submission(ALICE, 1, "c", "alice@example.org", tuple(decisions), MESSAGE, RECEIVED))
        self.assertEqual(relay.delivered, [])

    async def test_the_partial_case_sends_the_sender_a_notice(self) -> None:
        relay = MemoryRelay()
        relay.refuse_copy["dave@example.net"] = RelayReply(554, "5.7.1 content refused")
        submitted = await self.submit(pipeline(relay), "bob@example.org", "dave@example.net")
        self.assertEqual(submitted.refused, ("dave@example.net",))  # type: ignore[attr-defined]
        bob, notice = relay.delivered
        self.assertEqual(bob.recipients, ("bob@example.org",))
        self.assertEqual((notice.sender, notice.recipients), ("", ("alice@example.org",)))
        self.assertIn(b"dave@example.net", notice.data)
        self.assertIn(b"554 5.7.1 content refused", notice.data)
        self.assertIn(b"Content-Type: message/rfc822", notice.data)

    async def test_the_partial_case_without_a_notice_is_temporary(self) -> None:
        relay = MemoryRelay()
        relay.refuse_copy["dave@example.net"] = RelayReply(554, "5.7.1 content refused")
        relay.refuse_copy["alice@example.org"] = RelayReply(452, "4.2.2 mailbox full")
        with self.assertRaises(UpstreamUnavailable):
            await self.submit(pipeline(relay), "bob@example.org", "dave@example.net")


class HeldWorkers:
    """Runs jobs only when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Deferred[object], object, tuple[object, ...]]] = []

    async def run(self, function: object, *args: object) -> object:
        waiting: Deferred[object] = Deferred()
        self.jobs.append((waiting, function, args))
        return await waiting

    def finish(self) -> None:
        for waiting, function, args in self.jobs:
            waiting.callback(function(*args))  # type: ignore[operator]


class CancelTests(TestCase):
    async def test_a_cancelled_submission_leaves_no_spool_files(self) -> None:
        spool = Path(self.mktemp()).absolute()
        spool.mkdir()
        source = spool / "in.eml"
        source.write_bytes(MESSAGE)
        workers = HeldWorkers()
        relay = MemoryRelay()
        outbound = OutboundPipeline(
            key_manager=FakeKeys({}),
            workers=workers,  # type: ignore[arg-type]
            relay=relay,
            policy=PolicyConfig(),
            hostname="gk.example.org",
            spool_directory=spool,
        )
        decision = await outbound.check_recipient(ALICE, 1, "alice@example.org", "carol@example.org")
        submitting = Deferred.fromCoroutine(
            outbound.submit(Submission(ALICE, 1, "c", "alice@example.org", (decision,), source, RECEIVED))
        )
        submitting.addErrback(lambda _: None)
        submitting.cancel()  # the client went away while its message was being protected
        workers.finish()  # the worker still wrote its copies
        source.unlink()
        self.assertEqual(list(spool.iterdir()), [])
        self.assertEqual(relay.delivered, [])

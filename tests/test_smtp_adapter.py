"""The SMTP adapter without sockets: extensions, pipelining, replies, the data phase, spooling.

The real outbound pipeline runs behind it with fakes around it: instant logins
(:func:`fake_login`), a key manager answering from a dict (answers can be held back to
make RCPT asynchronous), the worker jobs inline and an in-memory relay.
"""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography import x509
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.mail import smtp
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides

from gatekeeper import smtp as smtp_adapter
from gatekeeper.config import PolicyConfig, PolicyRule
from gatekeeper.interfaces import RelayReply
from gatekeeper.keys.directory import LookupResult, SourceOutcome, SourceState
from gatekeeper.outbound import OutboundPipeline
from gatekeeper.smtp import DataReader, SubmissionLimits
from gatekeeper.testing.login import fake_login
from gatekeeper.testing.relay import MemoryRelay
from gatekeeper.workers import InlineWorkerPool

PASSWORD = "adapter test password"
ALICE = "alice@example.org"


class SecureTransport(StringTransport):
    """A connection with TLS up (so AUTH is allowed)."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.9", 41000))
        directlyProvides(self, ITLSTransport, ISSLTransport)


class HeldKeys:
    """A key manager whose answers the test can hold back."""

    def __init__(self, certificates: dict[str, x509.Certificate]) -> None:
        self.certificates = certificates
        self.hold = False
        self.held: list[tuple[str, Deferred[LookupResult]]] = []

    def answer(self, address: str) -> LookupResult:
        certificate = self.certificates.get(address.lower())
        if certificate is None:
            outcome = SourceOutcome("keyring", SourceState.NOT_FOUND)
            return LookupResult(address, (), (), None, (outcome,), (), False)
        outcome = SourceOutcome("keyring", SourceState.FOUND, 1, 1)
        return LookupResult(address, (certificate,), (), "keyring", (outcome,), (), False)

    def lookup(self, address: str) -> Deferred[LookupResult]:
        if not self.hold:
            return succeed(self.answer(address))
        waiting: Deferred[LookupResult] = Deferred()
        self.held.append((address, waiting))
        return waiting

    def release(self) -> None:
        held, self.held = self.held, []
        for address, waiting in held:
            waiting.callback(self.answer(address))


class AdapterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.login = fake_login()
        identity = self.login.add_user(ALICE, PASSWORD)
        self.login.add_user("bob@example.org", "bob password")
        self.relay = MemoryRelay()
        bob = self.login.unlocker.users["bob@example.org"][1]
        self.keys = HeldKeys({"bob@example.org": bob.current.certificate, ALICE: identity.current.certificate})
        self.spool = Path(self.mktemp()).absolute()
        self.spool.mkdir()
        self.pipeline = OutboundPipeline(
            key_manager=self.keys,
            workers=InlineWorkerPool(),
            relay=self.relay,
            policy=PolicyConfig(
                domains=(PolicyRule("secure.example", encryption="mandatory"),),
                sender_aliases=((ALICE, ("sales@example.org",)),),
            ),
            hostname="gk.example.org",
            spool_directory=self.spool,
        )
        self.factory = smtp_adapter.SubmissionFactory(
            self.login.portal(smtp.IMessageDelivery, smtp_adapter.make_delivery_avatar(self.pipeline)),
            None,
            hostname="gk.example.org",
            limits=SubmissionLimits(
                max_message_size=20_000, max_recipients=3, spool_threshold=4096, spool_directory=self.spool
            ),
            clock=self.login.clock,
        )
        self.transport = SecureTransport()
        self.protocol = self.factory.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)
        self.addCleanup(self.protocol.connectionLost, None)
        self.transport.clear()

    def send(self, data: bytes) -> list[bytes]:
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.replies()

    def replies(self) -> list[bytes]:
        value = self.transport.value()
        self.transport.clear()
        return [line for line in value.split(b"\r\n") if line]

    def login_and_mail(self, sender: bytes = b"<alice@example.org>") -> None:
        self.send(b"EHLO client.example\r\n")
        token = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode())
        [reply] = self.send(b"AUTH PLAIN " + token + b"\r\n")
        self.assertTrue(reply.startswith(b"235 2.7.0"), reply)
        [reply] = self.send(b"MAIL FROM:" + sender + b"\r\n")
        self.assertEqual(reply, b"250 2.1.0 Sender OK")

    # -- extensions and replies -------------------------------------------------------------

    def test_ehlo_offers_the_submission_extensions(self) -> None:
        lines = self.send(b"EHLO client.example\r\n")
        offered = [line[4:] for line in lines]
        for extension in (b"SIZE 20000", b"8BITMIME", b"PIPELINING", b"ENHANCEDSTATUSCODES"):
            self.assertIn(extension, offered)
        self.assertIn(b"AUTH PLAIN LOGIN", b"\n".join(lines))
        self.assertNotIn(b"2.0.0", b"\n".join(lines))  # the EHLO reply carries no status code

    def test_every_other_reply_has_an_enhanced_status_code(self) -> None:
        self.send(b"EHLO client.example\r\n")
        self.assertEqual(self.send(b"NOOP\r\n"), [b"250 2.0.0 OK"])
        self.assertEqual(self.send(b"RSET\r\n"), [b"250 2.0.0 OK"])
        self.assertEqual(self.send(b"FOO\r\n"), [b"500 5.5.2 Command not implemented"])
        self.assertEqual(self.send(b"RCPT TO:<bob@example.org>\r\n"), [b"503 5.5.1 Need MAIL before RCPT"])
        self.assertEqual(self.send(b"QUIT\r\n"), [b"221 2.0.0 See you later"])

    def test_mail_parameters(self) -> None:
        self.login_and_mail()
        self.send(b"RSET\r\n")
        [reply] = self.send(b"MAIL FROM:<alice@example.org> SIZE=20001\r\n")
        self.assertTrue(reply.startswith(b"552 5.3.4"), reply)
        [reply] = self.send(b"MAIL FROM:<alice@example.org> RET=HDRS\r\n")
        self.assertTrue(reply.startswith(b"555 5.5.4"), reply)
        [reply] = self.send(b"MAIL FROM:<alice@example.org> BODY=8BITMIME SIZE=100 AUTH=<>\r\n")
        self.assertEqual(reply, b"250 2.1.0 Sender OK")

    def test_an_allowed_alias_may_send(self) -> None:
        self.login_and_mail(b"<Sales@example.org>")

    def test_someone_else_may_not(self) -> None:
        self.send(b"EHLO client.example\r\n")
        self.send(b"AUTH PLAIN " + base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()) + b"\r\n")
        [reply] = self.send(b"MAIL FROM:<bob@example.org>\r\n")
        self.assertTrue(reply.startswith(b"553 5.7.1"), reply)

    # -- recipients ----------------------------------------------------------------------

    def test_recipient_replies(self) -> None:
        self.relay.refuse["nobody@example.org"] = RelayReply(550, "5.1.1 <nobody@example.org>: User unknown")
        self.login_and_mail()
        self.assertEqual(self.send(b"RCPT TO:<bob@example.org>\r\n"), [b"250 2.1.5 Recipient OK"])
        [reply] = self.send(b"RCPT TO:<frank@secure.example>\r\n")
        self.assertTrue(reply.startswith(b"550 5.7.1 encryption to frank@secure.example is mandatory"), reply)
        [reply] = self.send(b"RCPT TO:<nobody@example.org>\r\n")
        self.assertTrue(reply.startswith(b"550 5.1.1 "), reply)
        self.assertIn(b"User unknown", reply)
        [reply] = self.send(b"RCPT TO:<not an address>\r\n")
        self.assertTrue(reply.startswith(b"5"), reply)
        self.relay.down = True
        [reply] = self.send(b"RCPT TO:<carol@example.org>\r\n")
        self.assertTrue(reply.startswith(b"451 4.4.1"), reply)

    def test_too_many_recipients(self) -> None:
        self.login_and_mail()
        replies = self.send(b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(4)))
        self.assertEqual(replies[:3], [b"250 2.1.5 Recipient OK"] * 3)
        self.assertTrue(replies[3].startswith(b"452 4.5.3"), replies)

    def test_pipelined_commands_wait_for_asynchronous_answers(self) -> None:
        self.keys.hold = True
        self.login_and_mail()
        replies = self.send(b"RCPT TO:<bob@example.org>\r\nRCPT TO:<frank@secure.example>\r\nDATA\r\n")
        self.assertEqual(replies, [])  # the first lookup is still out: nothing else was read
        self.keys.release()
        self.assertEqual(self.replies()[0], b"250 2.1.5 Recipient OK")
        self.keys.release()
        replies = self.replies()
        self.assertTrue(replies[0].startswith(b"550 5.7.1"), replies)
        self.assertEqual(replies[1], b"354 End data with <CR><LF>.<CR><LF>")

    # -- the data ------------------------------------------------------------------------

    def transaction(self, body: bytes, *recipients: bytes) -> list[bytes]:
        self.login_and_mail()
        for recipient in recipients or (b"bob@example.org",):
            [reply] = self.send(b"RCPT TO:<" + recipient + b">\r\n")
            self.assertTrue(reply.startswith(b"250"), reply)
        self.assertEqual(self.send(b"DATA\r\n"), [b"354 End data with <CR><LF>.<CR><LF>"])
        return self.send(body)

    def test_a_message_is_relayed_with_dots_unstuffed(self) -> None:
        message = (
            b"From: alice@example.org\r\nTo: carol@example.org\r\nSubject: dots\r\n\r\n..leading dot\r\n...\r\nend\r\n"
        )
        # arrives in pieces cut inside the end marker and inside a stuffed dot
        self.login_and_mail()
        self.send(b"RCPT TO:<carol@example.org>\r\n")
        self.send(b"DATA\r\n")
        for piece in (message[:70], message[70:72], message[72:-3], message[-3:] + b".", b"\r", b"\nNOOP\r\n"):
            self.protocol.dataReceived(piece)
        replies = self.replies()
        self.assertTrue(replies[0].startswith(b"250 2.0.0 Sent as <"), replies)
        self.assertEqual(replies[1], b"250 2.0.0 OK")  # the pipelined NOOP after the data
        [copy] = self.relay.delivered
        self.assertEqual(copy.recipients, ("carol@example.org",))
        self.assertIn(b"\r\n\r\n.leading dot\r\n..\r\nend\r\n", copy.data)  # signed-only: the text is readable

    def test_too_large_is_refused_after_the_data(self) -> None:
        replies = self.transaction(b"Subject: big\r\n\r\n" + b"x" * 900 + b"\r\n" * 30 + b"y\r\n" * 10_000 + b".\r\n")
        self.assertEqual(len(replies), 1)
        self.assertTrue(replies[0].startswith(b"552 5.3.4"), replies)
        self.assertEqual(self.relay.delivered, [])
        self.assertEqual(list(self.spool.iterdir()), [])

    def test_large_messages_are_spooled_and_the_files_removed(self) -> None:
        body = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: spool\r\n\r\n" + b"line of text\r\n" * 800
        replies = self.transaction(body + b".\r\n")
        self.assertTrue(replies[0].startswith(b"250 2.0.0"), replies)
        [copy] = self.relay.delivered
        self.assertTrue(copy.spooled)
        self.assertEqual(list(self.spool.iterdir()), [])

    def test_upstream_down_at_the_end_of_data_is_451_and_nothing_is_kept(self) -> None:
        self.login_and_mail()
        self.send(b"RCPT TO:<bob@example.org>\r\n")
        self.send(b"DATA\r\n")
        self.relay.down = True
        [reply] = self.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
        self.assertTrue(reply.startswith(b"451 4.4.1"), reply)
        self.assertIn(b"nothing was sent", reply)
        self.assertEqual(self.relay.delivered, [])

    def test_a_message_that_cannot_be_repaired_is_554(self) -> None:
        [reply] = self.transaction(b"Subject: a\x00b\r\n\r\nhello\r\n.\r\n")
        self.assertTrue(reply.startswith(b"554 5.6.0"), reply)

    def test_a_client_that_goes_away_keeps_nothing(self) -> None:
        self.relay.hold = True
        replies = self.transaction(b"From: alice@example.org\r\nSubject: x\r\n\r\n" + b"z" * 5000 + b"\r\n.\r\n")
        self.assertEqual(replies, [])
        self.protocol.connectionLost(None)
        self.relay.release()
        self.assertEqual(self.relay.delivered, [])
        self.assertEqual(list(self.spool.iterdir()), [])


class DataReaderTests(SynchronousTestCase):
    def read(self, pieces: list[bytes], **limits: int) -> tuple[DataReader, bytes]:
        reader = DataReader(
            max_size=limits.get("max_size", 10_000),
            spool_threshold=limits.get("spool_threshold", 10_000),
            spool_directory=None,
        )
        for index, piece in enumerate(pieces):
            complete, rest = reader.feed(piece)
            if complete:
                return reader, rest + b"".join(pieces[index + 1 :])
        raise AssertionError("no end marker seen")

    def test_byte_by_byte(self) -> None:
        data = b"a\r\n..b\r\n.c\r\n\r\n.\r\nQUIT\r\n"
        reader, rest = self.read([data[i : i + 1] for i in range(len(data))])
        self.assertEqual(reader.result(), b"a\r\n.b\r\nc\r\n\r\n")
        self.assertEqual(rest, b"QUIT\r\n")

    def test_empty_message(self) -> None:
        reader, rest = self.read([b".\r\n"])
        self.assertEqual((reader.result(), rest), (b"", b""))

    def test_a_first_line_with_a_dot(self) -> None:
        reader, _ = self.read([b"..x\r\n.\r\n"])
        self.assertEqual(reader.result(), b".x\r\n")

    def test_a_long_line_without_line_ends(self) -> None:
        reader, _ = self.read([b"y" * 3000, b"y" * 3000 + b"\r", b"\n.\r\n"])
        self.assertEqual(reader.result(), b"y" * 6000 + b"\r\n")

    def test_size_limit(self) -> None:
        reader, _ = self.read([b"z" * 600 + b"\r\n"] * 5 + [b".\r\n"], max_size=2000)
        self.assertTrue(reader.too_large)
        self.assertEqual(reader.size, 3010)

"""The upstream POP3 client without sockets: bulk message bodies, the time limit, error codes."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail.pop3 import ServerErrorResponse
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.errors import UpstreamRefused, UpstreamUnavailable
from gatekeeper.upstream.pop3 import Pop3UpstreamClient, _Bulk, _translate, response_code

MESSAGE = b"Subject: x\r\n\r\n.dot\r\n..two\r\nplain\r\n.\r\nend\r\n"
WIRE = b"Subject: x\r\n\r\n..dot\r\n...two\r\nplain\r\n..\r\nend\r\n.\r\n"


class BulkTests(SynchronousTestCase):
    def test_every_way_of_cutting_the_answer(self) -> None:
        after = b"+OK next answer\r\n"
        data = WIRE + after
        for first in range(len(data) + 1):
            for second in range(first, len(data) + 1, 3):
                bulk = _Bulk()
                result = None
                rest = b""
                for piece in (data[:first], data[first:second], data[second:]):
                    if result is None and piece:
                        result, rest = bulk.feed(piece)
                    elif result is not None:
                        rest += piece
                self.assertEqual((result, rest), (MESSAGE, after), (first, second))

    def test_an_empty_body_and_a_leading_dot(self) -> None:
        self.assertEqual(_Bulk().feed(b".\r\n"), (b"", b""))
        self.assertEqual(_Bulk().feed(b"..x\r\n.\r\n"), (b".x\r\n", b""))
        bulk = _Bulk()
        self.assertEqual(bulk.feed(b"."), (None, b""))
        self.assertEqual(bulk.feed(b"\r\n"), (b"", b""))


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.client = Pop3UpstreamClient(self.clock, 10)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.lost: list[object] = []
        self.transport.abortConnection = lambda: self.lost.append(True)  # type: ignore[method-assign]

    def test_greeting_then_bulk_retrieve_and_top(self) -> None:
        self.client.dataReceived(b"+OK ready\r\n")
        self.assertEqual(self.successResultOf(self.client.greeted), b"ready")
        retrieved = self.client.retrieve_bulk(0)
        self.assertEqual(self.transport.value(), b"RETR 1\r\n")
        # the answer in awkward pieces, the next answer in the same segment as the end
        answer = b"+OK 40 octets\r\n" + WIRE
        top = self.client.retrieve_bulk(1, 0)
        for index in range(0, len(answer), 7):
            self.client.dataReceived(answer[index : index + 7])
        self.assertEqual(self.successResultOf(retrieved), MESSAGE)
        self.client.dataReceived(b"+OK\r\nSubject: y\r\n\r\n.\r\n")
        self.assertEqual(self.successResultOf(top), b"Subject: y\r\n\r\n")
        self.assertEqual(self.transport.value(), b"RETR 1\r\nTOP 2 0\r\n")

    def test_a_refused_retrieve_keeps_the_session(self) -> None:
        self.client.dataReceived(b"+OK ready\r\n")
        refused = self.client.retrieve_bulk(4)
        self.client.dataReceived(b"-ERR [SYS/TEMP] no such message\r\n")
        self.failureResultOf(refused, ServerErrorResponse)
        noop = self.client.noop()
        self.client.dataReceived(b"+OK\r\n")
        self.successResultOf(noop)

    def test_time_limit_per_command_not_while_idle(self) -> None:
        self.clock.advance(9)
        self.client.dataReceived(b"+OK ready\r\n")
        self.clock.advance(3600)  # idle, waiting for our client: no limit
        self.assertEqual(self.lost, [])
        retrieved = self.client.retrieve_bulk(0)
        self.client.dataReceived(b"+OK\r\n" + WIRE[:10])
        for _ in range(5):
            self.clock.advance(9)  # slow, but progressing
            self.client.dataReceived(b"x")
        self.assertEqual(self.lost, [])
        self.clock.advance(10)
        self.assertEqual(self.lost, [True])
        self.assertTrue(self.client.timed_out)
        self.client.connectionLost(Exception("aborted"))  # type: ignore[arg-type]
        failure = self.failureResultOf(retrieved)
        error = _translate(failure.value, self.client, "RETR", 10)  # type: ignore[arg-type]
        self.assertIsInstance(error, UpstreamUnavailable)
        self.assertEqual(str(error), "the mail server did not answer within 10 s")
        self.successResultOf(self.client.disconnected)

    def test_no_greeting_in_time(self) -> None:
        self.clock.advance(10)
        self.assertEqual(self.lost, [True])
        self.client.connectionLost(Exception("aborted"))  # type: ignore[arg-type]
        self.failureResultOf(self.client.greeted)


class TranslationTests(SynchronousTestCase):
    def test_response_codes(self) -> None:
        self.assertEqual(response_code(b"[IN-USE] Mailbox locked"), "IN-USE")
        self.assertEqual(response_code(b"[sys/temp] later"), "SYS/TEMP")
        self.assertIsNone(response_code(b"Authentication failed"))

    def test_server_answers_become_refusals_without_their_text(self) -> None:
        login = _translate(ServerErrorResponse(b"Authentication failed: secret detail"), None, "login", 10)
        assert isinstance(login, UpstreamRefused)
        self.assertEqual(
            (str(login), login.code, login.temporary), ("the mail server refused the login", "AUTH", False)
        )
        locked = _translate(ServerErrorResponse(b"[IN-USE] locked by another session"), None, "login", 10)
        assert isinstance(locked, UpstreamRefused)
        self.assertEqual((locked.code, locked.temporary), ("IN-USE", True))
        retr = _translate(ServerErrorResponse(b"[SYS/PERM] broken"), None, "RETR", 10)
        self.assertEqual(str(retr), "the mail server refused RETR")
        self.assertNotIn("secret", str(login) + str(locked) + str(retr))

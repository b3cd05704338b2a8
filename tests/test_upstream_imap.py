"""The upstream IMAP client, alone: scripted server lines through a StringTransport."""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.config import UpstreamConfig, UpstreamEndpoint
from gatekeeper.errors import UpstreamRefused, UpstreamUnavailable
from gatekeeper.interfaces import FetchResponse, MailStoreError
from gatekeeper.upstream.imap import UpstreamImapProtocol, UpstreamImapSession, _log_in

ENDPOINT = UpstreamEndpoint("tls", "imap.example.org", 993)
CONFIG = UpstreamConfig(imap=ENDPOINT, timeout_seconds=10)


class Events:
    """A recorder of what the session reports on its own."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def exists(self, count: int) -> None:
        self.seen.append(("exists", count))

    def recent(self, count: int) -> None:
        self.seen.append(("recent", count))

    def expunged(self, seq: int) -> None:
        self.seen.append(("expunged", seq))

    def fetched(self, response: FetchResponse) -> None:
        self.seen.append(("fetched", response))

    def uidvalidity(self, value: int) -> None:
        self.seen.append(("uidvalidity", value))

    def session_lost(self, reason: str) -> None:
        self.seen.append(("lost", reason))


class UpstreamClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.protocol = UpstreamImapProtocol(self.clock, 10)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def server(self, *lines: bytes) -> None:
        self.protocol.dataReceived(b"".join(line + b"\r\n" for line in lines))

    def sent(self) -> list[bytes]:
        lines = self.transport.value().split(b"\r\n")
        self.transport.clear()
        return [line for line in lines if line]

    def result(self, d: Deferred[Any]) -> Any:
        return self.successResultOf(d)

    def logged_in(self) -> UpstreamImapSession:
        d = Deferred.fromCoroutine(_log_in(self.clock, self.protocol, ENDPOINT, CONFIG, "u@example.org", "pw é"))
        self.server(b"* OK [CAPABILITY IMAP4rev1] ready")
        self.assertEqual(self.sent(), [b"0001 CAPABILITY"])
        self.server(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR IDLE UIDPLUS MOVE", b"0001 OK done")
        token = base64.b64encode("\0u@example.org\0pw é".encode())
        self.assertEqual(self.sent(), [b"0002 AUTHENTICATE PLAIN " + token])
        self.server(b"0002 OK [CAPABILITY IMAP4rev1 IDLE UIDPLUS MOVE LITERAL+] Logged in")
        self.assertEqual(self.sent(), [b'0003 LIST "" ""'])
        self.server(b'* LIST (\\Noselect) "/" ""', b"0003 OK done")
        session = self.result(d)
        self.events = Events()
        session.set_listener(self.events)
        return session

    def test_login_with_sasl_ir_and_the_delimiter(self) -> None:
        session = self.logged_in()
        self.assertEqual(session.delimiter, "/")
        self.assertIn("MOVE", session.capabilities)

    def test_refused_login_is_upstream_refused_without_the_servers_words(self) -> None:
        d = Deferred.fromCoroutine(_log_in(self.clock, self.protocol, ENDPOINT, CONFIG, "u", "wrong"))
        self.server(b"* OK ready", b"* CAPABILITY IMAP4rev1 AUTH=PLAIN", b"0001 OK")
        self.sent()
        self.server(b"+ ")
        self.server(b"0002 NO [AUTHENTICATIONFAILED] user u has password hunter2")
        error = self.failureResultOf(d, UpstreamRefused).value
        self.assertEqual(error.code, "AUTH")
        self.assertNotIn("hunter2", str(error))

    def test_starttls_refused_when_not_offered(self) -> None:
        endpoint = UpstreamEndpoint("starttls", "imap.example.org", 143)
        d = Deferred.fromCoroutine(_log_in(self.clock, self.protocol, endpoint, CONFIG, "u", "pw"))
        self.server(b"* OK ready", b"* CAPABILITY IMAP4rev1 AUTH=PLAIN", b"0001 OK")
        self.failureResultOf(d, UpstreamUnavailable)
        self.assertNotIn(b"AUTHENTICATE", self.transport.value())

    def test_fetch_streams_and_unsolicited_responses_go_to_the_events(self) -> None:
        session = self.logged_in()
        got: list[FetchResponse] = []
        d = session.fetch(b"1:2", b"(UID BODY.PEEK[])", got.append)
        self.assertEqual(self.sent(), [b"0004 UID FETCH 1:2 (UID BODY.PEEK[])"])
        self.server(b"* 1 FETCH (UID 7 BODY[] {7}")
        self.protocol.dataReceived(b"hi\r\nyo!)\r\n")
        self.assertEqual(got, [FetchResponse(1, 7, b"(UID 7 BODY[] {7}\r\nhi\r\nyo!)")])
        self.server(b"* 3 EXPUNGE", b"* 4 EXISTS", b"* 2 FETCH (FLAGS (\\Seen) UID 9)", b"0004 OK done")
        self.result(d)
        self.assertEqual(got[1], FetchResponse(2, 9, b"(FLAGS (\\Seen) UID 9)"))
        self.assertEqual(self.events.seen, [("expunged", 3), ("exists", 4)])
        self.server(b"* 5 FETCH (FLAGS (\\Flagged))", b"* OK [UIDVALIDITY 99] changed")
        self.assertEqual(self.events.seen[-2:], [("fetched", FetchResponse(5, None, b"(FLAGS (\\Flagged))")),
                                                 ("uidvalidity", 99)])  # fmt: skip

    def test_no_is_a_store_error_with_its_code(self) -> None:
        session = self.logged_in()
        d = session.select("Nope")
        self.server(b"0004 NO [NONEXISTENT] Mailbox Nope does not exist")
        error = self.failureResultOf(d, MailStoreError).value
        self.assertEqual(error.code, "NONEXISTENT")
        self.assertNotIn("Nope", str(error))

    def test_select_collects_the_mailbox_and_its_uids(self) -> None:
        session = self.logged_in()
        d = session.select("INBOX")
        self.server(
            b"* FLAGS (\\Seen \\Deleted)",
            b"* OK [PERMANENTFLAGS (\\Seen \\Deleted \\*)] ok",
            b"* 3 EXISTS",
            b"* 1 RECENT",
            b"* OK [UIDVALIDITY 42] ok",
            b"* OK [UIDNEXT 9] ok",
            b"0004 OK [READ-WRITE] done",
        )
        self.assertEqual(self.sent(), [b"0004 SELECT INBOX", b"0005 UID SEARCH ALL"])
        self.server(b"* SEARCH 2 5 8", b"* 4 EXISTS", b"0005 OK done")
        info = self.result(d)
        self.assertEqual((info.uidvalidity, info.uidnext, info.uids, info.exists), (42, 9, [2, 5, 8], 4))
        self.assertEqual(info.permanent_flags, ("\\Seen", "\\Deleted", "\\*"))
        self.assertFalse(info.readonly)

    def test_append_waits_for_the_continuation(self) -> None:
        session = self.logged_in()
        d = session.append("Sent", b"Subject: x\r\n\r\nbody\r\n", ["\\Seen"])
        self.assertEqual(self.sent(), [b"0004 APPEND Sent (\\Seen) {20}"])
        self.server(b"+ go ahead")
        self.assertEqual(self.transport.value(), b"Subject: x\r\n\r\nbody\r\n\r\n")
        self.transport.clear()
        self.server(b"0004 OK [APPENDUID 38 12] done")
        appended = self.result(d)
        self.assertEqual((appended.uidvalidity, appended.uid), (38, 12))

    def test_move_reports_copyuid_from_the_untagged_ok(self) -> None:
        session = self.logged_in()
        d = session.move(b"3:4", "Archive")
        self.assertEqual(self.sent(), [b"0004 UID MOVE 3:4 Archive"])
        self.server(b"* OK [COPYUID 77 3:4 10,11] moved", b"* 2 EXPUNGE", b"* 2 EXPUNGE", b"0004 OK done")
        copied = self.result(d)
        self.assertEqual((copied.uidvalidity, copied.source, copied.destination), (77, (3, 4), (10, 11)))
        self.assertEqual(self.events.seen, [("expunged", 2), ("expunged", 2)])

    def test_idle_and_done(self) -> None:
        session = self.logged_in()
        started = session.idle()
        self.assertEqual(self.sent(), [b"0004 IDLE"])
        self.assertNoResult(started)
        self.server(b"+ idling")
        self.result(started)
        self.clock.advance(3600)  # no deadline while idling
        self.server(b"* 9 EXISTS")
        self.assertEqual(self.events.seen, [("exists", 9)])
        noop = session.noop()  # a command during IDLE ends it first
        self.assertEqual(self.sent(), [b"DONE"])
        self.server(b"0004 OK idle done")
        self.assertEqual(self.sent(), [b"0005 NOOP"])
        self.server(b"0005 OK done")
        self.result(noop)

    def test_a_silent_server_times_out_and_fails_everything_waiting(self) -> None:
        session = self.logged_in()
        first = session.noop()
        second = session.status("INBOX", ["MESSAGES"])
        self.clock.advance(9)
        self.server(b"* OK still thinking")  # data restarts the deadline
        self.clock.advance(9)
        self.assertNoResult(first)
        self.clock.advance(2)
        self.assertTrue(self.transport.disconnecting or self.protocol.timed_out)
        self.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.failureResultOf(first, UpstreamUnavailable)
        self.failureResultOf(second, UpstreamUnavailable)
        self.assertEqual(self.events.seen[-1], ("lost", "timed out"))
        self.failureResultOf(session.noop(), UpstreamUnavailable)

    def test_list_status_search_store_expunge(self) -> None:
        session = self.logged_in()
        listed = session.list_mailboxes("", "*")
        self.server(b'* LIST (\\HasChildren) "/" "Work &AOk-t&AOk-"', b"* LIST () NIL INBOX", b"0004 OK")
        self.assertEqual([(e.name, e.delimiter) for e in self.result(listed)], [("Work été", "/"), ("INBOX", None)])
        status = session.status("Work été", ["MESSAGES", "UIDNEXT"])
        self.assertEqual(self.sent()[-1], b'0005 STATUS "Work &AOk-t&AOk-" (MESSAGES UIDNEXT)')
        self.server(b'* STATUS "Work &AOk-t&AOk-" (MESSAGES 3 UIDNEXT 8)', b"0005 OK")
        self.assertEqual(self.result(status), {"MESSAGES": 3, "UIDNEXT": 8})
        found = session.search(b"TEXT hello", "UTF-8")
        self.assertEqual(self.sent(), [b"0006 UID SEARCH CHARSET UTF-8 TEXT hello"])
        self.server(b"* SEARCH 9 4", b"0006 OK")
        self.assertEqual(self.result(found), [4, 9])
        self.result(self._answered(session.store(b"4", b"+FLAGS.SILENT", ["\\Deleted"]), b"0007"))
        self.result(self._answered(session.expunge(b"4"), b"0008"))
        self.assertEqual(self.sent(), [])

    def _answered(self, d: Deferred[Any], tag: bytes) -> Deferred[Any]:
        line = self.sent()[-1]
        self.assertTrue(line.startswith(tag), line)
        self.server(tag + b" OK done")
        return d

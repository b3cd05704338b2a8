"""The IMAP adapter and proxy core over a recorder fake of the mail store: no sockets.

The client side is Twisted's real ``IMAP4Server`` subclass fed bytes through a
``StringTransport`` that looks like TLS; the store is :class:`RecordingStore`, which
answers like Dovecot and records every command the proxy sent it.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.mail import imap4
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper import imap as imap_adapter
from gatekeeper import imap_mime
from gatekeeper.errors import UpstreamRefused, UpstreamUnavailable
from gatekeeper.imap_proxy import MailCaches, RevealedMessage
from gatekeeper.interfaces import FetchResponse, MailStoreError, UpstreamLogin
from gatekeeper.keys.identity import Identity
from gatekeeper.testing.login import fake_login
from tests.imap_support import RecordingStore
from tests.test_protocol_login import TLSStringTransport, transport

PASSWORD = "imap adapter password"
USER = "dana@example.org"
CONTEXT = object()
ENCRYPTED = (
    b"From: a@example.org\r\nTo: dana@example.org\r\nSubject: sealed\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHA6CAMIACAQAxggE=\r\n"
)
REVEALED = (
    b"From: a@example.org\r\nTo: dana@example.org\r\nSubject: sealed\r\n"
    b"X-Gatekeeper-Security: decrypted=yes; signature=none\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="r"\r\n\r\n--r\r\nContent-Type: text/plain\r\n\r\n'
    b"the revealed words\r\n--r\r\nContent-Type: text/plain\r\n\r\nreport\r\n--r--\r\n"
)


def plain(subject: str, body: str = "plain words") -> bytes:
    return f"From: b@example.org\r\nTo: {USER}\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()


class AdapterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.login = fake_login()
        self.login.add_user(USER, PASSWORD)
        self.store = RecordingStore()
        self.reveals: list[bytes] = []
        self.encrypted: list[bytes] = []
        self.open_error: Exception | None = None
        self.caches = MailCaches(self.login.clock, 1024 * 1024, 0)

        async def open_store(login: UpstreamLogin) -> RecordingStore:
            if self.open_error is not None:
                raise self.open_error
            self.store_login = login
            return self.store

        async def resolve(identity: Identity, password: str) -> UpstreamLogin:
            return UpstreamLogin(identity.address, identity.address, password)

        async def reveal(message: bytes) -> RevealedMessage:
            self.reveals.append(message)
            return RevealedMessage(REVEALED, imap_mime.describe(REVEALED), "yes", "none")

        def make_encrypt(identity: Identity) -> Any:
            async def encrypt(message: bytes) -> bytes:
                self.encrypted.append(message)
                return ENCRYPTED

            return encrypt

        backend = imap_adapter.ImapBackend(
            open_store=open_store,
            resolve=resolve,
            make_reveal=lambda identity, session: reveal,
            caches=self.caches,
            clock=self.login.clock,
            make_encrypt=make_encrypt,
            encrypt_folders=("Sent",),
        )
        self.factory = imap_adapter.ImapFactory(
            self.login.portal(imap4.IAccount, imap_adapter.make_account_avatar(backend)),
            CONTEXT,  # type: ignore[arg-type]
        )

    def connect(self, *, log_in: bool = True) -> tuple[imap4.IMAP4Server, TLSStringTransport]:
        t = transport(secure=True)
        protocol = self.factory.buildProtocol(t.getPeer())
        protocol.makeConnection(t)
        self.addCleanup(protocol.connectionLost, None)
        if log_in:
            reply = self.send(protocol, t, f'a0 LOGIN {USER} "{PASSWORD}"'.encode())
            self.assertIn(b"a0 OK [CAPABILITY", reply)
        return protocol, t

    def send(self, protocol: imap4.IMAP4Server, t: TLSStringTransport, line: bytes) -> bytes:
        t.clear()
        protocol.dataReceived(line + b"\r\n")
        return t.value()

    def selected(self) -> tuple[imap4.IMAP4Server, TLSStringTransport]:
        protocol, t = self.connect()
        reply = self.send(protocol, t, b"s SELECT INBOX")
        self.assertIn(b"s OK [READ-WRITE]", reply)
        return protocol, t

    # -- login

    def test_login_passes_the_credentials_through_and_offers_what_upstream_can(self) -> None:
        protocol, t = self.connect()
        self.assertEqual((self.store_login.user, self.store_login.password), (USER, PASSWORD))
        capability = self.send(protocol, t, b"c CAPABILITY")
        for name in (b"IDLE", b"UIDPLUS", b"MOVE", b"UNSELECT", b"NAMESPACE"):
            self.assertIn(b" " + name, capability)
        self.assertNotIn(b"AUTH=", capability)

    def test_authenticate_plain_opens_the_store_too(self) -> None:
        protocol, t = self.connect(log_in=False)
        self.assertTrue(self.send(protocol, t, b"a1 AUTHENTICATE PLAIN").startswith(b"+ "))
        import base64

        reply = self.send(protocol, t, base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()))
        self.assertIn(b"a1 OK", reply)
        self.assertEqual(self.store_login.user, USER)

    def test_store_refusing_or_unreachable_at_login(self) -> None:
        for error, code in (
            (UpstreamRefused("no", code="AUTH"), b"AUTHENTICATIONFAILED"),
            (UpstreamUnavailable("down"), b"UNAVAILABLE"),
        ):
            self.open_error = error
            protocol, t = self.connect(log_in=False)
            reply = self.send(protocol, t, f'a1 LOGIN {USER} "{PASSWORD}"'.encode())
            self.assertIn(b"a1 NO [" + code + b"]", reply)
            self.assertNotIn(b"down", reply)
            self.assertIn(b"a2 BAD", self.send(protocol, t, b'a2 LIST "" "*"'))
        self.assertEqual(self.login.sessions.sessions(), [])

    # -- FETCH

    def test_header_listing_asks_upstream_for_exactly_those_items(self) -> None:
        for index in range(3):
            self.store.add("INBOX", plain(f"listed {index}"), ["\\Seen"])
        protocol, t = self.selected()
        self.store.calls.clear()
        reply = self.send(
            protocol, t, b"f FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])"
        )
        fetches = self.store.called("fetch")
        self.assertEqual(len(fetches), 2, fetches)
        self.assertIn(b"CONTENT-TYPE X-GATEKEEPER-SECURITY", fetches[0][1])  # which ones to reveal, once
        self.assertEqual(
            fetches[1], (b"1:3", b"(UID FLAGS RFC822.SIZE ENVELOPE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])")
        )
        for _, items in fetches:
            self.assertNotIn(b"BODY.PEEK[]", items)
            self.assertNotIn(b"BODY[]", items)
        self.assertEqual(len(re.findall(rb"^\* \d FETCH \(FLAGS", reply, re.M)), 3, reply)
        self.assertIn(b"Subject: listed 2", reply)
        self.assertNotIn(b"UID", reply)  # not asked for
        self.assertTrue(reply.endswith(b"f OK FETCH completed\r\n"))
        # a second listing classifies nothing again
        self.store.calls.clear()
        self.send(protocol, t, b"g FETCH 1:* (RFC822.SIZE)")
        self.assertEqual(len(self.store.called("fetch")), 1)

    def test_revealed_message_is_consistent_and_revealed_once(self) -> None:
        self.store.add("INBOX", plain("plain"))
        self.store.add("INBOX", ENCRYPTED)
        protocol, t = self.selected()
        listing = self.send(protocol, t, b"f UID FETCH 1:* (RFC822.SIZE BODYSTRUCTURE ENVELOPE)")
        view = imap_mime.describe(REVEALED)
        self.assertIn(b"RFC822.SIZE %d BODYSTRUCTURE " % len(REVEALED) + view.bodystructure, listing)
        self.assertIn(b"ENVELOPE " + view.envelope, listing)
        self.assertIn(b" UID 2)", listing)
        body = self.send(protocol, t, b"b FETCH 2 (BODY[] BODY.PEEK[1] BODY.PEEK[]<0.10>)")
        self.assertIn(b"BODY[] {%d}\r\n" % len(REVEALED) + REVEALED, body)
        self.assertIn(b"BODY[]<0> {10}\r\n" + REVEALED[:10], body)
        self.assertIn(b"BODY[1] {18}\r\nthe revealed words", body)
        self.assertIn(b"FLAGS (\\Seen)", body)  # BODY[] set \Seen upstream, and the client is told
        self.assertEqual(self.store.mailboxes["INBOX"].messages[1].flags, ["\\Seen"])
        self.assertEqual(self.reveals, [ENCRYPTED])  # downloaded and revealed once, then cached
        downloads = [c for c in self.store.called("fetch") if c[1] == b"(UID BODY.PEEK[])"]
        self.assertEqual(len(downloads), 1)

    def test_search_text_on_revealed_messages_is_answered_from_their_words(self) -> None:
        self.store.add("INBOX", plain("plain", "nothing here"))
        self.store.add("INBOX", ENCRYPTED)

        def answer(criteria: bytes) -> list[int]:
            if criteria.startswith(b"UID 2 "):
                return [2] if b"UID 2" in criteria[6:] else []
            return []  # upstream finds nothing in the ciphertext or the plain one

        self.store.search_result = answer
        protocol, t = self.selected()
        reply = self.send(protocol, t, b'x SEARCH TEXT "revealed words"')
        self.assertIn(b"* SEARCH 2\r\n", reply)
        criteria = [c[0] for c in self.store.called("search")]
        self.assertEqual(criteria[0], b'(TEXT "revealed words")'.strip(b"()"))
        self.assertEqual(criteria[1], b"UID 2 UID 2")
        reply = self.send(protocol, t, b"y SEARCH NOT BODY missing")
        self.assertIn(b"UID 2 NOT NOT ALL", [c[0] for c in self.store.called("search")][-1])

    def test_pipelined_commands_run_in_order(self) -> None:
        self.store.add("INBOX", plain("one"))
        protocol, t = self.connect()
        t.clear()
        protocol.dataReceived(b"a SELECT INBOX\r\nb FETCH 1 (FLAGS)\r\nc NOOP\r\n")
        reply = t.value()
        self.assertLess(reply.index(b"a OK"), reply.index(b"* 1 FETCH"))
        self.assertLess(reply.index(b"b OK"), reply.index(b"c OK"))

    # -- errors

    def test_store_errors_never_echo_the_stores_words(self) -> None:
        protocol, t = self.connect()
        reply = self.send(protocol, t, b"s SELECT Nope")
        self.assertEqual(reply, b"s NO [NONEXISTENT] the upstream server refused SELECT\r\n")
        self.store.fail["list_mailboxes"] = MailStoreError("the upstream server refused LIST", "WEIRDCODE")
        reply = self.send(protocol, t, b'l LIST "" "*"')
        self.assertEqual(reply, b"l NO the upstream server refused LIST\r\n")  # an unknown code is dropped
        self.store.fail["list_mailboxes"] = UpstreamUnavailable("connection refused to 10.0.0.1")
        reply = self.send(protocol, t, b'l LIST "" "*"')
        self.assertIn(b"l NO [UNAVAILABLE]", reply)
        self.assertNotIn(b"10.0.0.1", reply)

    def test_lost_upstream_session_is_bye(self) -> None:
        _protocol, t = self.selected()
        assert self.store.events is not None
        self.store.events.session_lost("connection lost")
        self.assertIn(b"* BYE [UNAVAILABLE]", t.value())
        self.assertTrue(t.disconnecting)

    # -- changes

    def test_expunges_wait_for_a_command_that_may_report_them(self) -> None:
        for index in range(3):
            self.store.add("INBOX", plain(f"m{index}"))
        protocol, t = self.selected()
        self.store.fetch = lambda uids, items, sink: self._expunge_during(uids, items, sink)  # type: ignore[method-assign]
        reply = self.send(protocol, t, b"f FETCH 1:3 (FLAGS)")
        self.assertNotIn(b"EXPUNGE", reply)
        self.assertIn(b"* 2 FETCH", reply)  # numbers unchanged during the command
        del self.store.fetch
        reply = self.send(protocol, t, b"n NOOP")
        self.assertIn(b"* 1 EXPUNGE\r\nn OK", reply)

    def _expunge_during(self, uids: bytes, items: bytes, sink: Any) -> Any:
        result = RecordingStore.fetch(self.store, uids, items, sink)
        if self.store.mailboxes["INBOX"].messages[0].uid == 1:
            del self.store.mailboxes["INBOX"].messages[0]
            assert self.store.events is not None
            self.store.events.expunged(1)
        return result

    def test_store_copy_move_and_uid_expunge_name_upstream_uids(self) -> None:
        for index in range(4):
            self.store.add("INBOX", plain(f"m{index}"))
        self.store.add("Archive", plain("old"))
        protocol, t = self.selected()
        reply = self.send(protocol, t, b"a STORE 1:2 +FLAGS (\\Flagged)")
        self.assertIn(b"* 1 FETCH (UID 1 FLAGS (\\Flagged))", reply)
        reply = self.send(protocol, t, b"b STORE 3 +FLAGS.SILENT (\\Deleted)")
        self.assertNotIn(b"FETCH", reply)
        reply = self.send(protocol, t, b"c COPY 1 Archive")
        self.assertIn(b"c OK [COPYUID 1001 1 2] COPY completed", reply)
        reply = self.send(protocol, t, b"d UID MOVE 2 Archive")
        self.assertIn(b"* OK [COPYUID 1001 2 3]", reply)
        self.assertIn(b"* 2 EXPUNGE", reply)
        reply = self.send(protocol, t, b"e UID EXPUNGE 4")  # uid 3 is \Deleted but not named: it stays
        self.assertEqual(self.store.called("expunge")[-1], (b"4",))
        self.assertEqual([m.uid for m in self.store.mailboxes["INBOX"].messages], [1, 3, 4])
        reply = self.send(protocol, t, b"f EXPUNGE")
        self.assertIn(b"* 2 EXPUNGE", reply)
        self.assertEqual([m.uid for m in self.store.mailboxes["INBOX"].messages], [1, 4])

    def test_move_without_upstream_move_uses_uidplus_or_is_not_offered(self) -> None:
        self.store.capabilities = frozenset({"UIDPLUS"})
        self.store.add("INBOX", plain("m0"))
        self.store.add("INBOX", plain("m1"))
        self.store.add("Archive", plain("old"))
        self.store.mailboxes["INBOX"].messages[0].flags = ["\\Deleted"]  # the client's own, not ours to expunge
        protocol, t = self.selected()
        reply = self.send(protocol, t, b"m MOVE 2 Archive")
        self.assertIn(b"m OK", reply)
        self.assertEqual(self.store.called("expunge")[-1], (b"2",))
        self.assertEqual([m.uid for m in self.store.mailboxes["INBOX"].messages], [1])
        self.store.capabilities = frozenset()
        self.assertNotIn(b"MOVE", self.send(protocol, t, b"c CAPABILITY"))
        self.assertIn(b"n NO [CANNOT]", self.send(protocol, t, b"n MOVE 1 Archive"))

    def test_append_encrypts_for_the_encrypt_folders_only(self) -> None:
        self.store.create("Sent")
        protocol, t = self.connect()
        message = plain("to myself")
        t.clear()
        protocol.dataReceived(b"a APPEND Sent (\\Seen) {%d}\r\n" % len(message))
        self.assertTrue(t.value().startswith(b"+"))
        t.clear()
        protocol.dataReceived(message + b"\r\n")
        self.assertIn(b"a OK [APPENDUID", t.value())
        self.assertEqual(self.encrypted, [message])
        self.assertEqual(self.store.mailboxes["Sent"].messages[0].data, ENCRYPTED)
        t.clear()
        protocol.dataReceived(b"b APPEND Sent {%d}\r\n" % len(ENCRYPTED))
        protocol.dataReceived(ENCRYPTED + b"\r\n")
        protocol.dataReceived(b"c APPEND INBOX {%d}\r\n" % len(message))
        protocol.dataReceived(message + b"\r\n")
        self.assertEqual(len(self.encrypted), 1)  # already S/MIME, and INBOX: not encrypted again
        self.assertEqual(self.store.mailboxes["INBOX"].messages[0].data, message)

    def test_idle_pushes_upstream_changes(self) -> None:
        self.store.add("INBOX", plain("m0"))
        protocol, t = self.selected()
        self.assertTrue(self.send(protocol, t, b"i IDLE").startswith(b"+ idling"))
        self.assertTrue(self.store.idling)
        t.clear()
        uid = self.store.add("INBOX", plain("new"))
        assert self.store.events is not None
        self.store.events.exists(2)
        self.store.events.fetched(FetchResponse(1, 1, b"(UID 1 FLAGS (\\Flagged))"))
        self.login.clock.advance(0)
        pushed = t.value()
        self.assertIn(b"* 2 EXISTS", pushed)
        self.assertIn(b"* 1 FETCH (UID 1 FLAGS (\\Flagged))", pushed)
        self.assertIn((b"%d:*" % uid, b"(UID)"), [c[:2] for c in self.store.called("fetch")])
        self.assertTrue(self.store.idling)  # back in IDLE after learning the new UID
        reply = self.send(protocol, t, b"DONE")
        self.assertIn(b"i OK IDLE terminated", reply)
        self.assertFalse(self.store.idling)

    def test_logout_logs_out_upstream_and_releases_the_cache(self) -> None:
        protocol, t = self.selected()
        self.assertEqual(len(self.caches), 1)
        self.send(protocol, t, b"z LOGOUT")
        protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertTrue(self.store.logged_out)
        self.assertEqual(len(self.caches), 0)

    def test_mailbox_commands_reach_the_store(self) -> None:
        protocol, t = self.connect()
        for line, call in (
            (b"a CREATE Projects", ("create", ("Projects",))),
            (b"b RENAME Projects Done", ("rename", ("Projects", "Done"))),
            (b"c SUBSCRIBE Done", ("subscribe", ("Done",))),
            (b"d UNSUBSCRIBE Done", ("unsubscribe", ("Done",))),
            (b"e DELETE Done", ("delete", ("Done",))),
            (b"f STATUS INBOX (MESSAGES UIDNEXT)", ("status", ("INBOX", ("MESSAGES", "UIDNEXT")))),
        ):
            reply = self.send(protocol, t, line)
            self.assertIn(line[:2] + b"OK", reply)
            self.assertEqual(self.store.calls[-1], call)
        self.assertIn(
            b"* STATUS INBOX (MESSAGES 0 UIDNEXT 1)", self.send(protocol, t, b"g STATUS INBOX (MESSAGES UIDNEXT)")
        )
        self.assertIn(b'* LIST (\\HasNoChildren) "." INBOX', self.send(protocol, t, b'h LIST "" "*"'))
        self.assertIn(b'* NAMESPACE (("" "."))', self.send(protocol, t, b"i NAMESPACE"))
        self.assertIn(b"j BAD", self.send(protocol, t, b"j STATUS INBOX (SIZE)"))

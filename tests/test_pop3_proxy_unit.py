"""The POP3 proxy without sockets: the adapter over an in-memory upstream and the real inbound pipeline.

Logins use the fake checker (no KDF); messages are revealed by the real
:mod:`gatekeeper.inbound` code, inline (``InlineWorkerPool``); the upstream is
:class:`~gatekeeper.testing.pop3.MemoryPop3Upstream`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer
from twisted.logger import globalLogPublisher
from twisted.mail import pop3
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper import pop3 as pop3_adapter
from gatekeeper import smime
from gatekeeper.errors import UpstreamUnavailable
from gatekeeper.inbound import Revealer, TrustSpec
from gatekeeper.interfaces import UpstreamLogin
from gatekeeper.keys.identity import UnlockedKey
from gatekeeper.pop3 import stuffed_pieces
from gatekeeper.testing.login import fake_login
from gatekeeper.testing.pop3 import MemoryPop3Upstream
from gatekeeper.upstream.credentials import CredentialStore, LoginResolver
from gatekeeper.workers import InlineWorkerPool
from tests.test_protocol_login import TLSStringTransport, transport

BOB, ALICE = "bob@example.org", "alice@example.org"
PASSWORD = "bob's gateway password"


def plain(subject: str, body: bytes = b"Hello Bob.\r\n") -> bytes:
    return (
        f"From: Carol <carol@outside.example>\r\nTo: {BOB}\r\nSubject: {subject}\r\nContent-Type: text/plain\r\n\r\n"
    ).encode() + body


def unstuff(answer: bytes) -> bytes:
    """The message in a multi-line answer (after the +OK line, up to the final dot)."""
    assert answer.endswith(b"\r\n.\r\n"), answer[-20:]
    body = answer[:-3]
    if body.startswith(b".."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


class ProducingTransport(TLSStringTransport):
    """A secure string transport that pulls from a registered producer until it unregisters."""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        assert IPullProducer.providedBy(producer) and not streaming
        while self.producer is not None:
            producer.resumeProducing()


class Pop3ProxyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.login = fake_login()
        self.bob = self.login.add_user(BOB, PASSWORD)
        self.alice = self.login.add_user(ALICE, "alice pw")
        self.upstream = MemoryPop3Upstream()
        self.upstream.add_user(BOB, PASSWORD)
        self.workers = InlineWorkerPool()
        self.revealer = Revealer(self.workers, TrustSpec.of([self.login.pki.certificate]), clock=self.login.clock)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.build()

    def build(self, *, resolver: LoginResolver | None = None, cache_bytes: int = 1 << 20) -> None:
        avatars = pop3_adapter.make_mailbox_avatar(
            self.upstream, resolver=resolver, revealer=self.revealer, cache_bytes=cache_bytes
        )
        self.factory = pop3_adapter.Pop3Factory(self.login.portal(pop3.IMailbox, avatars), None, scheduler=list)

    def connect(self, t: TLSStringTransport | None = None) -> tuple[pop3.POP3, TLSStringTransport]:
        t = t or transport(secure=True)
        protocol = self.factory.buildProtocol(t.getPeer())
        protocol.callLater = self.login.clock.callLater  # type: ignore[method-assign]
        protocol.makeConnection(t)
        return protocol, t

    def send(self, protocol: pop3.POP3, t: TLSStringTransport, line: bytes) -> bytes:
        t.clear()
        protocol.dataReceived(line + b"\r\n")
        return t.value()

    def logged_in(self, t: TLSStringTransport | None = None) -> tuple[pop3.POP3, TLSStringTransport]:
        protocol, t = self.connect(t)
        self.send(protocol, t, b"USER " + BOB.encode())
        reply = self.send(protocol, t, b"PASS " + PASSWORD.encode())
        self.assertTrue(reply.startswith(b"+OK"), reply)
        return protocol, t

    def retr(self, protocol: pop3.POP3, t: TLSStringTransport, number: int) -> bytes:
        reply = self.send(protocol, t, b"RETR %d" % number)
        first, _, rest = reply.partition(b"\r\n")
        self.assertTrue(first.startswith(b"+OK"), first)
        message = unstuff(rest)
        self.assertEqual(first, b"+OK %d octets" % len(message))
        return message

    def encrypted_for_bob(self, subject: str) -> bytes:
        signer = UnlockedKey(
            "a", self.alice.current.certificate, self.alice.current.private_key, self.alice.current.chain
        )
        message = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\nContent-Type: text/plain\r\n\r\n.secret\r\n"
        return smime.sign_and_encrypt(message.encode(), signer, [self.bob.current.certificate])

    # -- the transaction state -----------------------------------------------------------

    def test_messages_are_revealed_and_sizes_match_what_retr_sends(self) -> None:
        uids = [
            self.upstream.deliver(BOB, plain("one", b".leading dot\r\n..two\r\n")),
            self.upstream.deliver(BOB, self.encrypted_for_bob("two")),
        ]
        protocol, t = self.logged_in()
        self.assertEqual(self.upstream.logins, [UpstreamLogin(BOB, BOB, PASSWORD)])  # pass-through
        stat = self.send(protocol, t, b"STAT")
        listing = self.send(protocol, t, b"LIST").split(b"\r\n")
        first, second = self.retr(protocol, t, 1), self.retr(protocol, t, 2)
        self.assertEqual(stat, b"+OK 2 %d\r\n" % (len(first) + len(second)))
        self.assertEqual(listing[1:4], [b"1 %d" % len(first), b"2 %d" % len(second), b"."])
        self.assertEqual(self.send(protocol, t, b"LIST 2"), b"+OK 2 %d\r\n" % len(second))
        self.assertEqual(
            self.send(protocol, t, b"UIDL"),
            b"+OK unique-id listing follows\r\n1 " + uids[0] + b"\r\n2 " + uids[1] + b"\r\n.\r\n",
        )
        self.assertEqual(self.send(protocol, t, b"UIDL 2"), b"+OK 2 " + uids[1] + b"\r\n")
        self.assertIn(b"\r\n.leading dot\r\n..two\r\n", first)
        self.assertTrue(first.startswith(b"X-Gatekeeper-Security: decrypted=no; signature=none; warning=unverified"))
        self.assertTrue(
            second.startswith(b"X-Gatekeeper-Security: decrypted=yes; signature=valid; signer=" + ALICE.encode())
        )
        self.assertIn(b"\r\n.secret\r\n", second)
        # each message came from upstream and was revealed once: LIST's reveal served RETR
        self.assertEqual(sorted(self.upstream.retrieved), [0, 1])
        self.assertEqual(len([e for e in self.events if e.get("gk_event") == "reveal"]), 2)

    def test_capa_after_login(self) -> None:
        protocol, t = self.logged_in()
        capabilities = self.send(protocol, t, b"CAPA").split(b"\r\n")
        for name in (b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING"):
            self.assertIn(name, capabilities)
        for name in (b"USER", b"STLS"):
            self.assertNotIn(name, capabilities)
        self.assertFalse([c for c in capabilities if c.startswith(b"SASL")])

    def test_top_shows_the_revealed_header_and_body_lines(self) -> None:
        self.upstream.deliver(BOB, plain("top", b"line 1\r\nline 2\r\n"))
        protocol, t = self.logged_in()
        whole = self.retr(protocol, t, 1)
        reply = self.send(protocol, t, b"TOP 1 2")
        self.assertTrue(reply.startswith(b"+OK"))
        top = unstuff(reply.partition(b"\r\n")[2])
        head, _, body = whole.partition(b"\r\n\r\n")
        self.assertEqual(top, head + b"\r\n\r\n" + b"\r\n".join(body.split(b"\r\n")[:2]) + b"\r\n")
        self.assertTrue(self.send(protocol, t, b"TOP 1 x").startswith(b"-ERR"))

    def test_dele_applies_upstream_only_at_quit(self) -> None:
        for n in range(3):
            self.upstream.deliver(BOB, plain(f"m{n}"))
        protocol, t = self.logged_in()
        self.assertEqual(self.send(protocol, t, b"DELE 2"), b"+OK message deleted\r\n")
        self.assertTrue(self.send(protocol, t, b"RETR 2").startswith(b"-ERR Message is deleted"))
        self.assertTrue(self.send(protocol, t, b"DELE 2").startswith(b"-ERR"))
        self.assertTrue(self.send(protocol, t, b"LIST 2").startswith(b"-ERR"))
        self.assertTrue(self.send(protocol, t, b"STAT").startswith(b"+OK 2 "))
        self.assertNotIn(b"\r\n2 ", self.send(protocol, t, b"UIDL"))
        self.assertEqual(self.send(protocol, t, b"RSET"), b"+OK \r\n")
        self.assertTrue(self.send(protocol, t, b"STAT").startswith(b"+OK 3 "))
        self.send(protocol, t, b"DELE 1")
        self.send(protocol, t, b"DELE 3")
        self.assertEqual(len(self.upstream.messages(BOB)), 3)  # nothing happened upstream yet
        self.assertEqual(self.send(protocol, t, b"QUIT"), b"+OK Gatekeeper POP3 done, 2 message(s) deleted\r\n")
        self.assertTrue(t.disconnecting)
        self.assertEqual([m for m in self.upstream.messages(BOB)], [plain("m1")])
        self.assertEqual(self.upstream.sessions[0].committed, [0, 2])

    def test_a_dropped_connection_deletes_nothing(self) -> None:
        for n in range(2):
            self.upstream.deliver(BOB, plain(f"m{n}"))
        protocol, t = self.logged_in()
        self.send(protocol, t, b"DELE 1")
        self.send(protocol, t, b"DELE 2")
        protocol.connectionLost(Exception("gone"))  # type: ignore[arg-type]
        session = self.upstream.sessions[0]
        self.assertEqual((session.closed, session.committed), (True, None))
        self.assertEqual(len(self.upstream.messages(BOB)), 2)
        self.assertEqual(self.login.sessions.sessions(), [])

    def test_bad_message_numbers(self) -> None:
        self.upstream.deliver(BOB, plain("only"))
        protocol, t = self.logged_in()
        for line in (b"RETR 0", b"RETR 2", b"RETR x", b"LIST -1", b"DELE 99", b"UIDL 5", b"TOP 2 1"):
            self.assertTrue(self.send(protocol, t, line).startswith(b"-ERR"), line)
        self.assertTrue(self.send(protocol, t, b"RETR").startswith(b"-ERR"))
        self.assertTrue(self.send(protocol, t, b"NOOP").startswith(b"+OK"))

    def test_read_ahead_and_no_cache(self) -> None:
        for n in range(4):
            self.upstream.deliver(BOB, plain(f"m{n}"))
        protocol, t = self.logged_in()
        self.retr(protocol, t, 1)
        self.assertEqual(self.upstream.retrieved, [0, 1, 2])  # the next two (one per worker) revealed ahead
        self.send(protocol, t, b"DELE 3")
        self.retr(protocol, t, 2)
        self.assertEqual(self.upstream.retrieved, [0, 1, 2, 3])  # 3 is revealed and deleted: 4 is next
        self.assertEqual(self.retr(protocol, t, 4).count(b"Subject: m3"), 1)
        self.assertEqual(self.upstream.retrieved, [0, 1, 2, 3])
        self.build(cache_bytes=0)
        protocol, t = self.logged_in()
        self.upstream.retrieved.clear()
        self.send(protocol, t, b"LIST")
        self.retr(protocol, t, 1)
        self.assertEqual(self.upstream.retrieved, [0, 1, 2, 3, 0])  # no cache: revealed again

    def test_pipelined_commands_wait_for_a_slow_upstream(self) -> None:
        self.upstream.deliver(BOB, plain("slow"))
        protocol, t = self.logged_in()
        self.upstream.hold = Deferred()
        t.clear()
        protocol.dataReceived(b"RETR 1\r\nNOOP\r\nUIDL 1\r\n")
        self.assertEqual(t.value(), b"")
        hold, self.upstream.hold = self.upstream.hold, None
        hold.callback(None)
        lines = t.value().split(b"\r\n")
        self.assertTrue(lines[0].startswith(b"+OK") and lines[0].endswith(b"octets"))
        self.assertEqual(lines[-3:], [b"+OK ", b"+OK 1 uid-000001", b""])

    # -- the upstream failing --------------------------------------------------------------

    def test_upstream_refusing_the_login(self) -> None:
        self.upstream.passwords[BOB] = "another password"
        protocol, t = self.connect()
        self.send(protocol, t, b"USER " + BOB.encode())
        self.assertEqual(
            self.send(protocol, t, b"PASS " + PASSWORD.encode()), b"-ERR [AUTH] The mail server refused the login\r\n"
        )
        self.assertTrue(self.send(protocol, t, b"STAT").startswith(b"-ERR"))
        self.assertEqual(self.login.sessions.sessions(), [])

    def test_upstream_down_is_sys_temp(self) -> None:
        self.upstream.error = UpstreamUnavailable("cannot connect to tls:mail.example.org:995: ConnectionRefusedError")
        protocol, t = self.connect()
        self.send(protocol, t, b"USER " + BOB.encode())
        reply = self.send(protocol, t, b"PASS " + PASSWORD.encode())
        self.assertEqual(
            reply, b"-ERR [SYS/TEMP] Cannot connect to tls:mail.example.org:995: ConnectionRefusedError\r\n"
        )
        self.assertEqual(self.login.sessions.sessions(), [])

    def test_upstream_failing_during_the_session(self) -> None:
        self.upstream.deliver(BOB, plain("m"))
        self.upstream.deliver(BOB, plain("n"))
        protocol, t = self.logged_in()
        self.send(protocol, t, b"DELE 1")
        self.upstream.error = UpstreamUnavailable("the mail server did not answer within 30 s")
        self.assertEqual(
            self.send(protocol, t, b"STAT"), b"-ERR [SYS/TEMP] The mail server did not answer within 30 s\r\n"
        )
        reply = self.send(protocol, t, b"QUIT")
        self.assertTrue(reply.startswith(b"-ERR [SYS/TEMP]"), reply)
        self.assertIn(b"may still be there", reply)
        self.assertTrue(t.disconnecting)
        self.assertEqual(len(self.upstream.messages(BOB)), 2)

    def test_client_gone_while_upstream_logs_in(self) -> None:
        self.upstream.hold = Deferred()
        protocol, t = self.connect()
        self.send(protocol, t, b"USER " + BOB.encode())
        self.send(protocol, t, b"PASS " + PASSWORD.encode())
        protocol.connectionLost(Exception("gone"))  # type: ignore[arg-type]
        hold, self.upstream.hold = self.upstream.hold, None
        hold.callback(None)
        self.assertTrue(self.upstream.sessions[0].closed)
        self.assertEqual(self.login.sessions.sessions(), [])

    # -- upstream logins ---------------------------------------------------------------------

    def test_stored_upstream_credentials(self) -> None:
        store = CredentialStore(Path(self.mktemp()))
        store.put(BOB, [self.bob.current.certificate], "bob.upstream", "upstream secret")
        self.assertNotIn(b"upstream secret", (store.root / next(store.root.iterdir()).name).read_bytes())
        self.upstream.add_user("bob.upstream", "upstream secret")
        self.build(resolver=LoginResolver(store, self.workers.run))
        self.logged_in()
        self.assertEqual(self.upstream.logins, [UpstreamLogin(BOB, "bob.upstream", "upstream secret")])

    def test_without_pass_through_a_user_needs_stored_credentials(self) -> None:
        store = CredentialStore(Path(self.mktemp()))
        self.build(resolver=LoginResolver(store, self.workers.run, pass_through=False))
        protocol, t = self.connect()
        self.send(protocol, t, b"USER " + BOB.encode())
        reply = self.send(protocol, t, b"PASS " + PASSWORD.encode())
        self.assertTrue(reply.startswith(b"-ERR [SYS/PERM] No upstream login"), reply)
        self.assertEqual(self.upstream.logins, [])

    def test_credentials_sealed_to_another_key_are_refused(self) -> None:
        store = CredentialStore(Path(self.mktemp()))
        store.put(BOB, [self.alice.current.certificate], "bob.upstream", "upstream secret")
        self.build(resolver=LoginResolver(store, self.workers.run))
        protocol, t = self.connect()
        self.send(protocol, t, b"USER " + BOB.encode())
        reply = self.send(protocol, t, b"PASS " + PASSWORD.encode())
        self.assertTrue(reply.startswith(b"-ERR [SYS/PERM] The stored upstream login cannot be opened"), reply)

    # -- large messages ------------------------------------------------------------------------

    def test_a_large_message_is_sent_in_pieces_by_a_producer(self) -> None:
        body = b"".join(b".%07d line of a long message\r\n" % i for i in range(40_000))  # ~1.3 MB
        self.upstream.deliver(BOB, plain("big", body))
        secure = ProducingTransport("192.0.2.7")
        secure.startTLS(object())
        protocol, t = self.logged_in(secure)
        writes: list[int] = []
        original = t.write
        t.write = lambda data: (writes.append(len(data)), original(data))[1]  # type: ignore[method-assign]
        message = self.retr(protocol, t, 1)
        self.assertIn(body, message)
        self.assertGreater(len(writes), 4)
        self.assertLessEqual(max(writes), 320 * 1024)


class StuffingTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        # revealed messages are canonical (CRLF only): inbound.reveal makes them so
        st.lists(st.sampled_from([b".", b"..", b"\r\n", b"x", b"abc", b"\r\n."]), max_size=60),
        st.integers(min_value=1, max_value=12),
    )
    def test_pieces_unstuff_to_the_message_at_any_chunk_size(self, tokens: list[bytes], chunk: int) -> None:
        data = b"".join(tokens)
        wire = b"".join(stuffed_pieces(data, chunk))
        self.assertTrue(wire.endswith(b".\r\n"))
        # on the wire, no line but the last is a lone dot, and every dot-line was stuffed
        lines = wire[:-3].split(b"\r\n")
        self.assertNotIn(b".", lines[:-1])
        expected = data if data.endswith(b"\r\n") or not data else data + b"\r\n"
        self.assertEqual(unstuff(wire) if data else b"", expected)
        self.assertIsNone(re.search(rb"(?:^|\r\n)\.(?!\.)", wire[:-3]))


class InterfaceTests(SynchronousTestCase):
    def test_the_upstreams_provide_their_interfaces(self) -> None:
        from zope.interface.verify import verifyClass, verifyObject

        from gatekeeper.interfaces import IPop3Maildrop, IPop3Upstream
        from gatekeeper.upstream.pop3 import NetworkMaildrop, NetworkPop3Upstream

        upstream = MemoryPop3Upstream()
        upstream.add_user(BOB, PASSWORD)
        self.assertTrue(verifyObject(IPop3Upstream, upstream))
        session = self.successResultOf(Deferred.fromCoroutine(upstream.open(UpstreamLogin(BOB, BOB, PASSWORD))))
        self.assertTrue(verifyObject(IPop3Maildrop, session))
        self.assertTrue(verifyClass(IPop3Upstream, NetworkPop3Upstream))
        self.assertTrue(verifyClass(IPop3Maildrop, NetworkMaildrop))
        self.assertTrue(verifyObject(IPop3Maildrop, pop3_adapter.EmptyMaildrop()))

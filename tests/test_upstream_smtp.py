"""The upstream SMTP relay against a scripted SMTP server on loopback.

The server (below) speaks just enough ESMTP to be told what to do: refuse a recipient,
refuse a message at its final dot, never answer, offer STARTTLS and AUTH PLAIN or not.
It records what it committed, so "nothing kept" can be checked exactly.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from OpenSSL.crypto import FILETYPE_PEM
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import TestCase

from gatekeeper.config import UpstreamEndpoint
from gatekeeper.errors import RelayRefused, UpstreamUnavailable
from gatekeeper.interfaces import RelayCopy
from gatekeeper.testing.pki import TestPKI
from gatekeeper.upstream import smtp as upstream_smtp
from gatekeeper.upstream.smtp import SmtpRelay, dot_stuffed

PKI = TestPKI("Upstream SMTP Test CA")
OTHER = TestPKI("Some Other CA", key_index=9)


class ScriptedServer(LineReceiver):
    """One connection of :class:`ScriptedFactory`."""

    factory: ScriptedFactory

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.data: list[bytes] | None = None
        self.envelope: tuple[str, list[str]] = ("", [])
        self.sendLine(b"220 fake.example ESMTP")

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connections.remove(self)

    def lineReceived(self, line: bytes) -> None:
        factory = self.factory
        if self.data is not None:
            if line == b".":
                recipients = self.envelope[1]
                refusal = next((factory.refuse_data[r] for r in recipients if r in factory.refuse_data), None)
                if refusal:
                    self.sendLine(refusal)
                else:
                    factory.committed.append((self.envelope[0], tuple(recipients), b"".join(self.data)))
                    self.sendLine(b"250 2.0.0 queued")
                self.data = None
                self.envelope = ("", [])
            else:
                self.data.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
            return
        factory.commands.append(line)
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if verb == b"EHLO":
            extensions = [b"PIPELINING", b"8BITMIME", b"SIZE 100000000"]
            if factory.tls is not None and not self.tls_started:
                extensions.append(b"STARTTLS")
            if factory.password is not None:
                extensions.append(b"AUTH PLAIN LOGIN")
            self.sendLine(
                b"250-fake.example\r\n"
                + b"\r\n".join(b"250-" + e for e in extensions[:-1])
                + b"\r\n250 "
                + extensions[-1]
            )
        elif verb == b"STARTTLS":
            self.sendLine(b"220 2.0.0 go ahead")
            self.transport.startTLS(factory.tls)  # type: ignore[union-attr]
            self.tls_started = True
        elif verb == b"AUTH":
            _, user, password = base64.b64decode(line.split()[2]).split(b"\0")
            ok = (user, password) == (b"relay@example.org", factory.password)
            self.sendLine(b"235 2.7.0 ok" if ok else b"535 5.7.8 bad credentials")
        elif verb == b"MAIL":
            self.envelope = (line.split(b"<", 1)[1].split(b">", 1)[0].decode(), [])
            self.sendLine(b"250 2.1.0 ok")
        elif verb == b"RCPT":
            address = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
            if address in factory.refuse_rcpt:
                self.sendLine(factory.refuse_rcpt[address])
            else:
                self.envelope[1].append(address)
                self.sendLine(b"250 2.1.5 ok")
        elif verb == b"DATA":
            if factory.silent_data:
                return
            if not self.envelope[1]:
                self.sendLine(b"554 5.5.1 no valid recipients")
                return
            self.data = []
            self.sendLine(b"354 go on")
        elif verb == b"RSET":
            self.envelope = ("", [])
            self.sendLine(b"250 2.0.0 ok")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 bye")
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.sendLine(b"502 5.5.1 what")

    tls_started = False


class ScriptedFactory(ServerFactory):
    protocol = ScriptedServer

    def __init__(self) -> None:
        self.connections: list[ScriptedServer] = []
        self.commands: list[bytes] = []
        self.committed: list[tuple[str, tuple[str, ...], bytes]] = []
        self.refuse_rcpt: dict[str, bytes] = {}
        self.refuse_data: dict[str, bytes] = {}
        self.silent_data = False
        self.tls: Any = None
        self.password: bytes | None = None


class RelayTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.server = ScriptedFactory()
        self.port = reactor.listenTCP(0, self.server, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def relay(self, security: str = "tcp", **options: Any) -> SmtpRelay:
        endpoint = UpstreamEndpoint(security, "127.0.0.1", self.port.getHost().port)
        relay = SmtpRelay(reactor, endpoint, hostname="gk.example.org", timeout=options.pop("timeout", 5.0), **options)
        self.addCleanup(relay.close)
        return relay

    def enable_tls(self) -> Path:
        server = PKI.server(["127.0.0.1"])
        self.server.tls = ssl.CertificateOptions(
            privateKey=ssl.KeyPair.load(server.key_pem(), FILETYPE_PEM).original,
            certificate=ssl.Certificate.loadPEM(server.cert_pem()).original,
        )
        ca_file = Path(self.mktemp())
        ca_file.write_bytes(PKI.cert_pem())
        return ca_file

    async def test_copies_are_sent_dot_stuffed_over_one_reused_connection(self) -> None:
        relay = self.relay()
        data = b"Subject: dots\r\n\r\n.one\r\n..two\r\nthree"
        for _ in range(3):
            [outcome] = await relay.relay([RelayCopy("alice@example.org", ("bob@example.org",), data)])
            self.assertTrue(outcome.accepted)
        self.assertEqual(relay.connections_made, 1)
        self.assertEqual(len(self.server.committed), 3)
        self.assertEqual(self.server.committed[0], ("alice@example.org", ("bob@example.org",), data + b"\r\n"))
        self.assertIn(b"MAIL FROM:<alice@example.org> SIZE=%d" % len(data), self.server.commands)

    async def test_close_while_a_connection_is_being_made_waits_for_it_and_drops_it(self) -> None:
        relay = self.relay()
        pending = Deferred.fromCoroutine(relay.relay([RelayCopy("alice@example.org", ("bob@example.org",), b"x")]))
        closed = relay.close()  # the TCP connection is still being made
        self.assertNoResult(closed)
        with self.assertRaises(UpstreamUnavailable):
            await pending
        await closed
        self.assertEqual(self.server.committed, [])
        with self.assertRaises(UpstreamUnavailable):
            await relay.relay([RelayCopy("alice@example.org", ("bob@example.org",), b"x")])

    async def test_verify_returns_the_recipients_reply(self) -> None:
        self.server.refuse_rcpt["nobody@example.org"] = b"550 5.1.1 no such user"
        relay = self.relay()
        self.assertTrue((await relay.verify("alice@example.org", "bob@example.org")).accepted)
        reply = await relay.verify("alice@example.org", "nobody@example.org")
        self.assertEqual((reply.code, reply.status), (550, "5.1.1"))
        await _settle()
        self.assertEqual(self.server.commands.count(b"RSET"), 2)
        self.assertEqual(self.server.committed, [])

    async def test_a_single_copy_goes_on_the_held_transaction(self) -> None:
        relay = self.relay()
        transaction = relay.transaction("alice@example.org")
        self.assertTrue((await transaction.add_recipient("bob@example.org")).accepted)
        self.assertTrue((await transaction.add_recipient("carol@example.org")).accepted)
        copy = RelayCopy("alice@example.org", ("carol@example.org", "bob@example.org"), b"Subject: held\r\n\r\nx\r\n")
        [outcome] = await transaction.send([copy])
        self.assertTrue(outcome.accepted)
        self.assertEqual(
            [c.split(b":")[0] for c in self.server.commands[1:]], [b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"DATA"]
        )
        self.assertEqual(
            self.server.committed, [("alice@example.org", ("bob@example.org", "carol@example.org"), copy.message)]
        )
        self.assertEqual((relay.connections_made, relay.idle), (1, 1))

    async def test_several_copies_reset_the_held_transaction(self) -> None:
        relay = self.relay()
        transaction = relay.transaction("alice@example.org")
        await transaction.add_recipient("bob@example.org")
        await transaction.add_recipient("grace@example.org")
        copies = [
            RelayCopy("alice@example.org", ("bob@example.org",), b"Subject: a\r\n\r\none\r\n"),
            RelayCopy("alice@example.org", ("grace@example.org",), b"Subject: a\r\n\r\ntwo\r\n"),
        ]
        outcomes = await transaction.send(copies)
        self.assertEqual([o.accepted for o in outcomes], [True, True])
        self.assertIn(b"RSET", self.server.commands)
        self.assertEqual(sorted(c[1] for c in self.server.committed), [("bob@example.org",), ("grace@example.org",)])

    async def test_a_held_connection_the_server_closed_is_replaced(self) -> None:
        relay = self.relay()
        transaction = relay.transaction("alice@example.org")
        await transaction.add_recipient("bob@example.org")
        for connection in list(self.server.connections):
            connection.transport.loseConnection()  # type: ignore[union-attr]
        await _settle()
        [outcome] = await transaction.send([RelayCopy("alice@example.org", ("bob@example.org",), b"x\r\n")])
        self.assertTrue(outcome.accepted)
        self.assertEqual(len(self.server.committed), 1)
        self.assertEqual(relay.connections_made, 2)

    async def test_a_refused_recipient_keeps_every_copy_back(self) -> None:
        self.server.refuse_rcpt["grace@example.org"] = b"550 5.1.1 no such user"
        relay = self.relay()
        copies = [
            RelayCopy("alice@example.org", ("bob@example.org",), b"Subject: a\r\n\r\none\r\n"),
            RelayCopy("alice@example.org", ("grace@example.org",), b"Subject: a\r\n\r\ntwo\r\n"),
        ]
        with self.assertRaises(RelayRefused) as caught:
            await relay.relay(copies)
        self.assertEqual((caught.exception.code, caught.exception.recipient), (550, "grace@example.org"))
        self.assertFalse(caught.exception.temporary)
        await _settle()
        self.assertEqual(self.server.committed, [])  # the first copy's connection was dropped mid-data

    async def test_the_partial_case_is_reported_per_copy(self) -> None:
        self.server.refuse_data["grace@example.org"] = b"554 5.7.1 content refused"
        relay = self.relay()
        outcomes = await relay.relay(
            [
                RelayCopy("alice@example.org", ("bob@example.org",), b"Subject: a\r\n\r\none\r\n"),
                RelayCopy("alice@example.org", ("grace@example.org",), b"Subject: a\r\n\r\ntwo\r\n"),
            ]
        )
        self.assertEqual([o.accepted for o in outcomes], [True, False])
        self.assertEqual(outcomes[1].reply.code, 554)
        self.assertEqual(len(self.server.committed), 1)

    async def test_every_copy_refused_at_the_end_is_a_refusal(self) -> None:
        self.server.refuse_data["bob@example.org"] = b"452 4.3.1 insufficient storage"
        with self.assertRaises(RelayRefused) as caught:
            await self.relay().relay([RelayCopy("alice@example.org", ("bob@example.org",), b"x\r\n")])
        self.assertTrue(caught.exception.temporary)

    async def test_a_spooled_copy_is_streamed_with_dots_across_chunks(self) -> None:
        self.patch(upstream_smtp, "WHOLE_FILE", 10)
        lines = [b"." * (i % 5) + b"x" * (i % 70) for i in range(5000)]
        data = b"Subject: big\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
        path = Path(self.mktemp())
        path.write_bytes(data)
        [outcome] = await self.relay().relay([RelayCopy("alice@example.org", ("bob@example.org",), path)])
        self.assertTrue(outcome.accepted)
        self.assertEqual(self.server.committed[0][2], data)

    async def test_starttls_verified_and_auth(self) -> None:
        ca_file = self.enable_tls()
        self.server.password = b"relay secret"
        relay = self.relay("starttls", ca_file=ca_file, user="relay@example.org", password="relay secret")
        self.assertTrue((await relay.verify("alice@example.org", "bob@example.org")).accepted)
        self.assertIn(b"STARTTLS", self.server.commands)
        auth = [c for c in self.server.commands if c.startswith(b"AUTH")]
        self.assertEqual(len(auth), 1)
        self.assertLess(self.server.commands.index(b"STARTTLS"), self.server.commands.index(auth[0]))

    async def test_wrong_upstream_password(self) -> None:
        ca_file = self.enable_tls()
        self.server.password = b"relay secret"
        relay = self.relay("starttls", ca_file=ca_file, user="relay@example.org", password="wrong")
        with self.assertRaises(UpstreamUnavailable) as caught:
            await relay.verify("alice@example.org", "bob@example.org")
        self.assertIn("AUTH refused: 535", str(caught.exception))
        self.assertNotIn("wrong", str(caught.exception))

    async def test_an_untrusted_certificate_is_refused(self) -> None:
        self.enable_tls()
        other = Path(self.mktemp())
        other.write_bytes(OTHER.cert_pem())
        with self.assertRaises(UpstreamUnavailable) as caught:
            await self.relay("starttls", ca_file=other).verify("alice@example.org", "bob@example.org")
        self.assertIn("TLS", str(caught.exception))

    async def test_starttls_required_but_not_offered(self) -> None:
        ca_file = Path(self.mktemp())
        ca_file.write_bytes(PKI.cert_pem())
        with self.assertRaises(UpstreamUnavailable) as caught:
            await self.relay("starttls", ca_file=ca_file).verify("alice@example.org", "bob@example.org")
        self.assertIn("does not offer STARTTLS", str(caught.exception))

    async def test_a_silent_server_times_out_and_keeps_nothing(self) -> None:
        self.server.silent_data = True
        relay = self.relay(timeout=0.5)
        with self.assertRaises(UpstreamUnavailable) as caught:
            await relay.relay([RelayCopy("alice@example.org", ("bob@example.org",), b"x\r\n")])
        self.assertIn("timed out", str(caught.exception))
        self.assertEqual(self.server.committed, [])

    async def test_nobody_listening(self) -> None:
        endpoint = UpstreamEndpoint("tcp", "127.0.0.1", 9)
        relay = SmtpRelay(reactor, endpoint, hostname="gk.example.org", timeout=5)
        with self.assertRaises(UpstreamUnavailable):
            await relay.verify("alice@example.org", "bob@example.org")

    def test_dot_stuffing(self) -> None:
        self.assertEqual(dot_stuffed(b".a\r\n.\r\nb"), b"..a\r\n..\r\nb\r\n")
        self.assertEqual(dot_stuffed(b"a\r\n"), b"a\r\n")


async def _settle() -> None:
    """Let aborted connections reach the server."""
    waiting: Deferred[None] = Deferred()
    reactor.callLater(0.2, waiting.callback, None)
    await waiting

"""Login rules in the SMTP, POP3 and IMAP adapters, without sockets.

A ``StringTransport`` that provides ``ISSLTransport`` stands for a connection where TLS
is up; one that provides only ``ITLSTransport`` is a plain connection that could start
TLS. The real TLS handshakes are exercised in ``test_gateway_login``.
"""

from __future__ import annotations

import base64

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.mail import imap4, pop3, smtp
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides

from gatekeeper import imap as imap_adapter
from gatekeeper import pop3 as pop3_adapter
from gatekeeper import smtp as smtp_adapter
from gatekeeper.testing.login import fake_login

PASSWORD = "s3cret pass"


class TLSStringTransport(StringTransport):
    """A plain connection that can be upgraded: records the context it was given."""

    def __init__(self, peer: str) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", peer, 40000))
        directlyProvides(self, ITLSTransport)
        self.tls_context: object = None

    def startTLS(self, context: object, normal: bool = True) -> None:
        self.tls_context = context
        directlyProvides(self, ITLSTransport, ISSLTransport)


def transport(peer: str = "192.0.2.50", *, secure: bool = False) -> TLSStringTransport:
    t = TLSStringTransport(peer)
    if secure:
        t.startTLS(object())
    return t


CONTEXT = object()


def plain_b64(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


class SmtpLoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.login = fake_login()
        self.login.add_user("alice@example.org", PASSWORD)
        self.factory = smtp_adapter.SubmissionFactory(
            self.login.portal(smtp.IMessageDelivery, smtp_adapter.make_delivery_avatar()),
            CONTEXT,  # type: ignore[arg-type]
            hostname="gk.example.org",
        )

    def connect(self, t: TLSStringTransport) -> smtp.ESMTP:
        protocol = self.factory.buildProtocol(t.getPeer())
        protocol.callLater = self.login.clock.callLater  # idle time-outs on the fake clock, not the reactor
        protocol.makeConnection(t)
        t.clear()
        return protocol

    def send(self, protocol: smtp.ESMTP, t: TLSStringTransport, line: bytes) -> bytes:
        t.clear()
        protocol.dataReceived(line + b"\r\n")
        return t.value()

    def test_no_auth_offered_before_tls(self) -> None:
        t = transport()
        p = self.connect(t)
        reply = self.send(p, t, b"EHLO client.example")
        self.assertIn(b"STARTTLS", reply)
        self.assertNotIn(b"AUTH", reply)

    def test_auth_before_tls_is_refused_with_538(self) -> None:
        t = transport()
        p = self.connect(t)
        self.send(p, t, b"EHLO client.example")
        reply = self.send(p, t, b"AUTH PLAIN " + plain_b64("alice@example.org", PASSWORD))
        self.assertTrue(reply.startswith(b"538 5.7.11"), reply)
        self.assertEqual(self.login.unlocker.calls, 0)

    def test_starttls_uses_the_configured_context(self) -> None:
        t = transport()
        p = self.connect(t)
        self.send(p, t, b"EHLO client.example")
        self.assertTrue(self.send(p, t, b"STARTTLS").startswith(b"220"))
        self.assertIs(t.tls_context, CONTEXT)
        reply = self.send(p, t, b"EHLO client.example")
        self.assertIn(b"AUTH PLAIN LOGIN", reply)
        self.assertNotIn(b"CRAM-MD5", reply)

    def test_auth_plain_after_tls(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        self.send(p, t, b"EHLO client.example")
        reply = self.send(p, t, b"AUTH PLAIN " + plain_b64("alice@example.org", PASSWORD))
        self.assertTrue(reply.startswith(b"235"), reply)
        [session] = self.login.sessions.sessions()
        self.assertEqual((session.protocol, session.client), ("smtp", "192.0.2.50"))

    def test_auth_login_exchange(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        self.send(p, t, b"EHLO client.example")
        self.assertTrue(self.send(p, t, b"AUTH LOGIN").startswith(b"334"))
        self.assertTrue(self.send(p, t, base64.b64encode(b"alice@example.org")).startswith(b"334"))
        reply = self.send(p, t, base64.b64encode(PASSWORD.encode()))
        self.assertTrue(reply.startswith(b"235"), reply)

    def test_wrong_password_is_535(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        self.send(p, t, b"EHLO client.example")
        reply = self.send(p, t, b"AUTH PLAIN " + plain_b64("alice@example.org", "nope"))
        self.assertTrue(reply.startswith(b"535 5.7.8"), reply)

    def test_throttled_login_is_454(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        self.send(p, t, b"EHLO client.example")
        for _ in range(4):
            self.send(p, t, b"AUTH PLAIN " + plain_b64("alice@example.org", "nope"))
        reply = self.send(p, t, b"AUTH PLAIN " + plain_b64("alice@example.org", PASSWORD))
        self.assertTrue(reply.startswith(b"454 4.7.0"), reply)

    def test_cram_md5_is_not_offered(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        self.send(p, t, b"EHLO client.example")
        self.assertTrue(self.send(p, t, b"AUTH CRAM-MD5").startswith(b"504"))

    def test_mail_from_requires_authentication(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        self.send(p, t, b"EHLO client.example")
        reply = self.send(p, t, b"MAIL FROM:<alice@example.org>")
        self.assertTrue(reply.startswith(b"530 5.7.0"), reply)

    def test_mail_from_must_be_the_logged_in_user(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        self.send(p, t, b"EHLO client.example")
        self.send(p, t, b"AUTH PLAIN " + plain_b64("alice@example.org", PASSWORD))
        reply = self.send(p, t, b"MAIL FROM:<mallory@example.org>")
        self.assertTrue(reply.startswith(b"553 "), reply)
        self.assertIn(b"5.7.1", reply)
        self.assertTrue(self.send(p, t, b"MAIL FROM:<Alice@Example.ORG>").startswith(b"250"))

    def test_plaintext_on_loopback_only_when_configured(self) -> None:
        self.factory.allow_plaintext_on_loopback = True
        t = transport("127.0.0.1")
        p = self.connect(t)
        self.assertIn(b"AUTH PLAIN LOGIN", self.send(p, t, b"EHLO client.example"))
        t2 = transport("192.0.2.9")
        p2 = self.connect(t2)
        self.assertNotIn(b"AUTH", self.send(p2, t2, b"EHLO client.example"))


class Pop3LoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.login = fake_login()
        self.login.add_user("bob@example.org", PASSWORD)
        self.factory = pop3_adapter.Pop3Factory(
            self.login.portal(pop3.IMailbox, pop3_adapter.make_mailbox_avatar()),
            CONTEXT,  # type: ignore[arg-type]
            scheduler=list,
        )

    def connect(self, t: TLSStringTransport) -> pop3.POP3:
        protocol = self.factory.buildProtocol(t.getPeer())
        protocol.callLater = self.login.clock.callLater  # idle time-outs on the fake clock, not the reactor
        protocol.makeConnection(t)
        return protocol

    def send(self, protocol: pop3.POP3, t: TLSStringTransport, line: bytes) -> bytes:
        t.clear()
        protocol.dataReceived(line + b"\r\n")
        return t.value()

    def test_greeting_has_no_apop_timestamp(self) -> None:
        t = transport()
        self.connect(t)
        greeting = t.value()
        self.assertTrue(greeting.startswith(b"+OK"))
        self.assertNotIn(b"<", greeting)
        p = self.connect(t)
        self.assertTrue(self.send(p, t, b"APOP bob@example.org 0123456789abcdef").startswith(b"-ERR [AUTH]"))

    def test_capa_before_tls_offers_stls_and_no_passwords(self) -> None:
        t = transport()
        p = self.connect(t)
        capa = self.send(p, t, b"CAPA")
        self.assertIn(b"\r\nSTLS\r\n", capa)
        self.assertNotIn(b"USER", capa)
        self.assertNotIn(b"SASL", capa)

    def test_user_and_auth_before_tls_are_refused(self) -> None:
        t = transport()
        p = self.connect(t)
        self.assertTrue(self.send(p, t, b"USER bob@example.org").startswith(b"-ERR [AUTH]"))
        self.assertTrue(self.send(p, t, b"AUTH PLAIN " + plain_b64("bob@example.org", PASSWORD)).startswith(b"-ERR"))
        self.assertEqual(self.login.unlocker.calls, 0)

    def test_stls_then_user_pass(self) -> None:
        t = transport()
        p = self.connect(t)
        self.assertTrue(self.send(p, t, b"STLS").startswith(b"+OK"))
        self.assertIs(t.tls_context, CONTEXT)
        capa = self.send(p, t, b"CAPA")
        self.assertNotIn(b"STLS", capa)
        self.assertIn(b"SASL PLAIN LOGIN", capa)
        self.assertTrue(self.send(p, t, b"STLS").startswith(b"-ERR"))
        self.assertTrue(self.send(p, t, b"USER bob@example.org").startswith(b"+OK"))
        self.assertTrue(self.send(p, t, b"PASS " + PASSWORD.encode()).startswith(b"+OK"))
        self.assertTrue(self.send(p, t, b"STAT").startswith(b"+OK 0 0"))

    def test_wrong_password(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        self.send(p, t, b"USER bob@example.org")
        self.assertEqual(self.send(p, t, b"PASS wrong"), b"-ERR [AUTH] Authentication failed\r\n")
        self.assertTrue(self.send(p, t, b"STAT").startswith(b"-ERR"))

    def test_auth_plain_with_initial_response(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        reply = self.send(p, t, b"AUTH PLAIN " + plain_b64("bob@example.org", PASSWORD))
        self.assertTrue(reply.startswith(b"+OK"), reply)

    def test_auth_plain_with_continuation(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        self.assertEqual(self.send(p, t, b"AUTH PLAIN"), b"+ \r\n")
        self.assertTrue(self.send(p, t, plain_b64("bob@example.org", PASSWORD)).startswith(b"+OK"))

    def test_auth_login(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        self.assertTrue(self.send(p, t, b"AUTH LOGIN").startswith(b"+ "))
        self.assertTrue(self.send(p, t, base64.b64encode(b"bob@example.org")).startswith(b"+ "))
        self.assertTrue(self.send(p, t, base64.b64encode(PASSWORD.encode())).startswith(b"+OK"))

    def test_auth_cancel_and_garbage(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        self.send(p, t, b"AUTH PLAIN")
        self.assertTrue(self.send(p, t, b"*").startswith(b"-ERR"))
        self.send(p, t, b"AUTH PLAIN")
        self.assertTrue(self.send(p, t, b"!!!not base64!!!").startswith(b"-ERR Malformed"))
        self.assertTrue(self.send(p, t, b"AUTH PLAIN " + base64.b64encode(b"no-nul-bytes")).startswith(b"-ERR"))
        self.assertEqual(self.login.unlocker.calls, 0)

    def test_commands_pipelined_after_pass_wait_for_the_login(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        t.clear()
        p.dataReceived(b"USER bob@example.org\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\n")
        lines = t.value().split(b"\r\n")
        self.assertTrue(lines[1].startswith(b"+OK"), lines)
        self.assertTrue(lines[2].startswith(b"+OK 0 0"), lines)

    def test_throttled(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        for _ in range(4):
            self.send(p, t, b"USER bob@example.org")
            self.send(p, t, b"PASS wrong")
        self.send(p, t, b"USER bob@example.org")
        self.assertTrue(self.send(p, t, b"PASS " + PASSWORD.encode()).startswith(b"-ERR [SYS/TEMP]"))


class ImapLoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.login = fake_login()
        self.login.add_user("carol@example.org", PASSWORD)
        self.factory = imap_adapter.ImapFactory(
            self.login.portal(imap4.IAccount, imap_adapter.make_account_avatar()),
            CONTEXT,  # type: ignore[arg-type]
        )

    def connect(self, t: TLSStringTransport) -> imap4.IMAP4Server:
        protocol = self.factory.buildProtocol(t.getPeer())
        protocol.callLater = self.login.clock.callLater  # idle time-outs on the fake clock, not the reactor
        protocol.makeConnection(t)
        return protocol

    def send(self, protocol: imap4.IMAP4Server, t: TLSStringTransport, line: bytes) -> bytes:
        t.clear()
        protocol.dataReceived(line + b"\r\n")
        return t.value()

    def test_logindisabled_and_no_auth_before_tls(self) -> None:
        t = transport()
        p = self.connect(t)
        greeting = t.value()
        self.assertIn(b"LOGINDISABLED", greeting)
        self.assertIn(b"STARTTLS", greeting)
        self.assertNotIn(b"AUTH=", greeting)
        reply = self.send(p, t, b'a1 LOGIN carol@example.org "s3cret pass"')
        self.assertIn(b"a1 NO [PRIVACYREQUIRED]", reply)
        reply = self.send(p, t, b"a2 AUTHENTICATE PLAIN")
        self.assertIn(b"a2 NO [PRIVACYREQUIRED]", reply)
        self.assertEqual(self.login.unlocker.calls, 0)

    def test_starttls_then_login(self) -> None:
        t = transport()
        p = self.connect(t)
        self.assertIn(b"a1 OK", self.send(p, t, b"a1 STARTTLS"))
        self.assertIs(t.tls_context, CONTEXT)
        capability = self.send(p, t, b"a2 CAPABILITY")
        self.assertNotIn(b"LOGINDISABLED", capability)
        self.assertIn(b"AUTH=PLAIN", capability)
        self.assertIn(b"a3 OK", self.send(p, t, b'a3 LOGIN carol@example.org "s3cret pass"'))
        self.assertIn(b"a4 OK", self.send(p, t, b'a4 LIST "" "*"'))

    def test_wrong_password(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        reply = self.send(p, t, b'a1 LOGIN carol@example.org "wrong"')
        self.assertEqual(reply, b"a1 NO [AUTHENTICATIONFAILED] Authentication failed\r\n")
        self.assertIn(b"a2 BAD", self.send(p, t, b'a2 LIST "" "*"'))

    def test_authenticate_plain(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        self.assertTrue(self.send(p, t, b"a1 AUTHENTICATE PLAIN").startswith(b"+"))
        reply = self.send(p, t, plain_b64("carol@example.org", PASSWORD))
        self.assertIn(b"a1 OK", reply)

    def test_throttled(self) -> None:
        t = transport(secure=True)
        p = self.connect(t)
        for index in range(4):
            self.send(p, t, b"a%d LOGIN carol@example.org wrong" % index)
        reply = self.send(p, t, b'b1 LOGIN carol@example.org "s3cret pass"')
        self.assertIn(b"b1 NO [UNAVAILABLE]", reply)

"""Real logins over TLS against the running gateway, with Python's own mail clients.

The gateway runs in-process on the test's reactor with its real configuration, key store
and 600,000-round KDF; each blocking stdlib client runs in a thread. The certificate is
verified against the gateway's built-in CA in every TLS handshake.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import imaplib
import poplib
import smtplib
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from gatekeeper.testing.gateway import GatewayHarness

PASSWORD = "gateway-login test password"
ALICE = "alice@example.org"


@functools.cache
def shared_harness() -> GatewayHarness:
    """One key store and CA for the whole module (trial runs tests in its temp directory)."""
    harness = GatewayHarness(Path("gateway-login").absolute(), extra_config="[login]\nfree_failures = 50\n")
    harness.add_user(ALICE, PASSWORD)
    return harness


class GatewayLoginTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.harness = shared_harness()
        self.harness.start(reactor)
        self.addCleanup(self.harness.stop)
        self.context = self.harness.client_context()

    def in_thread(self, function: Any, *args: Any) -> Any:
        return deferToThread(function, *args)

    # -- SMTP

    def smtp_starttls(self, password: str) -> tuple[dict[str, str], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", self.harness.port("smtp", "starttls"), timeout=30) as client:
            client.ehlo()
            before = dict(client.esmtp_features)
            try:
                client.login(ALICE, password)
            except smtplib.SMTPNotSupportedError:
                pass
            else:
                raise AssertionError("AUTH accepted before STARTTLS")
            client.starttls(context=self.context)
            client.ehlo()
            return before, client.login(ALICE, password)

    async def test_smtp_starttls_then_auth(self) -> None:
        before, (code, _) = await self.in_thread(self.smtp_starttls, PASSWORD)
        self.assertIn("starttls", before)
        self.assertNotIn("auth", before)
        self.assertEqual(code, 235)

    async def test_smtp_wrong_password(self) -> None:
        with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
            await self.in_thread(self.smtp_starttls, "not the password")
        self.assertEqual(caught.exception.smtp_code, 535)

    def smtp_plain_auth_before_tls(self) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", self.harness.port("smtp", "starttls"), timeout=30) as client:
            client.ehlo()
            token = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
            return client.docmd("AUTH", f"PLAIN {token}")

    async def test_smtp_plaintext_auth_is_refused(self) -> None:
        code, message = await self.in_thread(self.smtp_plain_auth_before_tls)
        self.assertEqual(code, 538)
        self.assertIn(b"5.7.11", message)

    def smtp_implicit_tls(self, password: str) -> tuple[int, bytes]:
        port = self.harness.port("smtp", "tls")
        with smtplib.SMTP_SSL("127.0.0.1", port, context=self.context, timeout=30) as client:
            client.ehlo()
            return client.login(ALICE, password)

    async def test_smtp_implicit_tls(self) -> None:
        code, _ = await self.in_thread(self.smtp_implicit_tls, PASSWORD)
        self.assertEqual(code, 235)

    # -- POP3

    def pop3_stls(self, password: str) -> tuple[bytes, Any]:
        client = poplib.POP3("127.0.0.1", self.harness.port("pop3", "starttls"), timeout=30)
        try:
            try:
                client.user(ALICE)
            except poplib.error_proto as error:
                refused = bytes(error.args[0])
            else:
                raise AssertionError("USER accepted before STLS")
            client.stls(context=self.context)
            client.user(ALICE)
            client.pass_(password)
            return refused, client.stat()
        finally:
            client.close()

    async def test_pop3_stls_then_login(self) -> None:
        refused, stat = await self.in_thread(self.pop3_stls, PASSWORD)
        self.assertTrue(refused.startswith(b"-ERR [AUTH]"), refused)
        self.assertEqual(stat, (0, 0))

    async def test_pop3_wrong_password(self) -> None:
        with self.assertRaises(poplib.error_proto) as caught:
            await self.in_thread(self.pop3_stls, "not the password")
        self.assertEqual(caught.exception.args[0], b"-ERR [AUTH] Authentication failed")

    def pop3_implicit_tls(self, password: str) -> bytes:
        client = poplib.POP3_SSL("127.0.0.1", self.harness.port("pop3", "tls"), context=self.context, timeout=30)
        try:
            client.user(ALICE)
            return bytes(client.pass_(password))
        finally:
            client.close()

    async def test_pop3_implicit_tls(self) -> None:
        reply = await self.in_thread(self.pop3_implicit_tls, PASSWORD)
        self.assertTrue(reply.startswith(b"+OK"))

    # -- IMAP

    def imap_starttls(self, password: str) -> tuple[tuple[str, ...], str]:
        client = imaplib.IMAP4("127.0.0.1", self.harness.port("imap", "starttls"), timeout=30)
        try:
            before = tuple(client.capabilities)
            try:
                client.login(ALICE, password)
            except imaplib.IMAP4.error:
                pass
            else:
                raise AssertionError("LOGIN accepted before STARTTLS")
            client.starttls(ssl_context=self.context)
            status, _ = client.login(ALICE, password)
            client.logout()
            return before, status
        finally:
            with contextlib.suppress(OSError):
                client.shutdown()

    async def test_imap_starttls_then_login(self) -> None:
        before, status = await self.in_thread(self.imap_starttls, PASSWORD)
        self.assertIn("LOGINDISABLED", before)
        self.assertIn("STARTTLS", before)
        self.assertFalse([c for c in before if c.startswith("AUTH=")])
        self.assertEqual(status, "OK")

    async def test_imap_wrong_password(self) -> None:
        with self.assertRaises(imaplib.IMAP4.error) as caught:
            await self.in_thread(self.imap_starttls, "not the password")
        self.assertIn("AUTHENTICATIONFAILED", str(caught.exception))

    def imap_implicit_tls(self, password: str, user: str = ALICE) -> str:
        client = imaplib.IMAP4_SSL("127.0.0.1", self.harness.port("imap", "tls"), ssl_context=self.context)
        try:
            status, _ = client.login(user, password)
            client.logout()
            return str(status)
        finally:
            with contextlib.suppress(OSError):
                client.shutdown()

    async def test_imap_implicit_tls_and_the_cached_second_login(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual(await self.in_thread(self.imap_implicit_tls, PASSWORD), "OK")
        self.assertEqual(await self.in_thread(self.imap_implicit_tls, PASSWORD, ALICE.upper()), "OK")
        logins = [e["how"] for e in events if e.get("log_format", "").startswith("login ok")]
        # The first login ran the KDF; the second, same password, came from the cache.
        self.assertEqual(logins, ["", ", cached"])

    # -- one client that cannot verify the gateway is refused by its own TLS

    def imap_with_an_unrelated_ca(self) -> None:
        import ssl

        from gatekeeper.testing.pki import TestPKI

        other = Path(self.mktemp())
        other.write_bytes(TestPKI("Unrelated CA", key_index=5).cert_pem())
        context = ssl.create_default_context(cafile=str(other))
        imaplib.IMAP4_SSL("127.0.0.1", self.harness.port("imap", "tls"), ssl_context=context, timeout=30)

    async def test_the_gateway_certificate_does_not_verify_with_another_ca(self) -> None:
        import ssl

        with self.assertRaises(ssl.SSLCertVerificationError):
            await self.in_thread(self.imap_with_an_unrelated_ca)

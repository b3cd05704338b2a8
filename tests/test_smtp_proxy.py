"""The SMTP proxy end to end: real clients -> Gatekeeper -> real Postfix -> real Dovecot (or smtp-sink).

The gateway runs in-process on the test's reactor with its real configuration, key store
and worker processes; the upstream is :class:`~tests.fixtures.mailstack.MailStack`
(Postfix relaying over STARTTLS, verified against the stack's CA, delivering
``example.org`` into Dovecot and everything else into smtp-sink). What arrives is read
back straight from Dovecot (or the sink) and checked with ``openssl cms``: decrypted with
the recipient's own key, signatures verified against the gateway's CA.

The seed's scenarios are named tests: FIG 4 (same secure domain), FIG 5/6 (no
certificate, same or another mail server), FIG 7 (a partner domain whose certificate is
in its own LDAP directory, a real slapd), wrong password, mandatory domain, Bcc
privacy, encrypt-to-self, no double encryption, upstream down.
"""

from __future__ import annotations

import atexit
import functools
import smtplib
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gatekeeper import smime
from gatekeeper.keys.unlocking import unlock_from_store
from gatekeeper.testing.gateway import GatewayHarness
from gatekeeper.testing.pki import Issued, TestPKI
from tests.fixtures import clients
from tests.fixtures.mailstack import MailStack
from tests.fixtures.slapd import READER_DN, SUFFIX, Slapd

ALICE, BOB, CAROL, GRACE = "alice@example.org", "bob@example.org", "carol@example.org", "grace@example.org"
DAVE, ERIN, FRANK = "dave@example.net", "erin@partner.example", "frank@secure.example"
GATEWAY_USERS = {ALICE: "alice gateway password", BOB: "bob gateway password", GRACE: "grace gateway password"}
MAIL_USERS = {ALICE: "alicepw", BOB: "bobpw", CAROL: "carolpw", GRACE: "gracepw"}


class World:
    """The mail stack, a partner directory and the gateway's files: made once per test process."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="gk-smtp-proxy-"))
        self.stack = MailStack(users=MAIL_USERS)
        self.stack.start()
        self.partner_ca = TestPKI("Partner CA", key_index=3)
        self.erin: Issued = self.partner_ca.user(ERIN, key_kind="p256", key_index=4)
        self.slapd = Slapd()
        self.slapd.start()
        atexit.register(self.slapd.close)
        self.slapd.add_person("erin", ERIN, certificates=[self.erin.certificate])
        partner_anchor = self.directory / "partner-ca.pem"
        partner_anchor.write_bytes(self.partner_ca.cert_pem())
        ldap = self.slapd.config()
        stack = self.stack
        self.harness = GatewayHarness(
            self.directory / "gateway",
            extra_config=(
                f'[upstream]\nsmtp = "starttls:127.0.0.1:{stack.smtp_port}"\n'
                f'pop3 = "tls:127.0.0.1:{stack.pop3s_port}"\nimap = "tls:127.0.0.1:{stack.imaps_port}"\n'
                f'ca_file = "{stack.ca_file}"\ntimeout_seconds = 10\n'
                "[login]\nfree_failures = 50\n"
                '[policy.domains]\n"secure.example" = "mandatory"\n'
                '[directory]\norder = ["keyring", "external"]\n'
                f'[[directory.external]]\nname = "partner"\nurl = "{self.slapd.ldaps_url}"\nbase_dn = "{SUFFIX}"\n'
                f'domains = ["partner.example"]\nca_file = "{self.slapd.ca_file}"\nbind_dn = "{READER_DN}"\n'
                f'bind_password_file = "{ldap.bind_password_file}"\n'
                f'[trust]\nanchors = ["{partner_anchor}"]\n'
            ),
        )
        for address, password in GATEWAY_USERS.items():
            self.harness.add_user(address, password)
        self._keys: dict[str, tuple[Path, Path]] = {}

    def key_files(self, address: str) -> tuple[Path, Path]:
        """(certificate, private key) PEM files of a gateway user, unlocked with the real KDF."""
        if address not in self._keys:
            wire = unlock_from_store(
                str(self.harness.config.keys.store),
                address,
                GATEWAY_USERS[address],
                self.harness.config.keys.kdf_iterations,
            )
            key = serialization.load_der_private_key(wire.keys[0].private_key, None)
            certificate = self.directory / f"{address}.crt"
            private = self.directory / f"{address}.key"
            certificate.write_bytes(
                b"-----BEGIN CERTIFICATE-----\n" + _b64(wire.keys[0].certificate) + b"-----END CERTIFICATE-----\n"
            )
            private.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            private.chmod(0o600)
            self._keys[address] = (certificate, private)
        return self._keys[address]

    def erin_files(self) -> tuple[Path, Path]:
        certificate, private = self.directory / "erin.crt", self.directory / "erin.key"
        certificate.write_bytes(self.erin.cert_pem())
        private.write_bytes(self.erin.key_pem())
        return certificate, private


def _b64(der: bytes) -> bytes:
    import base64

    text = base64.b64encode(der)
    return b"".join(text[i : i + 64] + b"\n" for i in range(0, len(text), 64))


@functools.cache
def world() -> World:
    return World()


def message(
    subject: str, to: str = BOB, *, cc: str = "", bcc: str = "", body: bytes = b"Hello from Alice.\r\n"
) -> bytes:
    head = f"From: Alice <{ALICE}>\r\nTo: <{to}>\r\n"
    if cc:
        head += f"Cc: <{cc}>\r\n"
    if bcc:
        head += f"Bcc: <{bcc}>\r\n"
    head += f"Subject: {subject}\r\nDate: Sun, 01 Mar 2026 10:00:00 +0000\r\n"
    head += f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n"
    return head.encode() + b"\r\n" + body


class ProxyTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.world = world()
        self.stack = self.world.stack
        self.stack.reset()
        self.harness = self.world.harness
        self.harness.start(reactor)
        self.addCleanup(self.harness.stop)

    # -- helpers -----------------------------------------------------------------------------

    def send(
        self,
        recipients: list[str],
        data: bytes,
        *,
        user: str = ALICE,
        password: str | None = None,
        implicit_tls: bool = False,
    ) -> Any:
        """smtplib in a thread: STARTTLS (or 465) verified, AUTH, sendmail; returns the refused recipients."""
        context = self.harness.client_context()
        secret = GATEWAY_USERS[user] if password is None else password

        def run() -> Any:
            if implicit_tls:
                client: smtplib.SMTP = smtplib.SMTP_SSL(
                    "127.0.0.1", self.harness.port("smtp", "tls"), context=context, timeout=60
                )
            else:
                client = smtplib.SMTP("127.0.0.1", self.harness.port("smtp", "starttls"), timeout=60)
                client.starttls(context=context)
            with client:
                client.login(user, secret)
                return client.sendmail(user, recipients, data)

        return deferToThread(run)

    async def inbox(self, address: str, count: int = 1) -> list[bytes]:
        return await self.stack.wait_for_messages_async(reactor, address, count, timeout=20)

    async def sink(self, count: int = 1) -> list[Any]:
        return await deferToThread(self.stack.wait_for_sink, count, timeout=20)

    def openssl(self, *argv: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["openssl", "cms", *argv], input=data, capture_output=True, timeout=60, check=False)

    def decrypt(self, data: bytes, certificate: Path, key: Path) -> bytes:
        done = self.openssl("-decrypt", "-recip", str(certificate), "-inkey", str(key), data=data)
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace"))
        return done.stdout

    def verify(self, data: bytes) -> bytes:
        done = self.openssl("-verify", "-CAfile", str(self.harness.ca_file), data=data)
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace"))
        self.assertIn(b"Verification successful", done.stderr)
        return done.stdout

    def assert_no_queue(self) -> None:
        self.stack.postfix.wait_for_empty_queue(timeout=10)

    # -- the seed's scenarios -------------------------------------------------------------------

    async def test_fig4_same_secure_domain_is_encrypted_and_signed(self) -> None:
        refused = await self.send([BOB], message("fig 4"))
        self.assertEqual(refused, {})
        [stored] = await self.inbox(BOB)
        self.assertEqual(smime.classify(stored), "encrypted")
        self.assertNotIn(b"Hello from Alice", stored)
        inner = self.decrypt(stored, *self.world.key_files(BOB))
        self.assertIn(b"Hello from Alice.", self.verify(inner))
        self.assertIn(b"Subject: fig 4\r\n", stored)  # header fields stay outside the envelope

    async def test_fig5_no_certificate_same_server_is_signed_only(self) -> None:
        await self.send([CAROL], message("fig 5", CAROL))
        [stored] = await self.inbox(CAROL)
        self.assertEqual(smime.classify(stored), "signed")
        self.assertIn(b"Hello from Alice.", self.verify(stored))

    async def test_fig6_no_certificate_other_server_is_signed_only(self) -> None:
        await self.send([DAVE], message("fig 6", DAVE))
        [captured] = await self.sink()
        self.assertEqual(captured.recipients, (DAVE,))
        self.assertEqual(smime.classify(captured.data), "signed")
        self.assertIn(b"Hello from Alice.", self.verify(captured.data))

    async def test_fig7_partner_certificate_from_its_directory_is_encrypted(self) -> None:
        await self.send([ERIN], message("fig 7", ERIN))
        [captured] = await self.sink()
        self.assertEqual(captured.recipients, (ERIN,))
        self.assertEqual(smime.classify(captured.data), "encrypted")
        inner = self.decrypt(captured.data, *self.world.erin_files())
        self.assertIn(b"Hello from Alice.", self.verify(inner))

    async def test_wrong_password_the_message_stays_with_the_client(self) -> None:
        run = await deferToThread(
            clients.swaks_send,
            "127.0.0.1",
            self.harness.port("smtp", "starttls"),
            ALICE,
            [BOB],
            message("wrong password"),
            ca_file=self.harness.ca_file,
            auth=(ALICE, "not the password"),
        )
        self.assertEqual(run.returncode, 28, run.output)  # swaks: AUTH failed
        self.assertIn("535 5.7.8", run.output)
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(self.stack.dovecot.count(BOB), 0)
        self.assertEqual(self.stack.postfix.queued(), 0)

    async def test_mandatory_domain_without_a_key_is_refused_at_rcpt(self) -> None:
        with self.assertRaises(smtplib.SMTPRecipientsRefused) as caught:
            await self.send([FRANK], message("mandatory", FRANK))
        code, text = caught.exception.recipients[FRANK]
        self.assertEqual(code, 550)
        self.assertTrue(text.startswith(b"5.7.1 encryption to frank@secure.example is mandatory"), text)

    async def test_a_recipient_upstream_refuses_gets_its_reply_at_rcpt(self) -> None:
        refused = await self.send([BOB, "nobody@example.org"], message("unknown", BOB))
        code, text = refused["nobody@example.org"]
        self.assertEqual(code, 550)
        self.assertIn(b"5.1.1", text)
        self.assertEqual(len(await self.inbox(BOB)), 1)

    async def test_bcc_privacy(self) -> None:
        await self.send([BOB, GRACE], message("bcc", BOB, bcc=GRACE))
        [to_bob] = await self.inbox(BOB)
        [to_grace] = await self.inbox(GRACE)
        for stored in (to_bob, to_grace):
            self.assertNotIn(b"\nBcc:", stored.split(b"\r\n\r\n", 1)[0])
            self.assertEqual(smime.classify(stored), "encrypted")
        bob_files, grace_files = self.world.key_files(BOB), self.world.key_files(GRACE)
        self.assertIn(b"Hello from Alice.", self.verify(self.decrypt(to_grace, *grace_files)))
        self.assertIn(b"Hello from Alice.", self.verify(self.decrypt(to_bob, *bob_files)))
        # No RecipientInfo of bob's copy is grace's (nor the other way round).
        for data, other in ((to_bob, grace_files), (to_grace, bob_files)):
            done = self.openssl("-decrypt", "-recip", str(other[0]), "-inkey", str(other[1]), data=data)
            self.assertNotEqual(done.returncode, 0)

    async def test_encrypt_to_self(self) -> None:
        await self.send([BOB], message("self"))
        [stored] = await self.inbox(BOB)
        inner = self.decrypt(stored, *self.world.key_files(ALICE))
        self.assertIn(b"Hello from Alice.", self.verify(inner))

    async def test_no_double_encryption(self) -> None:
        bob_certificate = self.world.key_files(BOB)[0]
        from cryptography import x509

        certificate = x509.load_pem_x509_certificate(bob_certificate.read_bytes())
        protected = smime.encrypt(message("client encrypted"), [certificate])
        await self.send([BOB], protected)
        [stored] = await self.inbox(BOB)
        self.assertEqual(stored.split(b"\r\n\r\n", 1)[1], protected.split(b"\r\n\r\n", 1)[1])
        inner = self.decrypt(stored, *self.world.key_files(BOB))
        self.assertIn(b"Hello from Alice.", inner)
        self.assertNotIn(b"application/pkcs7-mime", inner)  # one layer, not two

    async def test_upstream_down_gives_4xx_and_exactly_one_copy_after_the_retry(self) -> None:
        context = self.harness.client_context()
        port = self.harness.port("smtp", "starttls")
        data = message("retry")
        stack = self.stack

        def first_attempt() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
                client.starttls(context=context)
                client.login(ALICE, GATEWAY_USERS[ALICE])
                client.mail(ALICE)
                code, _ = client.rcpt(BOB)
                assert code == 250, code
                stack.postfix.stop()  # the upstream goes away between RCPT and the data
                code, _ = client.docmd("DATA")
                assert code == 354, code
                client.send(data + b".\r\n")
                return client.getreply()

        code, text = await deferToThread(first_attempt)
        self.assertEqual(code, 451, text)
        self.assertTrue(text.startswith(b"4.4.1"), text)
        with self.assertRaises(smtplib.SMTPRecipientsRefused) as caught:  # still down: refused at RCPT, 4xx
            await self.send([BOB], data)
        self.assertEqual(caught.exception.recipients[BOB][0], 451)
        stack.postfix.start()
        self.assertEqual(await self.send([BOB], data), {})
        await self.inbox(BOB)
        await deferLater(reactor, 1.0, lambda: None)  # anything duplicated would have arrived by now
        self.assertEqual(self.stack.dovecot.count(BOB), 1)

    # -- real clients -------------------------------------------------------------------------

    async def client_run(self, which: str, tls: str, subject: str) -> None:
        port = self.harness.port("smtp", "tls" if tls == "tls" else "starttls")
        send = clients.swaks_send if which == "swaks" else clients.msmtp_send
        run = await deferToThread(
            send,
            "127.0.0.1",
            port,
            ALICE,
            [BOB],
            message(subject),
            ca_file=self.harness.ca_file,
            tls=tls,
            auth=(ALICE, GATEWAY_USERS[ALICE]),
        )
        run.check()
        [stored] = await self.inbox(BOB)
        self.assertIn(f"Subject: {subject}".encode(), stored)
        self.assertIn(b"Hello from Alice.", self.verify(self.decrypt(stored, *self.world.key_files(BOB))))

    async def test_swaks_starttls(self) -> None:
        await self.client_run("swaks", "starttls", "swaks starttls")

    async def test_swaks_implicit_tls(self) -> None:
        await self.client_run("swaks", "tls", "swaks 465")

    async def test_msmtp_starttls(self) -> None:
        await self.client_run("msmtp", "starttls", "msmtp starttls")

    async def test_msmtp_implicit_tls(self) -> None:
        await self.client_run("msmtp", "tls", "msmtp 465")

    async def test_smtplib_implicit_tls_message_above_the_spool_threshold(self) -> None:
        body = b"".join(b"line %d of a large message\r\n" % i for i in range(60_000))  # ~1.6 MB
        await self.send([BOB, CAROL], message("large", BOB, cc=CAROL, body=body), implicit_tls=True)
        [to_bob] = await self.inbox(BOB)
        [to_carol] = await self.inbox(CAROL)
        inner = self.verify(self.decrypt(to_bob, *self.world.key_files(BOB)))
        self.assertIn(b"line 59999 of a large message", inner)
        self.assertEqual(smime.classify(to_carol), "signed")

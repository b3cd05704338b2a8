"""The whole gateway on its embedded store: SMTP into the store, the smarthost, a crash mid-delivery.

- Through the real SMTP proxy: an unknown local user is refused at ``RCPT`` (550
  5.1.1), an outside domain too when no smarthost is set (550 5.7.1); what lands in the
  store is encrypted to the recipient and opens whole with their key.
- ``[upstream] smarthost``: outside recipients leave through it (here ``smtp-sink``),
  local ones stay in the store.
- A gateway process killed (SIGKILL) while it delivers, after the message was written
  to ``tmp/`` and before it is published in ``new/``: every message the SMTP client
  got its ``250`` for is there and whole after a restart, and the one being delivered
  (no ``250``) shows up nowhere, half or whole.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import select
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gatekeeper import smime
from gatekeeper.keys.accounts import unlock
from gatekeeper.keys.identity import Identity
from gatekeeper.localstore import INBOX, LocalStore
from gatekeeper.testing.gateway import GatewayHarness
from gatekeeper.trust import validator_from_config
from tests.fixtures.smtp_sink import SmtpSink
from tests.localstore_support import local_store, remove_all

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ALICE, BOB = "alice@example.org", "bob@example.org"
PASSWORDS = {ALICE: "alice embedded password", BOB: "bob embedded password"}
OUTSIDE = "dave@other.example"


def message(subject: str, body: str = "hello from alice") -> bytes:
    return (
        f"From: Alice <{ALICE}>\r\nTo: Bob <{BOB}>\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n\r\n{body}\r\n"
    ).encode()


def make_harness(prefix: str, extra_config: str = "") -> GatewayHarness:
    """A gateway with alice and bob in a directory of its own, removed when the test process ends."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    harness = GatewayHarness(directory / "gateway", extra_config=extra_config)
    for address, password in PASSWORDS.items():
        harness.add_user(address, password)
    return harness


@functools.cache
def plain_harness() -> GatewayHarness:
    return make_harness("gk-embedded-")


def opened(harness: GatewayHarness, address: str, data: bytes) -> smime.Opened:
    """``data`` opened with the user's keys, its signature checked against the gateway's CA."""
    user = harness.store.get_user(address)
    assert user is not None
    identity: Identity = unlock(user, PASSWORDS[address]).identity
    anchor = x509.load_pem_x509_certificate(harness.ca_file.read_bytes())
    validator = validator_from_config(harness.config.trust, extra_anchors=[anchor])
    return smime.open_message(data, identity.keys, validator, ALICE)


class SmtpIntoTheStoreTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.harness = plain_harness()
        remove_all(self.harness, PASSWORDS)
        self.harness.start(reactor)
        self.addCleanup(self.harness.stop)

    def client(self) -> smtplib.SMTP:
        client = smtplib.SMTP(HOST, self.harness.port("smtp", "starttls"), timeout=60)
        client.starttls(context=self.harness.client_context())
        client.login(ALICE, PASSWORDS[ALICE])
        return client

    async def test_recipients_the_store_cannot_take_are_refused_at_rcpt(self) -> None:
        def run() -> list[tuple[int, bytes]]:
            with self.client() as client:
                client.mail(ALICE)
                return [client.rcpt(r) for r in ("nobody@example.org", OUTSIDE, BOB)]

        unknown, outside, bob = await deferToThread(run)
        self.assertEqual(unknown[0], 550)
        self.assertIn(b"5.1.1", unknown[1])
        self.assertEqual(outside[0], 550)
        self.assertIn(b"5.7.1", outside[1])
        self.assertIn(b"relaying denied", outside[1])
        self.assertEqual(bob[0], 250)

    async def test_what_lands_is_encrypted_to_the_recipient_and_opens_whole(self) -> None:
        sent = message("for the store", "only bob reads this")

        def run() -> None:
            with self.client() as client:
                client.sendmail(ALICE, [BOB], sent)

        await deferToThread(run)
        with local_store(self.harness) as store:
            mailbox = store.mailbox(BOB)
            [stored] = [mailbox.read_message(INBOX, uid) for uid in mailbox.uids(INBOX)]
        self.assertIn(b"Content-Type: application/pkcs7-mime", stored.partition(b"\r\n\r\n")[0])
        self.assertNotIn(b"only bob reads this", stored)
        revealed = opened(self.harness, BOB, stored)
        self.assertTrue(revealed.encrypted)
        self.assertIn(b"only bob reads this", revealed.content)
        self.assertEqual([s.trust.ok for s in revealed.signatures], [True])


class SmarthostTests(TestCase):
    timeout = 120

    async def test_outside_recipients_leave_through_the_smarthost(self) -> None:
        sink = SmtpSink()
        sink.start()
        self.addCleanup(sink.cleanup)
        harness = make_harness("gk-smarthost-", f'[upstream]\nsmarthost = "tcp:{HOST}:{sink.port}"\n')
        harness.start(reactor)
        self.addCleanup(harness.stop)
        sent = message("two ways", "to bob and to dave")

        def run() -> None:
            with smtplib.SMTP(HOST, harness.port("smtp", "starttls"), timeout=60) as client:
                client.starttls(context=harness.client_context())
                client.login(ALICE, PASSWORDS[ALICE])
                client.sendmail(ALICE, [BOB, OUTSIDE], sent)

        await deferToThread(run)
        [away] = await deferToThread(sink.wait_for_messages, 1)
        self.assertEqual(away.recipients, (OUTSIDE,))
        self.assertIn(b"to bob and to dave", away.data)  # dave has no certificate: signed, not encrypted
        self.assertIn(b"multipart/signed", away.data)
        with local_store(harness) as store:
            mailbox = store.mailbox(BOB)
            [here] = [mailbox.read_message(INBOX, uid) for uid in mailbox.uids(INBOX)]
        self.assertIn(b"application/pkcs7-mime", here)
        self.assertNotIn(b"to bob and to dave", here)


# -- killed while delivering -------------------------------------------------------------------------

CHILD = """
import os, signal, sys
import faulthandler; faulthandler.register(signal.SIGUSR1, all_threads=True)
from twisted.internet import reactor
from gatekeeper.config import load_config
from gatekeeper.localstore import files
from gatekeeper.tap import ListenerService, build_service, prepare

config_path, kill_at = sys.argv[1], int(sys.argv[2])
published = [0]
real_publish = files.publish

def publish(*args, **kwargs):
    published[0] += 1
    if published[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # written and fsync-ed in tmp/, not yet in new/
    return real_publish(*args, **kwargs)

files.publish = publish
service = build_service(prepare(load_config(config_path)), reactor)
service.privilegedStartService()
service.startService()

def announce():
    for child in service:
        if isinstance(child, ListenerService) and child.what == "SMTP (STARTTLS)":
            if child.port is None:
                reactor.callLater(0.05, announce)
                return
            print("SMTP", child.port.getHost().port, flush=True)

reactor.callWhenRunning(announce)
reactor.run()
"""


class CrashDuringDeliveryTests(SynchronousTestCase):
    def test_killed_between_tmp_and_new_loses_no_acknowledged_message(self) -> None:
        harness = make_harness("gk-crash-")
        errors = Path(self.mktemp())
        stderr = errors.open("w")
        self.addCleanup(stderr.close)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(harness.config_path), "3"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # the gateway and its worker processes: one group to clean up
        )
        self.addCleanup(self.kill_group, child)
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 60)
        if not ready:  # say where the gateway is stuck, instead of hanging
            child.send_signal(signal.SIGUSR1)
            time.sleep(1)
            self.fail("the gateway did not start: " + errors.read_text())
        line = child.stdout.readline()
        self.assertTrue(line.startswith("SMTP "), line + errors.read_text())
        port = int(line.split()[1])
        acknowledged = []
        lost = None
        with smtplib.SMTP(HOST, port, timeout=60) as client:
            client.starttls(context=harness.client_context())
            client.login(ALICE, PASSWORDS[ALICE])
            for number in (1, 2, 3):
                try:
                    client.sendmail(ALICE, [BOB], message(f"number {number}", f"message {number}"))
                except (smtplib.SMTPServerDisconnected, ConnectionError) as error:
                    lost = (number, error)
                    break
                acknowledged.append(number)
        self.assertEqual(child.wait(timeout=60), -signal.SIGKILL)
        self.assertEqual(acknowledged, [1, 2])
        self.assertIsNotNone(lost)
        data_dir = harness.config.upstream.store.data_dir
        self.assertEqual(len(list(data_dir.rglob("tmp/*"))), 1)  # the copy being delivered, never published
        store = LocalStore.from_config(harness.config)  # the recovery runs as the store opens
        try:
            mailbox = store.mailbox(BOB)
            stored = [mailbox.read_message(INBOX, uid) for uid in mailbox.uids(INBOX)]
        finally:
            store.close()
        self.assertEqual(list(data_dir.rglob("tmp/*")), [])
        revealed = [opened(harness, BOB, data).content for data in stored]
        self.assertEqual(len(revealed), 2)
        for number, content in zip(acknowledged, revealed, strict=True):
            self.assertIn(f"message {number}".encode(), content)

    def kill_group(self, child: subprocess.Popen[str]) -> None:
        # The gateway died by SIGKILL; its worker processes are in its session: end them too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()

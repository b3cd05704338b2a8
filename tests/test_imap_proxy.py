"""The IMAP proxy against a real upstream: Dovecot (and, later, the embedded store).

The cases live in :class:`ImapProxyCases`, a mixin parameterised by an *upstream
fixture*: an object that starts a mail store, knows its users, puts messages in it
and reads them back straight from the store (not through Gatekeeper). The Dovecot
fixture is :class:`DovecotUpstream` (a :class:`~tests.fixtures.mailstack.MailStack`:
Dovecot + Postfix); :class:`EmbeddedUpstream` is the gateway's own embedded store
(no ``[upstream]``), and every case runs against both.

Every client is Python's ``imaplib`` (or a real client: ``mbsync``, ``mutt``) in a
thread, talking TLS to the gateway running on the test's reactor; the gateway logs in
upstream with the user's own password (pass-through). Encrypted messages are made by
``openssl cms`` for the user's certificate in the gateway's key store.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import imaplib
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.logger import globalLogPublisher
from twisted.protocols import portforward
from twisted.trial.unittest import TestCase

from gatekeeper import imap_mime, imap_syntax
from gatekeeper.interfaces import UpstreamLogin
from gatekeeper.localstore.imap import LocalImapStore
from gatekeeper.testing.gateway import GatewayHarness
from tests.fixtures import clients
from tests.fixtures.mailstack import MailStack
from tests.fixtures.process import require_program
from tests.localstore_support import DirectImap, embedded, local_store, remove_all

BOB = "bob@example.org"
ALICE = "alice@example.org"
PASSWORDS = {BOB: "bob-imap-password", ALICE: "alice-imap-password"}  # mbsyncrc takes no spaces
HOST = "127.0.0.1"


def plain_message(subject: str, body: str = "hello", sender: str = ALICE, extra: str = "") -> bytes:
    text = (
        f"From: Alice <{sender}>\r\nTo: Bob <{BOB}>\r\nSubject: {subject}\r\n"
        f"Date: Mon, 2 Jan 2023 10:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}@example.org>\r\n"
        f"{extra}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}\r\n"
    )
    return text.encode()


# -- upstream fixtures ------------------------------------------------------------------------


class DovecotUpstream:
    """Dovecot (with Postfix in front) as the upstream of the proxy."""

    name = "dovecot"
    _stacks: ClassVar[dict[type, tuple[MailStack, GatewayHarness]]] = {}

    def __init__(self, test: TestCase) -> None:
        self.stack = MailStack.for_class(test, users=PASSWORDS)
        self.dovecot = self.stack.dovecot
        known = self._stacks.get(type(test))
        if known is None or known[0] is not self.stack:
            known = (self.stack, self._harness(self.stack))
            self._stacks[type(test)] = known
        self.harness = known[1]

    @staticmethod
    def _harness(stack: MailStack, relay_port: int | None = None) -> GatewayHarness:
        directory = Path(tempfile.mkdtemp(prefix="gk-imap-", dir="/tmp"))
        harness = GatewayHarness(
            directory / "gateway",
            extra_config=upstream_config(stack, relay_port),
            protocol_config={"imap": 'encrypt_folders = ["Sent", "Drafts"]\nidle_poll_seconds = 1'},
        )
        for address, password in PASSWORDS.items():
            harness.add_user(address, password)
        return harness

    def append(self, address: str, mailbox: str, message: bytes, flags: tuple[str, ...] = ()) -> int:
        return self.dovecot.append(address, mailbox, message, flags)

    def deliver(self, address: str, message: bytes) -> None:
        self.dovecot.deliver(address, message)

    def messages(self, address: str, mailbox: str = "INBOX") -> list[bytes]:
        return self.dovecot.messages(address, mailbox)

    def flags(self, address: str, mailbox: str = "INBOX") -> list[frozenset[str]]:
        return self.dovecot.flags(address, mailbox)

    def uids(self, address: str, mailbox: str = "INBOX") -> list[int]:
        return self.dovecot.uids(address, mailbox)

    def mailboxes(self, address: str) -> list[str]:
        return self.dovecot.mailboxes(address)

    @contextlib.contextmanager
    def direct(self, address: str) -> Iterator[imaplib.IMAP4]:
        with self.dovecot.imap(address) as connection:
            yield connection

    def stop(self) -> None:
        self.dovecot.stop()

    def start(self) -> None:
        self.dovecot.start()


def upstream_config(stack: MailStack, imap_port: int | None = None) -> str:
    """``[upstream]`` for a gateway in front of ``stack`` (IMAP through ``imap_port`` when given)."""
    imap = f"tls:localhost:{imap_port}" if imap_port else f"tls:localhost:{stack.imaps_port}"
    return (
        f'[upstream]\nimap = "{imap}"\npop3 = "tls:localhost:{stack.pop3s_port}"\n'
        f'smtp = "starttls:localhost:{stack.smtp_port}"\nca_file = "{stack.ca_file}"\ntimeout_seconds = 5\n'
    )


# -- helpers ------------------------------------------------------------------------------------


def openssl_encrypted(harness: GatewayHarness, address: str, subject: str, text: str) -> bytes:
    """A message encrypted by ``openssl cms`` to ``address``'s certificate in the gateway's key store."""
    openssl = require_program("openssl")
    user = harness.store.get_user(address)
    assert user is not None
    with tempfile.TemporaryDirectory() as work:
        certificate = Path(work) / "cert.pem"
        certificate.write_bytes(user.current.certificate.public_bytes(Encoding.PEM))
        entity = Path(work) / "entity.txt"
        entity.write_bytes(f"Content-Type: text/plain; charset=us-ascii\r\n\r\n{text}\r\n".encode())
        done = subprocess.run(
            [
                openssl,
                "cms",
                "-encrypt",
                "-aes256",
                "-in",
                str(entity),
                "-from",
                ALICE,
                "-to",
                address,
                "-subject",
                subject,
                str(certificate),
            ],
            capture_output=True,
            check=True,
        )
    return re.sub(rb"\r?\n", b"\r\n", done.stdout)


def fetch_map(data: list[Any]) -> dict[int, dict[bytes, bytes]]:
    """imaplib's FETCH answer as {seq: {ITEM: raw value}} (literals inline as IMAP sends them)."""
    found: dict[int, dict[bytes, bytes]] = {}
    pending = b""
    for part in data:
        if isinstance(part, tuple):
            pending += part[0] + b"\r\n" + part[1]
            continue
        if part is None:
            continue
        pending += part
        match = re.match(rb"(\d+) \(", pending)
        if match:
            items = dict(imap_syntax.fetch_items(pending, match.end() - 1))
            found.setdefault(int(match.group(1)), {}).update(items)
        pending = b""
    return found


def body_of(value: bytes) -> bytes:
    content = imap_syntax.unliteral(value)
    assert content is not None
    return content


class ImapProxyCases:
    """The cases every upstream must pass. Subclasses set ``upstream_class``."""

    timeout = 120
    upstream_class: Callable[[TestCase], Any]

    def setUp(self) -> None:
        self.upstream = self.upstream_class(self)  # type: ignore[arg-type]
        self.harness: GatewayHarness = self.upstream.harness
        self.harness.start(reactor)
        self.addCleanup(self.harness.stop)  # type: ignore[attr-defined]

    # -- clients

    def connect(self, address: str = BOB, password: str | None = None) -> imaplib.IMAP4_SSL:
        client = imaplib.IMAP4_SSL(
            HOST, self.harness.port("imap", "tls"), ssl_context=self.harness.client_context(), timeout=30
        )
        client.login(address, password or PASSWORDS[address])
        return client

    def in_thread(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThread(function, *args)

    # -- cases

    async def test_login_capabilities_and_namespace(self) -> None:
        def run() -> tuple[Any, ...]:
            client = self.connect()
            try:
                _typ, caps = client.capability()
                namespace = client.namespace()
                return caps[0].split(), namespace
            finally:
                client.logout()

        caps, namespace = await self.in_thread(run)
        for name in (b"IMAP4rev1", b"IDLE", b"UIDPLUS", b"MOVE", b"NAMESPACE", b"UNSELECT"):
            self.assertIn(name, caps)
        self.assertNotIn(b"LOGINDISABLED", caps)
        self.assertEqual(namespace[0], "OK")

    async def test_upstream_refusing_the_password_is_authenticationfailed(self) -> None:
        self.upstream.dovecot.add_user(ALICE, "another password upstream")

        def run() -> str:
            try:
                self.connect(ALICE)
            except imaplib.IMAP4.error as error:
                return str(error)
            raise AssertionError("login accepted")

        try:
            message = await self.in_thread(run)
        finally:
            self.upstream.dovecot.add_user(ALICE, PASSWORDS[ALICE])
        self.assertIn("AUTHENTICATIONFAILED", message)

    async def test_mailbox_commands(self) -> None:
        def run() -> dict[str, Any]:
            client = self.connect()
            seen: dict[str, Any] = {}
            try:
                seen["create"] = client.create("Projects")
                seen["create_child"] = client.create("Projects.2024")
                seen["subscribe"] = client.subscribe("Projects")
                seen["lsub"] = client.lsub('""', "*")
                seen["list"] = client.list('""', "*")
                seen["rename"] = client.rename("Projects.2024", "Archive")
                seen["unsubscribe"] = client.unsubscribe("Projects")
                seen["status"] = client.status("INBOX", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN RECENT)")
                seen["delete"] = client.delete("Archive")
                seen["delete_missing"] = client.delete("Nope")
                seen["select_missing"] = client.select("Nope")
            finally:
                client.logout()
            return seen

        self.upstream.append(BOB, "INBOX", plain_message("one"))
        before = set(self.upstream.mailboxes(BOB))  # Dovecot: INBOX; the embedded store: INBOX, Sent, Drafts, Trash
        seen = await self.in_thread(run)
        for key in ("create", "create_child", "subscribe", "rename", "unsubscribe", "delete", "lsub", "list"):
            self.assertEqual(seen[key][0], "OK", key)
        self.assertTrue(any(b"Projects" in line for line in seen["lsub"][1]))
        listed = b" ".join(seen["list"][1])
        self.assertIn(b"Projects.2024", listed)
        self.assertIn(b"INBOX", listed)
        self.assertIn(b"MESSAGES 1", seen["status"][1][0])
        self.assertEqual(seen["delete_missing"][0], "NO")
        self.assertEqual(seen["select_missing"][0], "NO")
        self.assertEqual(sorted(self.upstream.mailboxes(BOB)), sorted(before | {"Projects"}))

    async def test_plain_fetch_is_upstreams_answer(self) -> None:
        """Every FETCH item of plain messages is exactly what Dovecot answers directly."""
        multipart = (
            b"From: a@example.org\r\nTo: b@example.org\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n'
            b"first part\r\n--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64"
            b"\r\n\r\nAAEC\r\n--b1--\r\n"
        )
        self.upstream.append(BOB, "INBOX", plain_message("first", "x" * 5000), ("\\Seen",))
        self.upstream.append(BOB, "INBOX", multipart, ("\\Flagged",))
        queries = [
            "(FLAGS INTERNALDATE RFC822.SIZE ENVELOPE)",
            "(UID BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])",
            "(BODYSTRUCTURE BODY)",
            "(BODY.PEEK[] BODY.PEEK[TEXT]<10.20>)",
            "(BODY.PEEK[1] BODY.PEEK[2.MIME] BODY.PEEK[HEADER])",
            "(RFC822.HEADER RFC822.SIZE)",
            "FAST",
            "ALL",
            "FULL",
        ]

        def run() -> list[tuple[Any, Any]]:
            answers = []
            client = self.connect()
            with self.upstream.direct(BOB) as direct:
                client.select("INBOX", readonly=True)
                direct.select("INBOX", readonly=True)
                for query in queries:
                    answers.append((fetch_map(client.fetch("1:*", query)[1]), fetch_map(direct.fetch("1:*", query)[1])))
                answers.append(
                    (
                        fetch_map(client.uid("FETCH", "1:*", "(FLAGS)")[1]),
                        fetch_map(direct.uid("FETCH", "1:*", "(FLAGS)")[1]),
                    )
                )
            client.logout()
            return answers

        for (proxied, direct), query in zip(await self.in_thread(run), [*queries, "UID FETCH"], strict=True):
            self.assertEqual(proxied, direct, query)
            self.assertEqual(len(proxied), 2, query)

    async def test_encrypted_message_is_revealed_consistently(self) -> None:
        encrypted = openssl_encrypted(self.harness, BOB, "secret plans", "the launch code is 0000")
        self.upstream.append(BOB, "INBOX", plain_message("plain one"))
        self.upstream.append(BOB, "INBOX", encrypted)

        def run() -> dict[str, Any]:
            client = self.connect()
            try:
                client.select("INBOX")
                listing = fetch_map(client.fetch("1:*", "(FLAGS RFC822.SIZE ENVELOPE BODYSTRUCTURE)")[1])
                full = fetch_map(client.fetch("2", "(BODY[] BODY.PEEK[1] BODY.PEEK[]<5.40> BODY.PEEK[TEXT])")[1])
                header = fetch_map(client.fetch("2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT X-GATEKEEPER-SECURITY)])")[1])
                flags = fetch_map(client.fetch("2", "(FLAGS)")[1])
                search = client.search(None, "TEXT", '"launch code"')
                search_plain = client.search(None, "BODY", "hello")
                return {
                    "listing": listing,
                    "full": full,
                    "header": header,
                    "flags": flags,
                    "search": search,
                    "search_plain": search_plain,
                }
            finally:
                client.logout()

        events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("protocol") != "imap":
                return
            if event.get("gk_event") == "reveal" or event.get("operation") == "decrypt":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        try:
            seen = await self.in_thread(run)
        finally:
            globalLogPublisher.removeObserver(observe)
        # revealed once (then cached), with the audit event for the decryption
        self.assertEqual([(e["gk_event"], e.get("decrypted")) for e in events], [("reveal", "yes"), ("key_use", None)])
        self.assertEqual((events[1]["operation"], events[1]["user"]), ("decrypt", BOB))
        item = seen["full"][2]
        revealed = body_of(item[b"BODY[]"])
        self.assertIn(b"the launch code is 0000", revealed)
        self.assertIn(b"X-Gatekeeper-Security: decrypted=yes", revealed)
        self.assertNotIn(b"application/pkcs7-mime", revealed)
        view = imap_mime.describe(revealed)
        listing = seen["listing"][2]
        self.assertEqual(int(listing[b"RFC822.SIZE"]), len(revealed))
        self.assertEqual(listing[b"BODYSTRUCTURE"], view.bodystructure)
        self.assertEqual(listing[b"ENVELOPE"], view.envelope)
        self.assertIn(b'"secret plans"', listing[b"ENVELOPE"])
        self.assertEqual(body_of(item[b"BODY[]<5>"]), revealed[5:45])
        self.assertEqual(body_of(item[b"BODY[1]"]), imap_mime.section(revealed, view, (1,), ""))
        self.assertEqual(body_of(item[b"BODY[TEXT]"]), revealed[view.root.body_start :])
        header = body_of(seen["header"][2][b"BODY[HEADER.FIELDS (SUBJECT X-GATEKEEPER-SECURITY)]"])
        self.assertIn(b"Subject: secret plans", header)
        self.assertIn(b"X-Gatekeeper-Security: decrypted=yes", header)
        self.assertIn(b"\\Seen", seen["flags"][2][b"FLAGS"])
        self.assertEqual(seen["search"][1][0], b"2")
        self.assertEqual(seen["search_plain"][1][0], b"1")
        # upstream still holds the encrypted message, now \Seen
        self.assertIn(b"application/pkcs7-mime", self.upstream.messages(BOB)[1])
        self.assertIn("\\Seen", self.upstream.flags(BOB)[1])

    async def test_store_copy_move_expunge(self) -> None:
        for index in range(5):
            self.upstream.append(BOB, "INBOX", plain_message(f"message {index}"))
        self.upstream.append(BOB, "Archive", plain_message("archived"))

        def run() -> dict[str, Any]:
            client = self.connect()
            seen: dict[str, Any] = {}
            try:
                client.select("INBOX")
                uids = [int(u) for u in client.uid("SEARCH", "ALL")[1][0].split()]
                seen["store"] = client.store("1:2", "+FLAGS", "(\\Flagged $Work)")
                seen["store_silent"] = client.uid("STORE", str(uids[2]), "+FLAGS.SILENT", "(\\Answered)")
                seen["copy"] = client.copy("1", "Archive")
                seen["move"] = client._simple_command("MOVE", "2", "Archive")
                seen["search_flagged"] = client.search(None, "FLAGGED")
                # after the move, sequence 2 and 3 are the original third and fourth messages
                seen["delete_flag"] = client.store("2:3", "+FLAGS.SILENT", "(\\Deleted)")
                seen["uid_expunge"] = client.uid("EXPUNGE", str(uids[2]))
                seen["expunge"] = client.expunge()
                seen["check"] = client.check()
                seen["close"] = client.close()
            finally:
                client.logout()
            return seen

        seen = await self.in_thread(run)
        self.assertEqual([line.split(b" (", 1)[0] for line in seen["store"][1]], [b"1", b"2"])
        self.assertIn(b"\\Flagged", seen["store"][1][0])
        self.assertEqual(seen["store_silent"][1], [None])
        self.assertIn(b"COPYUID", client_text(seen["copy"]))
        self.assertEqual(seen["move"][0], "OK")
        self.assertEqual(seen["search_flagged"][1][0], b"1")
        self.assertEqual(seen["uid_expunge"][0], "OK")
        # expunged: message 2 (moved), 3 (UID EXPUNGE 3), 4 (\Deleted then EXPUNGE); kept: 1 and 5
        subjects = [re.search(rb"Subject: (.*)", m).group(1) for m in self.upstream.messages(BOB)]  # type: ignore[union-attr]
        self.assertEqual(subjects, [b"message 0\r", b"message 4\r"])
        archived = [re.search(rb"Subject: (.*)", m).group(1) for m in self.upstream.messages(BOB, "Archive")]  # type: ignore[union-attr]
        self.assertEqual(sorted(archived), [b"archived\r", b"message 0\r", b"message 1\r"])
        self.assertEqual(self.upstream.flags(BOB)[0], frozenset({"\\Flagged", "$Work"}))

    async def test_append_to_sent_is_encrypted_upstream(self) -> None:
        self.upstream.append(BOB, "Sent", plain_message("older"))
        draft = plain_message("my sent mail", "only bob may read this", sender=BOB)

        def run() -> tuple[Any, Any, Any]:
            client = self.connect()
            try:
                appended = client.append("Sent", "(\\Seen)", None, draft)
                inbox = client.append("INBOX", None, None, plain_message("not encrypted"))
                client.select("Sent")
                fetched = fetch_map(client.fetch("2", "(BODY.PEEK[] RFC822.SIZE)")[1])
                return appended, inbox, fetched
            finally:
                client.logout()

        appended, _inbox, fetched = await self.in_thread(run)
        self.assertIn(b"APPENDUID", client_text(appended))
        stored = self.upstream.messages(BOB, "Sent")[1]
        self.assertIn(b"application/pkcs7-mime", stored)
        self.assertNotIn(b"only bob may read this", stored)
        self.assertIn(b"Subject: my sent mail", stored)
        self.assertEqual(self.upstream.flags(BOB, "Sent")[1], frozenset({"\\Seen"}))
        self.assertNotIn(b"pkcs7", self.upstream.messages(BOB)[0])
        shown = body_of(fetched[2][b"BODY[]"])
        self.assertIn(b"only bob may read this", shown)
        self.assertIn(b"decrypted=yes", shown)
        self.assertEqual(int(fetched[2][b"RFC822.SIZE"]), len(shown))

    async def test_idle_sees_flags_new_mail_and_expunges_from_another_session(self) -> None:
        self.upstream.append(BOB, "INBOX", plain_message("watched"))
        self.upstream.append(BOB, "INBOX", plain_message("to be removed"))
        lines: list[bytes] = []
        ready = threading.Event()

        def idler() -> list[bytes]:
            client = self.connect()
            try:
                client.select("INBOX")
                tag = client._new_tag()
                client.send(tag + b" IDLE\r\n")
                assert client.readline().startswith(b"+")
                ready.set()
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not (
                    any(b"FLAGS" in line for line in lines)
                    and any(b"EXISTS" in line for line in lines)
                    and any(b"EXPUNGE" in line for line in lines)
                ):
                    client.sock.settimeout(max(0.1, deadline - time.monotonic()))
                    lines.append(client.readline())
                client.send(b"DONE\r\n")
                lines.append(client.readline())
                return lines
            finally:
                with contextlib.suppress(Exception):
                    client.logout()

        def other() -> None:
            assert ready.wait(20)
            client = self.connect()
            try:
                client.select("INBOX")
                client.store("1", "+FLAGS", "(\\Flagged)")
                self.upstream.deliver(BOB, plain_message("new arrival"))
                client.noop()
                client.store("2", "+FLAGS.SILENT", "(\\Deleted)")
                client.expunge()
            finally:
                client.logout()

        watching = self.in_thread(idler)
        await self.in_thread(other)
        seen = await watching
        text = b"\n".join(seen)
        self.assertRegex(text, rb"\* 1 FETCH \(UID \d+ FLAGS \([^)]*\\Flagged")
        self.assertIn(b"* 2 EXPUNGE", text)
        # the new message is announced as the third, or as the second once the expunge is told
        exists = re.findall(rb"\* (\d+) EXISTS", text)
        self.assertTrue(exists, text)
        expunged_first = text.index(b"* 2 EXPUNGE") < text.index(b"EXISTS")
        self.assertEqual(int(exists[-1]), 2 if expunged_first else 3, text)
        self.assertIn(b"OK IDLE terminated", seen[-1])

    async def test_upstream_down_is_unavailable_never_a_hang(self) -> None:
        self.upstream.append(BOB, "INBOX", plain_message("one"))

        def run() -> tuple[Any, ...]:
            client = self.connect()
            client.select("INBOX")
            self.upstream.stop()
            try:
                try:
                    answer: Any = client.fetch("1", "(FLAGS)")
                except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError) as error:
                    answer = ("abort", str(error))
            finally:
                with contextlib.suppress(Exception):
                    client.shutdown()
            try:
                self.connect()
            except imaplib.IMAP4.error as error:
                refused = str(error)
            else:
                refused = "accepted"
            return answer, refused

        started = time.monotonic()
        try:
            answer, refused = await self.in_thread(run)
        finally:
            self.upstream.start()
        self.assertLess(time.monotonic() - started, 15)
        self.assertIn("UNAVAILABLE", str(answer) + refused)
        self.assertIn("UNAVAILABLE", refused)

    async def test_mbsync_pulls_decrypted_messages(self) -> None:
        self.upstream.append(BOB, "INBOX", plain_message("plain for mbsync", "plain text body"))
        self.upstream.append(BOB, "INBOX", openssl_encrypted(self.harness, BOB, "sealed", "decrypted by the gateway"))
        maildir = Path(self.mktemp()).absolute()  # type: ignore[attr-defined]
        result = await self.in_thread(
            functools.partial(
                clients.mbsync_sync,
                "localhost",
                self.harness.port("imap", "tls"),
                BOB,
                PASSWORDS[BOB],
                ca_file=self.harness.ca_file,
                maildir=maildir,
                patterns=("INBOX",),
            )
        )
        result.run.check()
        messages = [m.crlf() for m in result.mailboxes["INBOX"]]
        self.assertEqual(len(messages), 2)
        self.assertIn(b"plain text body", messages[0])
        self.assertIn(b"decrypted by the gateway", messages[1])
        self.assertIn(b"X-Gatekeeper-Security: decrypted=yes", messages[1])

    async def test_mutt_lists_and_reads(self) -> None:
        self.upstream.append(BOB, "INBOX", openssl_encrypted(self.harness, BOB, "for mutt", "mutt reads this"))
        result = await self.in_thread(
            functools.partial(
                clients.mutt_fetch,
                HOST,
                self.harness.port("imap", "tls"),
                BOB,
                PASSWORDS[BOB],
                ca_file=self.harness.ca_file,
            )
        )
        self.assertEqual(len(result.messages), 1, result.run.output[-2000:])
        self.assertIn(b"mutt reads this", result.messages[0].data)
        self.assertIn(b"gatekeeper-report.txt", result.messages[0].data)


def client_text(response: tuple[str, list[Any]]) -> bytes:
    return b" ".join(p if isinstance(p, bytes) else b"" for p in response[1])


class DovecotImapProxyTests(ImapProxyCases, TestCase):
    """The cases against Dovecot."""

    upstream_class = DovecotUpstream


# -- the embedded store ------------------------------------------------------------------------------


@functools.cache
def embedded_harness() -> GatewayHarness:
    """A gateway with no ``[upstream]``: its own mail store (one key store per test process)."""
    directory = Path(tempfile.mkdtemp(prefix="gk-imap-embedded-", dir="/tmp"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    harness = GatewayHarness(
        directory / "gateway",
        protocol_config={"imap": 'encrypt_folders = ["Sent", "Drafts"]\nidle_poll_seconds = 1'},
    )
    for address, password in PASSWORDS.items():
        harness.add_user(address, password)
    return harness


class EmbeddedUpstream:
    """The gateway's embedded store as the proxy's mail store; each test starts with empty mailboxes."""

    name = "embedded"

    def __init__(self, test: TestCase) -> None:
        self.harness = embedded_harness()
        remove_all(self.harness, PASSWORDS)

    def append(self, address: str, mailbox: str, message: bytes, flags: tuple[str, ...] = ()) -> int:
        with local_store(self.harness) as store:
            user = store.mailbox(address)
            if mailbox.upper() != "INBOX" and mailbox not in {f.name for f in user.folders()}:
                user.create_folder(mailbox)
            return user.append(mailbox, message, flags=flags).uid

    def deliver(self, address: str, message: bytes) -> None:
        with local_store(self.harness) as store:
            assert store.deliver([address], message).all_delivered

    def messages(self, address: str, mailbox: str = "INBOX") -> list[bytes]:
        with local_store(self.harness) as store:
            user = store.mailbox(address)
            return [user.read_message(mailbox, uid) for uid in user.uids(mailbox)]

    def flags(self, address: str, mailbox: str = "INBOX") -> list[frozenset[str]]:
        with local_store(self.harness) as store:
            return [m.flags for m in store.mailbox(address).messages(mailbox)]

    def uids(self, address: str, mailbox: str = "INBOX") -> list[int]:
        with local_store(self.harness) as store:
            return store.mailbox(address).uids(mailbox)

    def mailboxes(self, address: str) -> list[str]:
        with local_store(self.harness) as store:
            return [f.name for f in store.mailbox(address).folders() if f.selectable]

    @contextlib.contextmanager
    def direct(self, address: str) -> Iterator[DirectImap]:
        running = embedded(self.harness)
        assert running is not None
        opener = LocalImapStore(running, reactor)
        session = blockingCallFromThread(
            reactor, Deferred.fromCoroutine, opener.open(UpstreamLogin(address, address, ""))
        )
        connection = DirectImap(reactor, session)
        try:
            yield connection
        finally:
            connection.close()

    def stop(self) -> None:
        """The store goes away under the gateway (called in a client thread)."""
        running = embedded(self.harness)
        assert running is not None
        blockingCallFromThread(reactor, running.close)

    def start(self) -> None:
        running = embedded(self.harness)
        if running is not None:
            running.open()


class EmbeddedImapProxyTests(ImapProxyCases, TestCase):
    """The same cases against the embedded store."""

    upstream_class = EmbeddedUpstream

    async def test_upstream_refusing_the_password_is_authenticationfailed(self) -> None:
        # Replaces the Dovecot case: the embedded store has no password of its own to refuse
        # (the gateway login, which unlocks the key, is the only one). What a client sees
        # of a refused login is the same: AUTHENTICATIONFAILED, and no session.
        def run() -> str:
            try:
                self.connect(ALICE, "not alice's password")
            except imaplib.IMAP4.error as error:
                return str(error)
            raise AssertionError("login accepted")

        self.assertIn("AUTHENTICATIONFAILED", await self.in_thread(run))

    async def test_a_restart_keeps_every_mailbox_uid_and_flag(self) -> None:
        for index in range(3):
            self.upstream.deliver(BOB, plain_message(f"kept {index}"))

        def change() -> dict[str, Any]:
            client = self.connect()
            try:
                client.create("Projects/2024")
                client.select("INBOX")
                client.store("1", "+FLAGS", "(\\Flagged $Later)")
                client.store("3", "+FLAGS.SILENT", "(\\Seen)")
                client.copy("2", "Projects/2024")
                client.append("Drafts", "(\\Draft)", None, plain_message("draft"))
                return self.snapshot(client)
            finally:
                client.logout()

        before = await self.in_thread(change)
        await self.harness.stop()
        self.harness.start(reactor)
        after = await self.in_thread(self.read_snapshot)
        self.assertEqual(after, before)
        self.assertIn(b"Projects/2024", b" ".join(after["list"]))
        self.assertEqual(len(after["INBOX"][1]), 3)

    def read_snapshot(self) -> dict[str, Any]:
        client = self.connect()
        try:
            return self.snapshot(client)
        finally:
            client.logout()

    def snapshot(self, client: imaplib.IMAP4_SSL) -> dict[str, Any]:
        """Folders, and per folder its UIDVALIDITY and each message's UID and flags (without \\Recent)."""
        seen: dict[str, Any] = {"list": sorted(client.list()[1])}
        for name in ("INBOX", "Projects/2024", "Drafts"):
            status = client.status(name, "(UIDVALIDITY UIDNEXT MESSAGES)")[1][0]
            client.select(name, readonly=True)
            listing = fetch_map(client.fetch("1:*", "(UID FLAGS)")[1]) if b"MESSAGES 0" not in status else {}
            seen[name] = (status, sorted((v[b"UID"], v[b"FLAGS"].replace(b" \\Recent", b"")) for v in listing.values()))
        return seen


# -- Dovecot-only: byte counting and SMTP end to end ------------------------------------------------


class CountingRelay(portforward.ProxyFactory):
    """A TCP relay that counts the bytes the server sends (upstream -> Gatekeeper)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.received = 0
        self.open = 0
        relay = self

        class Client(portforward.ProxyClient):
            def connectionMade(self) -> None:
                relay.open += 1
                super().connectionMade()

            def connectionLost(self, reason: Any = None) -> None:
                relay.open -= 1
                super().connectionLost(reason)

            def dataReceived(self, data: bytes) -> None:
                relay.received += len(data)
                super().dataReceived(data)

        class ClientFactory(portforward.ProxyClientFactory):
            protocol = Client

        class Server(portforward.ProxyServer):
            clientProtocolFactory = ClientFactory

        self.protocol = Server


class ListingTransferTests(TestCase):
    """A header listing of 1,000 plain messages downloads no body."""

    timeout = 180

    async def test_listing_downloads_no_body(self) -> None:
        stack = MailStack.for_class(self, users=PASSWORDS)
        relay = CountingRelay("127.0.0.1", stack.imaps_port)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(relay)
        self.addCleanup(port.stopListening)
        harness = DovecotUpstream._harness(stack, port.getHost().port)
        count, body = 1000, "b" * 20_000
        maildir = stack.dovecot.maildir(BOB)
        write_maildir(maildir, (plain_message(f"bulk {i}", body) for i in range(count)))
        harness.start(reactor)
        self.addCleanup(self.relay_closed, relay)
        self.addCleanup(harness.stop)

        def run() -> tuple[int, int]:
            client = imaplib.IMAP4_SSL(HOST, harness.port("imap", "tls"), ssl_context=harness.client_context())
            client.login(BOB, PASSWORDS[BOB])
            client.select("INBOX")
            before = relay.received
            _typ, data = client.fetch(
                "1:*", "(FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE)])"
            )
            listed = len(fetch_map(data))
            used = relay.received - before
            client.logout()
            return listed, used

        listed, used = await deferToThread(run)
        await deferLater(reactor, 0, lambda: None)
        self.assertEqual(listed, count)
        bodies = count * len(body)
        # every message's listing is a few hundred bytes; one body alone is 20,000
        self.assertLess(used, count * 1000, used)
        self.assertLess(used, bodies / 20)

    async def relay_closed(self, relay: CountingRelay) -> None:
        for _ in range(200):
            if not relay.open:
                return
            await deferLater(reactor, 0.01, lambda: None)


def write_maildir(maildir: Path, messages: Iterator[bytes]) -> int:
    """Put messages straight into a Maildir's ``cur`` (Dovecot indexes them on first access)."""
    import os

    cur = maildir / "cur"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    written = 0
    stamp = int(time.time())
    for index, message in enumerate(messages):
        path = cur / f"{stamp}.M{index}P{os.getpid()}.gatekeeper,S={len(message)}:2,"
        path.write_bytes(message)
        written += 1
    for root, dirs, files in os.walk(maildir.parents[1]):
        for name in dirs + files:
            os.chown(os.path.join(root, name), 65534, 65534)
    os.chown(maildir.parents[1], 65534, 65534)
    return written


class SmtpToImapTests(TestCase):
    """FIG 4 and 7: alice sends through Gatekeeper's SMTP proxy, bob reads through its IMAP proxy."""

    timeout = 120

    async def test_sent_encrypted_read_decrypted(self) -> None:
        upstream = DovecotUpstream(self)
        harness = upstream.harness
        harness.start(reactor)
        self.addCleanup(harness.stop)
        message = plain_message("through both proxies", "signed and sealed by the gateway")

        def send() -> None:
            with smtplib.SMTP(HOST, harness.port("smtp", "starttls"), timeout=30) as client:
                client.starttls(context=harness.client_context())
                client.login(ALICE, PASSWORDS[ALICE])
                client.sendmail(ALICE, [BOB], message)

        await deferToThread(send)
        stored = await upstream.stack.wait_for_messages_async(reactor, BOB, 1)
        self.assertIn(b"application/pkcs7-mime", stored[0])
        self.assertNotIn(b"signed and sealed by the gateway", stored[0])

        def read() -> bytes:
            client = imaplib.IMAP4_SSL(HOST, harness.port("imap", "tls"), ssl_context=harness.client_context())
            client.login(BOB, PASSWORDS[BOB])
            client.select("INBOX")
            shown = fetch_map(client.fetch("1", "(BODY.PEEK[])")[1])[1][b"BODY[]"]
            client.logout()
            return body_of(shown)

        shown = await deferToThread(read)
        self.assertIn(b"signed and sealed by the gateway", shown)
        self.assertIn(b"decrypted=yes; signature=valid; signer=alice@example.org", shown)


_ = (socket, ssl, Factory)

"""The embedded store behind the proxies: the SMTP relay, the POP3 maildrop and the IMAP store session.

Unit tests over a real :class:`~gatekeeper.localstore.LocalStore` in a temporary
directory (its thread pool on the test's reactor), without sockets:
:class:`~gatekeeper.localstore.relay.LocalRelay` (local delivery byte for byte,
refusals before anything is kept, the smarthost, the partial case),
:class:`~gatekeeper.localstore.pop3.LocalMaildrop` and
:class:`~gatekeeper.localstore.imap.LocalImapSession` (FETCH, STORE, COPY/MOVE/EXPUNGE
with UIDPLUS data, APPEND, SEARCH, LIST, the change feed between sessions, a restart).
:class:`DovecotAnswersTests` checks the session's FETCH answers against real Dovecot's,
byte for byte.
"""

from __future__ import annotations

import datetime
import imaplib
import re
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from gatekeeper.config import parse_config_text
from gatekeeper.errors import ConfigError, RelayRefused, UpstreamRefused, UpstreamUnavailable
from gatekeeper.interfaces import FetchResponse, IMailStoreEvents, MailStoreError, RelayCopy, RelayReply, UpstreamLogin
from gatekeeper.localstore import INBOX, LocalStore, Quota, StoreUnavailable
from gatekeeper.localstore.embedded import EmbeddedStore
from gatekeeper.localstore.imap import (
    FetchSpec,
    LocalImapSession,
    LocalImapStore,
    ViewCache,
    parse_date_time,
    pick,
    render_internal_date,
)
from gatekeeper.localstore.pop3 import LocalPop3Upstream
from gatekeeper.localstore.relay import LocalRelay
from gatekeeper.testing.relay import MemoryRelay
from tests.fixtures.dovecot import Dovecot

ALICE, BOB, CAROL = "alice@example.org", "bob@example.org", "carol@example.org"
OUTSIDE = "dave@other.example"


def message(subject: str, body: bytes = b"hello\r\n", *, extra: bytes = b"") -> bytes:
    return (
        b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\nSubject: "
        + subject.encode()
        + b"\r\nDate: Mon, 02 Jan 2023 10:00:00 +0000\r\nMessage-ID: <"
        + subject.replace(" ", ".").encode()
        + b"@example.org>\r\n"
        + extra
        + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        + body
    )


MULTIPART = (
    b"From: a@example.org\r\nTo: b@example.org\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n'
    b"first part with a needle\r\n--b1\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--b1--\r\n"
)


class StoreCase(TestCase):
    """A fresh embedded store per test, opened on the test's reactor."""

    timeout = 30

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.embedded = self.make_store()

    def make_store(self) -> EmbeddedStore:
        embedded = EmbeddedStore(reactor, self.directory, domains=("example.org",))
        embedded.open()
        self.addCleanup(embedded.close)
        return embedded

    @property
    def local(self) -> LocalStore:
        assert self.embedded.store is not None
        return self.embedded.store.store

    def inbox(self, address: str) -> list[bytes]:
        mailbox = self.local.mailbox(address)
        return [mailbox.read_message(INBOX, uid) for uid in mailbox.uids(INBOX)]


# -- SMTP: LocalRelay ----------------------------------------------------------------------------


class RelayTests(StoreCase):
    def relay(self, smarthost: MemoryRelay | None = None) -> LocalRelay:
        return LocalRelay(self.embedded, smarthost)

    async def test_local_recipients_get_exactly_the_copy(self) -> None:
        data = message("sealed", b"\x00binary\xff and .dots\r\n.\r\n")
        outcomes = await self.relay().relay([RelayCopy(ALICE, (BOB, "Carol@Example.org"), data)])
        self.assertTrue(outcomes[0].accepted)
        self.assertEqual([r for r, _ in outcomes[0].recipients], [BOB, "Carol@Example.org"])
        self.assertTrue(all(reply.accepted for _, reply in outcomes[0].recipients))
        self.assertEqual(self.inbox(BOB), [data])
        self.assertEqual(self.inbox(CAROL), [data])

    async def test_a_spool_file_is_delivered_from_the_file(self) -> None:
        spool = Path(self.mktemp())
        data = message("large", b"x" * 300_000 + b"\r\n")
        spool.write_bytes(data)
        await self.relay().relay([RelayCopy(ALICE, (BOB,), spool)])
        self.assertEqual(self.inbox(BOB), [data])

    async def test_an_unknown_local_user_is_refused_and_nothing_is_kept(self) -> None:
        store = EmbeddedStore(reactor, Path(self.mktemp()), domains=("example.org",), users=lambda a: a == BOB)
        store.open()
        self.addCleanup(store.close)
        relay = LocalRelay(store)
        reply = await relay.transaction(ALICE).add_recipient("nobody@example.org")
        self.assertEqual((reply.code, reply.status), (550, "5.1.1"))
        self.assertEqual((await relay.transaction(ALICE).add_recipient(BOB)).code, 250)
        with self.assertRaises(RelayRefused) as caught:
            await relay.relay([RelayCopy(ALICE, (BOB,), b"a\r\n"), RelayCopy(ALICE, ("nobody@example.org",), b"b\r\n")])
        self.assertEqual((caught.exception.code, caught.exception.recipient), (550, "nobody@example.org"))
        assert store.store is not None
        self.assertEqual(store.store.store.mailbox(BOB).uids(INBOX), [])

    async def test_outside_domains_without_a_smarthost_are_refused(self) -> None:
        reply = await self.relay().transaction(ALICE).add_recipient(OUTSIDE)
        self.assertEqual((reply.code, reply.status), (550, "5.7.1"))
        self.assertIn("relaying denied", reply.text)
        with self.assertRaises(RelayRefused) as caught:
            await self.relay().relay([RelayCopy(ALICE, (BOB, OUTSIDE), b"x\r\n")])
        self.assertEqual(caught.exception.code, 550)
        self.assertEqual(self.inbox(BOB), [])

    async def test_outside_domains_go_to_the_smarthost_local_ones_to_the_store(self) -> None:
        smarthost = MemoryRelay()
        relay = self.relay(smarthost)
        transaction = relay.transaction(ALICE)
        self.assertEqual((await transaction.add_recipient(BOB)).code, 250)
        self.assertEqual((await transaction.add_recipient(OUTSIDE)).code, 250)
        self.assertEqual(smarthost.verified, [(ALICE, OUTSIDE)])  # only the outside one asked there
        data = message("both ways")
        outcomes = await transaction.send([RelayCopy(ALICE, (BOB, OUTSIDE), data)])
        transaction.abort()
        self.assertTrue(outcomes[0].accepted)
        self.assertEqual([(c.recipients, c.data) for c in smarthost.delivered], [((OUTSIDE,), data)])
        self.assertEqual(self.inbox(BOB), [data])

    async def test_a_smarthost_refusal_keeps_nothing_here(self) -> None:
        smarthost = MemoryRelay()
        smarthost.refuse[OUTSIDE] = RelayReply(550, "5.1.1 no such user")
        with self.assertRaises(RelayRefused):
            await self.relay(smarthost).relay(
                [RelayCopy(ALICE, (BOB,), b"a\r\n"), RelayCopy(ALICE, (OUTSIDE,), b"b\r\n")]
            )
        smarthost.refuse.clear()
        smarthost.down = True
        with self.assertRaises(UpstreamUnavailable):
            await self.relay(smarthost).relay([RelayCopy(ALICE, (BOB, OUTSIDE), b"c\r\n")])
        self.assertEqual(self.inbox(BOB), [])

    async def test_a_full_mailbox_is_a_temporary_refusal(self) -> None:
        self.embedded = self.make_store_in(Path(self.mktemp()), Quota(messages=1))
        await self.relay().relay([RelayCopy(ALICE, (BOB,), b"first\r\n")])
        with self.assertRaises(RelayRefused) as caught:
            await self.relay().relay([RelayCopy(ALICE, (BOB,), b"second\r\n")])
        self.assertEqual(
            (caught.exception.code, caught.exception.status, caught.exception.temporary), (452, "4.2.2", True)
        )

    def make_store_in(self, directory: Path, quota: Quota) -> EmbeddedStore:
        embedded = EmbeddedStore(reactor, directory, domains=("example.org",), quota=quota)
        embedded.open()
        self.addCleanup(embedded.close)
        return embedded

    async def test_a_closed_store_is_temporary(self) -> None:
        await self.embedded.close()
        with self.assertRaises(UpstreamUnavailable):
            await self.relay().transaction(ALICE).add_recipient(BOB)
        with self.assertRaises(UpstreamUnavailable):
            await self.relay().relay([RelayCopy(ALICE, (BOB,), b"x\r\n")])

    async def test_a_local_copy_failing_at_its_commit_after_another_was_accepted_is_the_partial_case(self) -> None:
        smarthost = MemoryRelay()

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable("disk full (test)")

        self.patch(self.local, "deliver", broken)
        outcomes = await self.relay(smarthost).relay(
            [RelayCopy(ALICE, (OUTSIDE,), b"away\r\n"), RelayCopy(ALICE, (BOB,), b"here\r\n")]
        )
        self.assertEqual([o.accepted for o in outcomes], [True, False])
        self.assertEqual((outcomes[1].reply.code, outcomes[1].reply.status), (451, "4.3.0"))
        # with nothing accepted before it, the same failure keeps nothing and is temporary
        with self.assertRaises(UpstreamUnavailable):
            await self.relay(smarthost).relay([RelayCopy(ALICE, (BOB,), b"here\r\n")])


# -- POP3: LocalMaildrop -------------------------------------------------------------------------


class MaildropTests(StoreCase):
    def deliver(self, *messages: bytes) -> None:
        for data in messages:
            self.assertTrue(self.local.deliver([BOB], data).all_delivered)

    async def open(self) -> Any:
        return await LocalPop3Upstream(self.embedded).open(UpstreamLogin(BOB, BOB, ""))

    async def test_entries_retrieve_top_and_uidl(self) -> None:
        self.deliver(message("one", b"l1\r\nl2\r\nl3\r\n"), message("two"))
        maildrop = await self.open()
        validity = self.local.mailbox(BOB).status(INBOX).uidvalidity
        self.assertEqual([e.uid for e in maildrop.entries], [b"%d.1" % validity, b"%d.2" % validity])
        self.assertEqual([e.size for e in maildrop.entries], [len(m) for m in self.inbox(BOB)])
        self.assertEqual(await maildrop.retrieve(0), self.inbox(BOB)[0])
        top = await maildrop.top(0, 2)
        self.assertTrue(top.endswith(b"\r\n\r\nl1\r\nl2\r\n"))
        maildrop.close()

    async def test_commit_deletes_exactly_the_named_messages(self) -> None:
        self.deliver(message("a"), message("b"), message("c"))
        maildrop = await self.open()
        await maildrop.commit([0, 2])
        self.assertEqual(len(self.inbox(BOB)), 1)
        self.assertIn(b"Subject: b", self.inbox(BOB)[0])
        again = await self.open()
        self.assertEqual([e.uid.split(b".")[1] for e in again.entries], [b"2"])
        with self.assertRaises(UpstreamUnavailable):
            await maildrop.retrieve(1)  # the committed session is over

    async def test_close_deletes_nothing_and_new_mail_waits_for_the_next_session(self) -> None:
        self.deliver(message("a"))
        maildrop = await self.open()
        self.deliver(message("b"))
        self.assertEqual(len(maildrop.entries), 1)
        maildrop.close()
        self.assertEqual(len((await self.open()).entries), 2)

    async def test_a_message_another_session_deleted_meanwhile(self) -> None:
        self.deliver(message("a"), message("b"))
        maildrop = await self.open()
        self.local.mailbox(BOB).delete_messages(INBOX, [1])
        with self.assertRaises(UpstreamRefused) as caught:
            await maildrop.retrieve(0)
        self.assertIn("deleted by another session", str(caught.exception))
        await maildrop.commit([0, 1])  # the one already gone is no error; the other goes
        self.assertEqual(self.inbox(BOB), [])

    async def test_a_closed_store_is_temporary(self) -> None:
        self.deliver(message("a"))
        maildrop = await self.open()
        await self.embedded.close()
        with self.assertRaises(UpstreamUnavailable):
            await maildrop.retrieve(0)
        with self.assertRaises(UpstreamUnavailable):
            await self.open()


# -- IMAP: LocalImapSession ------------------------------------------------------------------------


@implementer(IMailStoreEvents)
class Events:
    """Records what a session reports on its own."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self.lost: str | None = None

    def exists(self, count: int) -> None:
        self.seen.append(("exists", count))

    def recent(self, count: int) -> None:
        self.seen.append(("recent", count))

    def expunged(self, seq: int) -> None:
        self.seen.append(("expunged", seq))

    def fetched(self, response: FetchResponse) -> None:
        self.seen.append(("fetched", response.seq, response.data))

    def uidvalidity(self, value: int) -> None:
        self.seen.append(("uidvalidity", value))

    def session_lost(self, reason: str) -> None:
        self.lost = reason


class SessionTests(StoreCase):
    async def session(self, address: str = BOB) -> tuple[LocalImapSession, Events]:
        session = await LocalImapStore(self.embedded, reactor).open(UpstreamLogin(address, address, ""))
        assert isinstance(session, LocalImapSession)
        events = Events()
        session.set_listener(events)
        self.addCleanup(session.logout)
        return session, events

    async def fetch(self, session: LocalImapSession, uids: bytes, items: bytes) -> list[FetchResponse]:
        found: list[FetchResponse] = []
        await session.fetch(uids, items, found.append)
        return found

    async def settle(self, events: Events, count: int) -> None:
        for _ in range(200):
            if len(events.seen) >= count:
                return
            await deferLater(reactor, 0.01, lambda: None)

    def add(self, *messages: bytes, flags: tuple[str, ...] = (), folder: str = INBOX) -> list[int]:
        mailbox = self.local.mailbox(BOB)
        date = datetime.datetime(2023, 1, 2, 10, 0, tzinfo=datetime.UTC)
        return [mailbox.append(folder, m, flags=flags, internal_date=date).uid for m in messages]

    async def test_select_and_examine(self) -> None:
        self.add(message("one"), flags=("\\Seen", "$Work"))
        self.add(message("two"))
        session, _ = await self.session()
        examined = await session.select("inbox", readonly=True)
        self.assertEqual((examined.name, examined.uids, examined.exists, examined.recent), ("INBOX", [1, 2], 2, 2))
        self.assertEqual(examined.unseen, 2)
        self.assertEqual(examined.flags, ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "$Work"))
        self.assertEqual(examined.permanent_flags, ())
        selected = await session.select("INBOX")
        self.assertEqual((selected.recent, selected.uidnext, selected.readonly), (2, 3, False))
        self.assertEqual(selected.permanent_flags, (*examined.flags, "\\*"))
        self.assertEqual((await session.select("INBOX")).recent, 0)  # claimed by the first SELECT
        with self.assertRaises(MailStoreError) as caught:
            await session.select("Nope")
        self.assertEqual(caught.exception.code, "NONEXISTENT")
        with self.assertRaises(MailStoreError):
            await self.fetch(session, b"1", b"(FLAGS)")  # a failed SELECT leaves nothing selected

    async def test_fetch_answers_as_dovecot_orders_them(self) -> None:
        self.add(message("one"), flags=("$Work", "\\Flagged"))
        session, _ = await self.session()
        await session.select("INBOX")
        [answer] = await self.fetch(session, b"1", b"(RFC822.SIZE FLAGS INTERNALDATE)")
        size = len(message("one"))
        self.assertEqual(
            answer.data,
            b'(UID 1 RFC822.SIZE %d FLAGS (\\Flagged \\Recent $Work) INTERNALDATE "02-Jan-2023 10:00:00 +0000")' % size,
        )
        [header] = await self.fetch(session, b"1", b"(BODY.PEEK[header.fields (subject)] BODY.PEEK[]<5.4>)")
        self.assertEqual(
            header.data, b"(UID 1 BODY[HEADER.FIELDS (SUBJECT)] {16}\r\nSubject: one\r\n\r\n BODY[]<5> {4}\r\n Ali)"
        )
        [parts] = await self.fetch(session, b"1", b"(BODY.PEEK[1] BODY.PEEK[3] RFC822.HEADER)")
        self.assertIn(b"BODY[1] {7}\r\nhello\r\n BODY[3] {0}\r\n RFC822.HEADER {", parts.data)

    async def test_reading_a_body_sets_seen_and_shows_flags_first(self) -> None:
        self.add(message("one"), message("two"))
        session, events = await self.session()
        await session.select("INBOX", readonly=True)
        [peeked] = await self.fetch(session, b"1", b"(BODY[TEXT])")
        self.assertEqual(peeked.data, b"(UID 1 BODY[TEXT] {7}\r\nhello\r\n)")  # EXAMINE: nothing changes
        await session.select("INBOX")
        [read] = await self.fetch(session, b"1", b"(BODY[TEXT])")
        self.assertEqual(read.data, b"(UID 1 FLAGS (\\Seen \\Recent) BODY[TEXT] {7}\r\nhello\r\n)")
        [again] = await self.fetch(session, b"1", b"(BODY[TEXT])")
        self.assertEqual(again.data, b"(UID 1 BODY[TEXT] {7}\r\nhello\r\n)")  # already seen: no FLAGS
        [peek] = await self.fetch(session, b"2", b"(BODY.PEEK[])")
        self.assertNotIn(b"FLAGS", peek.data)
        self.assertEqual([m.flags for m in self.local.mailbox(BOB).messages(INBOX)], [{"\\Seen"}, frozenset()])
        await session.noop()
        self.assertEqual(events.seen, [])  # its own change is not reported again

    async def test_n_star_always_names_the_last_message(self) -> None:
        self.assertEqual(pick(b"7:*", [1, 2, 5]), [5])
        self.assertEqual(pick(b"2:4,1", [1, 2, 5]), [1, 2])
        self.assertEqual(pick(b"*", []), [])
        with self.assertRaises(MailStoreError):
            pick(b"x", [1])

    async def test_store_reports_changed_messages_unless_silent(self) -> None:
        self.add(message("one"), message("two"), flags=("\\Flagged",))
        self.add(message("three"))
        session, events = await self.session()
        await session.select("INBOX")
        await session.store(b"1:3", b"+FLAGS", ["\\Flagged"])
        self.assertEqual(events.seen, [("fetched", 3, b"(UID 3 FLAGS (\\Flagged \\Recent))")])
        events.seen.clear()
        await session.store(b"1", b"-FLAGS.SILENT", ["\\Flagged"])
        await session.store(b"2", b"FLAGS", ["$Label", "\\Recent"])
        self.assertEqual(events.seen, [("fetched", 2, b"(UID 2 FLAGS (\\Recent $Label))")])
        await session.noop()
        self.assertEqual(len(events.seen), 1)
        flags = [m.flags for m in self.local.mailbox(BOB).messages(INBOX)]
        self.assertEqual(flags, [frozenset(), {"$Label"}, {"\\Flagged"}])
        with self.assertRaises(MailStoreError):
            await session.store(b"1", b"+FLAGS", ["\\Bogus"])

    async def test_copy_move_expunge_with_uidplus_data(self) -> None:
        self.add(*(message(f"m{n}") for n in range(5)))
        session, events = await self.session()
        await session.select("INBOX")
        archive = self.local.mailbox(BOB).create_folder("Archive")
        copied = await session.copy(b"1:2", archive)
        validity = self.local.mailbox(BOB).status(archive).uidvalidity
        assert copied is not None
        self.assertEqual((copied.uidvalidity, copied.source, copied.destination), (validity, (1, 2), (1, 2)))
        moved = await session.move(b"4", archive)
        assert moved is not None
        self.assertEqual((moved.source, moved.destination), ((4,), (3,)))
        self.assertEqual(events.seen, [("expunged", 4)])
        with self.assertRaises(MailStoreError) as caught:
            await session.copy(b"1", "Missing")
        self.assertEqual(caught.exception.code, "TRYCREATE")
        await session.store(b"1,3,5", b"+FLAGS.SILENT", ["\\Deleted"])
        await session.expunge(b"5")  # UID EXPUNGE: only 5
        await session.expunge(None)
        self.assertEqual(events.seen, [("expunged", 4), ("expunged", 4), ("expunged", 3), ("expunged", 1)])
        self.assertEqual(self.local.mailbox(BOB).uids(INBOX), [2])
        self.assertEqual(await session.copy(b"9", archive), None)

    async def test_append_keeps_its_date_and_flags_and_announces_itself_in_the_selected_folder(self) -> None:
        session, events = await self.session()
        await session.select("INBOX")
        appended = await session.append("INBOX", message("new"), ["\\Seen"], b"05-Feb-2024 08:09:10 +0100")
        self.assertEqual(appended.uid, 1)
        self.assertEqual(appended.uidvalidity, self.local.mailbox(BOB).status(INBOX).uidvalidity)
        self.assertEqual(events.seen, [("exists", 1), ("recent", 1)])
        [answer] = await self.fetch(session, b"1", b"(FLAGS INTERNALDATE)")
        self.assertEqual(answer.data, b'(UID 1 FLAGS (\\Seen \\Recent) INTERNALDATE "05-Feb-2024 08:09:10 +0100")')
        with self.assertRaises(MailStoreError) as caught:
            await session.append("Nowhere", b"x\r\n")
        self.assertEqual(caught.exception.code, "TRYCREATE")
        with self.assertRaises(MailStoreError):
            await session.append("INBOX", b"x\r\n", [], b"31-Feb-2024 00:00:00 +0000")

    async def test_dates(self) -> None:
        when = parse_date_time(b'" 2-Jan-2023 23:59:01 -0130"')
        self.assertEqual(when.utcoffset(), -datetime.timedelta(hours=1, minutes=30))
        self.assertEqual(render_internal_date(when), b'"02-Jan-2023 23:59:01 -0130"')

    async def test_search(self) -> None:
        self.add(message("apples", b"the body has a needle\r\n"), flags=("\\Seen",))
        self.add(message("=?utf-8?q?Gr=C3=BC=C3=9Fe?=", b"nothing here\r\n", extra=b"X-Tag: blue\r\n"))
        self.add(MULTIPART, flags=("$Work",))
        session, _ = await self.session()
        await session.select("INBOX")
        cases = {
            b"ALL": [1, 2, 3],
            b"SEEN": [1],
            b"UNSEEN KEYWORD $work": [3],
            b'SUBJECT "gr\xc3\xbc\xc3\x9f"': [2],
            b"FROM alice": [1, 2],
            b'HEADER X-Tag "blu"': [2],
            b'HEADER X-Tag ""': [2],
            b"BODY needle": [1, 3],
            b'TEXT "apples"': [1],
            b"OR SEEN KEYWORD $Work": [1, 3],
            b"NOT (SEEN)": [2, 3],
            b"UID 2:*": [2, 3],
            b"2": [2],
            b"LARGER 300": [3] if len(MULTIPART) > 300 else [],
            b"SENTON 2-Jan-2023": [1, 2, 3],  # no Date: field (3): its internal date
            b"SINCE 1-Jan-2023 BEFORE 3-Jan-2023": [1, 2, 3],
            b"NOT ALL": [],
            b"RECENT NEW": [2, 3],
        }
        for criteria, expected in cases.items():
            self.assertEqual(await session.search(criteria), expected, criteria)
        with self.assertRaises(MailStoreError):
            await session.search(b"FROBNICATE")

    async def test_list_and_status(self) -> None:
        mailbox = self.local.mailbox(BOB)
        mailbox.create_folder("Projects/2024")
        mailbox.subscribe("Projects")
        mailbox.subscribe("Gone")
        session, _ = await self.session()
        names = [e.name for e in await session.list_mailboxes("", "*")]
        self.assertEqual(sorted(names), ["Drafts", "INBOX", "Projects", "Projects/2024", "Sent", "Trash"])
        top = {e.name: e.attributes for e in await session.list_mailboxes("", "%")}
        self.assertEqual(top["Projects"], ("\\HasChildren",))
        self.assertEqual(top["Sent"], ("\\HasNoChildren", "\\Sent"))
        self.assertEqual([e.name for e in await session.list_mailboxes("Projects/", "%")], ["Projects/2024"])
        self.assertEqual([e.name for e in await session.list_mailboxes("", "inbox")], ["INBOX"])
        root = await session.list_mailboxes("", "")
        self.assertEqual((root[0].name, root[0].delimiter), ("", "/"))
        subscribed = {e.name: e.attributes for e in await session.list_mailboxes("", "*", subscribed=True)}
        self.assertEqual((subscribed["Projects"], subscribed["Gone"]), (("\\HasChildren",), ("\\Noselect",)))
        self.assertNotIn("Projects/2024", subscribed)
        self.add(message("a"))
        status = await session.status("INBOX", ["MESSAGES", "UIDNEXT", "UNSEEN", "RECENT", "UIDVALIDITY"])
        self.assertEqual({k: status[k] for k in ("MESSAGES", "UIDNEXT", "UNSEEN", "RECENT")},
                         {"MESSAGES": 1, "UIDNEXT": 2, "UNSEEN": 1, "RECENT": 1})  # fmt: skip
        await session.create("Projects/2025/")
        await session.rename("Projects", "Old")
        await session.delete("Old/2025")
        self.assertIn("Old/2024", [f.name for f in mailbox.folders()])
        with self.assertRaises(MailStoreError) as caught:
            await session.create("Old")
        self.assertEqual(caught.exception.code, "ALREADYEXISTS")
        with self.assertRaises(MailStoreError):
            await session.delete("INBOX")

    async def test_other_sessions_changes_are_reported(self) -> None:
        self.add(message("one"), message("two"), message("three"))
        watching, events = await self.session()
        other, _ = await self.session()
        await watching.select("INBOX")
        await other.select("INBOX")
        await other.store(b"1", b"+FLAGS", ["\\Flagged"])
        await self.settle(events, 1)
        self.assertEqual(events.seen, [("fetched", 1, b"(UID 1 FLAGS (\\Flagged \\Recent))")])
        self.local.deliver([BOB], message("four"))
        await self.settle(events, 3)
        # the new message is \Recent in one session only: whichever asked first
        self.assertIn(events.seen[1:], ([("exists", 4), ("recent", 4)], [("exists", 4), ("recent", 3)]))
        await other.store(b"2", b"+FLAGS.SILENT", ["\\Deleted"])
        await other.expunge(None)
        await self.settle(events, 5)
        self.assertEqual(events.seen[3:], [("fetched", 2, b"(UID 2 FLAGS (\\Deleted \\Recent))"), ("expunged", 2)])
        [answer] = await self.fetch(watching, b"4", b"(FLAGS)")
        self.assertEqual(answer.seq, 3)  # the session's own numbering follows the expunge

    async def test_a_renamed_selected_folder_is_followed_a_deleted_one_ends_the_session(self) -> None:
        mailbox = self.local.mailbox(BOB)
        mailbox.create_folder("Work")
        self.add(message("w"), folder="Work")
        session, events = await self.session()
        await session.select("Work")
        mailbox.rename_folder("Work", "Done")
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(await self.fetch(session, b"1:*", b"(FLAGS)")), 1)
        mailbox.delete_folder("Done")
        await deferLater(reactor, 0.05, lambda: None)
        self.assertIn("deleted", events.lost or "")
        with self.assertRaises(UpstreamUnavailable):
            await session.noop()

    async def test_a_closed_store_ends_the_session(self) -> None:
        self.add(message("one"))
        session, events = await self.session()
        await session.select("INBOX")
        await self.embedded.close()
        with self.assertRaises(UpstreamUnavailable):
            await self.fetch(session, b"1", b"(FLAGS)")
        self.assertEqual(events.lost, "the mail store was closed")

    async def test_a_restart_keeps_folders_uids_uidvalidity_and_flags(self) -> None:
        session, _ = await self.session()
        await session.create("Keep")
        for folder in ("INBOX", "Keep"):
            await session.append(folder, message("a"), ["\\Answered", "$One"])
            await session.append(folder, message("b"))
        await session.select("INBOX")
        await session.store(b"2", b"+FLAGS", ["\\Flagged"])
        await session.expunge(None)
        before = await self.picture(session)
        await self.embedded.close()
        self.embedded.open()
        after = await self.picture((await self.session())[0])
        self.assertEqual(after, before)
        self.assertEqual(before["Keep"][1], [(1, b"(\\Answered $One)"), (2, b"()")])

    async def picture(self, session: LocalImapSession) -> dict[str, Any]:
        seen: dict[str, Any] = {"list": sorted(e.name for e in await session.list_mailboxes("", "*"))}
        for name in ("INBOX", "Keep"):
            info = await session.select(name, readonly=True)
            answers = await self.fetch(session, b"1:*", b"(FLAGS)")
            flags = [(a.uid, re.sub(rb" ?\\Recent", b"", a.data.split(b"FLAGS ", 1)[1][:-1])) for a in answers]
            seen[name] = ((info.uidvalidity, info.uidnext), flags)
        return seen


# -- the same answers as Dovecot ------------------------------------------------------------------

RFC822_ATTACHED = (
    b'From: =?utf-8?q?J=C3=BCrgen?= <j@example.org>\r\nTo: a@example.org, "B, C" <b@example.org>\r\n'
    b"Cc: group: x@example.org;\r\nSubject: forwarded\r\nDate: Tue, 3 Jan 2023 11:00:00 +0100\r\n"
    b"Message-ID: <f@example.org>\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\npreamble\r\n--outer\r\n'
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"see below =E2=80=93 attached\r\n--outer\r\nContent-Type: message/rfc822\r\n"
    b'Content-Disposition: attachment; filename="inner.eml"\r\n\r\n'
    b"From: inner@example.org\r\nSubject: inner\r\n\r\ninner body\r\n--outer--\r\n"
)


class DovecotAnswersTests(TestCase):
    """The session's FETCH answers, byte for byte, against Dovecot's for the same messages."""

    timeout = 120
    MESSAGES = ((message("plain one", b"x" * 5000 + b"\r\n"), ("\\Seen",)), (MULTIPART, ("\\Flagged",)),
                (RFC822_ATTACHED, ()))  # fmt: skip
    QUERIES = (
        b"(FLAGS INTERNALDATE RFC822.SIZE ENVELOPE)",
        b"(UID BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])",
        b"(BODY.PEEK[header.fields.not (to cc)])",
        b"(BODYSTRUCTURE BODY)",
        b"(BODY.PEEK[] BODY.PEEK[TEXT]<10.20>)",
        b"(BODY.PEEK[1] BODY.PEEK[2.MIME] BODY.PEEK[HEADER] BODY.PEEK[4] BODY.PEEK[2.HEADER] BODY.PEEK[2.TEXT])",
        b"(BODY.PEEK[2.1] BODY.PEEK[1.MIME] BODY.PEEK[]<100000.5>)",
        b"(RFC822.HEADER RFC822.SIZE)",
        b"FAST",
        b"ALL",
        b"FULL",
        b"(BODY[TEXT] RFC822.SIZE)",
        b"(RFC822.TEXT)",
        b"(BODY[1] FLAGS)",
    )

    async def test_fetch_answers_equal_dovecots(self) -> None:
        dovecot = Dovecot()
        dovecot.add_user(BOB, "bobpw")
        dovecot.start()
        self.addCleanup(dovecot.cleanup)
        embedded = EmbeddedStore(reactor, Path(self.mktemp()), domains=("example.org",))
        embedded.open()
        self.addCleanup(embedded.close)
        assert embedded.store is not None
        mailbox = embedded.store.store.mailbox(BOB)
        date = b"02-Jan-2023 10:00:00 +0000"
        for data, flags in self.MESSAGES:
            mailbox.append(INBOX, data, flags=flags, internal_date=parse_date_time(date))

        def from_dovecot() -> list[list[bytes]]:
            answers = []
            with dovecot.imap(BOB) as client:
                for data, flags in self.MESSAGES:
                    client.append("INBOX", f"({' '.join(flags)})" if flags else None, f'"{date.decode()}"', data)
                client.select("INBOX")
                for query in self.QUERIES:
                    typ, found = client.uid("FETCH", "1:*", query.decode())
                    assert typ == "OK", found
                    answers.append(_responses(found))
            return answers

        expected = await deferToThread(from_dovecot)
        session = await LocalImapStore(embedded, reactor).open(UpstreamLogin(BOB, BOB, ""))
        await session.select("INBOX")
        for query, dovecot_answers in zip(self.QUERIES, expected, strict=True):
            mine: list[FetchResponse] = []
            await session.fetch(b"1:*", query, mine.append)
            self.assertEqual([b"%d %s" % (a.seq, a.data) for a in mine], dovecot_answers, query)
        await session.logout()


def _responses(data: list[Any]) -> list[bytes]:
    """imaplib's pieces of a FETCH answer joined back into one line per message, literals inline."""
    lines: list[bytes] = []
    pending = b""
    for part in data:
        if isinstance(part, tuple):
            pending += part[0] + b"\r\n" + part[1]
        elif part is not None:
            pending += part
            if pending.endswith(b")"):
                lines.append(pending)
                pending = b""
    return lines


_ = (imaplib, Deferred)


class SmarthostConfigTests(TestCase):
    """``[upstream] smarthost``: the embedded store's way out, with the upstream SMTP settings."""

    def test_smarthost_is_read_with_the_smtp_settings(self) -> None:
        text = (
            '[upstream]\nsmarthost = "starttls:relay.example.net:587"\nsmtp_user = "gk"\n'
            'smtp_password_env = "GK_RELAY"\nca_file = "/etc/ssl/relay.pem"\n'
        )
        upstream = parse_config_text(text, Path("/etc/gk")).upstream
        self.assertTrue(upstream.embedded)
        assert upstream.smarthost is not None
        self.assertEqual((upstream.smarthost.security, upstream.smarthost.host, upstream.smarthost.port),
                         ("starttls", "relay.example.net", 587))  # fmt: skip
        self.assertEqual((upstream.smtp_user, upstream.smtp_password_env), ("gk", "GK_RELAY"))
        self.assertEqual(upstream.ca_file, Path("/etc/ssl/relay.pem"))
        self.assertIsNone(parse_config_text("", Path("/etc/gk")).upstream.smarthost)

    def test_mistakes_name_the_setting(self) -> None:
        proxy = '[upstream]\nsmtp = "tls:m:465"\npop3 = "tls:m:995"\nimap = "tls:m:993"\n'
        cases = {
            proxy + 'smarthost = "tls:r:465"\n': "[upstream] smarthost: only used by the embedded store",
            '[upstream]\nsmarthost = "tcp:127.0.0.1:25"\nsmtp_user = "gk"\nsmtp_password_env = "X"\n': (
                "[upstream] smtp_user: a password is only sent over TLS"
            ),
            '[upstream]\nsmarthost = "relay.example.net"\n': "[upstream] smarthost: expected an endpoint",
        }
        for text, message in cases.items():
            with self.assertRaises(ConfigError, msg=text) as caught:
                parse_config_text(text, Path("/etc/gk"))
            self.assertIn(message, str(caught.exception))


class ViewCacheTests(StoreCase):
    """ENVELOPE and BODYSTRUCTURE are worked out once per message, and never mixed up between mailboxes."""

    async def test_a_second_listing_reads_no_message(self) -> None:
        self.local.deliver([BOB], message("one"))
        self.local.deliver([BOB], MULTIPART)
        views = ViewCache()
        session = await LocalImapStore(self.embedded, reactor, views=views).open(UpstreamLogin(BOB, BOB, ""))
        self.addCleanup(session.logout)
        await session.select("INBOX", readonly=True)
        first: list[FetchResponse] = []
        await session.fetch(b"1:*", b"(FLAGS ENVELOPE BODYSTRUCTURE)", first.append)
        self.assertEqual(len(views), 2)
        opened: list[int] = []
        real_open = self.local.mailbox(BOB).open_message

        def counting(*args: Any, **kwargs: Any) -> Any:
            opened.append(args[1])
            return real_open(*args, **kwargs)

        self.patch(self.local.mailbox(BOB), "open_message", counting)
        second: list[FetchResponse] = []
        await session.fetch(b"1:*", b"(FLAGS ENVELOPE BODYSTRUCTURE)", second.append)
        self.assertEqual([a.data for a in second], [a.data for a in first])
        self.assertEqual(opened, [])
        await session.fetch(b"1", b"(BODY)", second.append)  # not known yet: read once
        self.assertEqual(opened, [1])

    async def test_a_mailbox_made_again_does_not_meet_the_old_ones_entries(self) -> None:
        views = ViewCache()
        opener = LocalImapStore(self.embedded, reactor, views=views)
        self.local.deliver([BOB], message("before"))
        answers: list[FetchResponse] = []
        for _ in range(2):
            session = await opener.open(UpstreamLogin(BOB, BOB, ""))
            await session.select("INBOX", readonly=True)
            await session.fetch(b"1", b"(ENVELOPE)", answers.append)
            await session.logout()
            self.local.remove_mailbox(BOB)  # same second: the new INBOX may get the same UIDVALIDITY
            self.local.deliver([BOB], message("after"))
        self.assertIn(b'"before"', answers[0].data)
        self.assertIn(b'"after"', answers[1].data)

    def test_least_recently_used_entries_leave_first(self) -> None:
        views = ViewCache(limit_bytes=250)
        envelope = [FetchSpec("ENVELOPE", b"ENVELOPE", 1)]
        for uid in (1, 2, 3):
            views.put((1, 1, uid), envelope, [b"x" * 100])
        self.assertIsNone(views.get((1, 1, 1), envelope))
        self.assertEqual(views.get((1, 1, 2), envelope), [b"x" * 100])
        views.put((1, 1, 4), envelope, [b"y" * 100])
        self.assertIsNone(views.get((1, 1, 3), envelope))
        self.assertEqual(views.size, 200)

"""Tests for the local store's async facade: the same operations as coroutines, blocking work in a thread pool."""

from __future__ import annotations

import datetime
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gatekeeper.localstore import (
    DELETED,
    FLAGGED,
    INBOX,
    SEEN,
    AsyncLocalStore,
    AsyncMailbox,
    LocalStore,
    NoSuchFolder,
    NoSuchMessage,
    Notice,
    SearchQuery,
    UnknownMailbox,
)
from gatekeeper.testing.threads import ImmediatePool, ImmediateReactor

T = TypeVar("T")
MESSAGE = b"Subject: facade\r\n\r\nbody\r\n"


class ImmediateFacadeTests(SynchronousTestCase):
    """Every facade method, run at once on this thread (an immediate pool), against a real store."""

    def setUp(self) -> None:
        store = LocalStore(Path(self.mktemp()), domains=["example.org"])
        self.addCleanup(store.close)
        self.pool = ImmediatePool()
        self.store = AsyncLocalStore(store, reactor=ImmediateReactor(), threadpool=self.pool)  # type: ignore[arg-type]

    def wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.successResultOf(Deferred.fromCoroutine(coroutine))

    def test_every_operation(self) -> None:
        store = self.store
        self.assertTrue(store.is_local_domain("bob@example.org"))
        self.assertEqual(self.wait(store.check_recipient("Bob@example.org", 10)), "Bob@example.org")
        report = self.wait(store.deliver(iter(["bob@example.org"]), MESSAGE))
        self.assertEqual(report.delivered[0].uid, 1)
        bob = self.wait(store.mailbox("bob@example.org"))
        self.assertEqual(bob.address, "Bob@example.org")  # as first created
        self.assertEqual(self.wait(bob.create_folder("Work", special_use="\\Archive")), "Work")
        self.assertEqual(self.wait(bob.rename_folder("Work", "Jobs")), "Jobs")
        self.wait(bob.subscribe("Jobs"))
        self.wait(bob.unsubscribe("Sent"))
        self.assertEqual(self.wait(bob.subscriptions()), ["Drafts", INBOX, "Jobs", "Trash"])
        folders = {f.name: f for f in self.wait(bob.folders())}
        self.assertEqual(folders["Jobs"].special_use, "\\Archive")
        date = datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC)
        appended = self.wait(bob.append(INBOX, b"second", flags=(f for f in [SEEN]), internal_date=date))
        self.assertEqual(appended.uid, 2)
        selection = self.wait(bob.select(INBOX))
        self.assertEqual((selection.uids, selection.recent), ((1, 2), frozenset({1, 2})))
        self.assertEqual(self.wait(bob.status(INBOX)).unseen, 1)
        self.assertEqual([m.uid for m in self.wait(bob.messages(INBOX, [2]))], [2])
        self.assertEqual(self.wait(bob.message(INBOX, 2)).internal_date, date)
        self.assertEqual(self.wait(bob.uids(INBOX)), [1, 2])
        self.assertEqual(self.wait(bob.read_message(INBOX, 1)), MESSAGE)
        with self.wait(bob.open_message(INBOX, 2)) as handle:
            self.assertEqual(handle.read(), b"second")
        self.assertEqual([m.flags for m in self.wait(bob.add_flags(INBOX, [1], iter([FLAGGED])))], [{FLAGGED}])
        self.assertEqual([m.flags for m in self.wait(bob.remove_flags(INBOX, [2], [SEEN]))], [frozenset()])
        self.assertEqual([m.flags for m in self.wait(bob.set_flags(INBOX, [2], [DELETED]))], [{DELETED}])
        self.assertEqual(self.wait(bob.search(INBOX, SearchQuery(flags=frozenset({FLAGGED})))), [1])
        copied = self.wait(bob.copy(INBOX, [1], "Jobs"))
        self.assertEqual(copied.destination, (1,))
        moved = self.wait(bob.move("Jobs", [1], "Trash"))
        self.assertEqual(moved.source, (1,))
        self.assertEqual(self.wait(bob.expunge(INBOX)), [2])
        self.assertEqual(self.wait(bob.delete_messages("Trash", [1])), [1])
        changes = self.wait(bob.changes(INBOX, selection.status.highest_modseq, claim_recent=True))
        self.assertEqual((changes.expunged, [m.uid for m in changes.changed]), ((2,), [1]))
        self.wait(bob.check_quota(100))
        self.assertEqual(self.wait(bob.usage()).messages, 1)
        self.wait(bob.delete_folder("Jobs"))
        self.assertTrue(self.wait(store.remove_mailbox("bob@example.org")))
        self.assertEqual(self.pool.jobs, 30)  # each call went through the pool
        self.wait(store.close())

    def test_errors_come_out_of_the_await(self) -> None:
        bob = self.wait(self.store.mailbox("bob@example.org"))
        failure = self.failureResultOf(Deferred.fromCoroutine(bob.status("Nowhere")), NoSuchFolder)
        self.assertIn("Nowhere", str(failure.value))
        self.failureResultOf(Deferred.fromCoroutine(bob.read_message(INBOX, 9)), NoSuchMessage)

    def test_chunks(self) -> None:
        bob = self.wait(self.store.mailbox("bob@example.org"))
        data = bytes(range(256)) * 100
        self.wait(bob.append(INBOX, data))

        async def collect() -> list[bytes]:
            return [chunk async for chunk in bob.chunks(INBOX, 1, size=1000)]

        chunks = self.wait(collect())
        self.assertEqual(b"".join(chunks), data)
        self.assertEqual({len(chunk) for chunk in chunks[:-1]}, {1000})


class ThreadedFacadeTests(TestCase):
    """The facade with a real thread pool and reactor: sessions see each other's changes."""

    def setUp(self) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=4, name="localstore-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.local = LocalStore(Path(self.mktemp()), domains=["example.org"], users=lambda a: a.startswith("bob@"))
        self.addCleanup(self.local.close)
        self.store = AsyncLocalStore(self.local, reactor=reactor, threadpool=self.pool)

    def test_unknown_users_are_refused(self) -> Deferred[None]:
        async def run() -> None:
            with self.assertRaises(UnknownMailbox):
                await self.store.mailbox("eve@example.org")

        return Deferred.fromCoroutine(run())

    def test_a_watching_session_hears_of_another_sessions_changes(self) -> Deferred[None]:
        async def run() -> None:
            idle: AsyncMailbox = await self.store.mailbox("bob@example.org")
            other: AsyncMailbox = await self.store.mailbox("BOB@example.org")
            selection = await idle.select(INBOX)
            heard: Deferred[Notice] = Deferred()
            threads: list[threading.Thread] = []

            def on_notice(notice: Notice) -> None:
                threads.append(threading.current_thread())
                if not heard.called:
                    heard.callback(notice)

            cancel = idle.watch(on_notice)
            me = object()
            await other.append(INBOX, MESSAGE, flags=[SEEN], origin=me)
            notice = await heard
            cancel()
            self.assertEqual((notice.folder, notice.kind, notice.origin), (INBOX, "messages", me))
            self.assertEqual(threads, [threading.main_thread()])  # delivered on the reactor thread
            changes = await idle.changes(INBOX, selection.status.highest_modseq, claim_recent=True)
            self.assertEqual([(m.uid, m.flags) for m in changes.new], [(1, {SEEN})])
            self.assertEqual(changes.recent, frozenset({1}))
            report = await self.store.deliver(["bob@example.org", "eve@example.org"], MESSAGE)
            self.assertEqual([d.uid for d in report.delivered], [2])
            self.assertEqual([r.enhanced_status for r in report.refused], ["5.1.1"])
            data = b"".join([chunk async for chunk in idle.chunks(INBOX, 2, size=7)])
            self.assertEqual(data, MESSAGE)

        return Deferred.fromCoroutine(run())

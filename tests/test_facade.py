"""The ``gk`` facade over a gateway's real parts (key store, CA, caches, sessions), jobs run inline."""

from __future__ import annotations

import functools
import pydoc
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from gatekeeper.admin.facade import Deleted, Flushed, Gatekeeper, LookupTrace, SessionInfo, Stats, UserInfo
from gatekeeper.auth import ConnectionInfo
from gatekeeper.errors import InvalidAddress, UnknownUser, UserExists
from gatekeeper.tap import Parts, build_parts, prepare
from gatekeeper.testing.gateway import GatewayHarness
from gatekeeper.testing.login import make_identity
from gatekeeper.workers import InlineWorkerPool

ALICE = "alice@example.org"
FACADE_PASSWORD = "facade test password"


@functools.cache
def shared_harness() -> GatewayHarness:
    harness = GatewayHarness(Path("facade-gateway").absolute())
    harness.add_user(ALICE, FACADE_PASSWORD)
    return harness


class FacadeTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.harness = shared_harness()
        self.parts: Parts = build_parts(prepare(self.harness.config), reactor, MultiService())
        self.workers = InlineWorkerPool()
        self.parts.message_workers = self.workers  # type: ignore[assignment]
        self.gk = Gatekeeper(self.parts, actor="tester", via="test")
        self.addCleanup(self.parts.unlock_cache.drop)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def admin_events(self) -> list[tuple[str, str, str, str]]:
        return [
            (e["operation"], e["target"], e["actor"], e["via"])
            for e in self.events
            if e.get("gk_event") == "admin" and e.get("gk_audit")
        ]

    def unlocked(self, address: str) -> None:
        self.parts.unlock_cache.put(address, "whatever", make_identity(address))

    async def test_users(self) -> None:
        users = await self.gk.users()
        self.assertEqual(self.workers.jobs, 1)
        alice = next(user for user in users if user.address == ALICE)
        self.assertIsInstance(alice, UserInfo)
        stored = self.harness.store.get_user(ALICE)
        assert stored is not None
        self.assertEqual(alice.key_id, stored.current.key_id)
        self.assertEqual(alice.certificate_expires, stored.current.certificate.not_valid_after_utc)
        self.assertEqual((alice.keys, alice.pending), (1, 0))
        self.assertEqual([u.address for u in users], sorted((u.address for u in users), key=str.casefold))
        self.assertEqual(self.admin_events(), [])  # reading is not audited

    async def test_add_user_flushes_the_negative_lookup_and_is_audited(self) -> None:
        address = "bob@example.org"
        before = await self.parts.key_manager.lookup(address)
        self.assertFalse(before.found)
        info = await self.gk.add_user("Bob@Example.ORG", "bob's password")
        self.assertEqual(info.address, "Bob@example.org")
        self.assertEqual((info.keys, info.pending), (1, 0))
        self.assertIsNotNone(self.harness.store.get_user(address))
        after = await self.parts.key_manager.lookup(address)
        self.assertTrue(after.found)  # not the cached "no certificate" from before
        self.assertEqual(self.admin_events(), [("add_user", "Bob@example.org", "tester", "test")])
        self.assertNotIn("bob's password", repr(self.events))
        with self.assertRaises(UserExists):
            await self.gk.add_user(address, "another password")
        self.assertEqual(len(self.admin_events()), 1)

    async def test_invalid_and_unknown_addresses(self) -> None:
        with self.assertRaises(InvalidAddress):
            await self.gk.add_user("not an address", "pw")
        with self.assertRaises(UnknownUser):
            await self.gk.rotate("nobody@example.org")
        with self.assertRaises(UnknownUser):
            await self.gk.delete_user("nobody@example.org")
        self.assertEqual(self.admin_events(), [])

    async def test_rotate_drops_unlocked_keys(self) -> None:
        address = "carol@example.org"
        await self.gk.add_user(address, "carol's password")
        self.unlocked(address)
        self.unlocked(ALICE)
        pending = await self.gk.rotate(address)
        self.assertEqual((pending.keys, pending.pending), (1, 1))
        self.assertIsNone(self.parts.unlock_cache.get(address, "whatever"))
        self.assertIsNotNone(self.parts.unlock_cache.get(ALICE, "whatever"))  # only the user's own entry
        sealed = await self.gk.rotate(address, "carol's password")
        self.assertEqual((sealed.keys, sealed.pending), (3, 0))  # the pending one completed, then a new one
        self.assertEqual([op for op, *_ in self.admin_events()], ["add_user", "rotate", "rotate"])

    async def test_delete_user_closes_their_sessions(self) -> None:
        address = "dave@example.org"
        await self.gk.add_user(address, "dave's password")
        closed: list[str] = []
        identity = make_identity(address)
        self.parts.sessions.open(identity, ConnectionInfo("imap", "192.0.2.7", lambda: closed.append("imap")))
        self.parts.sessions.open(make_identity(ALICE), ConnectionInfo("pop3", "192.0.2.8", lambda: closed.append("x")))
        self.unlocked(address)
        deleted = await self.gk.delete_user(address)
        self.assertEqual(deleted, Deleted(address, 1))
        self.assertEqual(closed, ["imap"])
        self.assertIsNone(self.harness.store.get_user(address))
        self.assertEqual(len(self.parts.unlock_cache), 0)
        self.assertEqual(self.admin_events()[-1], ("delete_user", address, "tester", "test"))

    async def test_flush(self) -> None:
        await self.parts.key_manager.lookup("x@partner.example")
        await self.parts.key_manager.lookup("y@partner.example")
        self.unlocked(ALICE)
        self.unlocked("erin@example.org")
        self.assertEqual(self.gk.flush("X@partner.example"), Flushed(1, 0))
        self.assertEqual(self.gk.flush(ALICE), Flushed(0, 1))
        self.assertEqual(self.gk.flush(), Flushed(1, 1))
        self.assertEqual(
            [(op, target) for op, target, *_ in self.admin_events()],
            [("flush", "X@partner.example"), ("flush", ALICE), ("flush", "*")],
        )

    def test_sessions_kick_and_stats(self) -> None:
        kicked: list[int] = []
        alice = make_identity(ALICE)
        first = self.parts.sessions.open(alice, ConnectionInfo("imap", "192.0.2.1", lambda: kicked.append(1)))
        self.parts.sessions.open(alice, ConnectionInfo("smtp", "192.0.2.2", lambda: kicked.append(2)))
        sessions = self.gk.sessions()
        self.assertEqual((sessions[0].user, sessions[0].protocol, sessions[0].client), (ALICE, "imap", "192.0.2.1"))
        self.assertEqual([s.session for s in sessions], [first.session_id, first.session_id + 1])
        self.assertIsInstance(sessions[0], SessionInfo)
        self.assertAlmostEqual(sessions[0].since.timestamp(), first.since, places=5)
        self.assertGreaterEqual(sessions[0].seconds, 0)
        stats = self.gk.stats()
        self.assertIsInstance(stats, Stats)
        self.assertEqual(stats.sessions, {"imap": 1, "smtp": 1})
        self.assertEqual((stats.worker_queue, stats.worker_processes), (0, 0))
        self.assertTrue(self.gk.kick(sessions[0]))
        self.assertEqual(kicked, [1])
        self.assertFalse(self.gk.kick(9999))
        self.assertEqual(
            self.admin_events(),
            [("kick", f"{ALICE} (session {first.session_id}, imap from 192.0.2.1)", "tester", "test")],
        )

    async def test_lookup_trace(self) -> None:
        trace = await self.gk.lookup(ALICE)
        self.assertIsInstance(trace, LookupTrace)
        self.assertTrue(trace.found)
        self.assertTrue(repr(trace).startswith(f"Looking up a certificate for {ALICE}:"))
        self.assertIn("Decision: encrypt to", repr(trace))
        missing = await self.gk.lookup("nobody@partner.example", cached=True)
        self.assertFalse(missing.found)
        self.assertIn("Decision: no usable certificate", repr(missing))
        self.assertEqual(len(self.parts.key_manager.cache), 1)  # only the cached lookup was kept

    def test_help_lists_everything(self) -> None:
        text = pydoc.render_doc(self.gk, renderer=pydoc.plaintext)
        for name in (
            "users()",
            "add_user(address, password)",
            "rotate(address",
            "delete_user(address)",
            "lookup(address",
            "flush(address=None)",
            "sessions()",
            "kick(session)",
            "check()",
            "stats()",
        ):
            self.assertIn(name, text)
        self.assertIn("as tester via test", repr(self.gk))
        other = self.gk.acting_as("someone", "web")
        self.assertEqual((other.actor, other.via), ("someone", "web"))

"""The login checker: unlock = login, the unlocked-key cache, throttling, sessions.

The checker is tested with the key store's unlock functions injected, so each test
controls and counts the (expensive) KDF runs; ``tests/test_gateway_login.py`` runs the
real thing end to end.
"""

from __future__ import annotations

import datetime
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.defer import succeed
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.mail import pop3
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from gatekeeper.auth import (
    AddressedCredentials,
    ConnectionInfo,
    GatekeeperRealm,
    KeyUnlockingChecker,
    LoginRefused,
    LoginThrottledError,
    LoginUnavailable,
    SessionPortal,
    SessionRegistry,
    UnlockCache,
)
from gatekeeper.errors import BadPassword, KeyStoreError
from gatekeeper.interfaces import StoredKey, StoredUser
from gatekeeper.keys.identity import Identity, UnlockedKey
from gatekeeper.testing.memory_store import MemoryKeyStore
from gatekeeper.testing.pki import TestPKI
from gatekeeper.testing.threads import ImmediatePool, ImmediateReactor
from gatekeeper.throttle import LoginThrottle

PASSWORD = "correct horse battery staple"
NOW = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)


@attrs.frozen
class FakeUnlockResult:
    identity: Identity
    updated_user: StoredUser | None = None


class FakeUnlocker:
    """Stands in for accounts.unlock: the password is right when it equals ``password``."""

    def __init__(self, identity: Identity, password: str = PASSWORD) -> None:
        self.identity = identity
        self.password = password
        self.calls = 0
        self.dummy_calls = 0
        self.updated_user: StoredUser | None = None

    def unlock(self, user: StoredUser, password: str) -> FakeUnlockResult:
        self.calls += 1
        if password != self.password:
            raise BadPassword("authentication failed")
        return FakeUnlockResult(self.identity, self.updated_user)

    def dummy(self) -> None:
        self.dummy_calls += 1


def make_identity(address: str = "alice@example.org") -> tuple[Identity, StoredUser]:
    issued = TestPKI().user(address)
    key = UnlockedKey("k1", issued.certificate, issued.key, issued.chain)
    stored = StoredUser(address, (StoredKey("k1", issued.certificate, b"sealed", NOW),), NOW)
    return Identity(address, (key,)), stored


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ImmediateReactor()
        self.pool = ImmediatePool()
        self.store = MemoryKeyStore()
        self.identity, stored = make_identity()
        self.store.put_user(stored)
        self.unlocker = FakeUnlocker(self.identity)
        self.cache = UnlockCache(self.reactor, ttl=300)
        self.throttle = LoginThrottle(self.reactor, free_failures=3, base_seconds=1, max_seconds=60)
        self.checker = KeyUnlockingChecker(
            store=self.store,
            reactor=self.reactor,
            pool=self.pool,  # type: ignore[arg-type]
            cache=self.cache,
            throttle=self.throttle,
            unlock=self.unlocker.unlock,
            dummy_unlock=self.unlocker.dummy,
            record_login=self.store.record_login,
        )
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def login(self, user: str, password: str, client: str = "192.0.2.10") -> Any:
        return self.checker.requestAvatarId(
            AddressedCredentials(user.encode(), password.encode(), ConnectionInfo("imap", client))
        )

    def test_right_password_yields_the_identity(self) -> None:
        identity = self.successResultOf(self.login("alice@example.org", PASSWORD))
        self.assertIs(identity, self.identity)
        self.assertEqual(self.unlocker.calls, 1)
        self.assertEqual(self.store.logins, ["alice@example.org"])

    def test_user_name_is_case_insensitive(self) -> None:
        identity = self.successResultOf(self.login("Alice@EXAMPLE.org", PASSWORD))
        self.assertIs(identity, self.identity)

    def test_wrong_password_is_refused(self) -> None:
        self.failureResultOf(self.login("alice@example.org", "wrong"), LoginRefused)
        self.assertEqual(self.unlocker.calls, 1)

    def test_unknown_user_costs_a_dummy_kdf_and_the_same_error(self) -> None:
        failure = self.failureResultOf(self.login("nobody@example.org", PASSWORD), LoginRefused)
        self.assertEqual(self.unlocker.dummy_calls, 1)
        self.assertEqual(self.unlocker.calls, 0)
        known = self.failureResultOf(self.login("alice@example.org", "wrong"), LoginRefused)
        self.assertEqual(str(failure.value), str(known.value))

    def test_user_name_that_is_not_an_address_costs_a_dummy_kdf(self) -> None:
        self.failureResultOf(self.login("alice", PASSWORD), LoginRefused)
        self.assertEqual(self.unlocker.dummy_calls, 1)

    def test_password_that_is_not_utf8_is_refused_after_a_dummy_kdf(self) -> None:
        d = self.checker.requestAvatarId(
            AddressedCredentials(b"alice@example.org", b"\xff\xfe", ConnectionInfo("smtp", "192.0.2.1"))
        )
        self.failureResultOf(d, LoginRefused)
        self.assertEqual(self.unlocker.dummy_calls, 1)

    def test_repeated_login_within_ttl_skips_the_kdf(self) -> None:
        self.successResultOf(self.login("alice@example.org", PASSWORD))
        identity = self.successResultOf(self.login("alice@example.org", PASSWORD))
        self.assertIs(identity, self.identity)
        self.assertEqual(self.unlocker.calls, 1)

    def test_wrong_password_never_matches_the_cache(self) -> None:
        self.successResultOf(self.login("alice@example.org", PASSWORD))
        self.failureResultOf(self.login("alice@example.org", PASSWORD + "x"), LoginRefused)
        self.assertEqual(self.unlocker.calls, 2)

    def test_cache_expires_after_ttl(self) -> None:
        self.successResultOf(self.login("alice@example.org", PASSWORD))
        self.reactor.advance(301)
        self.assertEqual(len(self.cache), 0)
        self.successResultOf(self.login("alice@example.org", PASSWORD))
        self.assertEqual(self.unlocker.calls, 2)

    def test_cache_drop_forces_a_new_kdf(self) -> None:
        self.successResultOf(self.login("alice@example.org", PASSWORD))
        self.cache.drop("ALICE@example.org")
        self.successResultOf(self.login("alice@example.org", PASSWORD))
        self.assertEqual(self.unlocker.calls, 2)

    def test_throttled_login_runs_no_kdf(self) -> None:
        for _ in range(4):
            self.failureResultOf(self.login("alice@example.org", "wrong"), LoginRefused)
        failure = self.failureResultOf(self.login("alice@example.org", PASSWORD), LoginThrottledError)
        self.assertEqual(failure.value.retry_after, 1.0)
        self.assertEqual(self.unlocker.calls, 4)
        self.reactor.advance(1)
        self.successResultOf(self.login("alice@example.org", PASSWORD))

    def test_unknown_users_are_throttled_like_known_ones(self) -> None:
        for _ in range(4):
            self.failureResultOf(self.login("ghost@example.org", "x"), LoginRefused)
        self.failureResultOf(self.login("ghost@example.org", "x"), LoginThrottledError)
        self.assertEqual(self.unlocker.dummy_calls, 4)

    def test_client_address_is_throttled(self) -> None:
        for index in range(4):
            self.failureResultOf(self.login(f"u{index}@example.org", "x", client="198.51.100.1"), LoginRefused)
        self.failureResultOf(self.login("alice@example.org", PASSWORD, client="198.51.100.1"), LoginThrottledError)
        self.successResultOf(self.login("alice@example.org", PASSWORD, client="198.51.100.2"))

    def test_store_failure_is_temporary_and_not_counted(self) -> None:
        def broken(address: str) -> None:
            raise KeyStoreError("/keys/users/alice/user.json is damaged")

        self.store.get_user = broken  # type: ignore[method-assign,assignment]
        for _ in range(5):
            failure = self.failureResultOf(self.login("alice@example.org", PASSWORD), LoginUnavailable)
        self.assertNotIn("user.json", str(failure.value))
        self.assertEqual(self.throttle.failures("alice@example.org", "192.0.2.10"), (0, 0))

    def test_completed_pending_rotation_is_written_back(self) -> None:
        _, updated = make_identity()
        self.unlocker.updated_user = attrs.evolve(updated, keys=updated.keys * 2)
        writes = self.store.writes
        self.successResultOf(self.login("alice@example.org", PASSWORD))
        self.assertEqual(self.store.writes, writes + 1)
        stored = self.store.get_user("alice@example.org")
        assert stored is not None
        self.assertEqual(len(stored.keys), 2)

    def test_passwords_never_reach_the_log(self) -> None:
        self.successResultOf(self.login("alice@example.org", PASSWORD))
        self.failureResultOf(self.login("alice@example.org", "hunter2-wrong"), LoginRefused)
        self.failureResultOf(self.login("ghost@example.org", "hunter3-ghost"), LoginRefused)
        text = "\n".join(formatEvent(event) or "" for event in self.events)
        self.assertIn("login ok: alice@example.org", text)
        self.assertIn("login failed: ghost@example.org", text)
        for secret in (PASSWORD, "hunter2-wrong", "hunter3-ghost"):
            self.assertNotIn(secret, text)
            self.assertNotIn(secret, repr([event for event in self.events]))


class UnlockCacheTests(SynchronousTestCase):
    def test_cache_keeps_no_password(self) -> None:
        reactor = ImmediateReactor()
        cache = UnlockCache(reactor, ttl=10)
        identity, _ = make_identity()
        cache.put("alice@example.org", PASSWORD, identity)
        self.assertNotIn(PASSWORD, repr(vars(cache)))
        self.assertNotIn(PASSWORD.encode(), repr(vars(cache)).encode())

    def test_zero_ttl_disables_the_cache(self) -> None:
        cache = UnlockCache(ImmediateReactor(), ttl=0)
        identity, _ = make_identity()
        cache.put("alice@example.org", PASSWORD, identity)
        self.assertIsNone(cache.get("alice@example.org", PASSWORD))

    def test_drop_all(self) -> None:
        reactor = ImmediateReactor()
        cache = UnlockCache(reactor, ttl=10)
        identity, _ = make_identity()
        cache.put("alice@example.org", PASSWORD, identity)
        cache.put("bob@example.org", PASSWORD, identity)
        cache.drop()
        self.assertEqual(len(cache), 0)
        self.assertEqual(reactor.getDelayedCalls(), [])


class RealmTests(SynchronousTestCase):
    def test_sessions_are_registered_and_closed_at_logout(self) -> None:
        reactor = ImmediateReactor()
        sessions = SessionRegistry(reactor)
        kicked = []
        realm = GatekeeperRealm(pop3.IMailbox, lambda identity, session: (object(), lambda: None), sessions)
        identity, _ = make_identity()
        reactor.advance(100)
        interface, _avatar, logout = realm.requestAvatar(
            identity, ConnectionInfo("pop3", "192.0.2.3", lambda: kicked.append(1)), pop3.IMailbox
        )
        self.assertIs(interface, pop3.IMailbox)
        [session] = sessions.sessions()
        self.assertEqual(
            (session.address, session.protocol, session.client, session.since),
            ("alice@example.org", "pop3", "192.0.2.3", 100.0),
        )
        self.assertTrue(sessions.kick(session.session_id))
        self.assertEqual(kicked, [1])
        logout()
        self.assertEqual(sessions.sessions(), [])
        self.assertFalse(sessions.kick(session.session_id))

    def test_session_portal_tags_credentials(self) -> None:
        seen = []

        @implementer(ICredentialsChecker)
        class Checker:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: Any) -> Any:
                seen.append(credentials)
                return succeed(make_identity()[0])

        realm = GatekeeperRealm(
            pop3.IMailbox, lambda identity, session: (object(), lambda: None), SessionRegistry(ImmediateReactor())
        )
        portal = SessionPortal(Portal(realm, [Checker()]), ConnectionInfo("smtp", "203.0.113.5"))
        self.successResultOf(portal.login(UsernamePassword(b"a@example.org", b"pw"), None, pop3.IMailbox))
        [credentials] = seen
        self.assertEqual((credentials.username, credentials.password), (b"a@example.org", b"pw"))
        self.assertEqual(credentials.connection.client, "203.0.113.5")
        self.assertNotIn("pw", repr(credentials))

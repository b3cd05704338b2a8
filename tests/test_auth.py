"""The login checker: unlock = login, the unlocked-key cache, throttling, sessions.

The checker is tested with a fake unlock (``gatekeeper.testing.login``), so each test
controls and counts the expensive unlocks; ``tests/test_unlocking.py`` tests the real
worker-side unlock and ``tests/test_gateway_login.py`` runs everything end to end.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.mail import pop3
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from gatekeeper.auth import (
    AddressedCredentials,
    ConnectionInfo,
    GatekeeperRealm,
    LoginRefused,
    LoginThrottledError,
    LoginUnavailable,
    SessionPortal,
    SessionRegistry,
    UnlockCache,
)
from gatekeeper.errors import KeyStoreError
from gatekeeper.testing.login import fake_login, make_identity

PASSWORD = "correct horse battery staple"


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.login = fake_login(free_failures=3)
        self.identity = self.login.add_user("alice@example.org", PASSWORD)
        self.unlocker = self.login.unlocker
        self.clock = self.login.clock
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def attempt(self, user: str | bytes, password: str | bytes, client: str = "192.0.2.10") -> Any:
        return self.login.checker.requestAvatarId(
            AddressedCredentials(
                user.encode() if isinstance(user, str) else user,
                password.encode() if isinstance(password, str) else password,
                ConnectionInfo("imap", client),
            )
        )

    def test_right_password_yields_the_identity(self) -> None:
        identity = self.successResultOf(self.attempt("alice@example.org", PASSWORD))
        self.assertIs(identity, self.identity)
        self.assertEqual(self.unlocker.calls, 1)

    def test_user_name_is_case_insensitive(self) -> None:
        identity = self.successResultOf(self.attempt("Alice@EXAMPLE.org", PASSWORD))
        self.assertIs(identity, self.identity)

    def test_wrong_password_is_refused(self) -> None:
        self.failureResultOf(self.attempt("alice@example.org", "wrong"), LoginRefused)
        self.assertEqual(self.unlocker.calls, 1)

    def test_unknown_user_costs_a_dummy_unlock_and_the_same_error(self) -> None:
        failure = self.failureResultOf(self.attempt("nobody@example.org", PASSWORD), LoginRefused)
        self.assertEqual((self.unlocker.dummy_calls, self.unlocker.calls), (1, 0))
        known = self.failureResultOf(self.attempt("alice@example.org", "wrong"), LoginRefused)
        self.assertEqual(str(failure.value), str(known.value))

    def test_user_name_that_is_not_an_address_reaches_unlock_as_none(self) -> None:
        self.failureResultOf(self.attempt("alice", PASSWORD), LoginRefused)
        self.assertEqual(self.unlocker.dummy_calls, 1)

    def test_password_that_is_not_utf8_reaches_unlock_as_none(self) -> None:
        self.failureResultOf(self.attempt("alice@example.org", b"\xff\xfe"), LoginRefused)
        self.assertEqual((self.unlocker.dummy_calls, self.unlocker.calls), (1, 0))

    def test_repeated_login_within_ttl_skips_the_unlock(self) -> None:
        self.successResultOf(self.attempt("alice@example.org", PASSWORD))
        identity = self.successResultOf(self.attempt("alice@example.org", PASSWORD))
        self.assertIs(identity, self.identity)
        self.assertEqual(self.unlocker.calls, 1)

    def test_wrong_password_never_matches_the_cache(self) -> None:
        self.successResultOf(self.attempt("alice@example.org", PASSWORD))
        self.failureResultOf(self.attempt("alice@example.org", PASSWORD + "x"), LoginRefused)
        self.assertEqual(self.unlocker.calls, 2)

    def test_cache_expires_after_ttl(self) -> None:
        self.successResultOf(self.attempt("alice@example.org", PASSWORD))
        self.clock.advance(301)
        self.assertEqual(len(self.login.cache), 0)
        self.successResultOf(self.attempt("alice@example.org", PASSWORD))
        self.assertEqual(self.unlocker.calls, 2)

    def test_cache_drop_forces_a_new_unlock(self) -> None:
        self.successResultOf(self.attempt("alice@example.org", PASSWORD))
        self.login.cache.drop("ALICE@example.org")
        self.successResultOf(self.attempt("alice@example.org", PASSWORD))
        self.assertEqual(self.unlocker.calls, 2)

    def test_throttled_login_runs_no_unlock(self) -> None:
        for _ in range(4):
            self.failureResultOf(self.attempt("alice@example.org", "wrong"), LoginRefused)
        failure = self.failureResultOf(self.attempt("alice@example.org", PASSWORD), LoginThrottledError)
        self.assertEqual(failure.value.retry_after, 1.0)
        self.assertEqual(self.unlocker.calls, 4)
        self.clock.advance(1)
        self.successResultOf(self.attempt("alice@example.org", PASSWORD))

    def test_unknown_users_are_throttled_like_known_ones(self) -> None:
        for _ in range(4):
            self.failureResultOf(self.attempt("ghost@example.org", "x"), LoginRefused)
        self.failureResultOf(self.attempt("ghost@example.org", "x"), LoginThrottledError)
        self.assertEqual(self.unlocker.dummy_calls, 4)

    def test_client_address_is_throttled(self) -> None:
        for index in range(4):
            self.failureResultOf(self.attempt(f"u{index}@example.org", "x", client="198.51.100.1"), LoginRefused)
        self.failureResultOf(self.attempt("alice@example.org", PASSWORD, client="198.51.100.1"), LoginThrottledError)
        self.successResultOf(self.attempt("alice@example.org", PASSWORD, client="198.51.100.2"))

    def test_store_failure_is_temporary_and_not_counted(self) -> None:
        self.unlocker.error = KeyStoreError("/keys/users/alice/user.json is damaged")
        for _ in range(5):
            failure = self.failureResultOf(self.attempt("alice@example.org", PASSWORD), LoginUnavailable)
        self.assertNotIn("user.json", str(failure.value))
        self.assertEqual(self.login.throttle.failures("alice@example.org", "192.0.2.10"), (0, 0))

    def test_structured_events_for_metrics_and_audit(self) -> None:
        self.successResultOf(self.attempt("alice@example.org", PASSWORD))
        self.successResultOf(self.attempt("alice@example.org", PASSWORD))
        self.failureResultOf(self.attempt("alice@example.org", "bad"), LoginRefused)
        logins = [(e["outcome"], e["protocol"]) for e in self.events if e.get("gk_event") == "login"]
        self.assertEqual(logins, [("ok", "imap"), ("cached", "imap"), ("failed", "imap")])
        [unlock] = [e for e in self.events if e.get("gk_event") == "key_use"]
        self.assertEqual(
            (unlock["operation"], unlock["user"], unlock["gk_audit"]), ("unlock", "alice@example.org", True)
        )

    def test_passwords_never_reach_the_log(self) -> None:
        self.successResultOf(self.attempt("alice@example.org", PASSWORD))
        self.failureResultOf(self.attempt("alice@example.org", "hunter2-wrong"), LoginRefused)
        self.failureResultOf(self.attempt("ghost@example.org", "hunter3-ghost"), LoginRefused)
        text = "\n".join(formatEvent(event) or "" for event in self.events)
        self.assertIn("login ok: alice@example.org", text)
        self.assertIn("login failed: ghost@example.org", text)
        for secret in (PASSWORD, "hunter2-wrong", "hunter3-ghost"):
            self.assertNotIn(secret, text)
            self.assertNotIn(secret, repr(list(self.events)))


class UnlockCacheTests(SynchronousTestCase):
    def test_cache_keeps_no_password(self) -> None:
        reactor = Clock()
        cache = UnlockCache(reactor, ttl=10)
        identity = make_identity("alice@example.org")
        cache.put("alice@example.org", PASSWORD, identity)
        self.assertNotIn(PASSWORD, repr(vars(cache)))
        self.assertNotIn(PASSWORD.encode(), repr(vars(cache)).encode())

    def test_zero_ttl_disables_the_cache(self) -> None:
        cache = UnlockCache(Clock(), ttl=0)
        identity = make_identity("alice@example.org")
        cache.put("alice@example.org", PASSWORD, identity)
        self.assertIsNone(cache.get("alice@example.org", PASSWORD))

    def test_drop_all(self) -> None:
        reactor = Clock()
        cache = UnlockCache(reactor, ttl=10)
        identity = make_identity("alice@example.org")
        cache.put("alice@example.org", PASSWORD, identity)
        cache.put("bob@example.org", PASSWORD, identity)
        cache.drop()
        self.assertEqual(len(cache), 0)
        self.assertEqual(reactor.getDelayedCalls(), [])


class RealmTests(SynchronousTestCase):
    def test_sessions_are_registered_and_closed_at_logout(self) -> None:
        reactor = Clock()
        sessions = SessionRegistry(reactor)
        kicked = []
        realm = GatekeeperRealm(pop3.IMailbox, lambda identity, session: (object(), lambda: None), sessions)
        identity = make_identity("alice@example.org")
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
                return succeed(make_identity("alice@example.org"))

        realm = GatekeeperRealm(
            pop3.IMailbox, lambda identity, session: (object(), lambda: None), SessionRegistry(Clock())
        )
        portal = SessionPortal(Portal(realm, [Checker()]), ConnectionInfo("smtp", "203.0.113.5"))
        self.successResultOf(portal.login(UsernamePassword(b"a@example.org", b"pw"), None, pop3.IMailbox))
        [credentials] = seen
        self.assertEqual((credentials.username, credentials.password), (b"a@example.org", b"pw"))
        self.assertEqual(credentials.connection.client, "203.0.113.5")
        self.assertNotIn("pw", repr(credentials))

"""Integration tests: the LDAP key source and publisher against a real OpenLDAP slapd on loopback.

Each test gets its own slapd (tests/fixtures/slapd.py, ~0.1 s to start) and a real
thread pool; candidates are judged by the real :class:`gatekeeper.trust.TrustValidator`.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from gatekeeper.config import LdapDirectoryConfig
from gatekeeper.errors import InvalidAddress, SourceUnavailable
from gatekeeper.keys.cache import CachingDirectory, SourceGuard
from gatekeeper.keys.directory import KeyDirectory, LookupResult, SourceState
from gatekeeper.keys.ldap import LdapPublisher, LdapSource, PublishError, read_bind_password
from gatekeeper.testing.pki import TestPKI
from gatekeeper.trust import TrustValidator
from tests.fixtures.slapd import PUBLISHER_DN, PUBLISHER_PASSWORD, Slapd

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
DAY = datetime.timedelta(days=1)

USERS_CA = TestPKI("LDAP Users CA", key_index=21)
SUB_CA = USERS_CA.intermediate("LDAP Users Sub CA", key_index=22)
ROGUE_CA = TestPKI("LDAP Rogue CA", key_index=23)
OTHER_TLS_CA = TestPKI("Some Other TLS CA", key_index=24)

ALICE = USERS_CA.user("alice@example.org", key_index=30)
BOB_OLD = USERS_CA.user("bob@example.org", not_before=NOW - 40 * DAY, key_index=31)
BOB_NEW = SUB_CA.user("bob@example.org", not_before=NOW - 3 * DAY, key_index=32)
BOB_EXPIRED = USERS_CA.user("bob@example.org", not_before=NOW - 400 * DAY, days=30, key_index=33)
BOB_ROGUE = ROGUE_CA.user("bob@example.org", key_index=34)
STAR = USERS_CA.user("star*@example.org", key_index=35)
ODD = USERS_CA.user("other@example.org", key_index=36)
CAROL = USERS_CA.user("carol@example.org", key_index=37)


class LdapDirectoryTests(TestCase):
    """Finding certificates in slapd through the key source, the directory and the cache."""

    timeout = 30

    def setUp(self) -> None:
        self.slapd = Slapd()
        self.addCleanup(self.slapd.close)
        self.slapd.start()
        self.pool = ThreadPool(minthreads=0, maxthreads=3, name="test-ldap")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.validator = TrustValidator([USERS_CA.certificate])

    def source(self, config: LdapDirectoryConfig | None = None, **kwargs: Any) -> LdapSource:
        config = config or self.slapd.config()
        source = LdapSource(
            config, reactor=reactor, threadpool=self.pool, password=read_bind_password(config), **kwargs
        )
        self.addCleanup(source.close)
        return source

    def directory(self, source: LdapSource, *, timeout: float = 5.0, backoff: float = 5.0) -> KeyDirectory:
        guard = SourceGuard(source, clock=reactor, timeout=timeout, backoff=backoff)
        return KeyDirectory([guard], self.validator, clock=reactor)

    async def test_find_by_address_case_insensitive_over_ldaps_and_starttls(self) -> None:
        self.slapd.add_person("alice", "alice@example.org", certificates=[ALICE.certificate])
        for starttls in (False, True):
            keys = self.directory(self.source(self.slapd.config(starttls=starttls)))
            result: LookupResult = await keys.lookup("ALICE@Example.ORG")
            self.assertEqual(result.certificate, ALICE.certificate, f"starttls={starttls}")
            self.assertEqual(result.source, "ldap")
            self.assertEqual(result.chain, (ALICE.certificate, USERS_CA.certificate))
            self.assertEqual(result.outcomes[0].state, SourceState.FOUND)
            self.assertIn("1 entry", result.outcomes[0].detail)
        empty: LookupResult = await keys.lookup("nobody@example.org")
        self.assertEqual(
            (empty.found, empty.incomplete, empty.outcomes[0].state), (False, False, SourceState.NOT_FOUND)
        )

    async def test_several_certificates_expired_and_untrusted_refused_newest_valid_wins(self) -> None:
        self.slapd.add_person(
            "bob",
            "bob@example.org",
            certificates=[BOB_OLD.certificate, BOB_EXPIRED.certificate, BOB_ROGUE.certificate],
            smime=[[BOB_NEW.certificate, SUB_CA.certificate]],
        )
        result: LookupResult = await self.directory(self.source()).lookup("bob@example.org")
        self.assertEqual(result.certificates, (BOB_NEW.certificate, BOB_OLD.certificate))
        self.assertEqual(result.chain, (BOB_NEW.certificate, SUB_CA.certificate, USERS_CA.certificate))
        refused = {r.certificate: r for r in result.refused}
        self.assertEqual(set(refused), {BOB_EXPIRED.certificate, BOB_ROGUE.certificate})
        self.assertEqual(refused[BOB_EXPIRED.certificate].status, "expired")
        self.assertEqual(refused[BOB_ROGUE.certificate].status, "untrusted")
        self.assertTrue(any("trusted" in reason for reason in refused[BOB_ROGUE.certificate].reasons))
        self.assertEqual((result.outcomes[0].candidates, result.outcomes[0].usable), (4, 2))

    async def test_intermediates_from_cacertificate(self) -> None:
        self.slapd.add_person(
            "bob", "bob@example.org", certificates=[BOB_NEW.certificate], ca_certificates=[SUB_CA.certificate]
        )
        result: LookupResult = await self.directory(self.source()).lookup("bob@example.org")
        self.assertEqual(result.certificate, BOB_NEW.certificate)
        # Without cACertificate in the attributes the chain is incomplete: refused as untrusted.
        narrow = self.slapd.config(attributes=("userCertificate;binary",))
        result = await self.directory(self.source(narrow)).lookup("bob@example.org")
        self.assertFalse(result.found)
        self.assertEqual(result.refused[0].status, "untrusted")

    async def test_filter_metacharacters_are_escaped(self) -> None:
        self.slapd.add_person("star", "star*@example.org", certificates=[STAR.certificate])
        self.slapd.add_person("odd", "a(b\\c@example.org", certificates=[ODD.certificate])
        self.slapd.add_person("alice", "alice@example.org", certificates=[ALICE.certificate])
        source = self.source()
        self.assertEqual(await source.find("star*@example.org"), [STAR.certificate])
        self.assertEqual(await source.find("*@example.org"), [])
        self.assertEqual(await source.find("a*"), [])
        self.assertEqual(await source.find("a(b\\c@example.org"), [ODD.certificate])
        self.assertEqual(await source.find("*)(mail=*"), [])
        self.assertEqual(await source.find("a(b\\\\c@example.org"), [])
        with self.assertRaises(InvalidAddress):
            await source.find("")

    async def test_garbage_values_are_skipped_and_noted(self) -> None:
        self.slapd.add_person(
            "alice",
            "alice@example.org",
            certificates=[ALICE.certificate],
            raw=[("userSMIMECertificate", b"\x30\x03\x02\x01\x00")],
        )
        answer = await self.source().find_detailed("alice@example.org")
        self.assertEqual([c.certificate for c in answer.candidates], [ALICE.certificate])
        self.assertIn("1 attribute value(s) were not certificates", answer.note)

    async def test_directory_stopped_mid_test_then_recovers(self) -> None:
        self.slapd.add_person("alice", "alice@example.org", certificates=[ALICE.certificate])
        source = self.source()
        keys = self.directory(source, backoff=0.3)
        cache = CachingDirectory(keys, clock=reactor, incomplete_ttl=0.2)
        first: LookupResult = await cache.lookup("alice@example.org")
        self.assertTrue(first.found)
        self.slapd.stop()
        cache.flush()
        down: LookupResult = await cache.lookup("alice@example.org")
        self.assertEqual((down.found, down.incomplete), (False, True))
        self.assertEqual(down.outcomes[0].state, SourceState.UNAVAILABLE)
        self.assertIn("cannot connect", down.outcomes[0].detail)
        backed_off: LookupResult = await cache.lookup("bob@example.org")
        self.assertEqual(backed_off.outcomes[0].state, SourceState.BACKED_OFF)
        with self.assertRaises(SourceUnavailable):
            await source.find("alice@example.org")
        self.slapd.start()
        await deferLater(reactor, 0.35, lambda: None)
        again: LookupResult = await cache.lookup("alice@example.org")
        self.assertEqual((again.found, again.incomplete, again.cached), (True, False, False))

    async def test_restart_between_lookups_is_invisible(self) -> None:
        """A kept connection dies with the restart; the source reconnects once, silently."""
        self.slapd.add_person("alice", "alice@example.org", certificates=[ALICE.certificate])
        source = self.source()
        self.assertEqual(await source.find("alice@example.org"), [ALICE.certificate])
        self.slapd.restart()
        self.assertEqual(await source.find("alice@example.org"), [ALICE.certificate])

    async def test_slow_directory_times_out(self) -> None:
        self.slapd.add_person("alice", "alice@example.org", certificates=[ALICE.certificate])
        source = self.source(timeout=1.0)
        keys = self.directory(source, timeout=0.5)
        self.slapd.pause()
        started = time.monotonic()
        try:
            result: LookupResult = await keys.lookup("alice@example.org")
        finally:
            elapsed = time.monotonic() - started
            self.slapd.resume()
        self.assertEqual((result.found, result.incomplete), (False, True))
        self.assertEqual(result.outcomes[0].detail, "ldap: no answer within 0.5 s")
        self.assertLess(elapsed, 1.5)
        self.assertGreaterEqual(elapsed, 0.5)

    async def test_untrusted_server_certificate_is_refused(self) -> None:
        other_ca = self.slapd.dir / "other-ca.pem"
        other_ca.write_bytes(OTHER_TLS_CA.cert_pem())
        for starttls in (False, True):
            source = self.source(self.slapd.config(ca_file=other_ca, starttls=starttls))
            with self.assertRaises(SourceUnavailable) as raised:
                await source.find("alice@example.org")
            self.assertIn("TLS", str(raised.exception))

    async def test_server_certificate_must_name_the_server(self) -> None:
        named = Slapd(server_names=["ldap.example.test"])
        self.addCleanup(named.close)
        named.start()
        named.add_person("alice", "alice@example.org", certificates=[ALICE.certificate])
        for starttls in (False, True):
            wrong = self.source(named.config(starttls=starttls))
            with self.assertRaises(SourceUnavailable) as raised:
                await wrong.find("alice@example.org")
            self.assertEqual(
                str(raised.exception), f"ldap: the server certificate of {wrong.config.url} does not name 127.0.0.1"
            )
            right = self.source(named.config(starttls=starttls, tls_name="ldap.example.test"))
            self.assertEqual(await right.find("alice@example.org"), [ALICE.certificate])

    async def test_wrong_bind_password_is_an_outage_without_the_password(self) -> None:
        config = self.slapd.config()
        source = LdapSource(config, reactor=reactor, threadpool=self.pool, password="wrong-password-xyz")
        with self.assertRaises(SourceUnavailable) as raised:
            await source.find("alice@example.org")
        self.assertIn("refused the bind", str(raised.exception))
        self.assertNotIn("wrong-password-xyz", str(raised.exception))
        self.assertNotIn("wrong-password-xyz", repr(source.connector))

    async def test_concurrent_lookups_share_a_bounded_pool(self) -> None:
        for index in range(5):
            certificate = USERS_CA.user(f"user{index}@example.org", key_index=40).certificate
            self.slapd.add_person(f"user{index}", f"user{index}@example.org", certificates=[certificate])
        source = self.source()
        queries: list[Deferred[Any]] = [source.find(f"user{i % 5}@example.org") for i in range(60)]
        results = await gatherResults(queries)
        self.assertEqual([len(r) for r in results], [1] * 60)
        self.assertLessEqual(len(source._idle), self.pool.max)


class LdapPublisherTests(TestCase):
    """Publishing to and unpublishing from the directory (the write path, separate from lookups)."""

    timeout = 30

    def setUp(self) -> None:
        self.slapd = Slapd()
        self.addCleanup(self.slapd.close)
        self.slapd.start()
        self.slapd.add_person("carol", "carol@example.org")
        self.pool = ThreadPool(minthreads=0, maxthreads=2, name="test-ldap")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.password_file = self.slapd.dir / "publisher.password"
        self.password_file.write_text(PUBLISHER_PASSWORD)

    def writable(self, **overrides: Any) -> LdapDirectoryConfig:
        values: dict[str, Any] = {
            "bind_dn": PUBLISHER_DN,
            "bind_password_file": self.password_file,
            "writable": True,
            "starttls": True,
        }
        values.update(overrides)
        return self.slapd.config(**values)

    async def test_publish_then_find_then_unpublish(self) -> None:
        config = self.writable()
        publisher = LdapPublisher(config, read_bind_password(config))
        source = LdapSource(self.slapd.config(), reactor=reactor, threadpool=self.pool, password="reader-secret")
        self.addCleanup(source.close)
        self.assertEqual(await source.find("carol@example.org"), [])
        publisher.publish("Carol@example.org", CAROL.certificate)
        answer = await source.find_detailed("carol@example.org")
        # Both attributes carry it: userCertificate;binary (DER) and userSMIMECertificate (PKCS#7).
        self.assertEqual([c.certificate for c in answer.candidates], [CAROL.certificate, CAROL.certificate])
        newer = USERS_CA.user("carol@example.org", key_index=38)
        publisher.publish("carol@example.org", newer.certificate)
        self.assertEqual(set(await source.find("carol@example.org")), {newer.certificate})
        publisher.unpublish("carol@example.org")
        self.assertEqual(await source.find("carol@example.org"), [])
        publisher.unpublish("carol@example.org")  # nothing left: still fine

    def test_publish_needs_exactly_one_entry(self) -> None:
        publisher = LdapPublisher(self.writable(), PUBLISHER_PASSWORD)
        error = self.assertRaises(PublishError, publisher.publish, "nobody@example.org", CAROL.certificate)
        self.assertIn("no entry", str(error))
        self.slapd.add_person("carol2", "carol@example.org")
        error = self.assertRaises(PublishError, publisher.publish, "carol@example.org", CAROL.certificate)
        self.assertIn("several", str(error))

    def test_publish_without_write_access_is_refused(self) -> None:
        reader = self.slapd.config(writable=True)
        publisher = LdapPublisher(reader, read_bind_password(reader))
        error = self.assertRaises(PublishError, publisher.publish, "carol@example.org", CAROL.certificate)
        self.assertIn("insufficientAccessRights", str(error))

    def test_publisher_needs_a_writable_directory_and_a_reachable_server(self) -> None:
        from gatekeeper.errors import ConfigError

        self.assertRaises(ConfigError, LdapPublisher, self.slapd.config(), None)
        publisher = LdapPublisher(self.writable(), PUBLISHER_PASSWORD)
        self.slapd.stop()
        self.assertRaises(SourceUnavailable, publisher.publish, "carol@example.org", CAROL.certificate)

"""Unit tests for certificate discovery: the source chain, the guards and the cache (Clock, no sockets)."""

from __future__ import annotations

import datetime

from cryptography import x509
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.errors import InvalidAddress, SourceUnavailable
from gatekeeper.keys.cache import CachingDirectory, SourceGuard
from gatekeeper.keys.directory import (
    Candidate,
    KeyDirectory,
    LookupResult,
    SourceAnswer,
    SourceBackedOff,
    SourceState,
    dane_ee_problems,
    in_domains,
    key_strength,
)
from gatekeeper.testing.keys import FakeKeySource, FakeStatus, FakeValidator
from gatekeeper.testing.pki import TestPKI

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
DAY = datetime.timedelta(days=1)

CA = TestPKI("Directory Test CA")
SUB = CA.intermediate("Directory Sub CA")
ROGUE = TestPKI("Rogue CA", key_index=7)

OLD = CA.user("bob@example.org", not_before=NOW - 30 * DAY, key_index=1)
NEW = CA.user("bob@example.org", not_before=NOW - 2 * DAY, key_index=2)
EXPIRED = CA.user("bob@example.org", not_before=NOW - 400 * DAY, days=30, key_index=3)
UNTRUSTED = ROGUE.user("bob@example.org", key_index=4)
VIA_SUB = SUB.user("bob@example.org", key_index=5)
STRONG = CA.user("bob@example.org", not_before=NOW - 2 * DAY, key_kind="rsa3072", key_index=6)
CAROL = CA.user("carol@partner.example", key_index=8)
SELF_SIGNED = ROGUE.user("dave@example.org", key_index=9)


def directory(*sources: FakeKeySource, clock: Clock | None = None, **kwargs: object) -> KeyDirectory:
    return KeyDirectory(sources, FakeValidator([CA.certificate], **kwargs), clock=clock or Clock())  # type: ignore[arg-type]


class KeyDirectoryTests(SynchronousTestCase):
    def lookup(self, keys: KeyDirectory, address: str = "bob@example.org") -> LookupResult:
        return self.successResultOf(keys.lookup(address))

    def test_first_usable_source_wins_and_later_ones_are_not_asked(self) -> None:
        ring = FakeKeySource("keyring", {"bob@example.org": [NEW.certificate]})
        ldap = FakeKeySource("ldap", {"bob@example.org": [OLD.certificate]})
        result = self.lookup(directory(ring, ldap), "BOB@example.org")
        self.assertEqual(result.certificate, NEW.certificate)
        self.assertEqual(result.source, "keyring")
        self.assertEqual(ldap.total_queries, 0)
        self.assertEqual([o.state for o in result.outcomes], [SourceState.FOUND, SourceState.NOT_ASKED])
        self.assertFalse(result.incomplete)
        self.assertEqual(result.chain, (NEW.certificate, CA.certificate))

    def test_refused_candidates_are_recorded_with_reasons_and_next_source_asked(self) -> None:
        ring = FakeKeySource("keyring", {"bob@example.org": [EXPIRED.certificate]})
        ldap = FakeKeySource("ldap", {"bob@example.org": [UNTRUSTED.certificate, OLD.certificate]})
        result = self.lookup(directory(ring, ldap))
        self.assertEqual(result.certificates, (OLD.certificate,))
        self.assertEqual(result.source, "ldap")
        refused = {(r.source, r.status, r.reasons) for r in result.refused}
        self.assertEqual(
            refused,
            {("keyring", "expired", ("outside the validity period",)), ("ldap", "untrusted", ("issuer not trusted",))},
        )
        self.assertEqual(result.outcomes[0].state, SourceState.REFUSED)
        self.assertEqual((result.outcomes[1].candidates, result.outcomes[1].usable), (2, 1))

    def test_newest_valid_wins_then_strength(self) -> None:
        ldap = FakeKeySource("ldap", {"bob@example.org": [OLD.certificate, NEW.certificate, EXPIRED.certificate]})
        self.assertEqual(self.lookup(directory(ldap)).certificates, (NEW.certificate, OLD.certificate))
        tie = FakeKeySource("ldap", {"bob@example.org": [NEW.certificate, STRONG.certificate]})
        self.assertEqual(NEW.certificate.not_valid_before_utc, STRONG.certificate.not_valid_before_utc)
        self.assertEqual(self.lookup(directory(tie)).certificate, STRONG.certificate)

    def test_unavailable_source_makes_result_incomplete(self) -> None:
        ring = FakeKeySource("keyring")
        ldap = FakeKeySource("ldap")
        ldap.down = True
        dns = FakeKeySource("dns")
        result = self.lookup(directory(ring, ldap, dns))
        self.assertFalse(result.found)
        self.assertIsNone(result.certificate)
        self.assertTrue(result.incomplete)
        self.assertEqual(
            [o.state for o in result.outcomes], [SourceState.NOT_FOUND, SourceState.UNAVAILABLE, SourceState.NOT_FOUND]
        )
        self.assertIn("down", result.outcomes[1].detail)
        self.assertEqual(dns.total_queries, 1)

    def test_found_after_an_outage_is_still_marked_incomplete(self) -> None:
        ldap = FakeKeySource("ldap")
        ldap.down = True
        dns = FakeKeySource("dns", {"bob@example.org": [OLD.certificate]})
        result = self.lookup(directory(ldap, dns))
        self.assertEqual(result.source, "dns")
        self.assertTrue(result.incomplete)

    def test_domain_restricted_source_is_skipped(self) -> None:
        partner = FakeKeySource(
            "external:partner", {"carol@partner.example": [CAROL.certificate]}, domains=["partner.example"]
        )
        result = self.lookup(directory(partner))
        self.assertEqual(result.outcomes[0].state, SourceState.SKIPPED_DOMAIN)
        self.assertEqual(partner.total_queries, 0)
        self.assertFalse(result.incomplete)
        self.assertEqual(self.lookup(directory(partner), "carol@partner.example").source, "external:partner")
        self.assertTrue(in_domains("x@mail.partner.example", ["partner.example"]))
        self.assertFalse(in_domains("x@notpartner.example", ["partner.example"]))

    def test_ca_certificates_are_intermediates_not_candidates(self) -> None:
        ldap = FakeKeySource("ldap", {"bob@example.org": [VIA_SUB.certificate, SUB.certificate]})
        keys = directory(ldap)
        result = self.lookup(keys)
        self.assertEqual(result.certificates, (VIA_SUB.certificate,))
        self.assertEqual(result.chain, (VIA_SUB.certificate, SUB.certificate, CA.certificate))
        self.assertEqual(result.outcomes[0].candidates, 1)
        validator = keys.validator
        assert isinstance(validator, FakeValidator)
        ((certificate, purpose, address, intermediates),) = validator.calls
        self.assertEqual(
            (certificate, purpose, address, intermediates),
            (VIA_SUB.certificate, "encrypt", "bob@example.org", (SUB.certificate,)),
        )

    def test_without_the_intermediate_the_candidate_is_refused(self) -> None:
        ldap = FakeKeySource("ldap", {"bob@example.org": [VIA_SUB.certificate]})
        result = self.lookup(directory(ldap))
        self.assertFalse(result.found)
        self.assertEqual(result.refused[0].status, "untrusted")

    def test_duplicates_are_validated_once(self) -> None:
        ldap = FakeKeySource("ldap", {"bob@example.org": [OLD.certificate, OLD.certificate]})
        keys = directory(ldap)
        self.assertEqual(self.lookup(keys).certificates, (OLD.certificate,))
        assert isinstance(keys.validator, FakeValidator)
        self.assertEqual(len(keys.validator.calls), 1)

    def test_weak_is_refused(self) -> None:
        ldap = FakeKeySource("ldap", {"bob@example.org": [OLD.certificate]})
        result = self.lookup(directory(ldap, weak=[OLD.certificate]))
        self.assertFalse(result.found)
        self.assertEqual((result.refused[0].status, result.refused[0].reasons), ("weak", ("weak key",)))

    def test_weak_accepted_when_allowed_but_ranked_after_valid(self) -> None:
        ldap = FakeKeySource("ldap", {"bob@example.org": [NEW.certificate, OLD.certificate]})
        keys = KeyDirectory(
            [ldap], FakeValidator([CA.certificate], weak=[NEW.certificate]), clock=Clock(), accept_weak=True
        )
        self.assertEqual(self.lookup(keys).certificates, (OLD.certificate, NEW.certificate))

    def test_dane_ee_overrules_only_untrusted(self) -> None:
        dns = FakeKeySource("dns", {"dave@example.org": [SELF_SIGNED.certificate]}, dane_ee=[SELF_SIGNED.certificate])
        result = self.lookup(directory(dns), "dave@example.org")
        self.assertEqual(result.certificate, SELF_SIGNED.certificate)
        self.assertEqual(result.chain, ())
        # Without the DANE-EE mark the same certificate is untrusted.
        plain = FakeKeySource("dns", {"dave@example.org": [SELF_SIGNED.certificate]})
        self.assertFalse(self.lookup(directory(plain), "dave@example.org").found)

    def test_dane_ee_still_checks_dates_and_address(self) -> None:
        expired = ROGUE.user("dave@example.org", not_before=NOW - 400 * DAY, days=30, key_index=9)
        dns = FakeKeySource(
            "dns",
            {"dave@example.org": [expired.certificate], "eve@example.org": [SELF_SIGNED.certificate]},
            dane_ee=[expired.certificate, SELF_SIGNED.certificate],
        )
        result = self.lookup(directory(dns), "dave@example.org")
        self.assertFalse(result.found)
        self.assertIn("outside its validity period", result.refused[0].reasons)
        result = self.lookup(directory(dns), "eve@example.org")
        self.assertFalse(result.found)
        self.assertIn("does not name eve@example.org", result.refused[0].reasons)
        self.assertEqual(dane_ee_problems(CA.certificate, "x@example.org", NOW)[-1], "is a CA certificate")

    def test_validator_error_refuses_candidate_and_is_logged(self) -> None:
        class Broken:
            def validate(self, *args: object, **kwargs: object) -> object:
                raise RuntimeError("boom")

        keys = KeyDirectory([FakeKeySource("ldap", {"bob@example.org": [OLD.certificate]})], Broken(), clock=Clock())  # type: ignore[arg-type]
        result = self.lookup(keys)
        self.assertFalse(result.found)
        self.assertEqual(result.refused[0].status, "error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_broken_source_is_reported_unavailable_and_logged(self) -> None:
        broken = FakeKeySource("ldap")
        broken.error = KeyError("bug")
        result = self.lookup(directory(broken, FakeKeySource("dns", {"bob@example.org": [OLD.certificate]})))
        self.assertEqual(result.outcomes[0].state, SourceState.UNAVAILABLE)
        self.assertEqual(result.outcomes[0].detail, "internal error (see log)")
        self.assertTrue(result.found)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_plain_ikeysource_without_find_detailed(self) -> None:
        class Plain:
            name = "plain"

            def find(self, address: str) -> Deferred[list[x509.Certificate]]:
                return succeed([OLD.certificate])

        keys = KeyDirectory([Plain()], FakeValidator([CA.certificate]), clock=Clock())  # type: ignore[list-item]
        self.assertEqual(self.lookup(keys).source, "plain")

    def test_invalid_address(self) -> None:
        self.failureResultOf(directory(FakeKeySource("keyring")).lookup("no address"), InvalidAddress)

    def test_elapsed_time_per_source(self) -> None:
        clock = Clock()
        slow = FakeKeySource("ldap", {"bob@example.org": [OLD.certificate]})
        slow.hold = True
        pending = directory(slow, clock=clock).lookup("bob@example.org")
        clock.advance(0.25)
        slow.release()
        self.assertEqual(self.successResultOf(pending).outcomes[0].seconds, 0.25)

    def test_key_strength(self) -> None:
        self.assertEqual(key_strength(OLD.certificate), 112)
        self.assertEqual(key_strength(STRONG.certificate), 128)
        self.assertEqual(key_strength(CA.user("p@example.org", key_kind="p384").certificate), 192)


class SourceGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.source = FakeKeySource("ldap", {"bob@example.org": [OLD.certificate]})
        self.guard = SourceGuard(self.source, clock=self.clock, timeout=5.0, backoff=5.0, backoff_max=30.0)

    def test_forwards_name_domains_and_answers(self) -> None:
        partner = SourceGuard(FakeKeySource("p", domains=["partner.example"]), clock=self.clock)
        self.assertEqual((partner.name, partner.domains), ("p", ("partner.example",)))
        self.assertEqual(self.successResultOf(self.guard.find("bob@example.org")), [OLD.certificate])

    def test_timeout_becomes_source_unavailable_and_cancels_the_query(self) -> None:
        self.source.hold = True
        pending = self.guard.find_detailed("bob@example.org")
        self.clock.advance(4.9)
        self.assertNoResult(pending)
        self.clock.advance(0.2)
        failure = self.failureResultOf(pending, SourceUnavailable)
        self.assertEqual(failure.value.args[0], "ldap: no answer within 5 s")
        ((_, held),) = self.source.held
        self.assertTrue(held.called)  # cancelled: the source may stop working on it

    def test_backoff_doubles_up_to_the_maximum_and_resets_on_success(self) -> None:
        self.source.down = True
        delays = []
        for _ in range(5):
            self.failureResultOf(self.guard.find_detailed("bob@example.org"), SourceUnavailable)
            queries = self.source.total_queries
            failure = self.failureResultOf(self.guard.find_detailed("bob@example.org"), SourceBackedOff)
            self.assertEqual(self.source.total_queries, queries)  # not asked while backed off
            delays.append(round(failure.value.retry_in, 3))
            self.clock.advance(failure.value.retry_in)
        self.assertEqual(delays, [5.0, 10.0, 20.0, 30.0, 30.0])
        self.source.down = False
        self.successResultOf(self.guard.find_detailed("bob@example.org"))
        self.assertEqual((self.guard.failures, self.guard.backed_off), (0, False))
        self.source.down = True
        self.failureResultOf(self.guard.find_detailed("bob@example.org"), SourceUnavailable)
        self.assertEqual(self.guard.retry_at - self.clock.seconds(), 5.0)

    def test_concurrent_failures_count_once(self) -> None:
        self.source.hold = True
        pending = [self.guard.find_detailed("bob@example.org") for _ in range(50)]
        self.clock.advance(5.0)
        for query in pending:
            self.failureResultOf(query, SourceUnavailable)
        self.assertEqual(self.guard.failures, 1)
        self.assertEqual(self.guard.retry_at, 10.0)

    def test_reset(self) -> None:
        self.source.down = True
        self.failureResultOf(self.guard.find_detailed("bob@example.org"), SourceUnavailable)
        self.assertTrue(self.guard.backed_off)
        self.guard.reset()
        self.source.down = False
        self.successResultOf(self.guard.find_detailed("bob@example.org"))

    def test_unexpected_error_is_logged_and_reported_as_outage(self) -> None:
        self.source.error = ZeroDivisionError()
        failure = self.failureResultOf(self.guard.find_detailed("bob@example.org"), SourceUnavailable)
        self.assertIn("internal error", str(failure.value))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_backed_off_source_in_the_directory(self) -> None:
        self.source.down = True
        keys = KeyDirectory([self.guard], FakeValidator([CA.certificate]), clock=self.clock)
        first = self.successResultOf(keys.lookup("bob@example.org"))
        self.assertEqual(first.outcomes[0].state, SourceState.UNAVAILABLE)
        second = self.successResultOf(keys.lookup("bob@example.org"))
        self.assertEqual(second.outcomes[0].state, SourceState.BACKED_OFF)
        self.assertFalse(second.outcomes[0].asked)
        self.assertTrue(second.incomplete)
        self.source.down = False
        self.clock.advance(5.0)
        self.assertTrue(self.successResultOf(keys.lookup("bob@example.org")).found)


class CachingDirectoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ring = FakeKeySource("keyring", {"bob@example.org": [OLD.certificate]})
        self.ldap = FakeKeySource("ldap")
        self.guard = SourceGuard(self.ldap, clock=self.clock, timeout=5.0, backoff=5.0)
        self.keys = KeyDirectory([self.ring, self.guard], FakeValidator([CA.certificate]), clock=self.clock)
        self.cache = CachingDirectory(
            self.keys, clock=self.clock, positive_ttl=3600, negative_ttl=300, incomplete_ttl=30
        )

    def lookup(self, address: str) -> LookupResult:
        return self.successResultOf(self.cache.lookup(address))

    def test_positive_ttl(self) -> None:
        first = self.lookup("bob@example.org")
        self.assertFalse(first.cached)
        self.clock.advance(3599)
        second = self.lookup("BOB@EXAMPLE.ORG")
        self.assertTrue(second.cached)
        self.assertEqual(second.certificate, first.certificate)
        self.assertEqual(self.ring.total_queries, 1)
        self.clock.advance(1)
        self.assertFalse(self.lookup("bob@example.org").cached)
        self.assertEqual(self.ring.total_queries, 2)
        self.assertEqual((self.cache.stats.hits, self.cache.stats.misses), (1, 2))

    def test_negative_ttl_is_shorter(self) -> None:
        self.assertFalse(self.lookup("nobody@example.org").found)
        self.clock.advance(299)
        self.assertTrue(self.lookup("nobody@example.org").cached)
        self.clock.advance(1)
        self.assertFalse(self.lookup("nobody@example.org").cached)
        self.assertEqual(self.ldap.queries["nobody@example.org"], 2)

    def test_incomplete_ttl_and_recovery(self) -> None:
        self.ldap.down = True
        result = self.lookup("carol@partner.example")
        self.assertTrue(result.incomplete)
        self.clock.advance(29)
        self.assertTrue(self.lookup("carol@partner.example").cached)
        self.ldap.down = False
        self.ldap.add("carol@partner.example", CAROL.certificate)
        self.clock.advance(1)  # incomplete answer expired; the guard's 5 s back-off too
        result = self.lookup("carol@partner.example")
        self.assertEqual((result.found, result.incomplete, result.source), (True, False, "ldap"))

    def test_ttl_never_outlives_the_certificate(self) -> None:
        short = CA.user("short@example.org", not_before=NOW - DAY, days=2, key_index=11)
        self.ring.add("short@example.org", short.certificate)
        wall = short.certificate.not_valid_after_utc - datetime.timedelta(seconds=100)
        cache = CachingDirectory(self.keys, clock=self.clock, positive_ttl=3600, wall_clock=lambda: wall)
        self.assertTrue(self.successResultOf(cache.lookup("short@example.org")).found)
        self.clock.advance(99)
        self.assertTrue(self.successResultOf(cache.lookup("short@example.org")).cached)
        self.clock.advance(1)
        self.assertFalse(self.successResultOf(cache.lookup("short@example.org")).cached)

    def test_coalescing_1000_lookups_of_10_addresses_make_10_queries(self) -> None:
        self.ldap.hold = True
        addresses = [f"user{i}@partner.example" for i in range(10)]
        for address in addresses[:5]:
            self.ldap.add(address, CA.user(address, key_index=20).certificate)
        pending = [self.cache.lookup(addresses[i % 10].upper() if i % 3 else addresses[i % 10]) for i in range(1000)]
        self.assertEqual(self.ldap.total_queries, 10)
        self.assertEqual(self.ring.total_queries, 10)
        self.assertEqual(self.cache.stats.coalesced, 990)
        for query in pending:
            self.assertNoResult(query)
        self.clock.advance(1)
        self.assertEqual(self.ldap.release(), 10)
        results = [self.successResultOf(query) for query in pending]
        self.assertEqual(len(results), 1000)
        self.assertEqual(sum(1 for r in results if r.found), 500)
        self.assertEqual(len(self.cache), 10)
        self.lookup(addresses[3])
        self.assertEqual(self.ldap.total_queries, 10)

    def test_one_caller_cancelling_does_not_cancel_the_others(self) -> None:
        self.ldap.hold = True
        first = self.cache.lookup("x@example.org")
        second = self.cache.lookup("x@example.org")
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.ldap.release()
        self.assertFalse(self.successResultOf(second).found)
        self.assertEqual(self.ldap.total_queries, 1)

    def test_flush_one_and_all(self) -> None:
        self.lookup("bob@example.org")
        self.lookup("nobody@example.org")
        self.assertEqual(self.cache.flush("Bob@Example.org"), 1)
        self.assertEqual(self.cache.flush("bob@example.org"), 0)
        self.assertFalse(self.lookup("bob@example.org").cached)
        self.assertTrue(self.lookup("nobody@example.org").cached)
        self.assertEqual(self.cache.flush(), 2)
        self.assertEqual(len(self.cache), 0)
        self.assertFalse(self.lookup("nobody@example.org").cached)

    def test_flush_during_a_query_keeps_its_answer_out_of_the_cache(self) -> None:
        self.ldap.hold = True
        pending = self.cache.lookup("x@example.org")
        self.cache.flush()
        self.ldap.release()
        self.successResultOf(pending)
        self.assertEqual(len(self.cache), 0)

    def test_failure_reaches_every_waiter(self) -> None:
        class Failing:
            def lookup(self, address: str) -> Deferred[LookupResult]:
                self.pending: Deferred[LookupResult] = Deferred()
                return self.pending

        failing = Failing()
        cache = CachingDirectory(failing, clock=self.clock)
        waiters = [cache.lookup("a@example.org") for _ in range(3)]
        failing.pending.errback(SourceUnavailable("x"))
        for waiter in waiters:
            self.failureResultOf(waiter, SourceUnavailable)
        self.assertEqual(len(cache), 0)

    def test_invalid_address_fails_at_once(self) -> None:
        self.failureResultOf(self.cache.lookup("bad"), InvalidAddress)

    def test_bounded_size_evicts_oldest(self) -> None:
        cache = CachingDirectory(self.keys, clock=self.clock, max_entries=3)
        for i in range(5):
            self.successResultOf(cache.lookup(f"u{i}@example.org"))
        self.assertEqual([key for key, _ in cache.entries()], ["u2@example.org", "u3@example.org", "u4@example.org"])

    def test_status_enum_of_the_fake_matches_trust_names(self) -> None:
        self.assertEqual({s.name for s in FakeStatus}, {"VALID", "UNTRUSTED", "EXPIRED", "MISMATCH", "WEAK"})


class FakeKeySourceTests(SynchronousTestCase):
    """The fake's own behaviour, which the tests above rely on."""

    def test_answers_holds_and_fails(self) -> None:
        source = FakeKeySource("s", {"A@example.org": [OLD.certificate]}, dane_ee=[OLD.certificate])
        answer = self.successResultOf(source.find_detailed("a@EXAMPLE.org"))
        self.assertEqual(answer.candidates, (Candidate(OLD.certificate, True),))
        source.hold = True
        held = source.find("a@example.org")
        self.assertNoResult(held)
        source.release()
        self.assertEqual(self.successResultOf(held), [OLD.certificate])
        source.down = True
        self.failureResultOf(source.find("a@example.org"), SourceUnavailable)
        self.assertEqual(source.total_queries, 3)

    def test_validator_statuses(self) -> None:
        validator = FakeValidator([CA.certificate])
        self.assertTrue(validator.validate(OLD.certificate, purpose="encrypt", address="bob@example.org").ok)
        self.assertEqual(validator.validate(EXPIRED.certificate, purpose="encrypt").status, FakeStatus.EXPIRED)
        self.assertEqual(validator.validate(UNTRUSTED.certificate, purpose="encrypt").status, FakeStatus.UNTRUSTED)
        mismatch = validator.validate(OLD.certificate, purpose="encrypt", address="eve@example.org")
        self.assertEqual(mismatch.status, FakeStatus.MISMATCH)

    def test_source_answer_defaults(self) -> None:
        self.assertEqual(SourceAnswer(), SourceAnswer((), ""))
        self.failureResultOf(fail(SourceBackedOff("x", 1.0)), SourceUnavailable)

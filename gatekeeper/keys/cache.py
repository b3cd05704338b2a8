"""Wrappers around certificate discovery: per-source time-outs and back-off, and the lookup cache.

- :class:`SourceGuard` wraps one key source: an answer must come within the time-out,
  and a source that failed is not asked again until its back-off (doubling up to a
  maximum) has passed; meanwhile it fails at once with
  :class:`~gatekeeper.keys.directory.SourceBackedOff`, so the directory records it as
  backed off and the result as incomplete.
- :class:`CachingDirectory` wraps a :class:`~gatekeeper.keys.directory.KeyDirectory`:
  results are kept for a positive TTL (never past the chosen certificate's expiry), a
  shorter negative TTL, and a shorter still TTL for incomplete answers; concurrent
  lookups of one address share one query; the admin can flush one address or all.

Both take the clock (``IReactorTime``) so that tests drive time with ``Clock``.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeeper.address import address_key, normalize_address
from gatekeeper.errors import GatekeeperError, SourceUnavailable
from gatekeeper.interfaces import IKeySource
from gatekeeper.keys.directory import LookupResult, SourceAnswer, SourceBackedOff, ask_source

log = Logger()


# -- one source: time-out and back-off ----------------------------------------------------


@implementer(IKeySource)
class SourceGuard:
    """A key source with a time-out per query and back-off after failures.

    After ``n`` consecutive failures the source is skipped for
    ``min(backoff * 2 ** (n - 1), backoff_max)`` seconds. Failures of queries that
    were already running when an earlier failure was counted do not count again, so a
    burst of concurrent time-outs is one failure, not a hundred.
    """

    def __init__(
        self,
        source: IKeySource,
        *,
        clock: IReactorTime,
        timeout: float = 5.0,
        backoff: float = 5.0,
        backoff_max: float = 300.0,
    ) -> None:
        self.source = source
        self.name: str = str(source.name)
        self.domains: tuple[str, ...] = tuple(getattr(source, "domains", ()) or ())
        self.clock = clock
        self.timeout = timeout
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.failures = 0
        self.retry_at = 0.0
        self.last_error = ""
        self._epoch = 0

    @property
    def backed_off(self) -> bool:
        """True while the source is being skipped."""
        return self.clock.seconds() < self.retry_at

    def reset(self) -> None:
        """Forget past failures (admin: "the directory is back, ask it now")."""
        self.failures, self.retry_at, self.last_error = 0, 0.0, ""
        self._epoch += 1

    def find(self, address: str) -> Deferred[list[x509.Certificate]]:
        """Like the wrapped source's ``find``, bounded in time and skipped while backed off."""
        return self.find_detailed(address).addCallback(lambda answer: [c.certificate for c in answer.candidates])

    def find_detailed(self, address: str) -> Deferred[SourceAnswer]:
        """Ask the wrapped source (detailed answer), bounded in time and skipped while backed off."""
        now = self.clock.seconds()
        if now < self.retry_at:
            return fail(SourceBackedOff(self.name, self.retry_at - now))
        epoch = self._epoch
        query = Deferred.fromCoroutine(ask_source(self.source, address))
        query.addTimeout(self.timeout, self.clock)
        return query.addCallbacks(self._succeeded, self._failed, errbackArgs=(epoch,))

    def _succeeded(self, answer: SourceAnswer) -> SourceAnswer:
        if self.failures:
            log.info("key source {source} answers again", source=self.name)
        self.failures, self.retry_at, self.last_error = 0, 0.0, ""
        return answer

    def _failed(self, reason: Failure, epoch: int) -> Failure:
        if reason.check(TimeoutError, CancelledError):
            reason = Failure(SourceUnavailable(f"{self.name}: no answer within {self.timeout:g} s"))
        elif not reason.check(SourceUnavailable):
            # Anything else is a bug; it is logged in full and reported as an outage of this source.
            log.failure("key source {source} failed unexpectedly", reason, source=self.name)
            reason = Failure(SourceUnavailable(f"{self.name}: internal error (see log)"))
        if epoch == self._epoch:
            self._epoch += 1
            self.failures += 1
            delay = min(self.backoff * 2 ** (self.failures - 1), self.backoff_max)
            self.retry_at = self.clock.seconds() + delay
            self.last_error = reason.getErrorMessage()
            log.warn(
                "key source {source} failed ({reason}); skipped for {delay:g} s",
                source=self.name,
                reason=self.last_error,
                delay=delay,
            )
        return reason


# -- the cache ----------------------------------------------------------------------------


@attrs.define
class CacheStats:
    """Counters for the admin console and the benchmark."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    flushed: int = 0


@attrs.frozen
class CacheEntry:
    """A cached answer and when it expires (clock seconds)."""

    result: LookupResult
    expires: float


class _Pending:
    """One query in flight and the callers waiting for it."""

    def __init__(self) -> None:
        self.waiters: list[Deferred[LookupResult]] = []
        self.store = True


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class CachingDirectory:
    """A lookup cache in front of a directory (anything with ``lookup(address) -> Deferred``).

    ``positive_ttl`` applies when a certificate was found (capped at the certificate's
    expiry), ``negative_ttl`` when none was, ``incomplete_ttl`` when a source could not
    be asked (whatever was found: the better source may be back soon). At most
    ``max_entries`` answers are kept; the oldest go first.
    """

    def __init__(
        self,
        directory: Any,
        *,
        clock: IReactorTime,
        positive_ttl: float = 3600.0,
        negative_ttl: float = 300.0,
        incomplete_ttl: float = 30.0,
        max_entries: int = 100_000,
        wall_clock: Callable[[], datetime.datetime] = _now,
    ) -> None:
        self.directory = directory
        self.clock = clock
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.incomplete_ttl = incomplete_ttl
        self.max_entries = max_entries
        self.wall_clock = wall_clock
        self.stats = CacheStats()
        self._entries: dict[str, CacheEntry] = {}
        self._pending: dict[str, _Pending] = {}

    def lookup(self, address: str) -> Deferred[LookupResult]:
        """Return the cached answer for ``address``, or join (or start) the query for it."""
        try:
            key = address_key(normalize_address(address))
        except GatekeeperError as error:
            return fail(error)
        entry = self._entries.get(key)
        if entry is not None:
            if self.clock.seconds() < entry.expires:
                self.stats.hits += 1
                return succeed(attrs.evolve(entry.result, cached=True))
            del self._entries[key]
        waiter: Deferred[LookupResult] = Deferred(self._cancel_waiter)
        pending = self._pending.get(key)
        if pending is not None:
            self.stats.coalesced += 1
            pending.waiters.append(waiter)
            return waiter
        self.stats.misses += 1
        pending = self._pending[key] = _Pending()
        pending.waiters.append(waiter)
        query: Deferred[LookupResult] = self.directory.lookup(address)
        query.addBoth(self._finished, key, pending)
        return waiter

    def flush(self, address: str | None = None) -> int:
        """Forget the answer for ``address`` (normalised), or every answer; return how many.

        Queries already running are not cached when they finish.
        """
        if address is None:
            count = len(self._entries)
            self._entries.clear()
            for pending in self._pending.values():
                pending.store = False
        else:
            key = address_key(normalize_address(address))
            count = 1 if self._entries.pop(key, None) is not None else 0
            if key in self._pending:
                self._pending[key].store = False
        self.stats.flushed += count
        return count

    def entries(self) -> list[tuple[str, CacheEntry]]:
        """The unexpired cached answers (address key, entry), for the admin console."""
        now = self.clock.seconds()
        return [(key, entry) for key, entry in self._entries.items() if entry.expires > now]

    def __len__(self) -> int:
        return len(self._entries)

    def _cancel_waiter(self, waiter: Deferred[LookupResult]) -> None:
        # One caller giving up must not cancel the query the others share.
        for pending in self._pending.values():
            if waiter in pending.waiters:
                pending.waiters.remove(waiter)
                return

    def _ttl(self, result: LookupResult) -> float:
        if result.incomplete:
            ttl = self.incomplete_ttl
        elif result.found:
            ttl = self.positive_ttl
        else:
            ttl = self.negative_ttl
        certificate = result.certificate
        if certificate is not None:
            remaining = (certificate.not_valid_after_utc - self.wall_clock()).total_seconds()
            ttl = min(ttl, max(0.0, remaining))
        return ttl

    def _finished(self, outcome: LookupResult | Failure, key: str, pending: _Pending) -> None:
        if self._pending.get(key) is pending:
            del self._pending[key]
        if isinstance(outcome, LookupResult):
            ttl = self._ttl(outcome)
            if pending.store and ttl > 0:
                self._entries.pop(key, None)
                self._entries[key] = CacheEntry(outcome, self.clock.seconds() + ttl)
                self._evict()
        for waiter in pending.waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    def _evict(self) -> None:
        if len(self._entries) <= self.max_entries:
            return
        now = self.clock.seconds()
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            del self._entries[key]
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]

"""Certificate lookups against a real slapd: cold and cached, next to a bare ldap3 search.

Run: ``.venv/bin/python bench/lookup.py`` (a few seconds). It starts its own slapd
(tests/fixtures/slapd.py) with ``PEOPLE`` entries, each holding one certificate, and
measures in the same run:

- **bare**: one ldap3 search (bound connection over ldaps, reused; same filter and
  attributes), called directly: the floor any LDAP lookup pays;
- **cold**: the gateway's whole path with an empty cache: cache -> directory -> key
  ring (empty) -> guard -> LDAP source in a thread pool -> certificate parsing -> trust
  validation (the real validator) -> result, on a reactor;
- **cached**: the same lookup answered from the cache.

Latency is measured one lookup at a time (p50/p99), throughput with ``CONCURRENCY``
lookups in flight. The last lines are the targets, one per line:
``ratio NAME = VALUE (target OP VALUE)``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldap3 import SUBTREE
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.epollreactor import EPollReactor
from twisted.python.threadpool import ThreadPool

from gatekeeper.keys.cache import CachingDirectory, SourceGuard
from gatekeeper.keys.directory import KeyDirectory, LookupResult
from gatekeeper.keys.keyring import KeyRing, KeyRingSource
from gatekeeper.keys.ldap import LdapConnector, LdapSource, read_bind_password, search_filter
from gatekeeper.testing.pki import TestPKI
from gatekeeper.trust import TrustValidator
from tests.fixtures.slapd import Slapd

PEOPLE = 200
ROUNDS = 5
CACHED_CALLS = 20_000
CONCURRENCY = 50
THREADS = 4
CACHED_P99_TARGET_MS = 1.0
COLD_OVERHEAD_TARGET_MS = 2.0


def percentile(samples: list[float], fraction: float) -> float:
    """The sample at ``fraction`` (0..1) of the sorted list, in milliseconds."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


def report(name: str, samples: list[float], per_second: float | None = None) -> None:
    rate = f"{per_second:10.0f}" if per_second is not None else f"{1 / statistics.mean(samples):10.0f}"
    print(
        f"{name:<28} {len(samples):>7} {rate} {percentile(samples, 0.5):9.3f} {percentile(samples, 0.99):9.3f}"
        f" {max(samples) * 1000:9.3f}"
    )


def main() -> None:
    ca = TestPKI("Bench Lookup CA")
    addresses = [f"user{i:04d}@example.org" for i in range(PEOPLE)]
    slapd = Slapd()
    pool = ThreadPool(minthreads=THREADS, maxthreads=THREADS, name="bench-ldap")
    try:
        slapd.start()
        ldif = "\n".join(
            slapd.person_ldif(a.partition("@")[0], a, certificates=[ca.user(a, key_index=1).certificate])
            for a in addresses
        )
        slapd.add_ldif(ldif)
        config = slapd.config()
        password = read_bind_password(config)
        reactor = EPollReactor()
        pool.start()
        results: dict[str, Any] = {}

        async def run() -> None:
            results.update(await measure(reactor, pool, config, password, ca, addresses, Path(slapd.dir)))

        def start() -> None:
            done = Deferred.fromCoroutine(run())
            done.addErrback(lambda failure: results.setdefault("error", failure))
            done.addBoth(lambda _: reactor.stop())

        reactor.callWhenRunning(start)
        reactor.run(installSignalHandlers=False)
        if "error" in results:
            results["error"].raiseException()
    finally:
        pool.stop()
        slapd.close()

    bare, cold, cached = results["bare"], results["cold"], results["cached"]
    print(f"{'':<28} {'samples':>7} {'lookups/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    report("bare ldap3 search", bare)
    report("cold lookup (sequential)", cold)
    report("cached lookup (sequential)", cached)
    print(f"{'cold lookup, concurrent':<28} {PEOPLE:>7} {results['cold_rate']:10.0f}")
    print(f"{'cached lookup, concurrent':<28} {PEOPLE:>7} {results['cached_rate']:10.0f}")
    overhead_p50 = percentile(cold, 0.5) - percentile(bare, 0.5)
    overhead_p99 = percentile(cold, 0.99) - percentile(bare, 0.99)
    print(f"cold lookup adds {overhead_p50:.3f} ms at p50 and {overhead_p99:.3f} ms at p99 over the bare search")
    print(f"ratio cached_lookup_p99_ms = {percentile(cached, 0.99):.4f} (target <= {CACHED_P99_TARGET_MS:g})")
    print(f"ratio cold_lookup_overhead_ms = {overhead_p50:.3f} (target <= {COLD_OVERHEAD_TARGET_MS:g})")


async def measure(
    reactor: Any,
    pool: ThreadPool,
    config: Any,
    password: str | None,
    ca: TestPKI,
    addresses: list[str],
    scratch: Path,
) -> dict[str, Any]:
    """Every measurement, inside the running reactor (bare searches block it on purpose)."""
    connector = LdapConnector(config, password)
    connection = connector.connect()
    attributes = list(config.attributes)

    def bare_search(address: str) -> None:
        connection.search(config.base_dn, search_filter(config.filter, address), SUBTREE, attributes=attributes)
        assert connection.response and connection.response[0]["raw_attributes"]

    source = LdapSource(config, reactor=reactor, threadpool=pool, password=password)
    guard = SourceGuard(source, clock=reactor, timeout=5.0)
    keyring = KeyRingSource(KeyRing(scratch / "bench-keyring"))
    directory = KeyDirectory([keyring, guard], TrustValidator([ca.certificate]), clock=reactor)
    cache = CachingDirectory(directory, clock=reactor)

    async def timed(call: Callable[[], Awaitable[LookupResult]]) -> float:
        start = time.perf_counter()
        result = await call()
        elapsed = time.perf_counter() - start
        assert result.found, result
        return elapsed

    # Warm-up: connections opened, code paths imported and cached.
    for address in addresses[:20]:
        bare_search(address)
        cache.flush()
        await cache.lookup(address)

    bare: list[float] = []
    cold: list[float] = []
    for _ in range(ROUNDS):
        for address in addresses:
            start = time.perf_counter()
            bare_search(address)
            bare.append(time.perf_counter() - start)
        for address in addresses:
            cache.flush(address)
            cold.append(await timed(lambda address=address: cache.lookup(address)))  # type: ignore[misc]

    for address in addresses:
        await cache.lookup(address)
    cached: list[float] = []
    for index in range(CACHED_CALLS):
        address = addresses[index % len(addresses)]
        start = time.perf_counter()
        answer = cache.lookup(address)
        cached.append(time.perf_counter() - start)
        assert answer.called

    cache.flush()
    start = time.perf_counter()
    for chunk in range(0, len(addresses), CONCURRENCY):
        await gatherResults([cache.lookup(a) for a in addresses[chunk : chunk + CONCURRENCY]])
    cold_rate = len(addresses) / (time.perf_counter() - start)
    start = time.perf_counter()
    await gatherResults([cache.lookup(a) for a in addresses])
    cached_rate = len(addresses) / (time.perf_counter() - start)

    source.close()
    connection.unbind()
    return {"bare": bare, "cold": cold, "cached": cached, "cold_rate": cold_rate, "cached_rate": cached_rate}


if __name__ == "__main__":
    main()

"""Prometheus metrics: counters from the structured events, gauges read from the running gateway.

:class:`GatewayMetrics` keeps its own ``prometheus_client`` registry (never the global
one, so two gateways in one process do not collide) and is a ``twisted.logger``
observer: every event of :mod:`gatekeeper.events` moves a counter or a histogram, so
the code that emits events knows nothing about metrics. At each scrape a collector
reads the live state: sessions per protocol, the worker-pool queue, the cache sizes
and the lookup cache's hits and misses.

=========================================================  =====================================
metric                                                     from
=========================================================  =====================================
``gatekeeper_logins_total{protocol,outcome}``              ``login`` events
``gatekeeper_sessions_opened_total{protocol}``             ``session`` events (action open)
``gatekeeper_relays_total{outcome}``                       ``relay`` events
``gatekeeper_relay_recipients_total{outcome}``             ``relay`` events (``recipients``)
``gatekeeper_reveals_total{decrypted,signature}``          ``reveal`` events
``gatekeeper_reveal_seconds``                              ``reveal`` events (``seconds``)
``gatekeeper_lookups_total{source,outcome}``               ``lookup`` events
``gatekeeper_lookup_seconds{source}``                      ``lookup`` events (``seconds``)
``gatekeeper_upstream_total{protocol,outcome}``            ``upstream`` events (errors: not ok)
``gatekeeper_key_uses_total{operation}``                   ``key_use`` events
``gatekeeper_admin_operations_total{operation}``           ``admin`` events
``gatekeeper_sessions{protocol}``                          the session registry, at scrape
``gatekeeper_worker_queue{pool}``                          ``WorkerPool.pending``, at scrape
``gatekeeper_unlock_cache_entries``                        the unlocked-key cache, at scrape
``gatekeeper_lookup_cache_entries``                        the lookup cache, at scrape
``gatekeeper_lookup_cache_{hits,misses}_total``            the lookup cache's counters
``gatekeeper_lookup_cache_hit_ratio``                      hits / (hits + misses)
=========================================================  =====================================

:class:`MetricsPage` serves the text format from a ``twisted.web`` resource on the
reactor thread (rendering is a few hundred lines; ``prometheus_client.twisted``'s
resource would need the global reactor and a thread per scrape).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from twisted.application.service import Service
from twisted.logger import ILogObserver, LogPublisher, globalLogPublisher
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

__all__ = ["LATENCY_BUCKETS", "GatewayMetrics", "MetricsPage", "MetricsService", "metrics_site"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_LABEL = 64


def _label(value: Any) -> str:
    """A label value from an event field: a short string (the vocabulary is small and fixed)."""
    if value is None:
        return "unknown"
    return str(value)[:MAX_LABEL]


def _seconds(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


@implementer(ILogObserver)
class GatewayMetrics:
    """The gateway's metrics: call it with log events; scrape :attr:`registry`.

    ``parts`` is the gateway's :class:`~gatekeeper.tap.Parts` (anything with
    ``sessions``, ``message_workers``, ``unlock_cache`` and ``key_manager``), read at
    scrape time; None leaves out the gauges (for tests of the counters alone).
    """

    def __init__(self, parts: Any = None) -> None:
        self.parts = parts
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.logins = Counter(
            "gatekeeper_logins", "Logins by protocol and outcome", ["protocol", "outcome"], registry=registry
        )
        self.sessions_opened = Counter(
            "gatekeeper_sessions_opened", "Sessions opened, by protocol", ["protocol"], registry=registry
        )
        self.relays = Counter("gatekeeper_relays", "Messages relayed, by outcome", ["outcome"], registry=registry)
        self.relay_recipients = Counter(
            "gatekeeper_relay_recipients", "Recipients of relayed messages, by outcome", ["outcome"], registry=registry
        )
        self.reveals = Counter(
            "gatekeeper_reveals",
            "Messages revealed (decrypted/verified), by outcome",
            ["decrypted", "signature"],
            registry=registry,
        )
        self.reveal_seconds = Histogram(
            "gatekeeper_reveal_seconds", "Time to reveal a message", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.lookups = Counter(
            "gatekeeper_lookups", "Certificate lookups, by source and outcome", ["source", "outcome"], registry=registry
        )
        self.lookup_seconds = Histogram(
            "gatekeeper_lookup_seconds",
            "Certificate lookup latency, by source",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream = Counter(
            "gatekeeper_upstream",
            "Upstream connection events by protocol and outcome (errors: outcome other than ok)",
            ["protocol", "outcome"],
            registry=registry,
        )
        self.key_uses = Counter(
            "gatekeeper_key_uses", "Uses of users' private keys, by operation", ["operation"], registry=registry
        )
        self.admin_operations = Counter(
            "gatekeeper_admin_operations", "Administrative changes, by operation", ["operation"], registry=registry
        )
        if parts is not None:
            registry.register(_LiveCollector(parts))

    def __call__(self, event: Mapping[str, Any]) -> None:
        """Count one log event (events without ``gk_event`` are ignored)."""
        kind = event.get("gk_event")
        if kind is None:
            return
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(event)

    def _on_login(self, event: Mapping[str, Any]) -> None:
        self.logins.labels(_label(event.get("protocol")), _label(event.get("outcome"))).inc()

    def _on_session(self, event: Mapping[str, Any]) -> None:
        if event.get("action") == "open":
            self.sessions_opened.labels(_label(event.get("protocol"))).inc()

    def _on_relay(self, event: Mapping[str, Any]) -> None:
        outcome = _label(event.get("outcome"))
        self.relays.labels(outcome).inc()
        recipients = event.get("recipients")
        if isinstance(recipients, int) and not isinstance(recipients, bool) and recipients > 0:
            self.relay_recipients.labels(outcome).inc(recipients)
        elif isinstance(recipients, list | tuple):
            self.relay_recipients.labels(outcome).inc(len(recipients))

    def _on_reveal(self, event: Mapping[str, Any]) -> None:
        self.reveals.labels(_label(event.get("decrypted")), _label(event.get("signature"))).inc()
        seconds = _seconds(event.get("seconds"))
        if seconds is not None:
            self.reveal_seconds.observe(seconds)

    def _on_lookup(self, event: Mapping[str, Any]) -> None:
        source = _label(event.get("source"))
        self.lookups.labels(source, _label(event.get("outcome"))).inc()
        seconds = _seconds(event.get("seconds"))
        if seconds is not None:
            self.lookup_seconds.labels(source).observe(seconds)

    def _on_upstream(self, event: Mapping[str, Any]) -> None:
        self.upstream.labels(_label(event.get("protocol")), _label(event.get("outcome"))).inc()

    def _on_key_use(self, event: Mapping[str, Any]) -> None:
        self.key_uses.labels(_label(event.get("operation"))).inc()

    def _on_admin(self, event: Mapping[str, Any]) -> None:
        self.admin_operations.labels(_label(event.get("operation"))).inc()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header: (body, content type)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _LiveCollector:
    """Gauges read from the running gateway at each scrape."""

    def __init__(self, parts: Any) -> None:
        self.parts = parts

    def describe(self) -> list[Metric]:
        """Nothing to describe ahead of time (the metrics are made at collection)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Read sessions, queues and caches now."""
        parts = self.parts
        sessions = GaugeMetricFamily("gatekeeper_sessions", "Live sessions, by protocol", labels=["protocol"])
        by_protocol = Tally(_label(session.protocol) for session in parts.sessions.sessions())
        for protocol in sorted(set(by_protocol) | {"smtp", "pop3", "imap"}):
            sessions.add_metric([protocol], by_protocol.get(protocol, 0))
        yield sessions
        queue = GaugeMetricFamily("gatekeeper_worker_queue", "Jobs waiting for or in a worker", labels=["pool"])
        queue.add_metric(["message"], parts.message_workers.pending)
        yield queue
        yield GaugeMetricFamily(
            "gatekeeper_unlock_cache_entries", "Users whose unlocked keys are cached", value=len(parts.unlock_cache)
        )
        cache = parts.key_manager.cache
        yield GaugeMetricFamily("gatekeeper_lookup_cache_entries", "Cached lookup answers", value=len(cache))
        stats = cache.stats
        yield CounterMetricFamily("gatekeeper_lookup_cache_hits", "Lookups answered from the cache", value=stats.hits)
        yield CounterMetricFamily(
            "gatekeeper_lookup_cache_misses", "Lookups that asked the sources", value=stats.misses
        )
        asked = stats.hits + stats.misses
        yield GaugeMetricFamily(
            "gatekeeper_lookup_cache_hit_ratio",
            "Share of lookups answered from the cache (since start)",
            value=stats.hits / asked if asked else 0.0,
        )


class MetricsPage(Resource):
    """``/metrics`` in the Prometheus text format (or OpenMetrics when asked for)."""

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        """Render the registry now."""
        accept = request.getHeader("accept") or ""
        body, content_type = self.metrics.render(accept)
        request.setHeader("content-type", content_type)
        return body


class _QuietSite(Site):
    """A site without an access log: a scrape every few seconds is not news."""

    displayTracebacks = False
    noisy = False

    def log(self, request: http.Request) -> None:
        """Log nothing."""


def metrics_site(metrics: GatewayMetrics) -> Site:
    """A ``twisted.web`` site serving the metrics at ``/metrics`` (404 elsewhere)."""
    root = Resource()
    root.putChild(b"metrics", MetricsPage(metrics))
    return _QuietSite(root)


class MetricsService(Service):
    """Feeds the global log events to the metrics while the gateway runs."""

    def __init__(self, metrics: GatewayMetrics, publisher: LogPublisher = globalLogPublisher) -> None:
        self.metrics = metrics
        self.publisher = publisher
        self._observing = False

    def startService(self) -> None:
        """Start counting."""
        super().startService()
        if not self._observing:
            self._observing = True
            self.publisher.addObserver(self.metrics)

    def stopService(self) -> None:
        """Stop counting."""
        super().stopService()
        if self._observing:
            self._observing = False
            self.publisher.removeObserver(self.metrics)

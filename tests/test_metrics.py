"""Prometheus metrics: counters from structured events, gauges from the gateway, the HTTP endpoint."""

from __future__ import annotations

import contextlib
import functools
import smtplib
import socket
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogPublisher, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from gatekeeper.auth import ConnectionInfo, SessionRegistry, UnlockCache
from gatekeeper.events import emit
from gatekeeper.keys.cache import CachingDirectory
from gatekeeper.keys.directory import LookupResult
from gatekeeper.metrics import GatewayMetrics, MetricsPage, MetricsService
from gatekeeper.tap import ListenerService
from gatekeeper.testing.gateway import GatewayHarness
from gatekeeper.testing.login import make_identity
from gatekeeper.workers import InlineWorkerPool

METRICS_PASSWORD = "metrics test password"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class CounterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = GatewayMetrics()
        self.publisher = LogPublisher()
        self.service = MetricsService(self.metrics, publisher=self.publisher)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.log = Logger(observer=self.publisher)

    def value(self, name: str, **labels: str) -> float:
        found = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def test_every_event_of_the_vocabulary_moves_its_metric(self) -> None:
        log = self.log
        emit(log, "login", "x", outcome="ok", protocol="smtp", user="a@x.org", client="c")
        emit(log, "login", "x", outcome="failed", protocol="imap", user="a@x.org", client="c")
        emit(log, "login", "x", outcome="throttled", protocol="imap", user="a@x.org", client="c")
        emit(log, "session", "x", action="open", protocol="pop3", user="a@x.org", client="c", session=1)
        emit(log, "session", "x", action="close", protocol="pop3", user="a@x.org", client="c", session=1)
        emit(log, "relay", "x", outcome="encrypted", recipients=3, user="a@x.org", session=1, message_id="<m>")
        emit(log, "relay", "x", outcome="signed_only", recipients=["b@y.org"], user="a@x.org", session=1)
        emit(log, "relay", "x", outcome="temp_failed", recipients=1, user="a@x.org", session=1)
        emit(log, "reveal", "x", decrypted="yes", signature="valid", user="a@x.org", protocol="imap", seconds=0.02)
        emit(log, "reveal", "x", decrypted="failed", signature="none", user="a@x.org", protocol="pop3", seconds=0.3)
        emit(log, "lookup", "x", source="ldap", outcome="found", seconds=0.004)
        emit(log, "lookup", "x", source="ldap", outcome="unavailable", seconds=5.0)
        emit(log, "lookup", "x", source="keyring", outcome="cached", seconds=0)
        emit(log, "upstream", "x", protocol="smtp", outcome="error", detail="refused", level="warn")
        emit(log, "upstream", "x", protocol="imap", outcome="ok", detail="")
        emit(log, "key_use", "x", operation="sign", user="a@x.org", session=1, message_id="<m>", peer="c")
        emit(log, "admin", "x", operation="rotate", target="a@x.org", actor="me", via="cli")
        log.info("not an event {x}", x=1)
        value = self.value
        self.assertEqual(value("gatekeeper_logins_total", protocol="smtp", outcome="ok"), 1)
        self.assertEqual(value("gatekeeper_logins_total", protocol="imap", outcome="failed"), 1)
        self.assertEqual(value("gatekeeper_logins_total", protocol="imap", outcome="throttled"), 1)
        self.assertEqual(value("gatekeeper_sessions_opened_total", protocol="pop3"), 1)
        self.assertEqual(value("gatekeeper_relays_total", outcome="encrypted"), 1)
        self.assertEqual(value("gatekeeper_relay_recipients_total", outcome="encrypted"), 3)
        self.assertEqual(value("gatekeeper_relay_recipients_total", outcome="signed_only"), 1)
        self.assertEqual(value("gatekeeper_relays_total", outcome="temp_failed"), 1)
        self.assertEqual(value("gatekeeper_reveals_total", decrypted="yes", signature="valid"), 1)
        self.assertEqual(value("gatekeeper_reveals_total", decrypted="failed", signature="none"), 1)
        self.assertEqual(value("gatekeeper_reveal_seconds_count"), 2)
        self.assertAlmostEqual(value("gatekeeper_reveal_seconds_sum"), 0.32)
        self.assertEqual(value("gatekeeper_reveal_seconds_bucket", le="0.025"), 1)
        self.assertEqual(value("gatekeeper_lookups_total", source="ldap", outcome="found"), 1)
        self.assertEqual(value("gatekeeper_lookups_total", source="ldap", outcome="unavailable"), 1)
        self.assertEqual(value("gatekeeper_lookups_total", source="keyring", outcome="cached"), 1)
        self.assertEqual(value("gatekeeper_lookup_seconds_count", source="ldap"), 2)
        self.assertEqual(value("gatekeeper_lookup_seconds_bucket", source="ldap", le="0.005"), 1)
        self.assertEqual(value("gatekeeper_lookup_seconds_bucket", source="ldap", le="+Inf"), 2)
        self.assertEqual(value("gatekeeper_upstream_total", protocol="smtp", outcome="error"), 1)
        self.assertEqual(value("gatekeeper_upstream_total", protocol="imap", outcome="ok"), 1)
        self.assertEqual(value("gatekeeper_key_uses_total", operation="sign"), 1)
        self.assertEqual(value("gatekeeper_admin_operations_total", operation="rotate"), 1)

    def test_odd_field_values_do_not_break_counting(self) -> None:
        emit(self.log, "lookup", "x", source=None, outcome="found", seconds="soon")
        emit(self.log, "relay", "x", outcome="encrypted", recipients=True)
        emit(self.log, "login", "x", outcome="ok", protocol="p" * 500, user="u", client="c")
        self.assertEqual(self.value("gatekeeper_lookups_total", source="unknown", outcome="found"), 1)
        self.assertEqual(self.value("gatekeeper_lookup_seconds_count", source="unknown"), 0)
        self.assertEqual(self.value("gatekeeper_relay_recipients_total", outcome="encrypted"), 0)
        self.assertEqual(self.value("gatekeeper_logins_total", protocol="p" * 64, outcome="ok"), 1)

    def test_stopped_service_counts_nothing(self) -> None:
        self.service.stopService()
        emit(self.log, "login", "x", outcome="ok", protocol="smtp", user="a@x.org", client="c")
        self.assertEqual(self.value("gatekeeper_logins_total", protocol="smtp", outcome="ok"), 0)
        self.service.startService()


class _Directory:
    def lookup(self, address: str) -> Any:
        return succeed(LookupResult(address, (), (), None, (), (), False))


class GaugeTests(SynchronousTestCase):
    def setUp(self) -> None:
        clock = Clock()
        self.parts = types.SimpleNamespace(
            sessions=SessionRegistry(clock),
            message_workers=InlineWorkerPool(),
            unlock_cache=UnlockCache(clock, 300),
            key_manager=types.SimpleNamespace(cache=CachingDirectory(_Directory(), clock=clock)),
        )
        self.metrics = GatewayMetrics(self.parts)

    def test_live_state_is_read_at_each_scrape(self) -> None:
        parts = self.parts
        alice = make_identity("alice@example.org")
        parts.sessions.open(alice, ConnectionInfo("imap", "192.0.2.1"))
        parts.sessions.open(alice, ConnectionInfo("imap", "192.0.2.2"))
        parts.sessions.open(alice, ConnectionInfo("smtp", "192.0.2.1"))
        parts.unlock_cache.put("alice@example.org", "pw", alice)
        parts.message_workers.pending = 7
        cache = parts.key_manager.cache
        cache.lookup("bob@example.org")
        cache.lookup("bob@example.org")
        cache.lookup("carol@example.org")
        body, content_type = self.metrics.render()
        self.assertTrue(content_type.startswith("text/plain"))
        found = samples(body.decode())
        self.assertEqual(found[("gatekeeper_sessions", (("protocol", "imap"),))], 2)
        self.assertEqual(found[("gatekeeper_sessions", (("protocol", "smtp"),))], 1)
        self.assertEqual(found[("gatekeeper_sessions", (("protocol", "pop3"),))], 0)
        self.assertEqual(found[("gatekeeper_worker_queue", (("pool", "message"),))], 7)
        self.assertEqual(found[("gatekeeper_unlock_cache_entries", ())], 1)
        self.assertEqual(found[("gatekeeper_lookup_cache_entries", ())], 2)
        self.assertEqual(found[("gatekeeper_lookup_cache_hits_total", ())], 1)
        self.assertEqual(found[("gatekeeper_lookup_cache_misses_total", ())], 2)
        self.assertAlmostEqual(found[("gatekeeper_lookup_cache_hit_ratio", ())], 1 / 3)
        parts.unlock_cache.drop()
        self.assertEqual(samples(self.metrics.render()[0].decode())[("gatekeeper_unlock_cache_entries", ())], 0)

    def test_the_page_serves_text_or_openmetrics(self) -> None:
        page = MetricsPage(self.metrics)
        request = DummyRequest([b""])
        body = page.render_GET(request)  # type: ignore[arg-type]
        self.assertIn(b"gatekeeper_unlock_cache_entries 0.0", body)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        request = DummyRequest([b""])
        request.requestHeaders.addRawHeader(b"accept", b"application/openmetrics-text; version=1.0.0")
        body = page.render_GET(request)  # type: ignore[arg-type]
        self.assertTrue(body.endswith(b"# EOF\n"))


# -- scraped from the running gateway ---------------------------------------------------------


@functools.cache
def metrics_gateway() -> GatewayHarness:
    harness = GatewayHarness(
        Path("metrics-gateway").absolute(), extra_config='[admin]\nmetrics = "tcp:0"\n[login]\nfree_failures = 50\n'
    )
    harness.add_user("alice@example.org", METRICS_PASSWORD)
    return harness


def non_loopback_address() -> str | None:
    """This machine's address on the way out (no packet is sent), if it has one."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the route
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else str(address)


class ScrapeTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.harness = metrics_gateway()
        service = self.harness.start(reactor)
        self.addCleanup(self.harness.stop)
        listener = next(s for s in service if isinstance(s, ListenerService) and s.what == "metrics (HTTP)")
        assert listener.port is not None
        self.address = listener.port.getHost()

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.address.port}/metrics"  # type: ignore[attr-defined]
        with urllib.request.urlopen(url, timeout=30) as response:
            return samples(response.read().decode())

    def smtp_session(self) -> tuple[Any, Any]:
        """Log in over SMTP, scrape while the session is open, then quit."""
        port = self.harness.port("smtp", "tls")
        with smtplib.SMTP_SSL("127.0.0.1", port, context=self.harness.client_context(), timeout=30) as client:
            client.ehlo()
            client.login("alice@example.org", METRICS_PASSWORD)
            during = self.scrape()
            with contextlib.suppress(smtplib.SMTPAuthenticationError):
                client.login("alice@example.org", "not the password")  # refused: already authenticated
        return during, self.scrape()

    async def test_counters_move_during_an_smtp_session(self) -> None:
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        before = await deferToThread(self.scrape)
        during, _ = await deferToThread(self.smtp_session)
        ok = ("gatekeeper_logins_total", (("outcome", "ok"), ("protocol", "smtp")))
        opened = ("gatekeeper_sessions_opened_total", (("protocol", "smtp"),))
        unlock = ("gatekeeper_key_uses_total", (("operation", "unlock"),))
        live = ("gatekeeper_sessions", (("protocol", "smtp"),))
        self.assertEqual(during[ok] - before.get(ok, 0), 1)
        self.assertEqual(during[opened] - before.get(opened, 0), 1)
        self.assertEqual(during[unlock] - before.get(unlock, 0), 1)  # a new gateway: the KDF ran
        self.assertEqual(before[live], 0)
        self.assertEqual(during[live], 1)
        self.assertEqual(during[("gatekeeper_worker_queue", (("pool", "message"),))], 0)
        # The session is gone once the client has quit (the server notices at once, or nearly).
        for _ in range(100):
            after = await deferToThread(self.scrape)
            if after[live] == 0:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(after[live], 0)
        # Scrapes are not logged (no access log line every few seconds).
        self.assertFalse([e for e in logged if "/metrics" in formatEvent(e)])

    async def test_loopback_only_by_default(self) -> None:
        self.assertEqual(self.address.host, "127.0.0.1")  # type: ignore[attr-defined]
        outside = non_loopback_address()
        if outside is not None:
            url = f"http://{outside}:{self.address.port}/metrics"  # type: ignore[attr-defined]
            with self.assertRaises(urllib.error.URLError) as caught:
                await deferToThread(urllib.request.urlopen, url, timeout=10)
            self.assertIsInstance(caught.exception.reason, ConnectionRefusedError)
        # Only /metrics is served.
        url = f"http://127.0.0.1:{self.address.port}/"  # type: ignore[attr-defined]
        with self.assertRaises(urllib.error.HTTPError) as missing:
            await deferToThread(urllib.request.urlopen, url, timeout=10)
        self.assertEqual(missing.exception.code, 404)

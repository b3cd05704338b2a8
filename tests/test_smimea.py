"""SMIMEA (RFC 8162) tests: record parsing, and lookups against a Twisted Names server on loopback.

The server plays a validating resolver: it sets the AD bit on its answers or not, can
answer SERVFAIL (what a validating resolver says for bogus data), and can truncate UDP
answers to force the TCP retry.
"""

from __future__ import annotations

import datetime
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.names import dns, server
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gatekeeper.errors import SourceUnavailable
from gatekeeper.keys.directory import KeyDirectory, LookupResult, SourceState
from gatekeeper.keys.dns import SMIMEA, SmimeaSource, build_query, parse_records, smimea_name
from gatekeeper.testing.pki import TestPKI
from gatekeeper.trust import TrustValidator

NOW = datetime.datetime.now(datetime.UTC)
TRUSTED_CA = TestPKI("DNS Trusted CA", key_index=51)
OTHER_CA = TestPKI("DNS Unanchored CA", key_index=52)

PKIX = TRUSTED_CA.user("pkix@example.org", key_index=53)
PKIX_UNANCHORED = OTHER_CA.user("unanchored@example.org", key_index=54)
DANE = OTHER_CA.user("dane@example.org", key_index=55)
DANE_EXPIRED = OTHER_CA.user("old@example.org", not_before=NOW - datetime.timedelta(days=100), days=10, key_index=56)
LOWER = TRUSTED_CA.user("mixed@example.org", key_index=57)


def rdata(usage: int, certificate_der: bytes, selector: int = 0, matching: int = 0) -> bytes:
    return bytes([usage, selector, matching]) + certificate_der


class NamesTests(SynchronousTestCase):
    def test_owner_name_per_rfc(self) -> None:
        # RFC 7929/8162 example: SHA2-256 of "hugh", truncated to 28 octets.
        self.assertEqual(
            smimea_name("hugh@example.com"),
            "c93f1e400f26708f98cb19d936620da35eec8f72e57f9eec01c1afd6._smimecert.example.com",
        )
        self.assertNotEqual(smimea_name("Hugh@example.com"), smimea_name("hugh@example.com"))
        self.assertTrue(smimea_name("a@bücher.example").endswith("._smimecert.xn--bcher-kva.example"))

    def test_query_sets_ad_and_do(self) -> None:
        message = dns.Message()
        message.fromStr(build_query("x._smimecert.example.org", 1234).toStr())
        self.assertEqual((message.id, message.recDes, message.authenticData), (1234, 1, 1))
        self.assertEqual(message.queries[0].type, SMIMEA)
        (opt,) = message.additional
        self.assertEqual(opt.type, dns.OPT)
        edns = dns._EDNSMessage._fromMessage(message)
        self.assertEqual((edns.dnssecOK, edns.maxSize), (True, 4096))

    def test_parse_records_by_usage_selector_and_matching(self) -> None:
        answer = parse_records(
            [
                rdata(3, DANE.cert_der()),
                rdata(1, PKIX.cert_der()),
                rdata(0, TRUSTED_CA.certificate.public_bytes(dns_der())),
                rdata(2, TRUSTED_CA.certificate.public_bytes(dns_der())),
                rdata(3, b"\x01" * 32, selector=1, matching=1),
                rdata(9, PKIX.cert_der()),
                rdata(3, b"not a certificate"),
                b"\x03\x00",
            ]
        )
        self.assertEqual(
            [(c.certificate, c.dane_ee) for c in answer.candidates],
            [(DANE.certificate, True), (PKIX.certificate, False)],
        )
        self.assertEqual(
            answer.note,
            "DNSSEC-authenticated (DANE-EE, PKIX-EE); 2 trust-anchor record(s) (usage 0/2) ignored; "
            "1 record(s) hold only a key or hash, no certificate; 3 malformed record(s)",
        )


def dns_der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


class BogusData(Exception):
    """What a validating resolver meets when signatures do not verify (answered SERVFAIL)."""


class ZoneResolver:
    """An authority for the test zone: SMIMEA records by owner name, NXDOMAIN otherwise."""

    def __init__(self) -> None:
        self.records: dict[str, list[bytes]] = {}
        self.servfail = False

    def add(self, address: str, *rdatas: bytes) -> None:
        self.records.setdefault(smimea_name(address), []).extend(rdatas)

    def query(self, query: dns.Query, timeout: object = None) -> Deferred[Any]:
        if self.servfail:
            return fail(BogusData("validation failed"))
        name = query.name.name.decode("ascii")
        found = self.records.get(name.lower()) if query.type == SMIMEA else None
        if not found:
            return fail(dns.DomainError(query.name.name))
        answers = [
            dns.RRHeader(query.name.name, SMIMEA, dns.IN, 300, payload=dns.UnknownRecord(data), auth=True)
            for data in found
        ]
        return succeed((answers, [], []))


class ValidatingResolverFactory(server.DNSServerFactory):
    """Answers from the zone, setting AD as told; records what the queries asked for."""

    def __init__(self, zone: ZoneResolver) -> None:
        super().__init__(authorities=[zone])
        self.authenticated = True
        self.truncate_udp = False
        self.seen: list[tuple[str, bool, bool]] = []

    def handleQuery(self, message: Any, protocol: Any, address: Any) -> None:
        do_bit = any(rr.type == dns.OPT and rr.ttl & 0x8000 for rr in message.additional)
        self.seen.append(("udp" if address else "tcp", bool(message.authenticData), do_bit))
        super().handleQuery(message, protocol, address)

    def sendReply(self, protocol: Any, message: Any, address: Any) -> None:
        message.authenticData = self.authenticated
        if self.truncate_udp and address is not None:
            message.trunc = True
            message.answers = []
        super().sendReply(protocol, message, address)


class SmimeaLookupTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.zone = ZoneResolver()
        self.factory = ValidatingResolverFactory(self.zone)
        # DNS wants UDP and TCP on one port: a free UDP port's number may be taken for TCP
        # (another test's connection), so try again with another.
        for _attempt in range(20):
            udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(self.factory), interface="127.0.0.1")
            self.port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")
            except CannotListenError:
                udp.stopListening()
                continue
            break
        else:
            raise AssertionError("no port free for both UDP and TCP")
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.source = SmimeaSource(("127.0.0.1", self.port), reactor=reactor, timeout=2.0)
        self.directory = KeyDirectory([self.source], TrustValidator([TRUSTED_CA.certificate]), clock=reactor)

    async def lookup(self, address: str) -> LookupResult:
        result: LookupResult = await self.directory.lookup(address)
        return result

    async def test_dane_ee_accepted_without_a_pkix_path(self) -> None:
        self.zone.add("dane@example.org", rdata(3, DANE.cert_der()))
        result = await self.lookup("dane@example.org")
        self.assertEqual((result.certificate, result.source), (DANE.certificate, "dns"))
        self.assertIn("DNSSEC-authenticated (DANE-EE)", result.outcomes[0].detail)
        self.assertEqual(self.factory.seen, [("udp", True, True)])

    async def test_pkix_ee_must_also_pass_pkix_validation(self) -> None:
        self.zone.add("pkix@example.org", rdata(1, PKIX.cert_der()))
        self.zone.add("unanchored@example.org", rdata(1, PKIX_UNANCHORED.cert_der()))
        result = await self.lookup("pkix@example.org")
        self.assertEqual(result.certificate, PKIX.certificate)
        self.assertEqual(result.chain, (PKIX.certificate, TRUSTED_CA.certificate))
        refused = await self.lookup("unanchored@example.org")
        self.assertFalse(refused.found)
        self.assertEqual(refused.refused[0].status, "untrusted")

    async def test_dane_ee_still_needs_a_valid_certificate(self) -> None:
        self.zone.add("old@example.org", rdata(3, DANE_EXPIRED.cert_der()))
        result = await self.lookup("old@example.org")
        self.assertFalse(result.found)
        self.assertIn("outside its validity period", result.refused[0].reasons)

    async def test_without_ad_the_records_are_ignored(self) -> None:
        self.zone.add("dane@example.org", rdata(3, DANE.cert_der()))
        self.zone.add("pkix@example.org", rdata(1, PKIX.cert_der()))
        self.factory.authenticated = False
        for address in ("dane@example.org", "pkix@example.org"):
            result = await self.lookup(address)
            self.assertEqual((result.found, result.incomplete), (False, False))
            self.assertEqual(result.outcomes[0].state, SourceState.NOT_FOUND)
            self.assertIn("did not mark the answer authenticated", result.outcomes[0].detail)
        self.assertEqual(result.refused, ())

    async def test_nxdomain_is_not_found(self) -> None:
        result = await self.lookup("nobody@example.org")
        self.assertEqual((result.found, result.incomplete, result.outcomes[0].detail), (False, False, ""))

    async def test_servfail_is_unavailable(self) -> None:
        self.zone.servfail = True
        result = await self.lookup("dane@example.org")
        self.assertEqual((result.found, result.incomplete), (False, True))
        self.assertIn("SERVFAIL", result.outcomes[0].detail)
        self.assertEqual(len(self.flushLoggedErrors(BogusData)), 1)  # logged by the test server

    async def test_truncated_udp_answer_is_retried_over_tcp(self) -> None:
        self.zone.add("dane@example.org", rdata(3, DANE.cert_der()))
        self.factory.truncate_udp = True
        result = await self.lookup("dane@example.org")
        self.assertEqual(result.certificate, DANE.certificate)
        self.assertEqual([where for where, _, _ in self.factory.seen], ["udp", "tcp"])

    async def test_lower_case_local_part_is_tried_second(self) -> None:
        self.zone.add("mixed@example.org", rdata(1, LOWER.cert_der()))
        result = await self.lookup("Mixed@example.org")
        self.assertEqual(result.certificate, LOWER.certificate)
        self.assertEqual(len(self.factory.seen), 2)

    async def test_resolver_down_is_unavailable(self) -> None:
        closed = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        port = closed.getHost().port
        await closed.stopListening()
        source = SmimeaSource(("127.0.0.1", port), reactor=reactor, timeout=1.0)
        with self.assertRaises(SourceUnavailable) as raised:
            await source.find("dane@example.org")
        self.assertIn(f"cannot reach the resolver 127.0.0.1:{port}", str(raised.exception))

    async def test_silent_resolver_times_out(self) -> None:
        silent = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        source = SmimeaSource(("127.0.0.1", silent.getHost().port), reactor=reactor, timeout=0.3)
        with self.assertRaises(SourceUnavailable) as raised:
            await source.find("dane@example.org")
        self.assertIn("no answer from the resolver", str(raised.exception))

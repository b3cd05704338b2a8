"""SMIMEA (RFC 8162): recipients' certificates from DNSSEC-signed zones, via twisted.names.

For ``local@domain`` the owner name is the SHA2-256 of the local part, truncated to
28 octets, in hex, under ``_smimecert.domain``. The query goes to one configured
*validating* resolver with the AD and DO bits set; the answer is used only when the
resolver marks it authenticated (AD). Without AD the records are ignored: anyone on
the path could have written them.

Certificate usages (the TLSA fields, RFC 6698) are honoured as RFC 8162 says:

- 1 (PKIX-EE): the certificate must still pass PKIX validation (trust anchors, CRLs...).
- 3 (DANE-EE): DNSSEC vouches for it; it needs no path to an anchor, but validity,
  key usage and address are still checked (:class:`~gatekeeper.keys.directory.Candidate`
  with ``dane_ee``).
- 0 and 2 constrain trust anchors and carry no recipient certificate: ignored.

Only records holding the full certificate (selector 0, matching type 0) yield a
certificate; hashes can only confirm one found elsewhere, and are noted in the trace.
twisted.names does not know the SMIMEA type (53): its records arrive as
``UnknownRecord`` with the raw RDATA, which is parsed here.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets

import idna
from cryptography import x509
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.names import dns
from twisted.protocols.basic import Int16StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeeper.address import normalize_address
from gatekeeper.errors import SourceUnavailable
from gatekeeper.interfaces import IKeySource
from gatekeeper.keys.directory import Candidate, SourceAnswer

log = Logger()

SMIMEA = 53
USAGE_PKIX_TA, USAGE_PKIX_EE, USAGE_DANE_TA, USAGE_DANE_EE = 0, 1, 2, 3
EDNS_PAYLOAD = 4096
_DO_BIT = 0x8000  # in the OPT record's TTL field (RFC 3225)


def smimea_name(address: str) -> str:
    """Return the SMIMEA owner name for an address (RFC 8162 section 3).

    The local part is hashed as it is written (UTF-8); the domain is in A-label form.
    """
    local, _, domain = address.rpartition("@")
    digest = hashlib.sha256(local.encode("utf-8")).digest()[:28].hex()
    ascii_domain = idna.encode(domain.rstrip("."), uts46=True).decode("ascii").lower()
    return f"{digest}._smimecert.{ascii_domain}"


def build_query(name: str, message_id: int) -> dns.Message:
    """A recursive SMIMEA query with AD=1 (RFC 6840 5.7) and EDNS0 with DO=1 (RFC 3225)."""
    message = dns.Message(id=message_id, recDes=1, authenticData=1)
    message.queries = [dns.Query(name, SMIMEA, dns.IN)]
    # The OPT pseudo-record: class = UDP payload size, TTL carries the DO bit.
    message.additional = [dns.RRHeader(b"", dns.OPT, EDNS_PAYLOAD, _DO_BIT, payload=dns.UnknownRecord(b""))]
    return message


class _UdpQuery(DatagramProtocol):
    """Sends one query from its own port to the resolver and waits for the matching answer."""

    def __init__(self, data: bytes, message_id: int, server: tuple[str, int], result: Deferred[dns.Message]) -> None:
        self.data = data
        self.message_id = message_id
        self.server = server
        self.result = result

    def startProtocol(self) -> None:
        assert self.transport is not None
        self.transport.connect(*self.server)  # a connected socket only hears from the resolver
        self.transport.write(self.data, None)  # connected: no address

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        message = dns.Message()
        try:
            message.fromStr(datagram)
        except (EOFError, ValueError):
            return  # not an answer to us; keep waiting
        if message.id == self.message_id and message.answer and not self.result.called:
            self.result.callback(message)

    def connectionRefused(self) -> None:
        if not self.result.called:
            self.result.errback(net_error.ConnectionRefusedError("resolver port closed"))

    def stopProtocol(self) -> None:
        # With epoll, an ICMP "port unreachable" on a connected UDP socket closes the port
        # instead of calling connectionRefused: the port stopping before an answer means that.
        if not self.result.called:
            self.result.errback(net_error.ConnectionRefusedError("resolver port closed"))


class _TcpQuery(Int16StringReceiver):
    """Sends one query over TCP (after a truncated UDP answer) and waits for the answer."""

    def __init__(self, data: bytes, message_id: int, result: Deferred[dns.Message]) -> None:
        self.data = data
        self.message_id = message_id
        self.result = result

    def connectionMade(self) -> None:
        self.sendString(self.data)

    def stringReceived(self, string: bytes) -> None:
        message = dns.Message()
        try:
            message.fromStr(string)
        except (EOFError, ValueError):
            return
        if message.id == self.message_id and not self.result.called:
            self.result.callback(message)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = net_error.ConnectionDone) -> None:  # type: ignore[assignment]
        if not self.result.called:
            self.result.errback(net_error.ConnectionLost("resolver closed the TCP connection"))


@implementer(IKeySource)
class SmimeaSource:
    """Finds certificates in DNS (SMIMEA) through a validating resolver; AD bit required.

    ``reactor`` must provide ``IReactorUDP``, ``IReactorTCP`` (for truncated answers)
    and ``IReactorTime``; ``resolver`` is ``(ip, port)``.
    """

    name = "dns"

    def __init__(
        self,
        resolver: tuple[str, int],
        *,
        reactor: IReactorUDP,
        timeout: float = 5.0,
        name: str = "dns",
    ) -> None:
        self.resolver = (str(ipaddress.ip_address(resolver[0])), int(resolver[1]))
        self.reactor = reactor
        self.timeout = timeout
        self.name = name

    def find(self, address: str) -> Deferred[list[x509.Certificate]]:
        """Return a Deferred with the certificates of authenticated SMIMEA records."""
        return self.find_detailed(address).addCallback(lambda answer: [c.certificate for c in answer.candidates])

    def find_detailed(self, address: str) -> Deferred[SourceAnswer]:
        """Query SMIMEA for ``address`` (and its lower-cased local part if that differs and nothing was found)."""
        return Deferred.fromCoroutine(self._find(address))

    async def _find(self, address: str) -> SourceAnswer:
        address = normalize_address(address)
        local, _, domain = address.rpartition("@")
        answer = await self._ask(smimea_name(address))
        if not answer.candidates and local != local.lower():
            # RFC 8162 hashes the local part as written; mailboxes are usually case-insensitive.
            lower = await self._ask(smimea_name(f"{local.lower()}@{domain}"))
            if lower.candidates or lower.note:
                answer = lower
        return answer

    async def _ask(self, name: str) -> SourceAnswer:
        message = await self.query(name)
        if message.rCode == dns.ENAME:
            return SourceAnswer()
        if message.rCode != dns.OK:
            code = {dns.ESERVER: "SERVFAIL (DNSSEC validation failure?)", dns.EREFUSED: "REFUSED"}.get(
                message.rCode, f"rcode {message.rCode}"
            )
            raise SourceUnavailable(f"{self.name}: the resolver answered {code}")
        records = [rr for rr in message.answers if rr.type == SMIMEA]
        if not records:
            return SourceAnswer()
        if not message.authenticData:
            log.warn(
                "ignored {count} SMIMEA record(s) for {name}: the answer is not DNSSEC-authenticated",
                count=len(records),
                name=name,
            )
            return SourceAnswer(
                note=f"{len(records)} SMIMEA record(s) ignored: the resolver did not mark the answer authenticated (AD)"
            )
        return parse_records([_rdata(rr) for rr in records])

    def query(self, name: str) -> Deferred[dns.Message]:
        """Send the SMIMEA query for ``name`` over UDP, retrying over TCP when truncated."""
        return Deferred.fromCoroutine(self._query(name))

    async def _query(self, name: str) -> dns.Message:
        message_id = secrets.randbelow(0x10000)
        data = build_query(name, message_id).toStr()
        try:
            response = await self._udp(data, message_id)
            if response.trunc:
                response = await self._tcp(data, message_id)
        except (net_error.ConnectError, net_error.ConnectionLost, net_error.CannotListenError) as error:
            raise SourceUnavailable(f"{self.name}: cannot reach the resolver {self._where()}: {error}") from None
        except (TimeoutError, net_error.TimeoutError):
            raise SourceUnavailable(f"{self.name}: no answer from the resolver {self._where()}") from None
        return response

    def _where(self) -> str:
        host, port = self.resolver
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _udp(self, data: bytes, message_id: int) -> Deferred[dns.Message]:
        result: Deferred[dns.Message] = Deferred()
        protocol = _UdpQuery(data, message_id, self.resolver, result)
        interface = "::" if ":" in self.resolver[0] else ""
        port = self.reactor.listenUDP(0, protocol, interface=interface, maxPacketSize=65535)

        def done(outcome: object) -> object:
            port.stopListening()
            return outcome

        result.addBoth(done)
        result.addTimeout(self.timeout, IReactorTime(self.reactor))
        return result

    def _tcp(self, data: bytes, message_id: int) -> Deferred[dns.Message]:
        result: Deferred[dns.Message] = Deferred()
        host, port = self.resolver
        endpoint_type = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        endpoint = endpoint_type(IReactorTCP(self.reactor), host, port, timeout=max(1, int(self.timeout)))
        connected = connectProtocol(endpoint, _TcpQuery(data, message_id, result))

        def not_connected(reason: Failure) -> None:
            if not result.called:
                result.errback(reason)

        connected.addErrback(not_connected)
        result.addTimeout(self.timeout, IReactorTime(self.reactor))
        return result


def _rdata(record: dns.RRHeader) -> bytes:
    payload = record.payload
    data = getattr(payload, "data", b"")
    return data if isinstance(data, bytes) else b""


def parse_records(rdatas: list[bytes]) -> SourceAnswer:
    """Turn authenticated SMIMEA RDATA into candidates, noting what could not be used."""
    candidates: list[Candidate] = []
    anchors = hashes_only = malformed = 0
    for rdata in rdatas:
        if len(rdata) < 4:
            malformed += 1
            continue
        usage, selector, matching = rdata[0], rdata[1], rdata[2]
        if usage in (USAGE_PKIX_TA, USAGE_DANE_TA):
            anchors += 1
            continue
        if usage not in (USAGE_PKIX_EE, USAGE_DANE_EE):
            malformed += 1
            continue
        if selector != 0 or matching != 0:
            hashes_only += 1
            continue
        try:
            certificate = x509.load_der_x509_certificate(rdata[3:])
        except ValueError:
            malformed += 1
            continue
        candidates.append(Candidate(certificate, dane_ee=usage == USAGE_DANE_EE))
    notes = []
    if anchors:
        notes.append(f"{anchors} trust-anchor record(s) (usage 0/2) ignored")
    if hashes_only:
        notes.append(f"{hashes_only} record(s) hold only a key or hash, no certificate")
    if malformed:
        notes.append(f"{malformed} malformed record(s)")
    kinds = sorted({"DANE-EE" if c.dane_ee else "PKIX-EE" for c in candidates})
    if candidates:
        notes.insert(0, f"DNSSEC-authenticated ({', '.join(kinds)})")
    return SourceAnswer(tuple(candidates), "; ".join(notes))

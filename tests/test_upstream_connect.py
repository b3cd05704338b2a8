"""Upstream connections: TLS verified by host name, TCP_NODELAY on, failures temporary."""

from __future__ import annotations

import socket
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from gatekeeper.config import UpstreamEndpoint
from gatekeeper.errors import UpstreamUnavailable
from gatekeeper.testing.pki import TestPKI
from gatekeeper.tls import server_tls_options
from gatekeeper.upstream import connect


class Greeter(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello\r\n")


class Collector(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class ConnectTests(TestCase):
    timeout = 30

    async def listen(self, *, tls: bool) -> int:
        pki = TestPKI("Upstream CA", key_index=40)
        server = pki.server(["localhost", "127.0.0.1"])
        self.ca_file = Path(self.mktemp())
        self.ca_file.write_bytes(pki.cert_pem())
        factory: Factory = Factory.forProtocol(Greeter)
        if tls:
            options: CertificateOptions = server_tls_options(server.cert_pem() + server.chain_pem(), server.key)
            factory = TLSMemoryBIOFactory(options, False, factory)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def connected(self, endpoint: UpstreamEndpoint, ca_file: Path | None) -> Collector:
        protocol: Collector = await connect(
            reactor, endpoint, Factory.forProtocol(Collector), ca_file=ca_file, timeout=5
        )

        async def disconnect() -> None:
            protocol.transport.loseConnection()
            await protocol.lost

        self.addCleanup(lambda: Deferred.fromCoroutine(disconnect()))
        return protocol

    async def test_tls_upstream_is_verified_and_nodelay_is_set(self) -> None:
        port = await self.listen(tls=True)
        protocol = await self.connected(UpstreamEndpoint("tls", "localhost", port), self.ca_file)
        while not protocol.data:
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(protocol.data, b"hello\r\n")
        sock = protocol.transport.transport.getHandle()  # the TCP socket under the TLS layer
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)

    async def test_plain_upstream_gets_nodelay(self) -> None:
        port = await self.listen(tls=False)
        protocol = await self.connected(UpstreamEndpoint("tcp", "127.0.0.1", port), None)
        sock = protocol.transport.getHandle()
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)

    async def test_wrong_ca_fails_the_handshake(self) -> None:
        port = await self.listen(tls=True)
        other = Path(self.mktemp())
        other.write_bytes(TestPKI("Someone else", key_index=41).cert_pem())
        protocol = await self.connected(UpstreamEndpoint("tls", "localhost", port), other)
        lost = protocol.transport  # the handshake fails after connect: no data ever arrives
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(protocol.data, b"")
        self.assertFalse(lost.connected)

    async def test_refused_connection_is_temporary(self) -> None:
        with self.assertRaises(UpstreamUnavailable) as caught:
            await connect(
                reactor,
                UpstreamEndpoint("tcp", "127.0.0.1", 1),
                Factory.forProtocol(Collector),
                ca_file=None,
                timeout=2,
            )
        self.assertTrue(caught.exception.temporary)
        self.assertIn("cannot connect to tcp:127.0.0.1:1", str(caught.exception))

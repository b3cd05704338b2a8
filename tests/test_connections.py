"""Stopping a listener closes the connections it accepted."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.connections import Connections


class Closable:
    def __init__(self, connections: Connections) -> None:
        self.transport = StringTransport()
        self.connections = connections
        connections.add(self)

    def lose(self) -> None:
        self.connections.remove(self)


class ConnectionsTests(SynchronousTestCase):
    def test_no_connections_is_done_at_once(self) -> None:
        self.successResultOf(Connections().close_all(Clock()))

    def test_closes_then_waits_for_every_connection(self) -> None:
        connections, clock = Connections(), Clock()
        a, b = Closable(connections), Closable(connections)
        done = connections.close_all(clock)
        self.assertTrue(a.transport.disconnecting and b.transport.disconnecting)
        self.assertNoResult(done)
        a.lose()
        self.assertNoResult(done)
        b.lose()
        self.successResultOf(done)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stragglers_are_aborted_after_the_grace_period(self) -> None:
        connections, clock = Connections(), Clock()
        stuck = Closable(connections)
        aborted = []
        stuck.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        done = connections.close_all(clock, grace=5)
        clock.advance(5)
        self.assertEqual(aborted, [True])
        stuck.lose()
        self.successResultOf(done)

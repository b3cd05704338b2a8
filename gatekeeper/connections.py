"""The open client connections of a listener, so that stopping the gateway closes them.

Closing the listening port does not touch connections already accepted; without this,
a stopped gateway would leave sessions (and their unlocked keys) alive until the
clients hung up.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime


class Connections:
    """Protocols register on connect and unregister in ``connectionLost``."""

    def __init__(self) -> None:
        self._open: set[Any] = set()
        self._waiting: list[Deferred[None]] = []

    def add(self, protocol: Any) -> None:
        """Remember a newly connected protocol."""
        self._open.add(protocol)

    def remove(self, protocol: Any) -> None:
        """Forget a protocol whose connection is gone."""
        self._open.discard(protocol)
        if not self._open:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def __len__(self) -> int:
        return len(self._open)

    def close_all(self, clock: IReactorTime, *, grace: float = 5.0) -> Deferred[None]:
        """Close every connection; abort those still open after ``grace`` seconds."""
        done: Deferred[None] = Deferred()
        if not self._open:
            done.callback(None)
            return done
        self._waiting.append(done)
        for protocol in list(self._open):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.loseConnection()

        def abort() -> None:
            for protocol in list(self._open):
                transport = getattr(protocol, "transport", None)
                if transport is not None and hasattr(transport, "abortConnection"):
                    transport.abortConnection()

        timer = clock.callLater(grace, abort)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        done.addBoth(stop_timer)
        return done

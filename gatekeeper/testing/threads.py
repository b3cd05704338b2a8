"""Synchronous stand-ins for a reactor's thread support and a thread pool.

With these, code that hands work to ``deferToThreadPool`` runs it at once on the
calling thread, so unit tests stay deterministic and need no real threads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IReactorFromThreads)
class ImmediateReactor(Clock):
    """A :class:`Clock` whose ``callFromThread`` runs the call immediately."""

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        """Run the call now (there is only one thread)."""
        callable(*args, **kwargs)


class ImmediatePool:
    """A thread pool look-alike that runs every job at once and counts them."""

    def __init__(self) -> None:
        self.jobs = 0

    def callInThread(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``func`` now, swallowing nothing: errors propagate to the test."""
        self.jobs += 1
        func(*args, **kwargs)

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], None], func: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> None:
        """Run ``func`` now and report its result or failure like a real pool."""
        self.jobs += 1
        try:
            result = func(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)

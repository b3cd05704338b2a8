"""Start-up objects are left out of garbage collection once the reactor runs."""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.tap import FreezeStartupObjects, freeze_startup_objects


class RecordingReactor(MemoryReactor):
    """A memory reactor that keeps what was asked to run once it is running."""

    def __init__(self) -> None:
        super().__init__()
        self.when_running: list[Any] = []

    def callWhenRunning(self, callable: Any, *args: Any, **kwargs: Any) -> None:
        self.when_running.append(callable)


class FreezeTests(SynchronousTestCase):
    def setUp(self) -> None:
        gc.unfreeze()  # a gateway built earlier in this process may have frozen its objects
        self.addCleanup(gc.unfreeze)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_the_service_freezes_when_the_reactor_runs(self) -> None:
        reactor = RecordingReactor()
        FreezeStartupObjects(reactor).startService()
        self.assertEqual(reactor.when_running, [freeze_startup_objects])
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_freezing_leaves_existing_objects_out_of_collections(self) -> None:
        freeze_startup_objects()
        frozen = gc.get_freeze_count()
        self.assertGreater(frozen, 1000)  # the modules of the test run itself
        self.assertLess(len(gc.get_objects(generation=2)), frozen)
        (event,) = [e for e in self.events if "start-up" in e.get("log_format", "")]
        self.assertEqual(event["count"], frozen)

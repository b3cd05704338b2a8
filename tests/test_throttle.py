"""Exponential back-off for failed logins, driven by a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.throttle import LoginThrottle


class LoginThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = LoginThrottle(self.clock, free_failures=3, base_seconds=2.0, max_seconds=60.0, forget_after=600)

    def fail(self, times: int, user: str = "alice", client: str = "192.0.2.1") -> None:  # type: ignore[override]
        for _ in range(times):
            self.throttle.failed(user, client)

    def test_free_failures_cost_nothing(self) -> None:
        self.fail(3)
        self.assertEqual(self.throttle.retry_after("alice", "192.0.2.1"), 0.0)

    def test_back_off_doubles_after_free_failures(self) -> None:
        self.fail(4)
        self.assertEqual(self.throttle.retry_after("alice", "192.0.2.9"), 2.0)
        self.fail(1)
        self.assertEqual(self.throttle.retry_after("alice", "192.0.2.9"), 4.0)
        self.fail(1)
        self.assertEqual(self.throttle.retry_after("alice", "192.0.2.9"), 8.0)

    def test_back_off_is_capped(self) -> None:
        self.fail(30)
        self.assertEqual(self.throttle.retry_after("alice", "192.0.2.1"), 60.0)

    def test_wait_runs_down_with_time(self) -> None:
        self.fail(5)
        self.clock.advance(3)
        self.assertEqual(self.throttle.retry_after("alice", "192.0.2.1"), 1.0)
        self.clock.advance(1)
        self.assertEqual(self.throttle.retry_after("alice", "192.0.2.1"), 0.0)

    def test_client_address_is_throttled_across_user_names(self) -> None:
        for index in range(5):
            self.throttle.failed(f"user{index}", "198.51.100.7")
        self.assertEqual(self.throttle.retry_after("someone-else", "198.51.100.7"), 4.0)
        self.assertEqual(self.throttle.retry_after("someone-else", "198.51.100.8"), 0.0)

    def test_user_is_throttled_across_client_addresses(self) -> None:
        for index in range(5):
            self.throttle.failed("alice", f"203.0.113.{index}")
        self.assertEqual(self.throttle.retry_after("alice", "203.0.113.200"), 4.0)

    def test_success_clears_the_user_but_not_the_client(self) -> None:
        self.fail(5)
        self.clock.advance(10)
        self.throttle.succeeded("alice")
        self.assertEqual(self.throttle.failures("alice", "192.0.2.1"), (0, 5))

    def test_old_failures_are_forgotten(self) -> None:
        self.fail(10)
        self.clock.advance(601)
        self.assertEqual(self.throttle.retry_after("alice", "192.0.2.1"), 0.0)
        self.fail(1)
        self.assertEqual(self.throttle.failures("alice", "192.0.2.1"), (1, 1))

    def test_table_size_is_bounded(self) -> None:
        throttle = LoginThrottle(self.clock, max_entries=10)
        for index in range(100):
            throttle.failed(f"user{index}", "192.0.2.1")
        self.assertEqual(throttle.failures("user0", "x"), (0, 0))
        self.assertEqual(throttle.failures("user99", "x"), (1, 0))

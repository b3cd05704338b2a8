"""The closing line CI reads."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.summary import summarize


class SummaryTests(SynchronousTestCase):
    def test_passed(self) -> None:
        self.assertEqual(summarize("...\nRan 3 tests in 0.1s\n\nPASSED (successes=3)\n"), (3, 0))

    def test_failures_errors_and_skips_count_as_failed(self) -> None:
        text = "FAILED (skips=1, expectedFailures=1, failures=2, errors=3, successes=10)\n"
        self.assertEqual(summarize(text), (10, 7))

    def test_no_summary_is_a_failure(self) -> None:
        self.assertEqual(summarize("Traceback (most recent call last):\n"), (0, 1))

    def test_last_summary_wins(self) -> None:
        self.assertEqual(summarize("PASSED (successes=1)\nFAILED (errors=1, successes=4)\n"), (4, 1))

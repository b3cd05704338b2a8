"""The code is ruff- and mypy-clean: ``make lint`` as part of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PATHS = ["gatekeeper", "tests", "bench", "twisted"]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


class LintTests(SynchronousTestCase):
    def test_ruff_check(self) -> None:
        result = run(str(BIN / "ruff"), "check", "--no-cache", *PATHS)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_ruff_format(self) -> None:
        result = run(str(BIN / "ruff"), "format", "--check", "--no-cache", *PATHS)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_mypy(self) -> None:
        result = run(str(BIN / "mypy"), "--cache-dir", "/tmp/gatekeeper-mypy-cache")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

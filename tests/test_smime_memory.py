"""50 MB through sign+encrypt and decrypt+verify, with peak memory at most 4x the message.

The probe runs in a child process (tests/smime_memory_probe.py) so that the peak
resident memory it reads is its own; it reports the peak above what the process held
just before each call (the input included in that), so the whole stays within 4x when
the extra is within 3x.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

PROBE = Path(__file__).resolve().parent / "smime_memory_probe.py"


class LargeMessageTests(unittest.TestCase):
    def test_fifty_megabytes_within_four_times(self) -> None:
        result = subprocess.run([sys.executable, str(PROBE)], capture_output=True, timeout=300, check=False)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        size, extra_protect, extra_open = (int(v) for v in result.stdout.split())
        self.assertEqual(size, 50 * 1024 * 1024)
        self.assertLessEqual(
            extra_protect, 3 * size, f"sign+encrypt peaked {extra_protect / size:.2f}x above its input"
        )
        self.assertLessEqual(extra_open, 3 * size, f"decrypt+verify peaked {extra_open / size:.2f}x above its input")

"""Turn trial's summary into the plain closing line CI reads: ``N passed, N failed``.

Skips and expected failures count as failed: a skipped test is a test that did not run.
Exits 0 only when nothing failed and at least one test passed.
"""

import re
import sys


def summarize(text: str) -> tuple[int, int]:
    """Return (passed, failed) from trial's output, or (0, 1) when no summary is found."""
    matches = list(re.finditer(r"^(PASSED|FAILED) \(([^)]*)\)\s*$", text, re.MULTILINE))
    if not matches:
        return 0, 1
    counts = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", matches[-1].group(2))}
    passed = counts.get("successes", 0)
    failed = sum(counts.get(k, 0) for k in ("failures", "errors", "skips", "expectedFailures", "unexpectedSuccesses"))
    return passed, failed


def main() -> int:
    """Print the closing line for the trial log named on the command line.

    ``--extra RC ...`` adds checks run outside trial (exit status 0: passed).
    """
    with open(sys.argv[1], encoding="utf-8", errors="replace") as log:
        passed, failed = summarize(log.read())
    if "--extra" in sys.argv:
        for status in sys.argv[sys.argv.index("--extra") + 1 :]:
            if status == "0":
                passed += 1
            else:
                failed += 1
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

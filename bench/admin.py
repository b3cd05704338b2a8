"""What the audit log and the metrics cost per event, next to what the event already costs.

Every private-key use is an audited ``key_use`` event: the audit observer appends one
hash-chained JSON line (open, ``flock``, read the tail, write) on the reactor thread,
and the metrics observer moves a counter. Measured here in one run, per event:

- the baseline: the same event written as an ordinary text log line (what every event
  costs anyway, with twistd's file log observer);
- the audit observer, the metrics observer, and both;
- for scale, one RSA-3072 sign + encrypt of a 64 KB message (the work behind a
  ``sign`` event) with the S/MIME engine;
- ``gatekeeper audit verify`` over 20,000 records.

Run: ``.venv/bin/python bench/admin.py``. The last lines are the targets:
``ratio NAME = VALUE (target OP VALUE)``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.logger import FileLogObserver, Logger, LogPublisher, formatEventAsClassicLogText

from gatekeeper import smime
from gatekeeper.audit import AuditLog, AuditObserver, verify
from gatekeeper.events import emit
from gatekeeper.keys.identity import UnlockedKey
from gatekeeper.metrics import GatewayMetrics
from gatekeeper.testing.pki import TestPKI

EVENTS = 5000
VERIFY_RECORDS = 20_000


def per_event(observers: list[Any], rounds: int = 7) -> float:
    """Seconds per ``key_use`` event through a publisher with ``observers``: the best of ``rounds`` batches."""
    publisher = LogPublisher(*observers)
    log = Logger(namespace="gatekeeper.bench", observer=publisher)
    best = float("inf")
    for batch in range(rounds):
        start = time.perf_counter()
        for index in range(EVENTS):
            emit(
                log,
                "key_use",
                "key used: {operation} by {user} ({session})",
                operation="sign",
                user="alice@example.org",
                session=index,
                message_id=f"<{batch}.{index}@example.org>",
                peer="192.0.2.1",
            )
        best = min(best, (time.perf_counter() - start) / EVENTS)
    return best


def main() -> None:
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        text_log = (directory / "twistd.log").open("w", encoding="utf-8")

        def text_observer() -> FileLogObserver:
            return FileLogObserver(text_log, formatEventAsClassicLogText)

        audit_log = AuditObserver(AuditLog(directory / "audit.log"))
        metrics = GatewayMetrics()
        # Interleaved, best of three runs each, so a busy neighbour on the machine hits all alike.
        runs: dict[str, list[float]] = {"log": [], "audit": [], "metrics": [], "both": []}
        for _ in range(3):
            runs["log"].append(per_event([text_observer()]))
            runs["audit"].append(per_event([text_observer(), audit_log]))
            runs["metrics"].append(per_event([text_observer(), metrics]))
            runs["both"].append(per_event([text_observer(), audit_log, metrics]))
        baseline, audit, counted, both = (min(runs[name]) for name in ("log", "audit", "metrics", "both"))
        audit_log.log.close()
        text_log.close()

        pki = TestPKI("Bench CA")
        alice = pki.user("alice@example.org", key_kind="rsa3072")
        bob = pki.user("bob@example.org", key_kind="rsa3072", key_index=1)
        signer = UnlockedKey("alice", alice.certificate, alice.key, alice.chain)
        head = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: bench\r\n\r\n"
        message = head + b"x" * 76 + b"\r\n" * (64 * 1024 // 78)
        smime.sign_and_encrypt(message, signer, [bob.certificate])
        rounds = 20
        start = time.perf_counter()
        for _ in range(rounds):
            smime.sign_and_encrypt(message, signer, [bob.certificate])
        protect = (time.perf_counter() - start) / rounds

        big = AuditLog(directory / "big.log")
        for index in range(VERIFY_RECORDS):
            big.append({"time": "t", "event": "key_use", "operation": "decrypt", "user": f"u{index}@example.org"})
        start = time.perf_counter()
        result = verify(directory / "big.log")
        verify_rate = result.records / (time.perf_counter() - start)
        assert result.ok

    print(f"{'per key_use event':<34} {'us':>8} {'x log line':>10}")
    for label, seconds in (
        ("text log line (baseline)", baseline),
        ("+ audit observer", audit),
        ("+ metrics observer", counted),
        ("+ audit and metrics", both),
    ):
        print(f"{label:<34} {seconds * 1e6:8.1f} {seconds / baseline:10.2f}")
    print(f"{'sign+encrypt 64 KB, RSA-3072':<34} {protect * 1e6:8.0f}")
    print(f"audit verify: {verify_rate:,.0f} records/s")
    added = both - baseline
    print(f"ratio audit_and_metrics_vs_log_line = {both / baseline:.2f} (target <= 10)")
    print(f"ratio audit_and_metrics_added_vs_sign_encrypt_64k = {added / protect:.4f} (target <= 0.05)")
    print(f"ratio audit_verify_records_per_s = {verify_rate:.0f} (target >= 50000)")


if __name__ == "__main__":
    main()

"""Throughput of the local mail store next to bare file writes and reads of the same bytes, in the same run.

Run: ``.venv/bin/python bench/localstore.py`` (about half a minute). For each message
size it times one operation at a time, alternating with its baseline so that disk noise
(other processes' fsyncs) hits both alike, and compares the medians:

- **deliver**: ``LocalStore.deliver`` to one recipient (write to ``tmp/``, fsync, rename
  into ``new/``, fsync of the directory, one SQLite WAL transaction with
  ``synchronous=FULL``), against a bare write (create, write, fsync, close);
- **fetch**: ``Mailbox.read_message`` by UID (an index look-up, open, read), against a
  bare read (open, read, close) of the same bytes.

The last lines are the targets: ``ratio NAME = VALUE (target OP VALUE)``.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gatekeeper.localstore import INBOX, LocalStore, Mailbox

SIZES = {"4k": 4 * 1024, "64k": 64 * 1024, "1m": 1024 * 1024}
COUNTS = {"4k": 1000, "64k": 1000, "1m": 200}
BLOCK = 25
DELIVER_TARGET = 3.0
FETCH_TARGET = 3.0


def message(size: int) -> bytes:
    head = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: bench\r\n\r\n"
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return head + (line * (size // len(line) + 1))[: size - len(head)]


def bare_write(directory: Path, data: bytes, index: int) -> None:
    fd = os.open(directory / str(index), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def bare_read(directory: Path, index: int) -> int:
    with open(directory / str(index), "rb") as handle:
        return len(handle.read())


def deliver(store: LocalStore, data: bytes, uids: list[int], index: int) -> None:
    uids.append(store.deliver(["bob@example.org"], data).delivered[0].uid)


def fetch(mailbox: Mailbox, uids: list[int], index: int) -> int:
    return len(mailbox.read_message(INBOX, uids[index]))


def paired(first: Callable[[int], object], second: Callable[[int], object], count: int) -> tuple[float, float]:
    """Median seconds of one call of each, the two alternating in blocks so that disk noise hits both alike.

    Blocks rather than single calls: on ext4 an fsync commits the whole journal, so a
    bare write right after a delivery would pay for the delivery's metadata too.
    """
    times: tuple[list[float], list[float]] = ([], [])
    for block in range(0, count, BLOCK):
        order = ((0, first), (1, second)) if (block // BLOCK) % 2 else ((1, second), (0, first))
        for slot, function in order:
            for index in range(block, min(block + BLOCK, count)):
                start = time.perf_counter()
                function(index)
                times[slot].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to put the store (default: a temporary directory)"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the message counts")
    options = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-localstore-", dir=options.dir))
    ratios = {}
    try:
        store = LocalStore(root / "store", domains=["example.org"])
        mailbox = store.mailbox("bob@example.org")
        bare_dir = root / "bare"
        bare_dir.mkdir()
        print(" size  deliver/s  bare write/s  ratio   fetch/s  bare read/s  ratio")
        for label, size in SIZES.items():
            data = message(size)
            count = max(20, int(COUNTS[label] * options.scale))
            uids: list[int] = []
            deliver_s, write_s = paired(
                functools.partial(deliver, store, data, uids), functools.partial(bare_write, bare_dir, data), count
            )
            fetch_s, read_s = paired(
                functools.partial(fetch, mailbox, uids), functools.partial(bare_read, bare_dir), count
            )
            mailbox.delete_messages(INBOX, uids)
            for path in bare_dir.iterdir():
                path.unlink()
            ratios[label] = (deliver_s / write_s, fetch_s / read_s)
            print(
                f"{label:>5} {1 / deliver_s:10.0f} {1 / write_s:13.0f} {deliver_s / write_s:6.2f}"
                f" {1 / fetch_s:9.0f} {1 / read_s:12.0f} {fetch_s / read_s:6.2f}"
            )
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for label, (deliver_ratio, _) in ratios.items():
        print(f"ratio deliver_vs_fsynced_write_{label} = {deliver_ratio:.2f} (target <= {DELIVER_TARGET:g})")
    for label, (_, fetch_ratio) in ratios.items():
        print(f"ratio fetch_vs_read_{label} = {fetch_ratio:.2f} (target <= {FETCH_TARGET:g})")


if __name__ == "__main__":
    main()

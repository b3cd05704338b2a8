"""Crash safety of the local mail store: child processes really killed (SIGKILL) in the middle of a change.

Each child opens the store, delivers a few messages and prints ``ACK n uid`` once each
delivery returned (what the SMTP adapter would acknowledge with 250), then is killed at
a chosen point (by itself, with SIGKILL, from a patched step) or at a random moment by
the test. The test then opens the store (which runs the recovery) and checks that
every acknowledged message is there byte for byte, and that every message there is
whole (each carries the digest of its body).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.localstore import DELETED, INBOX, LocalStore

REPO = Path(__file__).resolve().parent.parent
RECIPIENTS = ["bob@example.org", "alice@example.org"]


def message(number: int) -> bytes:
    """Message ``number``: a header with the digest of its body, and a body of varying size (up to ~200 KB)."""
    line = b"line of message %d, some text to make it longer than a block\r\n" % number
    body = line * (number * 797 % 3000 + 1)
    digest = hashlib.sha256(body).hexdigest().encode()
    return b"X-Number: %d\r\nX-Digest: %s\r\n\r\n" % (number, digest) + body


def whole(data: bytes) -> int:
    """The number of a stored message, after checking it is whole (its body matches its digest)."""
    header, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in header.split(b"\r\n"))
    if hashlib.sha256(body).hexdigest().encode() != fields[b"X-Digest"]:
        raise AssertionError(f"message {fields.get(b'X-Number')!r} is not whole ({len(data)} bytes)")
    return int(fields[b"X-Number"])


def _die(*args: Any, **kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def child_main(data_dir: str, mode: str) -> None:
    """The child process: deliver, acknowledge on stdout, and get killed where ``mode`` says."""
    from gatekeeper.localstore import files
    from gatekeeper.localstore import mailbox as mailbox_module

    store = LocalStore(Path(data_dir), domains=["example.org"])

    def deliver(number: int, recipients: list[str]) -> None:
        report = store.deliver(recipients, message(number))
        assert report.all_delivered, report
        uids = " ".join(f"{item.address}={item.uid}" for item in report.delivered)
        print(f"ACK {number} {uids}", flush=True)

    if mode.startswith("loop:"):
        number = int(mode.partition(":")[2])
        while True:
            number += 1
            deliver(number, RECIPIENTS)
    for number in (1, 2, 3):
        deliver(number, RECIPIENTS[:1])
    real_publish, real_write_all = files.publish, files._write_all

    def publish_then_die(*args: Any, **kwargs: Any) -> None:
        real_publish(*args, **kwargs)
        _die()

    def write_half_then_die(fd: int, view: memoryview) -> int:
        real_write_all(fd, view[: len(view) // 2])
        _die()
        return 0

    mailbox = store.mailbox(RECIPIENTS[0])
    actions: dict[str, Callable[[], object]] = {
        "before-rename": lambda: setattr(files, "publish", _die),
        "after-rename": lambda: setattr(files, "publish", publish_then_die),
        "mid-write": lambda: setattr(files, "_write_all", write_half_then_die),
        "before-expunge-commit": lambda: setattr(mailbox_module.Mailbox, "_remove_rows", _die),
    }
    actions[mode.replace("append-", "").replace("move-", "")]()
    if mode.startswith("append-"):
        mailbox.append(INBOX, message(4))
    elif mode == "before-expunge-commit":
        mailbox.add_flags(INBOX, [2], [DELETED])
        mailbox.expunge(INBOX)
    elif mode.startswith("move-"):
        mailbox.move(INBOX, [2], "Trash")
    else:
        deliver(4, RECIPIENTS[:1])
    print("NOT KILLED", flush=True)


def start_child(data_dir: Path, mode: str) -> subprocess.Popen[str]:
    code = "import sys; from tests.test_localstore_crash import child_main; child_main(sys.argv[1], sys.argv[2])"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(data_dir), mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def acknowledged(output: str) -> dict[int, dict[str, int]]:
    """``{message number: {recipient: uid}}`` from the child's ACK lines."""
    acks = {}
    for line in output.splitlines():
        if line.startswith("ACK "):
            _, number, *pairs = line.split()
            acks[int(number)] = {address: int(uid) for address, _, uid in (p.partition("=") for p in pairs)}
    return acks


class CrashTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data_dir = Path(self.mktemp()).absolute()  # the child runs in the repository

    def run_child(self, mode: str) -> dict[int, dict[str, int]]:
        child = start_child(self.data_dir, mode)
        output, errors = child.communicate(timeout=60)
        self.assertEqual(child.returncode, -signal.SIGKILL, f"the child was not killed: {output}\n{errors}")
        self.assertNotIn("NOT KILLED", output)
        return acknowledged(output)

    def reopen(self) -> LocalStore:
        store = LocalStore(self.data_dir, domains=["example.org"])
        self.addCleanup(store.close)
        return store

    def contents(self, store: LocalStore, address: str, folder: str = INBOX) -> dict[int, int]:
        """``{uid: message number}`` of a folder, each message checked to be whole."""
        mailbox = store.mailbox(address)
        return {uid: whole(mailbox.read_message(folder, uid)) for uid in mailbox.uids(folder)}

    def assert_no_temporary_files(self) -> None:
        leftovers = [p for p in self.data_dir.rglob("tmp/*")]
        self.assertEqual(leftovers, [])

    def test_killed_before_the_rename_loses_nothing_acknowledged_and_shows_nothing(self) -> None:
        acks = self.run_child("before-rename")
        self.assertEqual(acks, {n: {RECIPIENTS[0]: n} for n in (1, 2, 3)})
        self.assertEqual(len(list(self.data_dir.rglob("tmp/*"))), 1)  # the written, never published copy
        store = self.reopen()
        self.assertEqual(self.contents(store, RECIPIENTS[0]), {1: 1, 2: 2, 3: 3})
        self.assert_no_temporary_files()
        self.assertEqual(store.mailbox(RECIPIENTS[0]).status(INBOX).uidnext, 4)

    def test_killed_in_the_middle_of_writing_shows_no_half_message(self) -> None:
        acks = self.run_child("mid-write")
        self.assertEqual(sorted(acks), [1, 2, 3])
        store = self.reopen()
        self.assertEqual(self.contents(store, RECIPIENTS[0]), {1: 1, 2: 2, 3: 3})
        self.assert_no_temporary_files()

    def test_killed_after_the_rename_keeps_the_whole_message(self) -> None:
        acks = self.run_child("after-rename")
        self.assertEqual(sorted(acks), [1, 2, 3])
        store = self.reopen()
        # Never acknowledged, but published whole: the recovery indexes it (a retry may duplicate it, never lose it).
        self.assertEqual(self.contents(store, RECIPIENTS[0]), {1: 1, 2: 2, 3: 3, 4: 4})
        self.assertEqual(store.mailbox(RECIPIENTS[0]).status(INBOX).recent, 4)
        self.assert_no_temporary_files()

    def test_killed_appending_before_the_rename(self) -> None:
        self.run_child("append-before-rename")
        store = self.reopen()
        self.assertEqual(self.contents(store, RECIPIENTS[0]), {1: 1, 2: 2, 3: 3})
        self.assert_no_temporary_files()

    def test_killed_appending_after_the_rename(self) -> None:
        self.run_child("append-after-rename")
        store = self.reopen()
        self.assertEqual(self.contents(store, RECIPIENTS[0]), {1: 1, 2: 2, 3: 3, 4: 4})

    def test_an_interrupted_expunge_is_finished_not_undone(self) -> None:
        self.run_child("before-expunge-commit")
        store = self.reopen()
        self.assertEqual(self.contents(store, RECIPIENTS[0]), {1: 1, 3: 3})
        mailbox = store.mailbox(RECIPIENTS[0])
        self.assertEqual(mailbox.changes(INBOX, 1).expunged, (2,))

    def test_an_interrupted_move_leaves_exactly_one_copy(self) -> None:
        self.run_child("move-before-expunge-commit")
        store = self.reopen()
        self.assertEqual(self.contents(store, RECIPIENTS[0]), {1: 1, 3: 3})
        self.assertEqual(list(self.contents(store, RECIPIENTS[0], "Trash").values()), [2])

    def test_killed_at_random_moments_while_delivering(self) -> None:
        rng = random.Random(20)  # a reproducible schedule
        acked: dict[int, dict[str, int]] = {}
        possible: set[int] = set()  # acknowledged, or in flight when killed
        for round_number in range(3):
            start = round_number * 1000
            child = start_child(self.data_dir, f"loop:{start}")
            assert child.stdout is not None
            lines = []
            while len(lines) < 5 + rng.randrange(15):
                line = child.stdout.readline()
                if not line:
                    break
                lines.append(line)
            time.sleep(rng.random() * 0.02)
            child.kill()
            output, errors = child.communicate(timeout=30)
            self.assertEqual(child.returncode, -signal.SIGKILL, errors)
            acks = acknowledged("".join(lines) + output)
            self.assertGreaterEqual(len(acks), 5)
            acked.update(acks)
            possible |= set(acks) | {max(acks) + 1}
            store = self.reopen()
            for address in RECIPIENTS:
                stored = self.contents(store, address)  # every message whole
                for number, uids in acked.items():
                    self.assertEqual(stored.get(uids[address]), number, f"{address}: message {number} lost")
                self.assertLessEqual(set(stored.values()), possible, address)
                self.assertEqual(len(stored), len(set(stored.values())), f"{address}: a message twice")
            self.assert_no_temporary_files()
            store.close()

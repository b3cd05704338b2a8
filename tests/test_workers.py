"""The worker-process pool: results, errors, crashes, back-pressure, and a free reactor."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gatekeeper import worker_process
from gatekeeper.errors import BadPassword
from gatekeeper.worker_process import JobFailed, on_idle, wait_for_job
from gatekeeper.workers import InlineWorkerPool, WorkerCrashed, WorkerPool, WorkersBusy
from tests.fixtures.process import pid_alive

REPO = Path(__file__).resolve().parent.parent


def worker_pid() -> int:
    return os.getpid()


def echo(data: bytes, *, times: int = 1) -> bytes:
    return data * times


def fail_with_bad_password() -> None:
    raise BadPassword("no")


def die() -> None:
    os._exit(3)


class Unpicklable(Exception):
    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("cannot pickle this")


def fail_unpicklably() -> None:
    raise Unpicklable("the reason")


def print_something() -> str:
    print("this must not reach the answer pipe")
    return "answer"


def hold_the_gil(seconds: float) -> int:
    """Pure-Python busy loop: in a thread it would freeze the reactor."""
    deadline = time.perf_counter() + seconds
    count = 0
    while time.perf_counter() < deadline:
        count += 1
    return count


class WorkerPoolTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pool = WorkerPool(reactor, processes=2, max_queue=4)
        self.addCleanup(self.pool.stop)

    async def _job(self, function, *args, **kwargs):  # type: ignore[no-untyped-def]
        return await self.pool.run(function, *args, **kwargs)

    def run_job(self, function, *args, **kwargs) -> Deferred:  # type: ignore[no-untyped-def,type-arg]
        return ensureDeferred(self._job(function, *args, **kwargs))

    async def test_runs_in_another_process(self) -> None:
        pid = await self.pool.run(worker_pid)
        self.assertNotEqual(pid, os.getpid())
        self.assertEqual(await self.pool.run(echo, b"ab", times=3), b"ababab")
        self.assertEqual(self.pool.pending, 0)

    async def test_exceptions_come_back_unchanged(self) -> None:
        with self.assertRaises(BadPassword):
            await self.pool.run(fail_with_bad_password)

    async def test_an_exception_that_does_not_pickle_comes_back_as_its_text(self) -> None:
        with self.assertRaises(JobFailed) as caught:
            await self.pool.run(fail_unpicklably)
        self.assertEqual(str(caught.exception), "Unpicklable: the reason")
        self.assertEqual(await self.pool.run(echo, b"still works"), b"still works")

    async def test_printing_in_a_job_does_not_break_the_pipe(self) -> None:
        self.assertEqual(await self.pool.run(print_something), "answer")

    async def test_stop_fails_queued_jobs_and_waits_for_the_processes(self) -> None:
        await self.pool.run(worker_pid)
        running = [self.run_job(hold_the_gil, 0.2) for _ in range(3)]
        await self.pool.stop()
        results = []
        for job in running:
            try:
                results.append(await job)
            except WorkerCrashed:
                results.append("crashed")
        self.assertEqual(results.count("crashed"), 1)  # two ran on the two workers, one waited
        self.assertEqual(self.pool.pending, 0)

    async def test_a_crashed_worker_is_a_temporary_error_and_the_pool_recovers(self) -> None:
        with self.assertRaises(WorkerCrashed) as caught:
            await self.pool.run(die)
        self.assertTrue(caught.exception.temporary)
        self.assertEqual(await self.pool.run(echo, b"x"), b"x")

    async def test_back_pressure(self) -> None:
        jobs = [self.run_job(hold_the_gil, 0.3) for _ in range(4)]
        with self.assertRaises(WorkersBusy):
            await self.pool.run(echo, b"x")
        for job in jobs:
            await job

    async def test_reactor_keeps_ticking_while_workers_hold_the_gil(self) -> None:
        await self.pool.run(worker_pid)  # processes started
        ticks: list[float] = []
        loop = LoopingCall(lambda: ticks.append(time.perf_counter()))
        loop.start(0.005)
        try:
            await ensureDeferred(self._job(hold_the_gil, 0.5))
        finally:
            loop.stop()
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        self.assertGreater(len(ticks), 20)
        self.assertLess(max(gaps), 0.1)


class InlineWorkerPoolTests(SynchronousTestCase):
    def test_runs_inline_and_counts(self) -> None:
        pool = InlineWorkerPool()
        result = self.successResultOf(ensureDeferred(pool.run(worker_pid)))
        self.assertEqual(result, os.getpid())
        self.failureResultOf(ensureDeferred(pool.run(fail_with_bad_password)), BadPassword)
        self.assertEqual(pool.jobs, 2)


POOL_SCRIPT = """
import os, sys
from twisted.internet import reactor, defer
from gatekeeper.workers import WorkerPool
from tests.test_workers import hold_the_gil, worker_pid
pool = WorkerPool(reactor, processes=1)
async def go():
    print(await pool.run(worker_pid), flush=True)
    await pool.run(hold_the_gil, 30)
reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(go()))
reactor.run()
"""


class OrphanTests(SynchronousTestCase):
    def test_workers_die_with_a_killed_gateway(self) -> None:
        process = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT], stdout=subprocess.PIPE, cwd=REPO)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        assert process.stdout is not None
        worker = int(process.stdout.readline())
        time.sleep(0.3)  # the worker is now inside its 30-second job
        process.kill()
        process.wait()
        deadline = time.monotonic() + 5
        while pid_alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(pid_alive(worker), "the worker outlived the gateway")


class IdleHookTests(SynchronousTestCase):
    """What a worker does while it waits for a job: forget what must not stay."""

    def setUp(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.addCleanup(os.close, self.read_fd)
        self.addCleanup(os.close, self.write_fd)
        self.calls = 0

    def hook(self) -> None:
        self.calls += 1
        if self.calls == 3:
            os.write(self.write_fd, b"a job")

    def test_hooks_run_every_idle_period_until_a_job_comes(self) -> None:
        on_idle(self.hook)
        on_idle(self.hook)  # registered once
        self.addCleanup(worker_process._idle_hooks.remove, self.hook)
        wait_for_job(self.read_fd, seconds=0.01)
        self.assertEqual(self.calls, 3)

    def test_no_hook_when_a_job_is_waiting(self) -> None:
        on_idle(self.hook)
        self.addCleanup(worker_process._idle_hooks.remove, self.hook)
        os.write(self.write_fd, b"a job")
        wait_for_job(self.read_fd, seconds=0.01)
        self.assertEqual(self.calls, 0)

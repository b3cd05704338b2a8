"""Worker processes for the work that holds the GIL: MIME parsing, base64, key loading.

Measured here: RSA, AES, SHA-256 and PBKDF2 release the GIL, but every pure-Python
MIME or base64 step, loading a PKCS#12 file (~270 ms) and loading an RSA key with
validation (~55 ms) hold it for the whole call. In a thread they would still stall the
reactor, so the pipelines run them in a pool of worker processes.

A job is a module-level function and picklable arguments (bytes, DER, attrs values);
its result comes back as a Deferred-friendly coroutine result. Private keys cross the
pipe as DER in memory, never through a file. The pool is bounded: when ``max_queue``
jobs are waiting, new ones fail at once with :class:`WorkersBusy` (a temporary error,
so the protocol answers 4xx and the client retries) instead of queueing without limit.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import sys
from collections import deque
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatekeeper.errors import TemporaryError
from gatekeeper.worker_process import HEADER, JobFailed

log = Logger()

P = ParamSpec("P")
T = TypeVar("T")


class WorkersBusy(TemporaryError):
    """Too many jobs are waiting for a worker; try again later."""


class WorkerCrashed(TemporaryError):
    """A worker process died while running a job (the pool restarts itself)."""


def background_priority() -> None:
    """Worker initialiser: put the process in Linux's idle scheduling class.

    Measured with ``bench/login.py`` on 2 CPUs at 20 logins/s: with workers at normal
    priority, or even at nice 10, a NOOP on another session waited 2-6 ms at p99 for
    the reactor thread to get a CPU back from them; in the idle class (SCHED_IDLE) the
    reactor preempts them at once. All of Gatekeeper's workers run there, so under
    saturation they share the CPU among themselves while sessions stay responsive.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


@attrs.define(eq=False)
class _Job:
    job_id: int
    payload: bytes | None
    result: Deferred[Any]


class _Worker(ProcessProtocol):
    """One worker process: frames in through stdin, answers out through stdout."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        # Answers arrive in pipe-sized pieces; they are joined once, when a frame is
        # complete (a 25 MB message must not be copied piece by piece into a growing buffer).
        self.chunks: list[bytes] = []
        self.received = 0
        self.expected: int | None = None
        self.job: _Job | None = None
        self.ready = False

    def connectionMade(self) -> None:
        self.ready = True
        self.pool._dispatch()

    def send(self, job: _Job) -> None:
        self.job = job
        assert self.transport is not None and job.payload is not None
        self.transport.writeSequence([HEADER.pack(len(job.payload)), job.payload])
        job.payload = None  # the transport has its own reference until it is written

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != 1:
            return
        self.chunks.append(data)
        self.received += len(data)
        while True:
            if self.expected is None:
                if self.received < HEADER.size:
                    return
                joined = b"".join(self.chunks)
                (self.expected,) = HEADER.unpack_from(joined)
                self.chunks = [joined[HEADER.size :]] if len(joined) > HEADER.size else []
                self.received -= HEADER.size
            if self.received < self.expected:
                return
            joined = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
            rest = joined[self.expected :]
            frame = memoryview(joined)[: self.expected]
            self.chunks = [rest] if rest else []
            self.received = len(rest)
            self.expected = None
            self._answer(frame)

    def _answer(self, frame: memoryview) -> None:
        job, self.job = self.job, None
        try:
            job_id, ok, value = pickle.loads(frame)  # noqa: S301 - frames from our own worker
        except Exception as error:
            job_id, ok, value = (job.job_id if job else 0), False, JobFailed(f"unreadable answer: {error}")
        del frame
        if job is None or job.job_id != job_id:
            log.error("a worker answered a job it was not given; stopping it")
            self.stop()
            return
        self.pool._finished(self, job, ok, value)

    def processEnded(self, reason: Failure) -> None:
        self.ready = False
        self.pool._lost(self)

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.closeStdin()


class WorkerPool:
    """A bounded pool of worker processes, answered on the reactor thread.

    ``processes`` defaults to the number of CPUs. Each worker is a fresh interpreter
    (``python -m gatekeeper.worker_process``) that never inherits the reactor's threads
    or sockets. The pipes are read and written by the reactor itself: no helper threads
    in the reactor's process, so a job costs it one pickle and a couple of system calls
    (``concurrent.futures``' pool, tried first, cost 0.25-0.4 ms of the reactor's CPU
    per job in its feeder and manager threads).
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        *,
        processes: int | None = None,
        max_queue: int = 1000,
        initializer: Callable[[], object] | None = None,
    ) -> None:
        """``initializer`` (a module-level function) runs once in each new worker."""
        self._reactor = reactor
        self._processes = processes or os.cpu_count() or 2
        self._max_queue = max_queue
        self._initializer = initializer
        self._workers: list[_Worker] = []
        self._queue: deque[_Job] = deque()
        self._ids = itertools.count(1)
        self._running = False
        self._stopped: list[Deferred[None]] = []

    @property
    def processes(self) -> int:
        """How many worker processes the pool runs."""
        return self._processes

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet answered (for metrics)."""
        return len(self._queue) + sum(1 for worker in self._workers if worker.job is not None)

    def start(self) -> None:
        """Start the worker processes (idempotent)."""
        if self._running:
            return
        self._running = True
        for _ in range(self._processes):
            self._spawn()

    def _spawn(self) -> None:
        worker = _Worker(self)
        argv = [sys.executable, "-m", "gatekeeper.worker_process"]
        if self._initializer is not None:
            argv.append(f"{self._initializer.__module__}:{self._initializer.__qualname__}")
        self._workers.append(worker)
        self._reactor.spawnProcess(worker, sys.executable, argv, env=os.environ.copy(), childFDs={0: "w", 1: "r", 2: 2})

    def stop(self) -> Deferred[None]:
        """Stop the workers; queued jobs fail with :class:`WorkerCrashed`. Fires when all have exited."""
        self._running = False
        while self._queue:
            self._queue.popleft().result.errback(WorkerCrashed("the worker pool stopped"))
        done: Deferred[None] = Deferred()
        if not self._workers:
            done.callback(None)
            return done
        self._stopped.append(done)
        for worker in self._workers:
            worker.stop()
        return done

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``function(*args, **kwargs)`` in a worker and return its result.

        Exceptions raised by the function come back unchanged (when they pickle, as
        Gatekeeper's do).
        """
        if self.pending >= self._max_queue:
            raise WorkersBusy("the gateway is busy; try again later")
        self.start()
        job_id = next(self._ids)
        payload = pickle.dumps((job_id, function, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        job = _Job(job_id, payload, Deferred())
        del payload
        self._queue.append(job)
        self._dispatch()
        result: T = await job.result
        return result

    def _dispatch(self) -> None:
        for worker in self._workers:
            if not self._queue:
                return
            if worker.ready and worker.job is None:
                worker.send(self._queue.popleft())

    def _finished(self, worker: _Worker, job: _Job, ok: bool, value: Any) -> None:
        self._dispatch()
        if ok:
            job.result.callback(value)
        else:
            job.result.errback(value)

    def _lost(self, worker: _Worker) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        if worker.job is not None:
            job, worker.job = worker.job, None
            log.error("a worker process died while running a job; starting another")
            job.result.errback(WorkerCrashed("a worker process stopped; try again"))
        if self._running:
            self._spawn()
        elif not self._workers:
            stopped, self._stopped = self._stopped, []
            for d in stopped:
                d.callback(None)


class InlineWorkerPool:
    """Runs jobs at once in the calling process: for unit tests and one-shot CLI commands."""

    def __init__(self) -> None:
        self.jobs = 0
        self.pending = 0
        self.processes = 0

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call the function directly."""
        self.jobs += 1
        return function(*args, **kwargs)

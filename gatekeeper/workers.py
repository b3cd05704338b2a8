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

import concurrent.futures
import contextlib
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import ParamSpec, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from gatekeeper.errors import TemporaryError

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


class WorkerPool:
    """A bounded pool of worker processes, answered on the reactor thread.

    ``processes`` defaults to the number of CPUs. Processes are started with
    ``forkserver`` so they never inherit the reactor's threads or sockets.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        *,
        processes: int | None = None,
        max_queue: int = 1000,
        start_method: str = "forkserver",
        initializer: Callable[[], object] | None = None,
    ) -> None:
        """``initializer`` runs once in each new worker (e.g. to import the heavy modules)."""
        self._reactor = reactor
        self._processes = processes or os.cpu_count() or 2
        self._max_queue = max_queue
        self._context = multiprocessing.get_context(start_method)
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._pending = 0
        self._initializer = initializer

    @property
    def processes(self) -> int:
        """How many worker processes the pool runs."""
        return self._processes

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet answered (for metrics)."""
        return self._pending

    def start(self) -> None:
        """Start the worker processes (idempotent)."""
        if self._executor is None:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self._processes, mp_context=self._context, initializer=self._initializer
            )

    def stop(self) -> None:
        """Stop the workers; running jobs are abandoned and their callers get an error."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``function(*args, **kwargs)`` in a worker and return its result.

        Exceptions raised by the function come back unchanged (they must be picklable,
        as Gatekeeper's are).
        """
        if self._pending >= self._max_queue:
            raise WorkersBusy("the gateway is busy; try again later")
        self.start()
        assert self._executor is not None
        result: Deferred[T] = Deferred()
        self._pending += 1
        try:
            future = self._executor.submit(function, *args, **kwargs)
        except BrokenProcessPool:
            self._pending -= 1
            self._restart()
            raise WorkerCrashed("a worker process stopped; try again") from None

        def done(finished: concurrent.futures.Future[T]) -> None:
            self._reactor.callFromThread(self._answer, finished, result)

        future.add_done_callback(done)
        return await result

    def _answer(self, finished: concurrent.futures.Future[T], result: Deferred[T]) -> None:
        self._pending -= 1
        if finished.cancelled():
            result.errback(WorkerCrashed("the worker pool stopped"))
            return
        error = finished.exception()
        if isinstance(error, BrokenProcessPool):
            log.error("a worker process died; restarting the pool")
            self._restart()
            result.errback(WorkerCrashed("a worker process stopped; try again"))
        elif error is not None:
            result.errback(error)
        else:
            result.callback(finished.result())

    def _restart(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self.start()


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

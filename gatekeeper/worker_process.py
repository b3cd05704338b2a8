"""The program a worker process runs: read a job, run it, write the answer, repeat.

Started by :class:`gatekeeper.workers.WorkerPool` as ``python -m gatekeeper.worker_process
[module:initializer]``. Jobs arrive on stdin and answers leave on stdout as frames: a
4-byte big-endian length, then a pickle. The pool is the only writer and reader of these
pipes, and both ends are our own code, so pickle is the right format.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib
import os
import pickle
import select
import signal
import struct
import sys
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct(">I")
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031  # Linux: a bigger pipe means fewer wake-ups per 64 KB message
PR_SET_PDEATHSIG = 1
IDLE_SECONDS = 30.0
"""After this long without a job, a worker runs its idle hooks (see :func:`on_idle`)."""

_idle_hooks: list[Callable[[], None]] = []


def on_idle(hook: Callable[[], None]) -> None:
    """Run ``hook`` whenever this worker has waited :data:`IDLE_SECONDS` for a job.

    For what a job may keep between jobs but must not keep for long (rebuilt private
    keys): a hook forgets it, so an idle worker holds nothing of the kind.
    """
    if hook not in _idle_hooks:
        _idle_hooks.append(hook)


def wait_for_job(fd: int, seconds: float = IDLE_SECONDS) -> None:
    """Block until ``fd`` is readable, running the idle hooks every ``seconds`` meanwhile."""
    while not select.select([fd], [], [], seconds)[0]:
        for hook in _idle_hooks:
            hook()


def enlarge_pipe(fd: int) -> None:
    """Ask Linux for a 1 MB pipe buffer (ignored where not allowed)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)


def read_exactly(fd: int, size: int) -> bytes | None:
    """Read ``size`` bytes, or None at end of input."""
    chunks = []
    while size:
        chunk = os.read(fd, min(size, PIPE_SIZE))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte (the pipe may take it in pieces)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class JobFailed(Exception):
    """An exception that could not be sent back as itself (it did not pickle)."""


def answer(job_id: int, ok: bool, value: Any) -> bytes:
    """Frame one answer; an exception that does not pickle is replaced by its type and text."""
    try:
        payload = pickle.dumps((job_id, ok, value), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        replacement = JobFailed(f"{type(value).__name__}: {value}") if not ok else JobFailed("unpicklable result")
        payload = pickle.dumps((job_id, False, replacement), protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def serve(read_fd: int = 0, write_fd: int = 1) -> None:
    """Run jobs until the pool closes our stdin."""
    enlarge_pipe(read_fd)
    enlarge_pipe(write_fd)
    while True:
        wait_for_job(read_fd)
        header = read_exactly(read_fd, HEADER.size)
        if header is None:
            return
        body = read_exactly(read_fd, HEADER.unpack(header)[0])
        if body is None:
            return
        job_id, function, args, kwargs = pickle.loads(body)  # noqa: S301 - frames from our own pool
        try:
            result = function(*args, **kwargs)
        except Exception as error:
            frame = answer(job_id, False, error)
        else:
            frame = answer(job_id, True, result)
        del body, args, kwargs  # the job's bytes (messages, keys) go as soon as possible
        write_all(write_fd, frame)


def die_with_parent() -> None:
    """Ask Linux to kill this worker when the gateway's process dies (even by SIGKILL).

    Otherwise a worker in the middle of a long job (key generation, a large message)
    runs on, holding keys and plaintext, until the job ends.
    """
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def main() -> None:
    """Entry point: run the optional initializer, then serve jobs."""
    die_with_parent()
    # Our stdout is the answer pipe: anything a job prints must go elsewhere.
    answers = os.dup(1)
    os.dup2(2, 1)
    if len(sys.argv) > 1:
        module, _, name = sys.argv[1].partition(":")
        getattr(importlib.import_module(module), name)()
    with contextlib.suppress(BrokenPipeError):  # the gateway is gone: nobody to answer
        serve(0, answers)


if __name__ == "__main__":
    # Run the module under its real name, so that what it pickles (JobFailed) can be
    # found again by that name in the pool's process.
    from gatekeeper import worker_process

    worker_process.main()

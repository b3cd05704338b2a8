"""The audit log: every use of a private key and every admin change, one hash-chained JSON line each.

The events are the structured events of :mod:`gatekeeper.events` marked ``gk_audit``
(``key_use``: unlock, sign, decrypt; ``admin``: add_user, rotate, delete_user, ...).
:class:`AuditObserver` turns each into a record of a fixed set of fields (time, event,
operation, user, target, actor, via, session, message_id, peer, protocol): nothing
else of the event is copied, so a field that should never have been there (a password,
a body) cannot reach the file. The gateway and the ``gatekeeper`` command append to the
same file; each append holds an exclusive ``flock`` on it.

Each line is the record's canonical JSON (sorted keys, no spaces) with ``hash`` added
last::

    {"actor":"root","event":"admin",...,"prev":"<hash of line 11>","seq":12,...,"hash":"<SHA-256>"}

``seq`` counts records from 1, ``prev`` is the previous record's ``hash`` (64 zeros for
the first), and ``hash`` is the SHA-256 of the record's canonical JSON without the
``hash`` field. :func:`verify` (``gatekeeper audit verify``) recomputes the chain and
names the first line that was edited (its hash no longer matches), removed (``seq``
jumps, or ``prev`` does not match the line before) or inserted. A chain cannot tell
that lines were cut off at the end: keep the head hash that ``verify`` prints somewhere
else (a ticket, a mail) to detect that.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import getpass
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from zope.interface import implementer

from gatekeeper.config import Config
from gatekeeper.errors import GatekeeperError
from gatekeeper.events import emit

log = Logger()

__all__ = [
    "GENESIS",
    "RECORD_FIELDS",
    "AuditError",
    "AuditLog",
    "AuditObserver",
    "AuditService",
    "Problem",
    "Verification",
    "admin_event",
    "audit_log_path",
    "cli_actor",
    "cli_audit_trail",
    "record_from_event",
    "verify",
]

GENESIS = "0" * 64
# What a record may hold; everything else in an event is left out on purpose.
RECORD_FIELDS = (
    "operation",
    "user",
    "target",
    "actor",
    "via",
    "session",
    "message_id",
    "peer",
    "protocol",
)
MAX_VALUE = 320  # an address is at most 254 characters; nothing longer belongs here
_TAIL = 8192  # a record is well under 2 KB: the last line is in the file's last 8 KB


class AuditError(GatekeeperError):
    """The audit log could not be written or read."""


def audit_log_path(config: Config) -> Path:
    """Where the audit log is: ``[admin] audit_log``, else ``audit.log`` in the key store."""
    return config.admin.audit_log or config.keys.store / "audit.log"


def _canonical(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _digest(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(record).encode("ascii")).hexdigest()


def _value(value: Any) -> str | int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return str(value)[:MAX_VALUE]


def record_from_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """The audit record of a ``gk_audit`` log event: time, event name and the allowed fields."""
    moment = event.get("log_time")
    when = datetime.datetime.fromtimestamp(moment, datetime.UTC) if isinstance(moment, int | float) else _now()
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "event": _value(event.get("gk_event")),
    }
    for name in RECORD_FIELDS:
        if name in event:
            record[name] = _value(event[name])
    return record


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class AuditLog:
    """Appends hash-chained records to one file (created 0600), safe with several writers.

    The file stays open between appends; every append holds an exclusive ``flock`` and
    reads the last record again only when the file grew since this object's own last
    write (another writer, e.g. the CLI). A file moved away (rotated) is reopened.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._last: tuple[int, int, str] | None = None  # (file size, seq, hash) after our own write

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Add ``record`` (JSON-serialisable values) as the next line; return it with seq, prev and hash."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if self._last is not None and self._last[0] == size:
                    seq, previous = self._last[1], self._last[2]
                else:
                    seq, previous = _last_link(fd, size)
                chained = {key: value for key, value in record.items() if key not in ("seq", "prev", "hash")}
                chained["seq"] = seq + 1
                chained["prev"] = previous
                body = _canonical(chained)
                chained["hash"] = hashlib.sha256(body.encode("ascii")).hexdigest()
                line = f'{body[:-1]},"hash":"{chained["hash"]}"}}\n'.encode("ascii")
                written = os.write(fd, line)
                if written != len(line):
                    raise AuditError(f"short write to the audit log {self.path}")
                self._last = (size + written, chained["seq"], chained["hash"])
                return chained
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as error:
            self.close()
            raise AuditError(f"cannot write the audit log {self.path}: {error.strerror}") from None

    def _open(self) -> int:
        try:
            current = os.stat(self.path)
            identity: tuple[int, int] | None = (current.st_dev, current.st_ino)
        except FileNotFoundError:
            identity = None
        except OSError as error:
            raise AuditError(f"cannot open the audit log {self.path}: {error.strerror}") from None
        if self._fd is not None and identity == self._inode:
            return self._fd
        self.close()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise AuditError(f"cannot open the audit log {self.path}: {error.strerror}") from None
        opened = os.fstat(fd)
        self._fd, self._inode, self._last = fd, (opened.st_dev, opened.st_ino), None
        return fd

    def close(self) -> None:
        """Close the file (the next append opens it again)."""
        fd, self._fd, self._last = self._fd, None, None
        if fd is not None:
            os.close(fd)


def _last_link(fd: int, size: int) -> tuple[int, str]:
    """The seq and hash of the last record in the file (0 and the genesis hash when empty)."""
    if size == 0:
        return 0, GENESIS
    start = max(0, size - _TAIL)
    tail = os.pread(fd, size - start, start)
    lines = tail.rstrip(b"\n").split(b"\n")
    last = lines[-1]
    try:
        record = json.loads(last)
        return int(record["seq"]), str(record["hash"])
    except (ValueError, KeyError, TypeError):
        # A damaged last line (verify names it); chain on to its bytes so nothing is lost.
        return 0, hashlib.sha256(last).hexdigest()


# -- the observer -----------------------------------------------------------------------


@implementer(ILogObserver)
class AuditObserver:
    """Writes every ``gk_audit`` event to an :class:`AuditLog`.

    A failed write goes to ``on_error``; without one the :class:`AuditError` is raised
    (and the log publisher reports it). The event stays in the ordinary log either way.
    """

    def __init__(self, log: AuditLog, on_error: Callable[[AuditError], None] | None = None) -> None:
        self.log = log
        self.on_error = on_error
        self.written = 0

    def __call__(self, event: Mapping[str, Any]) -> None:
        """Append the event if it is audited."""
        if not event.get("gk_audit"):
            return
        try:
            self.log.append(record_from_event(event))
            self.written += 1
        except AuditError as error:
            if self.on_error is None:
                raise
            self.on_error(error)


class AuditService(Service):
    """Observes the global log publisher while the gateway runs."""

    def __init__(self, path: Path, publisher: LogPublisher = globalLogPublisher) -> None:
        self.observer = AuditObserver(AuditLog(path), on_error=self._failed)
        self.publisher = publisher
        self.failures = 0
        self._observing = False

    def _failed(self, error: AuditError) -> None:
        # Deliberately not an audited event (that would recurse): a plain critical line.
        self.failures += 1
        log.critical("audit log: {reason}", reason=str(error))

    def privilegedStartService(self) -> None:
        """Start observing before the listeners open, so no key use is missed."""
        super().privilegedStartService()
        self._add()

    def startService(self) -> None:
        """Observe (idempotent with :meth:`privilegedStartService`)."""
        super().startService()
        self._add()

    def _add(self) -> None:
        if not self._observing:
            self._observing = True
            self.publisher.addObserver(self.observer)

    def stopService(self) -> None:
        """Stop observing."""
        super().stopService()
        if self._observing:
            self._observing = False
            self.publisher.removeObserver(self.observer)
        self.observer.log.close()


def admin_event(operation: str, target: str, *, actor: str, via: str) -> None:
    """Emit the ``admin`` event of a change (audited): what, to whom, by whom, through what."""
    emit(
        log,
        "admin",
        "admin: {operation} {target} by {actor} via {via}",
        operation=operation,
        target=target,
        actor=actor,
        via=via,
    )


# -- the command line ----------------------------------------------------------------------


def cli_actor() -> str:
    """Who runs the ``gatekeeper`` command: the login name (and the sudo user behind it)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = f"uid {os.getuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo} (sudo as {user})" if sudo and sudo != user else user


class _ConfiguredAuditLog(AuditLog):
    """An audit log whose path is looked up at the first append (when the command has its config)."""

    def __init__(self, config: Callable[[], Config]) -> None:
        super().__init__(Path())
        self._config = config
        self._resolved = False

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Resolve the path once, then append."""
        if not self._resolved:
            try:
                self.path = audit_log_path(self._config())
            except GatekeeperError as error:
                raise AuditError(f"cannot find the audit log: {error}") from None
            self._resolved = True
        return super().append(record)


@contextlib.contextmanager
def cli_audit_trail(config: Callable[[], Config], publisher: LogPublisher = globalLogPublisher) -> Iterator[None]:
    """While a CLI command runs, write its audited events to the configured audit log.

    ``config`` returns the command's configuration (called at the first audited event,
    when the command has loaded it). A failed write fails the command after it finished.
    """
    errors: list[AuditError] = []
    observer = AuditObserver(_ConfiguredAuditLog(config), on_error=errors.append)
    publisher.addObserver(observer)
    try:
        yield
    finally:
        publisher.removeObserver(observer)
        observer.log.close()
    if errors:
        raise errors[0]


# -- verification ------------------------------------------------------------------------


@attrs.frozen
class Problem:
    """One place where the chain is broken: the line number (1-based) and what is wrong."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@attrs.frozen
class Verification:
    """The result of :func:`verify`: how many records, the head hash, and every problem."""

    path: Path
    records: int
    head: str
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        """True when the chain is intact."""
        return not self.problems


def verify(path: Path) -> Verification:
    """Check every line of the audit log at ``path``; problems name their line."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise AuditError(f"cannot read the audit log {path}: {error.strerror}") from None
    problems: list[Problem] = []
    expected_seq, expected_prev = 1, GENESIS
    previous_line = 0
    records = 0
    with handle:
        for number, raw in enumerate(handle, start=1):
            records += 1
            record = _parse(raw)
            if record is None:
                problems.append(Problem(number, "not an audit record (damaged or edited)"))
                expected_seq, expected_prev = expected_seq + 1, hashlib.sha256(raw.rstrip(b"\n")).hexdigest()
                previous_line = number
                continue
            seq, prev, claimed = record["seq"], record["prev"], record["hash"]
            body = {key: value for key, value in record.items() if key != "hash"}
            if _digest(body) != claimed:
                problems.append(Problem(number, "edited: its content does not match its hash"))
            elif seq > expected_seq:
                missing = seq - expected_seq
                where = "at the start of the log" if previous_line == 0 else f"after line {previous_line}"
                problems.append(Problem(number, f"{missing} record(s) removed {where} (seq {expected_seq} expected)"))
            elif seq < expected_seq:
                problems.append(Problem(number, f"out of sequence (seq {seq}, {expected_seq} expected): inserted"))
            elif prev != expected_prev:
                what = "the start of the chain" if previous_line == 0 else f"line {previous_line}"
                problems.append(Problem(number, f"does not follow {what}: that line was edited or replaced"))
            expected_seq, expected_prev = seq + 1, claimed
            previous_line = number
    return Verification(path, records, expected_prev, tuple(problems))


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    if not isinstance(record.get("seq"), int) or isinstance(record.get("seq"), bool):
        return None
    if not isinstance(record.get("prev"), str) or not isinstance(record.get("hash"), str):
        return None
    return record

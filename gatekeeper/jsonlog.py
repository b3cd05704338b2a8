"""Structured logs: one JSON object per line, for log shippers (journald, Vector, Fluent Bit, Loki...).

Run the gateway with::

    twistd -n --logger gatekeeper.jsonlog.observer gatekeeper --config etc/gatekeeper.toml

and every log event becomes one line on standard output (or appended to the file named
by the environment variable ``GATEKEEPER_JSON_LOG``)::

    {"time":"2025-01-01T12:00:00.000Z","level":"info","namespace":"gatekeeper.auth",
     "message":"login ok: alice@example.org from 127.0.0.1 (smtp)","gk_event":"login",
     "outcome":"ok","protocol":"smtp","user":"alice@example.org","client":"127.0.0.1"}

``message`` is the formatted text; the event's own fields follow as they are (numbers,
strings, lists), anything else as its ``str``. Twisted's bookkeeping fields
(``log_*``) are left out, except that a logged failure adds ``error`` and
``traceback``. The events carry no passwords, keys or message bodies (the rule of
:mod:`gatekeeper.events`), so neither do these lines.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent

__all__ = ["ENVIRONMENT", "event_as_json", "json_observer", "observer"]

ENVIRONMENT = "GATEKEEPER_JSON_LOG"
MAX_FIELD = 4096


def _jsonable(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value if not isinstance(value, str) else value[:MAX_FIELD]
    if isinstance(value, bytes):
        return value[:MAX_FIELD].decode("utf-8", "replace")
    if depth < 3 and isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(item, depth + 1) for item in value]
    if depth < 3 and isinstance(value, Mapping):
        return {str(key): _jsonable(item, depth + 1) for key, item in value.items()}
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return str(value)[:MAX_FIELD]


def event_as_json(event: Mapping[str, Any]) -> str:
    """One log event as one line of JSON (without the line end)."""
    moment = event.get("log_time")
    when = datetime.datetime.fromtimestamp(moment if isinstance(moment, int | float) else 0, datetime.UTC)
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": str(event.get("log_namespace", "")),
        "message": formatEvent(dict(event)),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = f"{getattr(failure.type, '__name__', failure.type)}: {failure.getErrorMessage()}"
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if not key.startswith("log_") and key not in record and key != "format" and key != "message":
            record[key] = _jsonable(value)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)


def json_observer(out: IO[str]) -> ILogObserver:
    """An observer writing :func:`event_as_json` lines to ``out``."""
    return FileLogObserver(out, lambda event: event_as_json(event) + "\n")


def observer() -> ILogObserver:
    """The ``twistd --logger`` factory: standard output, or the file ``$GATEKEEPER_JSON_LOG``."""
    path = os.environ.get(ENVIRONMENT)
    if not path or path == "-":
        return json_observer(sys.stdout)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    return json_observer(os.fdopen(fd, "a", encoding="utf-8", buffering=1))

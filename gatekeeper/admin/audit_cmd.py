"""``gatekeeper audit verify``: is the audit log's hash chain intact?

Exit status 0 when every line is in place and unchanged; 1 when a line was edited,
removed or inserted (each such line is named). The last line printed on success is the
head hash: keep it elsewhere to detect lines cut off at the end later.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gatekeeper.admin import cli
from gatekeeper.audit import audit_log_path, verify


def register(subparsers: Any) -> None:
    """Add ``audit`` and ``audit verify``."""
    audit = subparsers.add_parser("audit", help="the audit log of key use and admin changes")
    commands = audit.add_subparsers(title="audit commands", dest="audit_command", metavar="COMMAND", required=True)
    check = commands.add_parser("verify", help="check the hash chain; name every edited, removed or inserted line")
    check.add_argument("--file", metavar="FILE", help="the audit log (default: [admin] audit_log)")
    check.set_defaults(handler=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    """``audit verify``."""
    path = Path(args.file) if args.file else audit_log_path(cli.load(args))
    result = verify(path)
    for problem in result.problems:
        cli.output(f"{path}: {problem}")
    if not result.ok:
        cli.output(f"FAILED: {len(result.problems)} problem(s) in {result.records} line(s) of {path}")
        return 1
    cli.output(f"OK: {result.records} record(s) in {path}, chain intact; head {result.head}")
    return 0

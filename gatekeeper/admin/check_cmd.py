"""``gatekeeper check``: is the gateway in communication with the network?

Checks upstream SMTP/POP3/IMAP, every LDAP directory, the DNS resolver and the CRLs
(:mod:`gatekeeper.admin.check`, the same code as the console's ``gk.check()``), prints
a table and a verdict, and exits 0 when everything passed, 1 when something failed.

Unlike ``gatekeeper lookup`` this runs on the process's global reactor: Twisted's TLS
transports flush small writes on the global reactor (``BufferingTLSTransport``), so
STARTTLS and implicit TLS do not work on a private one. The command is its own
process, so the reactor is its to run, once; call :func:`run_checks` with your own
reactor from code that already runs one (the console does).
"""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gatekeeper.admin import cli
from gatekeeper.admin.check import DEFAULT_TIMEOUT, CheckReport, configured_anchors, run_checks
from gatekeeper.config import Config


def register(subparsers: Any) -> None:
    """Add ``check``."""
    parser = subparsers.add_parser(
        "check",
        help="check upstream mail servers, directories, DNS and CRLs: reachable, TLS, login, round trip",
        description="Exit status 0 when every check passed, 1 when one failed.",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for each server (default {DEFAULT_TIMEOUT:g})",
    )
    parser.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    """``check``."""
    if not args.timeout > 0:
        raise cli.UsageError("check: --timeout must be a positive number of seconds")
    report = check(cli.load(args), timeout=args.timeout)
    for line in report.table():
        cli.output(line)
    return 0 if report.ok else 1


def check(config: Config, *, timeout: float = DEFAULT_TIMEOUT) -> CheckReport:
    """Run every check on the global reactor, which must not have run yet in this process."""
    from twisted.internet import reactor

    anchors = configured_anchors(config)
    outcome: list[CheckReport | Failure] = []

    def start() -> None:
        running: Deferred[CheckReport] = Deferred.fromCoroutine(
            run_checks(config, reactor, anchors=anchors, timeout=timeout)
        )
        running.addBoth(outcome.append)
        running.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:  # stopped by a signal before the checks finished
        raise KeyboardInterrupt
    (result,) = outcome
    if isinstance(result, Failure):
        result.raiseException()
    assert isinstance(result, CheckReport)
    return result

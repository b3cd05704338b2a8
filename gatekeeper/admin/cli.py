"""The ``gatekeeper`` command: set up the key store, manage users and the key ring.

Usage: ``gatekeeper [--config FILE] COMMAND ...`` (``--config`` and ``--debug`` are also
accepted after any command name; the default configuration is ``etc/gatekeeper.toml``).

Commands come from the modules named in :data:`COMMAND_MODULES`; each exposes
``register(subparsers) -> None`` and adds its parsers with ``subparsers.add_parser(...)``
and a handler with ``parser.set_defaults(handler=function)``. A handler takes the parsed
``argparse.Namespace`` and returns an exit status (or None for 0); it uses
:func:`load`, :func:`read_password` and :func:`output` from here. Every parser made
through ``add_parser`` (at any depth) accepts ``--config`` and ``--debug``.

Errors are one line on stderr, ``gatekeeper: <message>``, never a traceback: exit
status 2 for configuration and usage errors, 1 for anything else. An unexpected
exception says so in one line (without its text, which could hold anything) and
``--debug`` shows the traceback. Passwords are read with ``getpass`` (never echoed) or
from a file named by an option: never from the command line.
"""

from __future__ import annotations

import argparse
import getpass
import hmac
import importlib
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from gatekeeper.audit import cli_audit_trail
from gatekeeper.config import DEFAULT_CONFIG_PATH, Config, load_config
from gatekeeper.errors import ConfigError, GatekeeperError, InvalidPassword

__all__ = [
    "COMMAND_MODULES",
    "CommandParser",
    "UsageError",
    "build_parser",
    "load",
    "main",
    "output",
    "read_password",
    "read_password_file",
]

COMMAND_MODULES: tuple[str, ...] = (
    "gatekeeper.admin.init_cmd",
    "gatekeeper.admin.user_cmd",
    "gatekeeper.admin.cert_cmd",
    "gatekeeper.admin.smime_cmd",
    "gatekeeper.admin.lookup_cmd",
    "gatekeeper.admin.upstream_cmd",
    "gatekeeper.admin.check_cmd",
    "gatekeeper.admin.audit_cmd",
    "gatekeeper.admin.admin_cmd",
    "gatekeeper.admin.demo_cmd",
)

MAX_PASSWORD_FILE = 4096


class UsageError(GatekeeperError):
    """The command line is wrong (exit status 2, like a configuration error)."""


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose every level accepts ``--config`` and ``--debug``.

    Sub-parsers inherit the class (argparse's default), so commands that other modules
    register get both options too. Below the top level they default to "not given",
    so ``gatekeeper --config X user list`` and ``gatekeeper user list --config X`` both
    work. Usage errors raise :class:`UsageError` instead of exiting.
    """

    def __init__(self, *args: Any, top_level: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--config",
            metavar="FILE",
            default=DEFAULT_CONFIG_PATH if top_level else argparse.SUPPRESS,
            help=f"the configuration file (default: {DEFAULT_CONFIG_PATH})",
        )
        self.add_argument(
            "--debug",
            action="store_true",
            default=False if top_level else argparse.SUPPRESS,
            help="show a traceback when something unexpected fails",
        )

    def error(self, message: str) -> NoReturn:
        """Raise a :class:`UsageError` naming the command (argparse would print and exit)."""
        command = self.prog.partition(" ")[2]
        raise UsageError(f"{command + ': ' if command else ''}{message} (see --help)")


def build_parser() -> CommandParser:
    """Build the parser with every command of :data:`COMMAND_MODULES`."""
    parser = CommandParser(
        prog="gatekeeper",
        description="Gatekeeper, the S/MIME e-mail encryption gateway: administration.",
        top_level=True,
    )
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


# -- helpers for command handlers -----------------------------------------------------


def load(args: argparse.Namespace) -> Config:
    """Load (once) the configuration named by ``--config``."""
    config: Config | None = getattr(args, "loaded_config", None)
    if config is None:
        config = load_config(args.config)
        args.loaded_config = config
    return config


def output(line: str = "") -> None:
    """Print one line of a command's result on stdout."""
    print(line, file=sys.stdout)


def read_password_file(path: str) -> str:
    """Read a password from a file (``-``: one line of standard input), without its line end."""
    if path == "-":
        text = sys.stdin.readline()
    else:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read(MAX_PASSWORD_FILE + 1)
        except FileNotFoundError:
            raise UsageError(f"password file not found: {path}") from None
        except UnicodeDecodeError:
            raise UsageError(f"the password file is not UTF-8 text: {path}") from None
        except OSError as error:
            raise UsageError(f"cannot read the password file {path}: {error.strerror}") from None
        if len(text) > MAX_PASSWORD_FILE:
            raise UsageError(f"the password file is too long: {path}")
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return text


def read_password(path: str | None, prompt: str, *, confirm: bool = False) -> str:
    """Return a password from ``path`` (see :func:`read_password_file`) or asked with getpass.

    With ``confirm``, a typed password is asked twice and must match.
    """
    if path is not None:
        return read_password_file(path)
    if not sys.stdin.isatty():
        # getpass would fall back to reading stdin with echo: refuse instead.
        raise UsageError("no terminal to ask for a password; use a --...password-file option ('-' for stdin)")
    first = getpass.getpass(prompt)
    if confirm:
        second = getpass.getpass("Repeat it: ")
        if not hmac.compare_digest(first.encode("utf-8"), second.encode("utf-8")):
            raise InvalidPassword("the two passwords do not match")
    return first


# -- the entry point --------------------------------------------------------------------


def _fail(message: str) -> None:
    print(f"gatekeeper: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (the console script exits with it)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(arguments)
    except UsageError as error:
        _fail(str(error))
        return 2
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    debug = bool(getattr(args, "debug", False))
    try:
        with cli_audit_trail(lambda: load(args)):  # admin changes are audited, as through the console
            status = args.handler(args)
    except (ConfigError, UsageError) as error:
        _fail(str(error))
        return 2
    except GatekeeperError as error:
        _fail(str(error))
        return 1
    except (KeyboardInterrupt, EOFError):
        _fail("interrupted")
        return 130
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        _fail(f"{error.strerror or type(error).__name__}{where}")
        return 1
    except Exception as error:
        # The text of an unexpected exception could hold anything (even key material):
        # name its type only, and show the traceback when asked to.
        if debug:
            traceback.print_exc(file=sys.stderr)
        _fail(f"unexpected error ({type(error).__name__}); run with --debug for details")
        return 1
    return 0 if status is None else int(status)

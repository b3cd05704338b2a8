"""``gatekeeper upstream ...``: per-user logins for the upstream mail server (POP3 and IMAP).

By default a user's own gateway login is passed through to the upstream server
(``[upstream] pass_through``). Where the upstream server knows the user under another
name or password, ``upstream set`` stores them sealed to the user's certificates (see
:mod:`gatekeeper.upstream.credentials`): only a login with the user's password can open
them, and nobody can read them back, so ``upstream show`` only says whether they exist.
"""

from __future__ import annotations

import argparse
from typing import Any

from gatekeeper.address import normalize_address
from gatekeeper.admin import cli
from gatekeeper.audit import admin_event, cli_actor
from gatekeeper.config import Config
from gatekeeper.errors import UnknownUser
from gatekeeper.keys.store import FileKeyStore
from gatekeeper.upstream.credentials import CredentialStore


def register(subparsers: Any) -> None:
    """Add ``upstream`` and its sub-commands."""
    upstream = subparsers.add_parser("upstream", help="per-user logins for the upstream mail server")
    commands = upstream.add_subparsers(
        title="upstream commands", dest="upstream_command", metavar="COMMAND", required=True
    )

    store = commands.add_parser("set", help="store a user's upstream login, sealed to the user's keys")
    store.add_argument("address", help="the gateway user")
    store.add_argument("--login", required=True, metavar="NAME", help="the user name on the upstream server")
    store.add_argument(
        "--password-file", metavar="FILE", help="read the upstream password from FILE ('-': standard input)"
    )
    store.set_defaults(handler=run_set)

    clear = commands.add_parser("clear", help="forget a user's upstream login (back to pass-through)")
    clear.add_argument("address")
    clear.set_defaults(handler=run_clear)

    show = commands.add_parser("show", help="how a user logs in upstream")
    show.add_argument("address")
    show.set_defaults(handler=run_show)


def open_credentials(config: Config) -> CredentialStore:
    """The configured key store's upstream logins."""
    return CredentialStore(config.keys.store / "upstream-logins")


def run_set(args: argparse.Namespace) -> int:
    """``upstream set``: seal the login to the user's current (and pending) certificates."""
    config = cli.load(args)
    address = normalize_address(args.address)
    user = FileKeyStore(config.keys.store).get_user(address)
    if user is None:
        raise UnknownUser(f"no such user: {address}")
    password = cli.read_password(args.password_file, f"Upstream password for {address}: ", confirm=True)
    certificates = [user.current.certificate, *(pending.certificate for pending in user.pending)]
    open_credentials(config).put(user.address, certificates, args.login, password)
    admin_event("set_upstream_login", user.address, actor=cli_actor(), via="cli")
    cli.output(f"{user.address} logs in upstream as {args.login} (sealed to {len(certificates)} certificate(s))")
    return 0


def run_clear(args: argparse.Namespace) -> int:
    """``upstream clear``."""
    config = cli.load(args)
    address = normalize_address(args.address)
    if not open_credentials(config).remove(address):
        cli.output(f"{address} has no stored upstream login")
        return 1
    admin_event("clear_upstream_login", address, actor=cli_actor(), via="cli")
    cli.output(f"{address}: stored upstream login removed")
    return 0


def run_show(args: argparse.Namespace) -> int:
    """``upstream show``: stored, pass-through, or no way to log in."""
    config = cli.load(args)
    address = normalize_address(args.address)
    if open_credentials(config).sealed(address) is not None:
        cli.output(f"{address}: a stored upstream login (sealed; only the user's login opens it)")
    elif config.upstream.pass_through:
        cli.output(f"{address}: pass-through (the gateway login is used upstream)")
    else:
        cli.output(f"{address}: none (pass_through is off): this user cannot fetch mail")
        return 1
    return 0

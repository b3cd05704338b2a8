"""``gatekeeper admin ...``: the administrators of the web page.

``admin add NAME`` asks for a password twice (or reads it from ``--password-file``) and
stores its scrypt hash in ``[admin] web_admins``
(:class:`~gatekeeper.admin.web.admins.AdminAccounts`); ``--replace`` sets a new password
for an existing administrator. ``admin list`` and ``admin remove NAME`` do what they
say. The running gateway reads the file at every login: no restart is needed. Changes
are audited (``add_admin``, ``remove_admin``).
"""

from __future__ import annotations

import argparse
from typing import Any

from gatekeeper.admin import cli
from gatekeeper.admin.web.admins import AdminAccounts, admins_path, check_admin_password, check_name
from gatekeeper.audit import admin_event, cli_actor


def register(subparsers: Any) -> None:
    """Add ``admin`` and its sub-commands."""
    admin = subparsers.add_parser("admin", help="the administrators of the web page")
    commands = admin.add_subparsers(title="admin commands", dest="admin_command", metavar="COMMAND", required=True)

    add = commands.add_parser("add", help="add an administrator (or, with --replace, set a new password)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--password-file", metavar="FILE", help="read the password from FILE ('-': stdin)")
    add.add_argument("--replace", action="store_true", help="set a new password for an existing administrator")
    add.set_defaults(handler=run_add)

    listing = commands.add_parser("list", help="list the administrators")
    listing.set_defaults(handler=run_list)

    remove = commands.add_parser("remove", help="remove an administrator")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=run_remove)


def run_add(args: argparse.Namespace) -> int:
    """``admin add NAME``."""
    config = cli.load(args)
    name = check_name(args.name)  # a bad name is reported before the password is asked
    accounts = AdminAccounts(admins_path(config))
    if name in accounts.records() and not args.replace:
        raise cli.UsageError(f"the administrator {name} already exists (use --replace to set a new password)")
    password = cli.read_password(args.password_file, f"Password for {name}: ", confirm=True)
    check_admin_password(password)
    accounts.add(name, password, replace=args.replace)
    admin_event("add_admin", name, actor=cli_actor(), via="cli")
    cli.output(f"{'new password for' if args.replace else 'added'} administrator {name} ({accounts.path})")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """``admin list``."""
    records = AdminAccounts(admins_path(cli.load(args))).records()
    if not records:
        cli.output("no administrators; add one with `gatekeeper admin add NAME`")
    for name, record in sorted(records.items()):
        cli.output(f"{name}  added {record.created:%Y-%m-%d %H:%M} UTC")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    """``admin remove NAME``."""
    accounts = AdminAccounts(admins_path(cli.load(args)))
    if not accounts.remove(args.name):
        cli.output(f"no administrator {args.name}")
        return 1
    admin_event("remove_admin", args.name, actor=cli_actor(), via="cli")
    cli.output(f"removed administrator {args.name}")
    return 0

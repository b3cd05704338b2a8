"""``gatekeeper user ...``: add, list, re-key, delete and export the gateway's users.

Every command goes through :class:`~gatekeeper.keys.accounts.Accounts`, the same code the
SSH console and the web page use.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from gatekeeper.address import normalize_address
from gatekeeper.admin import cli
from gatekeeper.audit import admin_event, cli_actor
from gatekeeper.config import Config
from gatekeeper.errors import KeyStoreError
from gatekeeper.interfaces import StoredUser
from gatekeeper.keys.accounts import Accounts, current_certificate
from gatekeeper.keys.ca import CertificateAuthority, ca_directory, open_ca
from gatekeeper.keys.discovery import build_publisher
from gatekeeper.keys.store import FileKeyStore


def register(subparsers: Any) -> None:
    """Add ``user`` and its sub-commands."""
    user = subparsers.add_parser("user", help="manage the gateway's users and their key pairs")
    commands = user.add_subparsers(title="user commands", dest="user_command", metavar="COMMAND", required=True)

    add = commands.add_parser("add", help="create a user with a new key pair and certificate")
    add.add_argument("address")
    add.add_argument("--password-file", metavar="FILE", help="read the password from FILE ('-': stdin)")
    add.set_defaults(handler=run_add)

    listing = commands.add_parser("list", help="list users: certificate expiry, keys, last login")
    listing.set_defaults(handler=run_list)

    passwd = commands.add_parser("passwd", help="change a user's password (re-encrypts every key)")
    passwd.add_argument("address")
    passwd.add_argument("--old-password-file", metavar="FILE", help="read the current password from FILE")
    passwd.add_argument("--new-password-file", metavar="FILE", help="read the new password from FILE")
    passwd.set_defaults(handler=run_passwd)

    rotate = commands.add_parser(
        "rotate",
        help="give a user a new key pair and certificate (old keys are kept for old mail)",
        description=(
            "Without the user's password the new private key is encrypted to the user's current key "
            "and completed at the user's next login."
        ),
    )
    rotate.add_argument("address")
    how = rotate.add_mutually_exclusive_group()
    how.add_argument("--password-file", metavar="FILE", help="read the user's password from FILE")
    how.add_argument("--ask-password", action="store_true", help="ask for the user's password")
    rotate.set_defaults(handler=run_rotate)

    delete = commands.add_parser("delete", help="delete a user's keys and revoke their certificates")
    delete.add_argument("address")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.set_defaults(handler=run_delete)

    export = commands.add_parser("export", help="write the current key as PKCS#12 for a mail client")
    export.add_argument("address")
    export.add_argument("--out", metavar="FILE", required=True, help="the file to create (must not exist)")
    export.add_argument("--legacy", action="store_true", help="3DES encryption, for importers that need it")
    export.add_argument("--password-file", metavar="FILE", help="read the user's password from FILE")
    export.add_argument("--export-password-file", metavar="FILE", help="read the file's password from FILE")
    export.set_defaults(handler=run_export)


def open_accounts(config: Config) -> Accounts:
    """Return the :class:`Accounts` of an initialised key store (the CA is opened when needed)."""
    if not CertificateAuthority.exists(ca_directory(config.keys)):
        raise KeyStoreError(f"no key store at {config.keys.store}; run `gatekeeper --config {config.path} init` first")
    return Accounts(
        FileKeyStore(config.keys.store),
        lambda: open_ca(config.keys),
        config.keys,
        publisher=build_publisher(config.directory),
    )


def run_add(args: argparse.Namespace) -> int:
    """``user add``."""
    accounts = open_accounts(cli.load(args))
    address = normalize_address(args.address)  # a typo is reported before the password is asked
    password = cli.read_password(args.password_file, f"Password for {address}: ", confirm=True)
    user = accounts.add(address, password)
    admin_event("add_user", user.address, actor=cli_actor(), via="cli")
    certificate = user.current.certificate
    cli.output(f"added {user.address}: key {user.current.key_id}, certificate valid until {_date(certificate)}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """``user list``."""
    users = open_accounts(cli.load(args)).list()
    if not users:
        cli.output("no users")
        return 0
    rows = [("ADDRESS", "CERTIFICATE EXPIRES", "KEYS", "LAST LOGIN")]
    rows.extend(_row(user) for user in users)
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        cli.output("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0


def _row(user: StoredUser) -> tuple[str, str, str, str]:
    keys = str(len(user.keys))
    if user.pending:
        keys += f" (+{len(user.pending)} pending)"
    last = "never" if user.last_login is None else f"{user.last_login.astimezone(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    return user.address, _date(current_certificate(user)), keys, last


def run_passwd(args: argparse.Namespace) -> int:
    """``user passwd``."""
    accounts = open_accounts(cli.load(args))
    user = accounts.get(args.address)
    old = cli.read_password(args.old_password_file, f"Current password of {user.address}: ")
    new = cli.read_password(args.new_password_file, f"New password for {user.address}: ", confirm=True)
    updated = accounts.change_password(user.address, old, new)
    admin_event("passwd", updated.address, actor=cli_actor(), via="cli")
    cli.output(f"changed the password of {updated.address} ({len(updated.keys)} keys re-encrypted)")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    """``user rotate``."""
    accounts = open_accounts(cli.load(args))
    user = accounts.get(args.address)
    password = None
    if args.password_file is not None or args.ask_password:
        password = cli.read_password(args.password_file, f"Password of {user.address}: ")
    updated = accounts.rotate(user.address, password)
    admin_event("rotate", updated.address, actor=cli_actor(), via="cli")
    certificate = current_certificate(updated)
    if updated.pending:
        cli.output(
            f"rotated {updated.address}: new certificate valid until {_date(certificate)}; "
            "the new key is completed at the user's next login"
        )
    else:
        cli.output(f"rotated {updated.address}: new key {updated.current.key_id}, valid until {_date(certificate)}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    """``user delete``."""
    accounts = open_accounts(cli.load(args))
    user = accounts.get(args.address)
    if not args.yes:
        if not sys.stdin.isatty():
            raise cli.UsageError("not deleting without confirmation: run it in a terminal or add --yes")
        answer = input(f"Delete {user.address} and revoke its {len(user.keys)} certificate(s)? Type the address: ")
        if answer.strip().casefold() != user.address.casefold():
            cli.output("not deleted")
            return 1
    accounts.delete(user.address)
    admin_event("delete_user", user.address, actor=cli_actor(), via="cli")
    cli.output(f"deleted {user.address}; its certificates are revoked")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``user export``."""
    accounts = open_accounts(cli.load(args))
    user = accounts.get(args.address)
    out = Path(args.out)
    if out.exists():
        raise cli.UsageError(f"{out} already exists; choose another file")
    password = cli.read_password(args.password_file, f"Password of {user.address}: ")
    export_password = cli.read_password(
        args.export_password_file, "Password to protect the exported file: ", confirm=True
    )
    data = accounts.export(user.address, password, export_password, legacy=args.legacy)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    admin_event("export", user.address, actor=cli_actor(), via="cli")
    cli.output(f"wrote {out} ({'3DES, legacy' if args.legacy else 'AES-256'}) for {user.address}")
    return 0


def _date(certificate: x509.Certificate) -> str:
    return f"{certificate.not_valid_after_utc:%Y-%m-%d}"

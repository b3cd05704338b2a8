"""``gatekeeper cert ...``: the local key ring of other people's certificates.

The key ring itself is :class:`gatekeeper.keys.keyring.KeyRing`, kept in
``<key store>/keyring``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cryptography import x509

from gatekeeper.admin import cli
from gatekeeper.audit import admin_event, cli_actor
from gatekeeper.config import Config
from gatekeeper.keys.keyring import KeyRing, certificate_addresses, fingerprint

MAX_CERTIFICATE_FILE = 10 * 1024 * 1024


def register(subparsers: Any) -> None:
    """Add ``cert`` and its sub-commands."""
    cert = subparsers.add_parser("cert", help="the key ring of other people's certificates")
    commands = cert.add_subparsers(title="cert commands", dest="cert_command", metavar="COMMAND", required=True)

    imported = commands.add_parser("import", help="import certificates (PEM, DER or a PKCS#7 .p7c bundle)")
    imported.add_argument("files", nargs="+", metavar="FILE")
    imported.set_defaults(handler=run_import)

    listing = commands.add_parser("list", help="list the key ring's certificates")
    listing.set_defaults(handler=run_list)

    remove = commands.add_parser("remove", help="remove a certificate by its SHA-256 fingerprint")
    remove.add_argument("fingerprint")
    remove.set_defaults(handler=run_remove)


def open_keyring(config: Config) -> KeyRing:
    """Return the key ring of the configured key store."""
    return KeyRing(config.keys.store / "keyring")


def run_import(args: argparse.Namespace) -> int:
    """``cert import``: every file is read before anything is imported."""
    keyring = open_keyring(cli.load(args))
    contents = []
    for name in args.files:
        path = Path(name)
        with path.open("rb") as handle:
            data = handle.read(MAX_CERTIFICATE_FILE + 1)
        if len(data) > MAX_CERTIFICATE_FILE:
            raise cli.UsageError(f"{path} is larger than {MAX_CERTIFICATE_FILE} bytes")
        contents.append(data)
    count = 0
    for data in contents:
        for certificate in keyring.import_certificates(data):
            cli.output(f"imported {_describe(certificate)}")
            admin_event("import_cert", fingerprint(certificate), actor=cli_actor(), via="cli")
            count += 1
    cli.output(f"{count} certificate(s) imported")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """``cert list``."""
    certificates = open_keyring(cli.load(args)).certificates()
    if not certificates:
        cli.output("the key ring is empty")
    for certificate in certificates:
        cli.output(_describe(certificate))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    """``cert remove``."""
    if not open_keyring(cli.load(args)).remove(args.fingerprint):
        cli.output(f"no certificate with fingerprint {args.fingerprint}")
        return 1
    admin_event("remove_cert", args.fingerprint, actor=cli_actor(), via="cli")
    cli.output(f"removed {args.fingerprint}")
    return 0


def _describe(certificate: x509.Certificate) -> str:
    names = ", ".join(certificate_addresses(certificate)) or certificate.subject.rfc4514_string()
    return f"{fingerprint(certificate)}  until {certificate.not_valid_after_utc:%Y-%m-%d}  {names}"

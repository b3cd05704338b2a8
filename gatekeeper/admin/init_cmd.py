"""``gatekeeper init``: create the key store, the CA (and its passphrase) and the TLS certificate."""

from __future__ import annotations

import argparse
from typing import Any

from gatekeeper.admin import cli
from gatekeeper.keys.ca import initialize


def register(subparsers: Any) -> None:
    """Add the ``init`` command."""
    parser = subparsers.add_parser(
        "init",
        help="create the key store, the built-in CA and the TLS certificate",
        description=(
            "Create the key store directories, the CA passphrase (unless [keys] names one), the built-in CA, "
            "its CRL and a TLS certificate for [server] hostname, localhost and 127.0.0.1."
        ),
    )
    parser.add_argument(
        "--if-absent",
        action="store_true",
        help="succeed when already initialised (completing a missing TLS certificate or an expiring CRL)",
    )
    parser.set_defaults(handler=run_init)


def run_init(args: argparse.Namespace) -> int:
    """Initialise the key store named by the configuration."""
    config = cli.load(args)
    done = initialize(config, if_absent=args.if_absent)
    for line in done:
        cli.output(line)
    if not done:
        cli.output(f"already initialised: {config.keys.store}")
    return 0

"""Embedded store benchmark: the gateway as its own mail system, against Dovecot holding the same mail.

Set-up: the same N messages of 64 KB (90% plain, 10% encrypted to the user, as in
``bench/imap.py``) written into a Dovecot of its own (straight into its Maildir, indexed
once with ``doveadm``) and delivered into the embedded store of a gateway that has no
``[upstream]`` (``twistd -n gatekeeper`` as a separate process). Measured with Python's
imaplib, in the same run:

1. ``FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE)`` through the gateway over its embedded
   store (second run: the encrypted ones were revealed once and the plain ones'
   envelopes kept, as Dovecot keeps them in its cache), against the same listing
   straight from Dovecot (warm): what the embedded default costs compared with running
   a real IMAP server and reading it directly;
2. ``BODY[]`` of one plain message through the gateway over its embedded store, against
   straight from Dovecot (median of 30).

Usage: ``python bench/embedded.py [--messages 2000]``. The last lines are the targets:
``ratio NAME = VALUE (target OP VALUE)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gatekeeper.config import load_config  # noqa: E402
from gatekeeper.keys.accounts import Accounts  # noqa: E402
from gatekeeper.keys.ca import initialize, open_ca  # noqa: E402
from gatekeeper.keys.store import FileKeyStore  # noqa: E402
from gatekeeper.localstore import LocalStore  # noqa: E402
from tests.fixtures.dovecot import Dovecot  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_imap", REPO / "bench" / "imap.py")
assert _spec is not None and _spec.loader is not None
imap_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(imap_bench)
USER, PASSWORD = imap_bench.USER, imap_bench.PASSWORD


class EmbeddedGateway(imap_bench.Gateway):  # type: ignore[name-defined]
    """The gateway with no ``[upstream]``: its own embedded store under ``mail/``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self.port = imap_bench.free_port()
        others = "".join(f'[{name}]\nstarttls = ""\ntls = ""\n' for name in ("smtp", "pop3"))
        config_path = directory / "gatekeeper.toml"
        config_path.write_text(
            '[server]\nhostname = "bench.test"\ndomains = ["example.org"]\n'
            f'{others}[imap]\nstarttls = ""\ntls = "tcp:{self.port}:interface=127.0.0.1"\n'
            f"cache_bytes = {256 * 1024 * 1024}\n"
            '[keys]\nstore = "keys"\nkey_type = "p256"\nunlock_cache_seconds = 3600\n'
            '[tls]\ncertificate = "keys/tls/server.crt"\nkey = "keys/tls/server.key"\n'
            '[upstream.store]\ndata_dir = "mail"\n'
        )
        self.config = load_config(config_path)
        initialize(self.config)
        accounts = Accounts(FileKeyStore(self.config.keys.store), lambda: open_ca(self.config.keys), self.config.keys)
        accounts.add(USER, PASSWORD)
        user = FileKeyStore(self.config.keys.store).get_user(USER)
        assert user is not None
        self.certificate = user.current.certificate
        self.ca_file = accounts.ca.certificate_path
        self.config_path = config_path
        self.process = None

    def fill(self, count: int) -> None:
        """Deliver the messages as the SMTP side does (each written, fsync-ed and indexed)."""
        store = LocalStore.from_config(self.config)
        try:
            for index in range(count):
                certificate = self.certificate if index % 10 == 9 else None
                report = store.deliver([USER], imap_bench.message(index, certificate=certificate))
                assert report.all_delivered, report
        finally:
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    count = args.messages
    with imap_bench.workspace() as work:
        dovecot = Dovecot(directory=work / "dovecot")
        dovecot.add_user(USER, PASSWORD)
        gateway = EmbeddedGateway(work / "gateway")
        began = time.perf_counter()
        imap_bench.fill_maildir(dovecot, gateway.certificate, count)
        gateway.fill(count)
        dovecot.start()
        imap_bench.index_mailbox(dovecot)
        gateway.start()
        print(f"set-up: {count} messages in Dovecot and in the embedded store in {time.perf_counter() - began:.1f} s")
        try:
            run(dovecot, gateway, count)
        finally:
            gateway.stop()
            dovecot.cleanup()


def run(dovecot: Dovecot, gateway: EmbeddedGateway, count: int) -> None:
    plain_direct = imap_bench.direct(dovecot)
    plain_direct.select("INBOX", readonly=True)
    imap_bench.timed_listing(plain_direct, count)  # warm-up: Dovecot caches the envelopes
    direct_listing = min(imap_bench.timed_listing(plain_direct, count) for _ in range(3))
    print(f"listing, Dovecot direct:                 {direct_listing * 1000:8.1f} ms")

    client = gateway.connect()
    client.select("INBOX", readonly=True)
    first = imap_bench.timed_listing(client, count)
    print(f"listing, embedded via Gatekeeper, 1st:   {first * 1000:8.1f} ms (reveals {count // 10})")
    second = min(imap_bench.timed_listing(client, count) for _ in range(3))
    print(f"listing, embedded via Gatekeeper, 2nd:   {second * 1000:8.1f} ms")

    plain = imap_bench.timed_body(plain_direct, 1, 30)
    embedded = imap_bench.timed_body(client, 1, 30)
    print(f"BODY[] plain, Dovecot direct:            {plain * 1000:6.2f} ms")
    print(f"BODY[] plain, embedded via Gatekeeper:   {embedded * 1000:6.2f} ms")
    client.logout()
    plain_direct.logout()

    print(f"ratio embedded_listing_vs_dovecot_direct = {second / direct_listing:.2f} (target <= 1.3)")
    print(f"ratio embedded_body_minus_dovecot_direct_ms = {(embedded - plain) * 1000:.2f} (target <= 5)")


if __name__ == "__main__":
    main()

"""IMAP proxy benchmark: a 10,000-message mailbox in Dovecot, through Gatekeeper and direct.

Set-up (a minute or so): a Dovecot of its own (``tests/fixtures/dovecot.py``) whose INBOX
gets 10,000 messages of 64 KB written straight into its Maildir (90% plain, 10%
encrypted to the user by Gatekeeper's S/MIME engine, as another gateway would have
sent them), indexed once with ``doveadm``; and the real gateway (``twistd -n
gatekeeper``) as a separate process, proxying IMAPS to that Dovecot. Measured with
Python's imaplib, in the same run:

1. ``FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE)``: direct to Dovecot (after a warm-up run),
   then through Gatekeeper the first time (every message is classified, the 1,000
   encrypted ones are downloaded and revealed) and the second time (from the per-user
   index: nothing is decrypted again);
2. ``BODY[]`` of one encrypted message through Gatekeeper once cached, against
   ``BODY[]`` of one plain message straight from Dovecot (median of 30);
3. the gateway's resident memory before and after 1,000 logged-in idle sessions.

Usage: ``python bench/imap.py [--messages 10000] [--sessions 1000]``. The last lines
are the targets: ``ratio NAME = VALUE (target OP VALUE)``.
"""

from __future__ import annotations

import argparse
import contextlib
import imaplib
import os
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography import x509  # noqa: E402

from gatekeeper import smime  # noqa: E402
from gatekeeper.config import load_config  # noqa: E402
from gatekeeper.keys.accounts import Accounts  # noqa: E402
from gatekeeper.keys.ca import initialize, open_ca  # noqa: E402
from gatekeeper.keys.store import FileKeyStore  # noqa: E402
from tests.fixtures.dovecot import Dovecot  # noqa: E402

USER = "bench@example.org"
PASSWORD = "bench-imap-password"
SIZE = 64 * 1024
LISTING = "(FLAGS ENVELOPE RFC822.SIZE)"

# Dovecot serves many sessions of one user from one address: lift the per-user limit
# (default 10) and the number of imap processes (one per session).
DOVECOT_EXTRA = """
mail_max_userip_connections = 5000
default_client_limit = 5000
service imap {
  process_limit = 2500
}
service imap-login {
  service_count = 0
  client_limit = 5000
  process_limit = 4
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def message(index: int, *, certificate: x509.Certificate | None) -> bytes:
    """One 64 KB message: plain text, or encrypted to ``certificate``."""
    header = (
        f"From: Sender {index} <sender{index}@example.net>\r\nTo: Bench <{USER}>\r\n"
        f"Subject: benchmark message {index}\r\nDate: Mon, 2 Jan 2023 10:00:00 +0000\r\n"
        f"Message-ID: <bench.{index}@example.net>\r\nMIME-Version: 1.0\r\n"
    ).encode()
    line = b"the quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnop\r\n"
    body = line * (SIZE // len(line))
    entity = b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + body
    if certificate is None:
        return header + entity
    return smime.encrypt(header + entity, [certificate])


def fill_maildir(dovecot: Dovecot, certificate: x509.Certificate, count: int) -> None:
    """Write the messages straight into the Maildir (no IMAP APPEND one by one)."""
    maildir = dovecot.maildir(USER)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    stamp = int(time.time())
    for index in range(count):
        data = message(index, certificate=certificate if index % 10 == 9 else None)
        (maildir / "cur" / f"{stamp}.M{index}P1.bench,S={len(data)}:2,").write_bytes(data)
    for root, dirs, files in os.walk(dovecot.mail_dir):
        for name in dirs + files:
            os.chown(os.path.join(root, name), 65534, 65534)


def index_mailbox(dovecot: Dovecot) -> None:
    """Index the Maildir once (Dovecot must be running: doveadm asks its auth service)."""
    done = subprocess.run(
        ["doveadm", "-c", str(dovecot.config_file), "index", "-u", USER, "INBOX"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"doveadm index failed: {done.stderr.strip()}")


class Gateway:
    """The gateway as its own process, proxying to ``dovecot``."""

    def __init__(self, directory: Path, dovecot: Dovecot) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self.port = free_port()
        others = "".join(f'[{name}]\nstarttls = ""\ntls = ""\n' for name in ("smtp", "pop3"))
        config_path = directory / "gatekeeper.toml"
        config_path.write_text(
            '[server]\nhostname = "bench.test"\ndomains = ["example.org"]\n'
            f'{others}[imap]\nstarttls = ""\ntls = "tcp:{self.port}:interface=127.0.0.1"\n'
            f"cache_bytes = {256 * 1024 * 1024}\n"
            '[keys]\nstore = "keys"\nkey_type = "p256"\nunlock_cache_seconds = 3600\n'
            '[tls]\ncertificate = "keys/tls/server.crt"\nkey = "keys/tls/server.key"\n'
            f'[upstream]\nimap = "tls:localhost:{dovecot.imaps_port}"\npop3 = "tls:localhost:{dovecot.pop3s_port}"\n'
            f'smtp = "tls:localhost:{dovecot.pop3s_port}"\nca_file = "{dovecot.ca_file}"\ntimeout_seconds = 60\n'
        )
        config = load_config(config_path)
        initialize(config)
        accounts = Accounts(FileKeyStore(config.keys.store), lambda: open_ca(config.keys), config.keys)
        accounts.add(USER, PASSWORD)
        user = FileKeyStore(config.keys.store).get_user(USER)
        assert user is not None
        self.certificate = user.current.certificate
        self.ca_file = accounts.ca.certificate_path
        self.config_path = config_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log = open(self.directory / "twistd.log", "wb")  # noqa: SIM115 - closed in stop()
        twistd = Path(sys.executable).parent / "twistd"
        self.process = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "gatekeeper", "--config", str(self.config_path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                break
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"the gateway did not start; see {self.directory / 'twistd.log'}")
            time.sleep(0.05)

    def rss_kb(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def connect(self) -> imaplib.IMAP4_SSL:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        client = imaplib.IMAP4_SSL("127.0.0.1", self.port, ssl_context=context, timeout=300)
        client.login(USER, PASSWORD)
        return client

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)
            self.log.close()


def direct(dovecot: Dovecot) -> imaplib.IMAP4_SSL:
    context = ssl.create_default_context(cafile=str(dovecot.ca_file))
    client = imaplib.IMAP4_SSL("localhost", dovecot.imaps_port, ssl_context=context, timeout=300)
    client.login(USER, PASSWORD)
    return client


def timed_listing(client: imaplib.IMAP4_SSL, expected: int) -> float:
    started = time.perf_counter()
    typ, data = client.fetch("1:*", LISTING)
    elapsed = time.perf_counter() - started
    answers = sum(1 for item in data if isinstance(item, bytes) and b"RFC822.SIZE" in item)
    if typ != "OK" or answers != expected:
        raise SystemExit(f"listing failed: {typ}, {answers} answers of {expected}")
    return elapsed


def timed_body(client: imaplib.IMAP4_SSL, seq: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        typ, data = client.fetch(str(seq), "(BODY.PEEK[])")
        times.append(time.perf_counter() - started)
        if typ != "OK" or not isinstance(data[0], tuple) or len(data[0][1]) < SIZE // 2:
            raise SystemExit(f"BODY[] of {seq} failed: {typ}")
    return statistics.median(times)


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="gk-bench-imap-", dir="/tmp"))
    directory.chmod(0o755)  # Dovecot's auth process (user dovecot) reads its users file inside
    try:
        yield directory
    finally:
        if not os.environ.get("KEEP"):
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print("kept", directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=1000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20_000)), hard))
    with workspace() as work:
        dovecot = Dovecot(directory=work / "dovecot")
        with open(dovecot.config_file, "a") as config:
            config.write(DOVECOT_EXTRA)
        dovecot.add_user(USER, PASSWORD)
        gateway = Gateway(work / "gateway", dovecot)
        began = time.perf_counter()
        fill_maildir(dovecot, gateway.certificate, args.messages)
        dovecot.start()
        index_mailbox(dovecot)
        gateway.start()
        print(f"set-up: {args.messages} messages in {time.perf_counter() - began:.1f} s")
        try:
            run(dovecot, gateway, args)
        finally:
            gateway.stop()
            dovecot.cleanup()


def run(dovecot: Dovecot, gateway: Gateway, args: argparse.Namespace) -> None:
    count = args.messages
    plain_direct = direct(dovecot)
    plain_direct.select("INBOX", readonly=True)
    timed_listing(plain_direct, count)  # warm-up: Dovecot caches the envelopes
    direct_listing = min(timed_listing(plain_direct, count) for _ in range(3))
    print(f"listing direct:               {direct_listing * 1000:8.1f} ms")

    client = gateway.connect()
    client.select("INBOX", readonly=True)
    first = timed_listing(client, count)
    print(f"listing via Gatekeeper, 1st:  {first * 1000:8.1f} ms (classifies, reveals {count // 10})")
    second = min(timed_listing(client, count) for _ in range(3))
    print(f"listing via Gatekeeper, 2nd:  {second * 1000:8.1f} ms")

    encrypted_seq, plain_seq = 10, 1
    timed_body(client, encrypted_seq, 1)  # revealed bytes into the cache
    encrypted = timed_body(client, encrypted_seq, 30)
    plain = timed_body(plain_direct, plain_seq, 30)
    via_plain = timed_body(client, plain_seq, 30)
    print(f"BODY[] encrypted, cached, via Gatekeeper: {encrypted * 1000:6.2f} ms")
    print(f"BODY[] plain, direct:                     {plain * 1000:6.2f} ms")
    print(f"BODY[] plain, via Gatekeeper:             {via_plain * 1000:6.2f} ms")
    client.logout()
    plain_direct.logout()

    before = gateway.rss_kb()
    sessions = []
    began = time.perf_counter()
    for _ in range(args.sessions):
        sessions.append(gateway.connect())
    time.sleep(2)
    after = gateway.rss_kb()
    print(f"{args.sessions} idle sessions in {time.perf_counter() - began:.1f} s: RSS {before} KB -> {after} KB")
    for session in sessions:
        with contextlib.suppress(Exception):
            session.logout()
    per_session = (after - before) / args.sessions

    print(f"ratio imap_listing_second_vs_direct = {second / direct_listing:.2f} (target <= 1.3)")
    print(f"ratio imap_encrypted_cached_minus_plain_direct_ms = {(encrypted - plain) * 1000:.2f} (target <= 5)")
    print(f"ratio imap_idle_session_kb = {per_session:.0f} (target <= 200)")


if __name__ == "__main__":
    main()

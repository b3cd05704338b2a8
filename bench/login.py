"""Login benchmark: cold and cached login latency, and reactor responsiveness under logins.

Runs the real gateway (``twistd -n gatekeeper``) as a separate process with a fresh key
store (600,000-round KDF), and measures over IMAPS with Python's imaplib:

1. cold login: the first LOGIN of a user (the KDF runs), median over several users;
2. cached login: the same user and password again (answered from the unlock cache);
3. NOOP round-trip p99 on an already logged-in session, first with nothing else going
   on, then while another process performs 20 logins/s (each running the KDF: that
   gateway runs with the unlock cache off), in several rounds of both phases; the
   median of the per-round ratios shows whether the KDF work stays off the reactor.

Usage: ``python bench/login.py [--seconds 4] [--rounds 5] [--rate 20]``. The last lines are the
targets: ``ratio NAME = VALUE (target OP VALUE)``.
"""

from __future__ import annotations

import argparse
import contextlib
import imaplib
import multiprocessing
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gatekeeper.config import load_config  # noqa: E402
from gatekeeper.keys.accounts import Accounts  # noqa: E402
from gatekeeper.keys.ca import initialize, open_ca  # noqa: E402
from gatekeeper.keys.store import FileKeyStore  # noqa: E402

PASSWORD = "benchmark password 1"
COLD_USERS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """A gateway process with its own key store in a temporary directory."""

    def __init__(self, directory: Path, users: list[str], *, cache_seconds: int) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self.port = free_port()
        others = "".join(f'[{name}]\nstarttls = ""\ntls = ""\n' for name in ("smtp", "pop3"))
        config_path = directory / "gatekeeper.toml"
        config_path.write_text(
            '[server]\nhostname = "bench.test"\ndomains = ["example.org"]\n'
            f'{others}[imap]\nstarttls = ""\ntls = "tcp:{self.port}:interface=127.0.0.1"\n'
            f'[keys]\nstore = "keys"\nkey_type = "p256"\nunlock_cache_seconds = {cache_seconds}\n'
            '[tls]\ncertificate = "keys/tls/server.crt"\nkey = "keys/tls/server.key"\n'
            "[login]\nfree_failures = 1000000\n"
        )
        config = load_config(config_path)
        initialize(config)
        accounts = Accounts(FileKeyStore(config.keys.store), lambda: open_ca(config.keys), config.keys)
        for user in users:
            accounts.add(user, PASSWORD)
        self.ca_file = accounts.ca.certificate_path
        self.log = open(directory / "twistd.log", "wb")  # noqa: SIM115 - closed in stop()
        twistd = Path(sys.executable).parent / "twistd"
        self.process = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "gatekeeper", "--config", str(config_path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                break
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"the gateway did not start; see {directory / 'twistd.log'}")
            time.sleep(0.05)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def connect(gateway_port: int, ca_file: str) -> imaplib.IMAP4_SSL:
    context = ssl.create_default_context(cafile=ca_file)
    return imaplib.IMAP4_SSL("127.0.0.1", gateway_port, ssl_context=context, timeout=30)


def timed_login(port: int, ca_file: str, user: str) -> float:
    client = connect(port, ca_file)
    started = time.perf_counter()
    client.login(user, PASSWORD)
    elapsed = time.perf_counter() - started
    client.logout()
    return elapsed


def noop_latencies(client: imaplib.IMAP4_SSL, seconds: float) -> list[float]:
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        client.noop()
        latencies.append(time.perf_counter() - started)
        time.sleep(0.002)
    return latencies


def login_load(port: int, ca_file: str, users: list[str], rate: float, seconds: float, done: object) -> None:
    """In a separate process: start one login every 1/rate s (threads keep the pace).

    The load stands for clients on other machines: it runs at the lowest priority so
    its own TLS handshakes do not take CPU from the gateway or the NOOP probe.
    """
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    interval = 1.0 / rate
    threads = []
    start = time.perf_counter()
    for index in range(int(rate * seconds)):
        delay = start + index * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=timed_login, args=(port, ca_file, users[index % len(users)]))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    done.value = len(threads)  # type: ignore[attr-defined]


def noops_beside_logins(
    directory: Path, load_users: list[str], cache_seconds: int, args: argparse.Namespace
) -> list[tuple[list[float], list[float]]]:
    """NOOP latencies on a logged-in session, in ``args.rounds`` rounds: alone, then beside ``args.rate`` logins/s.

    Each round measures both phases back to back, so that their ratio compares the same
    minute of a shared machine whose speed drifts.
    """
    gateway = Gateway(directory, ["probe@example.org", *load_users], cache_seconds=cache_seconds)
    try:
        ca_file = str(gateway.ca_file)
        for user in load_users:  # with the cache on, every later login is answered from it
            timed_login(gateway.port, ca_file, user)
        client = connect(gateway.port, ca_file)
        client.login("probe@example.org", PASSWORD)
        noop_latencies(client, 1.0)  # warm up
        rounds = []
        for _ in range(args.rounds):
            idle = noop_latencies(client, args.seconds)
            done = multiprocessing.Value("i", 0)
            load = multiprocessing.Process(
                target=login_load, args=(gateway.port, ca_file, load_users, args.rate, args.seconds + 1, done)
            )
            load.start()
            time.sleep(0.5)
            loaded = noop_latencies(client, args.seconds)
            load.join()
            rounds.append((idle, loaded))
        client.logout()
        return rounds
    finally:
        gateway.stop()


def p99_ratio(rounds: list[tuple[list[float], list[float]]]) -> float:
    """The median over the rounds of (p99 beside logins / p99 alone)."""
    return statistics.median(percentile(loaded, 0.99) / percentile(idle, 0.99) for idle, loaded in rounds)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="gk-bench-login-"))
    try:
        yield directory
    finally:
        if not os.environ.get("KEEP"):
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print("kept", directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each NOOP phase")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (alone, beside logins)")
    parser.add_argument("--rate", type=float, default=20.0, help="logins per second in the loaded phase")
    args = parser.parse_args()

    with workspace() as directory:
        # Phase 1: cold and cached logins (cache on).
        users = [f"user{index}@example.org" for index in range(COLD_USERS)]
        gateway = Gateway(directory / "cached", users, cache_seconds=300)
        try:
            ca_file = str(gateway.ca_file)
            cold = [timed_login(gateway.port, ca_file, user) for user in users]
            cached = [timed_login(gateway.port, ca_file, users[0]) for _ in range(30)]
        finally:
            gateway.stop()

        # Phase 2: NOOPs alone, then NOOPs beside a stream of logins, on a gateway whose
        # every login runs the KDF (cache off) and on one whose logins are all cached (no KDF:
        # the same TLS handshakes and IMAP work on the reactor, for comparison).
        load_users = [f"load{index}@example.org" for index in range(4)]
        kdf_rounds = noops_beside_logins(directory / "kdf", load_users, 0, args)
        cached_rounds = noops_beside_logins(directory / "cached-load", load_users, 300, args)

    cold_ms = statistics.median(cold) * 1000
    cached_ms = statistics.median(cached) * 1000
    print(f"machine: {os.cpu_count()} CPUs; KDF: PBKDF2-HMAC-SHA256, 600000 rounds")
    print(f"cold login:   median {cold_ms:.1f} ms, max {max(cold) * 1000:.1f} ms over {len(cold)} users")
    print(f"cached login: median {cached_ms:.2f} ms, p99 {percentile(cached, 0.99) * 1000:.2f} ms over {len(cached)}")
    print(f"NOOP p99 per round ({args.seconds:g} s alone, then {args.seconds:g} s beside {args.rate:g} logins/s):")
    for name, rounds in (
        ("each login running the KDF", kdf_rounds),
        ("cached logins (TLS + IMAP, no KDF)", cached_rounds),
    ):
        cells = ", ".join(
            f"{percentile(idle, 0.99) * 1000:.2f} -> {percentile(loaded, 0.99) * 1000:.2f} ms"
            for idle, loaded in rounds
        )
        print(f"  {name}: {cells}; median ratio x{p99_ratio(rounds):.2f}")
    loaded_all = [value for _, loaded in kdf_rounds for value in loaded]
    print(
        f"NOOP beside {args.rate:g} logins/s with the KDF, all rounds:"
        f" p50 {statistics.median(loaded_all) * 1000:.3f} ms,"
        f" p99 {percentile(loaded_all, 0.99) * 1000:.3f} ms ({len(loaded_all)} NOOPs);"
        f" the KDF's own share: x{p99_ratio(kdf_rounds) / p99_ratio(cached_rounds):.2f}"
    )
    print(f"ratio cold_login_ms = {cold_ms:.1f} (target <= 400)")
    print(f"ratio cached_login_ms = {cached_ms:.2f} (target <= 5)")
    print(f"ratio noop_p99_under_logins = {p99_ratio(kdf_rounds):.2f} (target <= 2)")


if __name__ == "__main__":
    main()

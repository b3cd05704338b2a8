"""SMTP proxy benchmark: messages/s and latency through Gatekeeper next to Postfix's tools alone.

Run: ``.venv/bin/python bench/smtp.py`` (about two minutes). Upstream is Postfix's
``smtp-sink`` (not saving anything). For each message size (4 KB, 64 KB, 1 MB) and
recipient count (1, 5), with 10 sessions each sending one message after the other:

(a) ``smtp-source`` straight to ``smtp-sink`` (Postfix's own load generator: the ceiling);
(b) the load generator below through Gatekeeper with crypto off (recipients whose
    rule is ``sign = "never"`` and who have no certificate: a plain relay);
(c) the same through Gatekeeper signing and encrypting (recipients are gateway users,
    so every message is signed with the sender's key and encrypted to them and to
    the sender).

The load generator (a separate process, asyncio) logs in once per session with AUTH
PLAIN (over plain TCP on loopback, ``allow_plaintext_on_loopback``: ``smtp-source``
speaks no TLS either) and pipelines ``MAIL``/``RCPT``/``DATA`` as clients do. It also
runs straight against ``smtp-sink`` (a') to show its own ceiling. Gatekeeper runs as
``twistd -n gatekeeper`` with its default worker pool, users' keys of ``--key`` type
(default: the gateway's default, RSA-3072). The last lines are the targets:
``ratio NAME = VALUE (target OP VALUE)`` at 64 KB and one recipient.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gatekeeper.config import load_config  # noqa: E402
from gatekeeper.keys.accounts import Accounts  # noqa: E402
from gatekeeper.keys.ca import initialize, open_ca  # noqa: E402
from gatekeeper.keys.store import FileKeyStore  # noqa: E402
from tests.fixtures.smtp_sink import SmtpSink  # noqa: E402

PASSWORD = "benchmark password 1"
SENDER = "alice@example.org"
SIZES = {"4k": 4 * 1024, "64k": 64 * 1024, "1m": 1024 * 1024}
RECIPIENTS = (1, 5)
SESSIONS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def message(size: int, recipients: list[str]) -> bytes:
    head = (
        f"From: Alice <{SENDER}>\r\nTo: {', '.join(recipients)}\r\nSubject: benchmark\r\n"
        "Date: Sun, 01 Mar 2026 10:00:00 +0000\r\nMessage-ID: <bench@example.org>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * (size // len(line) + 1)
    return head + body[: max(0, size - len(head) - 2)] + b"\r\n"


class Gateway:
    """A gateway process with its own key store, relaying to ``upstream_port``."""

    def __init__(self, directory: Path, users: list[str], *, upstream_port: int, key: str) -> None:
        directory.mkdir(parents=True)
        self.port = free_port()
        config_path = directory / "gatekeeper.toml"
        config_path.write_text(
            '[server]\nhostname = "bench.test"\ndomains = ["example.org"]\n'
            f'[smtp]\nstarttls = "tcp:{self.port}:interface=127.0.0.1"\ntls = ""\n'
            '[pop3]\nstarttls = ""\ntls = ""\n[imap]\nstarttls = ""\ntls = ""\n'
            f'[keys]\nstore = "keys"\nkey_type = "{key}"\n'
            '[tls]\ncertificate = "keys/tls/server.crt"\nkey = "keys/tls/server.key"\n'
            "allow_plaintext_on_loopback = true\n"
            f'[upstream]\nsmtp = "tcp:127.0.0.1:{upstream_port}"\npop3 = "tcp:127.0.0.1:{upstream_port}"\n'
            f'imap = "tcp:127.0.0.1:{upstream_port}"\n'
            '[policy.domains]\n"plain.example" = { sign = "never" }\n'
        )
        config = load_config(config_path)
        initialize(config)
        accounts = Accounts(FileKeyStore(config.keys.store), lambda: open_ca(config.keys), config.keys)
        for user in users:
            accounts.add(user, PASSWORD)
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

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


# -- the load generator -------------------------------------------------------------------


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    text = b""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        text += line
        if line[3:4] != b"-":
            return int(line[:3]), text


async def _session(
    port: int, login: bool, recipients: list[str], data: bytes, clock: dict[str, Any], latencies: list[float]
) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await _reply(reader)
    writer.write(b"EHLO load.example\r\n")
    await _reply(reader)
    if login:
        token = base64.b64encode(f"\0{SENDER}\0{PASSWORD}".encode())
        writer.write(b"AUTH PLAIN " + token + b"\r\n")
        code, text = await _reply(reader)
        if code != 235:
            raise SystemExit(f"AUTH failed: {text!r}")
    clock["ready"] += 1
    if clock["ready"] == SESSIONS:
        clock["start"] = time.perf_counter()
        clock["go"].set()
    await clock["go"].wait()  # every session logged in: the clock starts now
    deadline = clock["start"] + clock["seconds"]
    envelope = f"MAIL FROM:<{SENDER}>\r\n".encode() + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in recipients)
    stuffed = data.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    sent = 0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        writer.write(envelope + b"DATA\r\n")
        for _ in range(len(recipients) + 1):
            code, text = await _reply(reader)
            if code >= 400:
                raise SystemExit(f"refused: {text!r}")
        code, text = await _reply(reader)
        if code != 354:
            raise SystemExit(f"DATA refused: {text!r}")
        writer.write(stuffed)
        code, text = await _reply(reader)
        if code != 250:
            raise SystemExit(f"message refused: {text!r}")
        latencies.append(time.perf_counter() - started)
        sent += 1
    writer.write(b"QUIT\r\n")
    with contextlib.suppress(ConnectionError):
        await _reply(reader)
    writer.close()
    return sent


async def _load(port: int, login: bool, recipients: list[str], data: bytes, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    clock: dict[str, Any] = {"ready": 0, "go": asyncio.Event(), "seconds": seconds, "start": 0.0}
    counts = await asyncio.gather(*(_session(port, login, recipients, data, clock, latencies) for _ in range(SESSIONS)))
    elapsed = time.perf_counter() - clock["start"]
    return {"count": sum(counts), "seconds": elapsed, "latencies": latencies}


def _load_process(port: int, login: bool, recipients: list[str], size: int, seconds: float, out: Any) -> None:
    result = asyncio.run(_load(port, login, recipients, message(size, recipients), seconds))
    out.put(result)


def load(port: int, *, login: bool, recipients: list[str], size: int, seconds: float) -> dict[str, float]:
    """Run the load generator in its own process; return rate and latency percentiles."""
    queue: Any = multiprocessing.Queue()
    process = multiprocessing.Process(target=_load_process, args=(port, login, recipients, size, seconds, queue))
    process.start()
    result = queue.get(timeout=seconds + 120)
    process.join()
    latencies = sorted(result["latencies"])
    return {
        "rate": result["count"] / result["seconds"],
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
        "count": result["count"],
    }


def smtp_source(port: int, *, recipients: int, size: int, messages: int) -> dict[str, float]:
    """Postfix's smtp-source: ``messages`` messages over 10 reused sessions; the rate."""
    argv = ["smtp-source", "-d", "-s", str(SESSIONS), "-m", str(messages), "-l", str(size), "-r", str(recipients)]
    argv += ["-f", SENDER, "-t", "r@plain.example", "-M", "source.example", f"127.0.0.1:{port}"]
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=300)
    elapsed = time.perf_counter() - started
    return {"rate": messages / elapsed, "p50": float("nan"), "p99": float("nan"), "count": messages}


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="gk-bench-smtp-"))
    try:
        yield directory
    finally:
        if not os.environ.get("KEEP"):
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print("kept", directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each load run")
    parser.add_argument("--key", default="rsa3072", help="users' key type (rsa2048, rsa3072, p256...)")
    parser.add_argument("--only", default="", help="run one size only (4k, 64k, 1m)")
    args = parser.parse_args()
    sizes = {k: v for k, v in SIZES.items() if not args.only or k == args.only}
    encrypted = [f"r{index}@example.org" for index in range(1, 6)]
    plain = [f"p{index}@plain.example" for index in range(1, 6)]
    results: dict[tuple[str, str, int], dict[str, float]] = {}
    with workspace() as directory:
        sink = SmtpSink(directory=directory / "sink", capture=False, backlog=200)
        sink.start()
        gateway = None
        try:
            gateway = Gateway(directory / "gateway", [SENDER, *encrypted], upstream_port=sink.port, key=args.key)
            load(gateway.port, login=True, recipients=encrypted[:1], size=4096, seconds=1.0)  # warm up
            for label, size in sizes.items():
                for count in RECIPIENTS:
                    direct = load(sink.port, login=False, recipients=plain[:count], size=size, seconds=args.seconds)
                    messages = max(200, int(direct["rate"] * args.seconds))
                    source = smtp_source(sink.port, recipients=count, size=size, messages=messages)
                    results[("a", label, count)] = source
                    results[("a'", label, count)] = direct
                    results[("b", label, count)] = load(
                        gateway.port, login=True, recipients=plain[:count], size=size, seconds=args.seconds
                    )
                    results[("c", label, count)] = load(
                        gateway.port, login=True, recipients=encrypted[:count], size=size, seconds=args.seconds
                    )
        finally:
            if gateway is not None:
                gateway.stop()
            sink.stop()

    print(f"machine: {os.cpu_count()} CPUs; {SESSIONS} sessions; users' keys {args.key}; upstream smtp-sink")
    print("a: smtp-source -> smtp-sink; a': load generator -> smtp-sink; b: through Gatekeeper, crypto off;")
    print("c: through Gatekeeper, signed and encrypted")
    print(f"{'size':>5} {'rcpt':>4} {'run':>3} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for (run, label, count), result in results.items():
        print(f"{label:>5} {count:>4} {run:>3} {result['rate']:9.0f} {result['p50']:8.2f} {result['p99']:8.2f}")
    for label in sizes:
        for count in RECIPIENTS:
            a, b, c = (results[(run, label, count)]["rate"] for run in ("a", "b", "c"))
            print(f"{label:>5} {count:>4}   c/b = {c / b:.2f}   c/a = {c / a:.2f}")
    if "64k" in sizes:
        a, b, c = (results[(run, "64k", 1)]["rate"] for run in ("a", "b", "c"))
        print(f"ratio smtp_64k_1rcpt_crypto_vs_plain_relay = {c / b:.2f} (target >= 0.8)")
        print(f"ratio smtp_64k_1rcpt_crypto_vs_postfix_direct = {c / a:.2f} (target >= 0.2)")


if __name__ == "__main__":
    main()

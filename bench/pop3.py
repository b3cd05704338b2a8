"""POP3 proxy benchmark: RETR of 1,000 messages of 64 KB, through Gatekeeper and straight from Dovecot.

Set-up (half a minute or so): a Dovecot of its own (``tests/fixtures/dovecot.py``) with two
mailboxes written straight into their Maildirs and indexed once with ``doveadm``: one of
1,000 plain messages, one of 1,000 messages signed and encrypted by Gatekeeper's S/MIME
engine (as the SMTP proxy sends them: signed by a user of the gateway, encrypted to the
reader); and the real gateway (``twistd -n gatekeeper``) as a separate process, proxying
POP3S to that Dovecot with the users' own logins (pass-through). Measured with Python's
poplib over TLS, in the same run, each a whole session of ``RETR 1`` ... ``RETR 1000``
(login excluded; ``--rounds`` rounds, the median of the per-round ratios reported):

1. plain: straight from Dovecot, then through Gatekeeper (each message revealed: forged
   verdicts looked for, the FIG 8 report attached; plain text of up to 128 KB on the
   reactor, see ``inbound.Revealer``);
2. encrypted+signed: straight from Dovecot (ciphertext), then through Gatekeeper
   (decrypted, verified, reported);
3. the decrypt+verify cost of one message (``smime.open_message``, as ``bench/smime.py``
   measures it), in this process, at the end of every round.

Targets: plain through Gatekeeper <= 1.5 x direct; encrypted through Gatekeeper <= (direct
+ 1,000 x decrypt+verify) x 1.2. Usage: ``python bench/pop3.py [--messages 1000]
[--rounds 5]``. The last lines are the targets: ``ratio NAME = VALUE (target OP VALUE)``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import poplib
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography import x509  # noqa: E402

from gatekeeper import smime  # noqa: E402
from gatekeeper.config import load_config  # noqa: E402
from gatekeeper.keys.accounts import Accounts, unlock  # noqa: E402
from gatekeeper.keys.ca import initialize, open_ca  # noqa: E402
from gatekeeper.keys.identity import Identity  # noqa: E402
from gatekeeper.keys.store import FileKeyStore  # noqa: E402
from gatekeeper.trust import TrustValidator  # noqa: E402
from tests.fixtures.dovecot import Dovecot  # noqa: E402

PLAIN, SEALED, SENDER = "plain@example.org", "sealed@example.org", "alice@example.org"
PASSWORD = "bench-pop3-password"
SIZE = 64 * 1024
PLAIN_TARGET = 1.5
ENCRYPTED_TARGET = 1.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def message(index: int, sender: str, recipient: str) -> bytes:
    """One 64 KB text message."""
    header = (
        f"From: {sender}\r\nTo: {recipient}\r\nSubject: benchmark message {index}\r\n"
        f"Date: Mon, 2 Jan 2023 10:00:00 +0000\r\nMessage-ID: <pop3.{index}@example.net>\r\nMIME-Version: 1.0\r\n"
    ).encode()
    line = b"the quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnop\r\n"
    return header + b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + line * (SIZE // len(line))


def fill_maildir(dovecot: Dovecot, user: str, messages: Iterator[bytes]) -> None:
    """Write the messages straight into the user's Maildir and index it once."""
    maildir = dovecot.maildir(user)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    stamp = int(time.time())
    for index, data in enumerate(messages):
        (maildir / "cur" / f"{stamp}.M{index}P1.bench,S={len(data)}:2,").write_bytes(data)
    for root, dirs, files in os.walk(dovecot.mail_dir):
        for name in dirs + files:
            os.chown(os.path.join(root, name), 65534, 65534)
    done = subprocess.run(
        ["doveadm", "-c", str(dovecot.config_file), "index", "-u", user, "INBOX"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"doveadm index failed: {done.stderr.strip()}")


class Gateway:
    """The gateway as its own process (``twistd -n gatekeeper``), proxying POP3S to ``dovecot``."""

    def __init__(self, directory: Path, dovecot: Dovecot) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self.port = free_port()
        others = "".join(f'[{name}]\nstarttls = ""\ntls = ""\n' for name in ("smtp", "imap"))
        self.config_path = directory / "gatekeeper.toml"
        self.config_path.write_text(
            '[server]\nhostname = "bench.test"\ndomains = ["example.org"]\n'
            f'{others}[pop3]\nstarttls = ""\ntls = "tcp:{self.port}:interface=127.0.0.1"\n'
            '[keys]\nstore = "keys"\nkey_type = "p256"\nunlock_cache_seconds = 3600\n'
            '[tls]\ncertificate = "keys/tls/server.crt"\nkey = "keys/tls/server.key"\n'
            f'[upstream]\npop3 = "tls:localhost:{dovecot.pop3s_port}"\nimap = "tls:localhost:{dovecot.imaps_port}"\n'
            f'smtp = "tls:localhost:{dovecot.pop3s_port}"\nca_file = "{dovecot.ca_file}"\ntimeout_seconds = 60\n'
        )
        config = load_config(self.config_path)
        initialize(config)
        self.store = FileKeyStore(config.keys.store)
        accounts = Accounts(self.store, lambda: open_ca(config.keys), config.keys)
        for user in (PLAIN, SEALED, SENDER):
            accounts.add(user, PASSWORD)
        self.ca_certificate = x509.load_pem_x509_certificate(accounts.ca.certificate_path.read_bytes())
        self.ca_file = accounts.ca.certificate_path
        self.process: subprocess.Popen[bytes] | None = None

    def identity(self, user: str) -> Identity:
        stored = self.store.get_user(user)
        assert stored is not None
        return unlock(stored, PASSWORD).identity

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

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)
            self.log.close()


def session(host: str, port: int, ca_file: Path, user: str) -> poplib.POP3_SSL:
    context = ssl.create_default_context(cafile=str(ca_file))
    client = poplib.POP3_SSL(host, port, context=context, timeout=300)
    client.user(user)
    client.pass_(PASSWORD)
    return client


def timed_retrieval(connect: Callable[[], poplib.POP3_SSL], count: int, expect: bytes) -> float:
    """Seconds for RETR 1..count in one session (login excluded); checks what came back."""
    client = connect()
    try:
        started = time.perf_counter()
        for number in range(1, count + 1):
            lines = client.retr(number)[1]
            if len(lines) < SIZE // 80 or expect not in b"\r\n".join(lines[:40]):
                raise SystemExit(f"RETR {number} did not return the expected message ({expect!r})")
        return time.perf_counter() - started
    finally:
        client.quit()


def best_of(function: Callable[[], object], *, budget: float = 1.0, rounds: int = 5) -> float:
    """Seconds per call: the best of ``rounds`` batches of about budget/rounds seconds (as bench/smime.py)."""
    function()
    start = time.perf_counter()
    function()
    once = max(time.perf_counter() - start, 1e-6)
    per_batch = max(1, int(budget / rounds / once))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_batch):
            function()
        best = min(best, (time.perf_counter() - start) / per_batch)
    return best


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="gk-bench-pop3-", dir="/tmp"))
    directory.chmod(0o755)  # Dovecot's auth process (user dovecot) reads its users file inside
    try:
        yield directory
    finally:
        if not os.environ.get("KEEP"):
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print("kept", directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    count = args.messages
    with workspace() as work:
        dovecot = Dovecot(directory=work / "dovecot")
        gateway = Gateway(work / "gateway", dovecot)
        for user in (PLAIN, SEALED):
            dovecot.add_user(user, PASSWORD)
        dovecot.start()
        try:
            print(f"writing {count} plain and {count} signed+encrypted messages of {SIZE // 1024} KB ...")
            sender = gateway.identity(SENDER).current
            reader = gateway.identity(SEALED)
            sealed_certificate = reader.current.certificate
            fill_maildir(dovecot, PLAIN, (message(i, "Carol <carol@outside.example>", PLAIN) for i in range(count)))
            fill_maildir(
                dovecot,
                SEALED,
                (
                    smime.sign_and_encrypt(message(i, SENDER, SEALED), sender, [sealed_certificate])
                    for i in range(count)
                ),
            )
            sample = smime.sign_and_encrypt(message(0, SENDER, SEALED), sender, [sealed_certificate])
            validator = TrustValidator([gateway.ca_certificate])
            opened = smime.open_message(sample, reader.keys, validator, SENDER)
            assert opened.signatures[0].trust.ok and opened.decryptions, "the sample does not open"

            def decrypt_cost() -> float:
                return best_of(lambda: smime.open_message(sample, reader.keys, validator, SENDER), budget=0.5)

            gateway.start()
            try:
                results = measure(dovecot, gateway, count, args.rounds, decrypt_cost)
            finally:
                gateway.stop()
        finally:
            dovecot.stop()
    print(
        f"{'round':>5} {'plain direct':>13} {'through':>8} {'ratio':>6}"
        f"   {'sealed direct':>13} {'decrypt':>8} {'through':>8} {'ratio':>6}"
    )
    plain_ratios, sealed_ratios = [], []
    for number, (direct_plain, gateway_plain, direct_sealed, gateway_sealed, cost) in enumerate(results, 1):
        plain_ratios.append(gateway_plain / direct_plain)
        sealed_ratios.append(gateway_sealed / (direct_sealed + cost * count))
        print(
            f"{number:5} {direct_plain:12.2f}s {gateway_plain:7.2f}s {plain_ratios[-1]:6.2f}"
            f"   {direct_sealed:12.2f}s {cost * count:7.2f}s {gateway_sealed:7.2f}s {sealed_ratios[-1]:6.2f}"
        )
    medians = [statistics.median(column) for column in zip(*results, strict=True)]
    print(f"{'median of the rounds':28} {'seconds':>8} {'msg/s':>8} {'ms/msg':>7}")
    for name, seconds in zip(
        ("plain, direct", "plain, through Gatekeeper", "encrypted, direct", "encrypted, through Gatekeeper"),
        medians[:4],
        strict=True,
    ):
        print(f"{name:28} {seconds:8.2f} {count / seconds:8.0f} {seconds / count * 1000:7.2f}")
    cost = medians[4]
    print(f"decrypt+verify of one message (open_message): {cost * 1000:.2f} ms; {count} x = {cost * count:.2f} s")
    print(f"ratio pop3_plain_vs_direct = {statistics.median(plain_ratios):.2f} (target <= {PLAIN_TARGET})")
    print(
        f"ratio pop3_encrypted_vs_direct_plus_decrypt = {statistics.median(sealed_ratios):.2f}"
        f" (target <= {ENCRYPTED_TARGET})"
    )


def measure(
    dovecot: Dovecot, gateway: Gateway, count: int, rounds: int, decrypt_cost: Callable[[], float]
) -> list[tuple[float, float, float, float, float]]:
    """``rounds`` rounds of the four sessions, each path measured right after its direct baseline.

    Each round ends with the decrypt+verify cost of one message, measured in this process
    while the gateway is idle, so the encrypted ratio compares figures of the same minute.

    The ratios are taken per round and their median reported: on a shared machine whose
    speed drifts by tens of percent from one minute to the next, a pair measured
    back to back sees the same machine, where the best of each column alone may not.
    """

    def direct(user: str) -> Callable[[], poplib.POP3_SSL]:
        return lambda: session("localhost", dovecot.pop3s_port, dovecot.ca_file, user)

    def proxied(user: str) -> Callable[[], poplib.POP3_SSL]:
        return lambda: session("127.0.0.1", gateway.port, gateway.ca_file, user)

    warm = min(count, 20)
    for connect in (direct(PLAIN), proxied(PLAIN), direct(SEALED), proxied(SEALED)):
        timed_retrieval(connect, warm, b"Subject: benchmark message")  # caches, worker processes, the login KDF
    results = []
    for _ in range(rounds):
        results.append(
            (
                timed_retrieval(direct(PLAIN), count, b"Subject: benchmark message"),
                timed_retrieval(proxied(PLAIN), count, b"X-Gatekeeper-Security: decrypted=no"),
                timed_retrieval(direct(SEALED), count, b"smime.p7m"),
                timed_retrieval(proxied(SEALED), count, b"X-Gatekeeper-Security: decrypted=yes; signature=valid"),
                decrypt_cost(),
            )
        )
    return results


if __name__ == "__main__":
    main()

"""``gatekeeper demo``: the whole gateway in a temporary directory, one message through it, and what to look at.

The demo makes a configuration of its own (nothing of ``etc/gatekeeper.toml`` is used
or touched): a built-in CA, two users (alice and bob, with passwords generated and
printed once), the embedded mail store, and listeners on free loopback ports. It runs
the gateway as ``twistd -n gatekeeper`` would run it (its own process), then acts as two
mail clients:

1. alice sends bob a message with an attachment through the SMTP proxy (STARTTLS,
   AUTH): the gateway signs it with alice's key and encrypts it to bob (and alice);
2. it shows what the store holds: ``application/pkcs7-mime``, ciphertext at rest;
3. bob reads it through IMAP and through POP3: the plaintext, the attachment byte for
   byte, and the report (decrypted, signature valid);
4. it prints the settings to try the same with Thunderbird.

Then the gateway stops, or with ``--keep`` stays up until Ctrl-C. The exit status is
0 only when every check held. With ``--directory`` everything is kept there (the
configuration, keys, the mail store, the gateway's log and the messages as sent,
stored and received); otherwise the temporary directory is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import hashlib
import imaplib
import json
import os
import poplib
import secrets
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import attrs

from gatekeeper.admin import cli
from gatekeeper.config import Config, load_config
from gatekeeper.keys.accounts import Accounts
from gatekeeper.keys.ca import initialize, open_ca
from gatekeeper.keys.store import FileKeyStore, safe_name
from gatekeeper.localstore.mailbox import FOLDER_FILE, FOLDERS
from gatekeeper.localstore.names import uid_from_name
from gatekeeper.localstore.store import MAILBOXES

DOMAIN = "example.org"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
HOST = "127.0.0.1"
LISTENERS = ("smtp", "pop3", "imap")
TEXT = "Hello Bob,\r\n\r\nthe figures are attached. Only you can read this.\r\n\r\nAlice\r\n"
ATTACHMENT_NAME = "figures.bin"
STARTUP_SECONDS = 90.0


def register(subparsers: Any) -> None:
    """Add the ``demo`` command."""
    parser = subparsers.add_parser(
        "demo",
        help="run a throw-away gateway and send one encrypted message through it",
        description=(
            "In a temporary directory: a CA, two users (alice, bob), the gateway on free loopback ports with its "
            "embedded mail store; alice sends bob a message with an attachment through the SMTP proxy, bob reads "
            "it through IMAP and POP3. Shows what the store holds (ciphertext), what bob's client receives "
            "(plaintext and the report) and the settings to try it with Thunderbird. Ignores --config."
        ),
    )
    parser.add_argument("--keep", action="store_true", help="keep the gateway running afterwards (Ctrl-C stops it)")
    parser.add_argument(
        "--directory", metavar="DIR", help="work in DIR (new or empty) and keep it, instead of a temporary one"
    )
    parser.set_defaults(handler=run_demo)


@attrs.frozen
class Ports:
    """The loopback ports of one demo gateway."""

    smtp: int
    smtps: int
    pop3: int
    pop3s: int
    imap: int
    imaps: int


@attrs.frozen
class Received:
    """What one client was given: the whole message and what the demo found in it."""

    data: bytes
    security: str
    text: str
    attachment: bytes | None
    report: str


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo (see the module docstring); 0 when every check held."""
    keep_directory = args.directory is not None
    if keep_directory:
        directory = Path(args.directory).absolute()
        if directory.exists() and any(directory.iterdir()):
            raise cli.UsageError(f"--directory {directory}: not empty (the demo needs a new or empty directory)")
        directory.mkdir(parents=True, exist_ok=True)
    else:
        directory = Path(tempfile.mkdtemp(prefix="gatekeeper-demo-"))
    try:
        return Demo(directory, keep=args.keep, args=args).run()
    finally:
        if not keep_directory:
            shutil.rmtree(directory, ignore_errors=True)


class Demo:
    """One run of the demo in ``directory``."""

    def __init__(self, directory: Path, *, keep: bool, args: argparse.Namespace) -> None:
        self.directory = directory
        self.keep = keep
        self.args = args
        self.passwords = {ALICE: _password(), BOB: _password()}
        self.ports = Ports(*_free_ports(6))
        self.failures: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None

    # -- steps --------------------------------------------------------------------------------

    def run(self) -> int:
        """All the steps; the gateway is stopped whatever happens (unless ``keep``)."""
        out = cli.output
        out(f"Gatekeeper demo in {self.directory}")
        out()
        config = self.configure()
        self.make_users(config)
        self.start_gateway()
        try:
            attachment = os.urandom(3000)
            sent = self.compose(attachment)
            self.send(sent)
            self.show_store()
            by_imap = self.read_imap()
            by_pop3 = self.read_pop3()
            self.check("IMAP", by_imap, attachment)
            self.check("POP3", by_pop3, attachment)
            self.show_received(by_imap, attachment)
            self.show_settings()
            if self.failures:
                out()
                out("FAILED: " + "; ".join(self.failures))
            else:
                out()
                out("All checks passed: stored encrypted, read decrypted, signature valid, attachment identical.")
            if self.keep:
                self.wait_for_interrupt()
        finally:
            self.stop_gateway()
        return 1 if self.failures else 0

    def configure(self) -> Config:
        """Write the demo's configuration, create the CA and the TLS certificate."""
        ports = self.ports
        listeners = {
            "smtp": (ports.smtp, ports.smtps),
            "pop3": (ports.pop3, ports.pop3s),
            "imap": (ports.imap, ports.imaps),
        }
        sections = "".join(
            f'[{name}]\nstarttls = "tcp:{plain}:interface={HOST}"\ntls = "tcp:{implicit}:interface={HOST}"\n'
            for name, (plain, implicit) in listeners.items()
        )
        path = self.directory / "gatekeeper.toml"
        path.write_text(
            "# Written by `gatekeeper demo`: a throw-away gateway with its own CA, users and mail store.\n"
            f'[server]\nhostname = "localhost"\ndomains = ["{DOMAIN}"]\n'
            f"{sections}"
            '[keys]\nstore = "keys"\n'
            '[upstream.store]\ndata_dir = "mail"\n'
        )
        config = load_config(path)
        self.args.loaded_config = config  # audit records go to the demo's own key store
        initialize(config)
        cli.output(f"1. A certificate authority ({config.keys.store / 'ca' / 'ca.pem'}) and two users:")
        return config

    def make_users(self, config: Config) -> None:
        """alice and bob: key pairs, certificates from the demo CA, keys sealed under their passwords."""
        accounts = Accounts(FileKeyStore(config.keys.store), lambda: open_ca(config.keys), config.keys)
        for address, password in self.passwords.items():
            accounts.add(address, password)
            cli.output(f"     {address:<20} password: {password}")
        cli.output("   (the passwords are shown only here; each one unlocks its user's private key)")
        cli.output()

    def start_gateway(self) -> None:
        """``twistd -n gatekeeper`` in its own process; returns once every listener answers."""
        log = (self.directory / "gatekeeper.log").open("wb")
        self.process = subprocess.Popen(
            [*_twistd(), "-n", "--pidfile=", "gatekeeper", "--config", str(self.directory / "gatekeeper.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        log.close()
        deadline = time.monotonic() + STARTUP_SECONDS
        for port in attrs.astuple(self.ports):
            while not _listening(port):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = (self.directory / "gatekeeper.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the gateway did not start; its log ends with:\n{tail}")
                time.sleep(0.1)
        ports = self.ports
        cli.output(
            f"2. The gateway runs (pid {self.process.pid}) on {HOST}: SMTP {ports.smtp}/{ports.smtps}, "
            f"POP3 {ports.pop3}/{ports.pop3s}, IMAP {ports.imap}/{ports.imaps}; with no [upstream] it is its "
            f"own mail system (store: {self.directory / 'mail'})."
        )
        cli.output()

    def compose(self, attachment: bytes) -> bytes:
        """alice's message: a text and a binary attachment."""
        message = EmailMessage()
        message["From"] = f"Alice <{ALICE}>"
        message["To"] = f"Bob <{BOB}>"
        message["Subject"] = "Quarterly figures (Gatekeeper demo)"
        message["Message-ID"] = f"<demo.{secrets.token_hex(8)}@{DOMAIN}>"
        message.set_content(TEXT.replace("\r\n", "\n"))
        message.add_attachment(attachment, maintype="application", subtype="octet-stream", filename=ATTACHMENT_NAME)
        data = message.as_bytes(policy=email.policy.SMTP)
        (self.directory / "sent.eml").write_bytes(data)
        return data

    def send(self, data: bytes) -> None:
        """Through the SMTP proxy, as a mail client does (STARTTLS, then AUTH)."""
        with smtplib.SMTP(HOST, self.ports.smtp, timeout=60) as client:
            client.starttls(context=self.tls())
            client.login(ALICE, self.passwords[ALICE])
            refused = client.sendmail(ALICE, [BOB], data)
        if refused:
            self.failures.append(f"the SMTP proxy refused {sorted(refused)}")
        cli.output(
            f"3. alice sent bob a message with an attachment ({ATTACHMENT_NAME}, 3000 bytes) through the SMTP proxy "
            f"(port {self.ports.smtp}, STARTTLS, AUTH): accepted (250) once it was stored."
        )
        cli.output()

    def show_store(self) -> None:
        """What bob's INBOX holds on disk: the message as it left the SMTP proxy, encrypted."""
        stored = stored_messages(self.directory / "mail", BOB)
        if len(stored) != 1:
            self.failures.append(f"bob's INBOX holds {len(stored)} messages, not 1")
            return
        path, data = stored[0]
        (self.directory / "stored.eml").write_bytes(data)
        header, _, body = data.partition(b"\r\n\r\n")
        content_type = _field(header, "Content-Type")
        out = cli.output
        out(f"4. What the store holds ({path.relative_to(self.directory)}, {len(data)} bytes):")
        for line in header.decode("utf-8", "replace").split("\r\n"):
            if line.split(":", 1)[0].lower() in ("from", "to", "subject", "content-type", "content-disposition"):
                out(f"     {line}")
        out()
        for raw in body.split(b"\r\n")[:3]:
            out(f"     {raw.decode('ascii', 'replace')}")
        out(f"     ... ({len(body)} bytes of CMS ciphertext; neither the text nor the attachment is in there)")
        out()
        if "application/pkcs7-mime" not in content_type.lower():
            self.failures.append(f"the stored message is {content_type!r}, not application/pkcs7-mime")
        if TEXT.split("\r\n")[2].encode() in data:
            self.failures.append("the stored message holds the text in clear")

    def read_imap(self) -> Received:
        """bob reads INBOX through the IMAP proxy (IMAPS)."""
        client = imaplib.IMAP4_SSL(HOST, self.ports.imaps, ssl_context=self.tls(), timeout=60)
        try:
            client.login(BOB, self.passwords[BOB])
            client.select("INBOX")
            _typ, data = client.fetch("1", "(BODY.PEEK[])")
            message = next(part[1] for part in data if isinstance(part, tuple))
        finally:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                client.logout()
        (self.directory / "received-imap.eml").write_bytes(message)
        return _understand(message)

    def read_pop3(self) -> Received:
        """bob reads the same message through the POP3 proxy (POP3S); nothing is deleted."""
        client = poplib.POP3_SSL(HOST, self.ports.pop3s, context=self.tls(), timeout=60)
        try:
            client.user(BOB)
            client.pass_(self.passwords[BOB])
            _response, lines, _octets = client.retr(1)
        finally:
            with contextlib.suppress(poplib.error_proto, OSError):
                client.quit()
        message = b"\r\n".join(lines) + b"\r\n"
        (self.directory / "received-pop3.eml").write_bytes(message)
        return _understand(message)

    def check(self, protocol: str, received: Received, attachment: bytes) -> None:
        """What bob's client must have been given."""
        if not received.security.startswith("decrypted=yes; signature=valid"):
            self.failures.append(f"{protocol}: the report says {received.security!r}")
        if "Only you can read this." not in received.text:
            self.failures.append(f"{protocol}: the text is not there")
        if received.attachment != attachment:
            self.failures.append(f"{protocol}: the attachment is not the one sent")

    def show_received(self, received: Received, attachment: bytes) -> None:
        """What bob's client shows (through IMAP; POP3 gave the same)."""
        out = cli.output
        out("5. What bob's client receives through IMAP and through POP3 (decrypted and verified by the gateway):")
        out(f"     X-Gatekeeper-Security: {received.security}")
        for line in received.text.strip().splitlines():
            out(f"     | {line}")
        sent_digest = hashlib.sha256(attachment).hexdigest()
        got = received.attachment or b""
        out(f"     attachment {ATTACHMENT_NAME}: {len(got)} bytes, sha256 {hashlib.sha256(got).hexdigest()}")
        out(f"     sent by alice:           {len(attachment)} bytes, sha256 {sent_digest}")
        out(f"     identical: {'yes' if got == attachment else 'NO'}")
        out("     the report attached to the message (gatekeeper-report.txt):")
        for line in received.report.strip().splitlines():
            out(f"     > {line}")
        out()

    def show_settings(self) -> None:
        """How to point Thunderbird (or any client) at this gateway."""
        ports, out = self.ports, cli.output
        ca = self.directory / "keys" / "ca" / "ca.pem"
        out("6. Try it with Thunderbird (run `gatekeeper demo --keep` to keep the gateway up):")
        out(f"     Incoming: IMAP, server {HOST}, port {ports.imaps}, SSL/TLS   (or port {ports.imap}, STARTTLS)")
        out(f"               or POP3, server {HOST}, port {ports.pop3s}, SSL/TLS   (or port {ports.pop3}, STARTTLS)")
        out(f"     Outgoing: SMTP, server {HOST}, port {ports.smtp}, STARTTLS   (or port {ports.smtps}, SSL/TLS)")
        out(f"     User name: {BOB} (or {ALICE}), authentication: normal password, the password from step 1")
        out(f"     The server certificate is issued by the demo's own CA ({ca}): import it under Settings >")
        out("     Privacy & Security > Certificates > Manage Certificates > Authorities, or confirm the exception.")
        if self.keep:
            out(f"     (the data stays in {self.directory}" + (")" if self.args.directory else " until you stop)"))

    def wait_for_interrupt(self) -> None:
        """``--keep``: the gateway runs until Ctrl-C (or until it stops by itself)."""
        assert self.process is not None
        cli.output()
        cli.output(f"The gateway keeps running (log: {self.directory / 'gatekeeper.log'}). Press Ctrl-C to stop it.")

        def interrupted(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        # Ctrl-C, or a SIGTERM to the demo, stops the gateway cleanly (stop_gateway).
        previous = {number: signal.signal(number, interrupted) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            with contextlib.suppress(KeyboardInterrupt):
                self.process.wait()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def stop_gateway(self) -> None:
        """SIGTERM, as an init system would; the gateway closes its store and ports."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            self.failures.append("the gateway did not stop within 60 s")
            return
        cli.output()
        cli.output("The gateway stopped cleanly.")

    def tls(self) -> ssl.SSLContext:
        """A client TLS context that trusts the demo's CA only."""
        return ssl.create_default_context(cafile=str(self.directory / "keys" / "ca" / "ca.pem"))


# -- helpers -------------------------------------------------------------------------------------


def stored_messages(data_dir: Path, address: str, folder: str = "INBOX") -> list[tuple[Path, bytes]]:
    """The files of a folder of the embedded store, read from disk in UID order (no lock needed: read only)."""
    root = data_dir / MAILBOXES / safe_name(address.lower()) / FOLDERS
    found: list[tuple[int, Path]] = []
    for directory in root.iterdir() if root.is_dir() else ():
        with contextlib.suppress(OSError, ValueError):
            if json.loads((directory / FOLDER_FILE).read_text())["name"] != folder:
                continue
            for sub in ("new", "cur"):
                for path in (directory / sub).iterdir():
                    found.append((uid_from_name(path.name) or 0, path))
    return [(path, path.read_bytes()) for _, path in sorted(found)]


def _understand(data: bytes) -> Received:
    """The security verdict, the text, the attachment and the report of a revealed message."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    security = str(message.get("X-Gatekeeper-Security", ""))
    text, attachment, report = "", None, ""
    for part in message.walk():
        if part.is_multipart():
            continue
        name = part.get_filename()
        payload = _payload(part)
        if name == ATTACHMENT_NAME:
            attachment = payload
        elif name == "gatekeeper-report.txt":
            report = payload.decode("utf-8", "replace")
        elif part.get_content_type() == "text/plain" and not text:
            text = payload.decode("utf-8", "replace")
    return Received(data, security, text, attachment, report)


def _payload(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _field(header: bytes, name: str) -> str:
    message = email.message_from_bytes(header + b"\r\n\r\n", policy=email.policy.default)
    return str(message.get(name, ""))


def _password() -> str:
    # Four groups of four letters and digits: easy to type into Thunderbird, ~80 bits.
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"
    return "-".join("".join(secrets.choice(alphabet) for _ in range(4)) for _ in range(4))


def _free_ports(count: int) -> list[int]:
    """Ports the kernel gives for loopback now (free when the gateway binds them a moment later)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _twistd() -> list[str]:
    """How to run twistd with this Python (the venv's script when there is one)."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


__all__ = ["register", "run_demo", "stored_messages"]

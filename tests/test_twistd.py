"""The administrator's path end to end: CLI set-up, ``twistd -n gatekeeper``, a login, one message, a clean stop."""

from __future__ import annotations

import imaplib
import poplib
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.fixtures.process import free_ports, wait_for_port, wait_for_port_closed

BIN = Path(sys.executable).parent
PASSWORD = "twistd test user password"


class TwistdTests(SynchronousTestCase):
    def test_cli_setup_then_twistd_serves_logins_and_stops_cleanly(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        ports = dict(zip(("smtp", "smtps", "pop3", "pop3s", "imap", "imaps"), free_ports(6), strict=True))
        listeners = "".join(
            f'[{name}]\nstarttls = "tcp:{ports[name]}:interface=127.0.0.1"\n'
            f'tls = "tcp:{ports[name + "s"]}:interface=127.0.0.1"\n'
            for name in ("smtp", "pop3", "imap")
        )
        config = directory / "gatekeeper.toml"
        config.write_text(
            f'[server]\nhostname = "gw.test"\ndomains = ["example.org"]\n{listeners}[keys]\nkey_type = "p256"\n'
        )
        password_file = directory / "password"
        password_file.write_text(PASSWORD)

        def gatekeeper(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(BIN / "gatekeeper"), "--config", str(config), *args],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        self.assertEqual(gatekeeper("init").returncode, 0)
        added = gatekeeper("user", "add", "carol@example.org", "--password-file", str(password_file))
        self.assertEqual(added.returncode, 0, added.stderr)

        log = open(directory / "twistd.log", "wb")  # noqa: SIM115 - closed by the cleanup
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "gatekeeper", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        for port in ports.values():
            wait_for_port(port, timeout=30, what="twistd gatekeeper")

        context = ssl.create_default_context(cafile=str(directory / "keys" / "ca" / "ca.pem"))
        client = imaplib.IMAP4_SSL("127.0.0.1", ports["imaps"], ssl_context=context, timeout=30)
        self.assertEqual(client.login("carol@example.org", PASSWORD)[0], "OK")
        client.logout()
        bad = imaplib.IMAP4_SSL("127.0.0.1", ports["imaps"], ssl_context=context, timeout=30)
        with self.assertRaises(imaplib.IMAP4.error):
            bad.login("carol@example.org", "not the password")
        bad.logout()

        # No [upstream]: the gateway is its own mail system. One message through it, end to end.
        sent = (
            b"From: <carol@example.org>\r\nTo: <carol@example.org>\r\nSubject: a note to self\r\n"
            b"Content-Type: text/plain\r\n\r\nkept in the embedded store\r\n"
        )
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=60) as smtp:
            smtp.starttls(context=context)
            smtp.login("carol@example.org", PASSWORD)
            smtp.sendmail("carol@example.org", ["carol@example.org"], sent)
        stored = list((directory / "mail").rglob("new/*"))
        self.assertEqual(len(stored), 1)
        self.assertIn(b"application/pkcs7-mime", stored[0].read_bytes())
        reader = imaplib.IMAP4_SSL("127.0.0.1", ports["imaps"], ssl_context=context, timeout=30)
        reader.login("carol@example.org", PASSWORD)
        reader.select("INBOX")
        shown = reader.fetch("1", "(BODY.PEEK[])")[1][0]
        reader.logout()
        assert isinstance(shown, tuple)
        self.assertIn(b"kept in the embedded store", shown[1])
        self.assertIn(b"decrypted=yes; signature=valid; signer=carol@example.org", shown[1])
        pop = poplib.POP3_SSL("127.0.0.1", ports["pop3s"], context=context, timeout=30)
        pop.user("carol@example.org")
        pop.pass_(PASSWORD)
        self.assertIn(b"kept in the embedded store", b"\r\n".join(pop.retr(1)[1]))
        pop.quit()

        process.send_signal(signal.SIGTERM)
        # twistd shuts down, then re-raises the signal so the exit status says what stopped it.
        self.assertEqual(process.wait(timeout=30), -signal.SIGTERM)
        for port in ports.values():
            wait_for_port_closed(port)
        text = (directory / "twistd.log").read_text()
        self.assertIn("IMAP (TLS) listening on 127.0.0.1", text)
        self.assertIn("login ok: carol@example.org", text)
        self.assertIn("Server Shut Down.", text)
        self.assertNotIn(PASSWORD, text)
        self.assertNotIn("Traceback", text)

    def test_a_port_in_use_stops_the_gateway_with_one_clear_line(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        others = "".join(f'[{name}]\nstarttls = ""\ntls = ""\n' for name in ("smtp", "pop3"))
        config = directory / "gatekeeper.toml"
        config.write_text(
            f'{others}[imap]\nstarttls = ""\ntls = "tcp:{port}:interface=127.0.0.1"\n[keys]\nkey_type = "p256"\n'
        )
        subprocess.run([str(BIN / "gatekeeper"), "--config", str(config), "init"], check=True, capture_output=True)
        started = time.monotonic()
        result = subprocess.run(
            [str(BIN / "twistd"), "-n", "--pidfile=", "gatekeeper", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=directory,
        )
        self.assertLess(time.monotonic() - started, 30)
        self.assertIn(f"cannot listen for IMAP (TLS) on tcp:{port}:interface=127.0.0.1", result.stdout + result.stderr)

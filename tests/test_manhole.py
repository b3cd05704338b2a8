"""The SSH manhole: public-key login against the authorized-keys file, ``gk`` in a real ``ssh`` session.

Unit tests check the authorized-keys parser, the checker (an unlisted key is refused
before any signature is asked for) and the host key at rest. The integration tests run
the whole gateway in-process with ``[admin] manhole`` on loopback and drive it with the
system's OpenSSH client (``ssh -tt`` on a pipe, a temporary known_hosts holding the
gateway's host key), in a thread while the reactor serves the session.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import re
import select
import subprocess
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh import keys
from twisted.cred.credentials import SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gatekeeper.admin.manhole import (
    AuthorizedKeysChecker,
    ManholeAdmin,
    ensure_host_key,
    host_key_path,
    known_hosts_line,
    read_authorized_keys,
)
from gatekeeper.audit import audit_log_path
from gatekeeper.config import parse_config_text
from gatekeeper.errors import ConfigError
from gatekeeper.tap import ListenerService
from gatekeeper.testing.gateway import GatewayHarness
from tests.scan import unencrypted_key

ALICE = "alice@example.org"
ALICE_PASSWORD = "manhole test alice password"
CAROL = "carol@example.org"
CAROL_PASSWORD = "manhole test carol password"


def make_ssh_key(directory: Path, name: str, comment: str) -> Path:
    """An Ed25519 key pair made by ssh-keygen (private key in OpenSSH format, 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True, timeout=30
    )
    return path


def public_line(key: Path) -> str:
    return key.with_suffix(".pub").read_text().strip()


# -- unit tests ----------------------------------------------------------------------------


class AuthorizedKeysTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.first = make_ssh_key(self.dir, "first", "first admin")
        self.second = make_ssh_key(self.dir, "second", "")
        self.file = self.dir / "authorized_keys"

    def test_lines_with_comments_and_blank_lines(self) -> None:
        self.file.write_text(f"# the admins\n\n{public_line(self.first)}\n  {public_line(self.second)}  \n")
        found = read_authorized_keys(self.file, strict=True)
        self.assertEqual([(entry.line, entry.comment) for entry in found], [(3, "first admin"), (4, "")])
        self.assertEqual(found[0].blob, keys.Key.fromFile(str(self.first)).public().blob())
        expected = subprocess.run(
            ["ssh-keygen", "-l", "-f", str(self.first.with_suffix(".pub"))], capture_output=True, text=True, check=True
        ).stdout.split()[1]
        self.assertEqual(found[0].fingerprint, expected)

    def test_options_are_refused_and_named(self) -> None:
        self.file.write_text(f'{public_line(self.first)}\nfrom="10.0.0.1" {public_line(self.second)}\n')
        with self.assertRaises(ConfigError) as caught:
            read_authorized_keys(self.file, strict=True)
        self.assertIn("line 2: options are not supported", str(caught.exception))
        # At login time the bad line is skipped and the good one still works.
        self.assertEqual([entry.line for entry in read_authorized_keys(self.file)], [1])

    def test_garbage_and_private_keys_are_refused(self) -> None:
        self.file.write_text("ssh-ed25519 not-base64-at-all\n")
        with self.assertRaises(ConfigError) as caught:
            read_authorized_keys(self.file, strict=True)
        self.assertIn("line 1: not a public key", str(caught.exception))

    def test_the_shipped_example_is_all_comments(self) -> None:
        example = Path(__file__).resolve().parent.parent / "etc" / "manhole_authorized_keys.example"
        self.assertEqual(read_authorized_keys(example, strict=True), [])

    def test_missing_file(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            read_authorized_keys(self.dir / "nothing")
        self.assertEqual(caught.exception.path, "[admin] authorized_keys")


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.listed = keys.Key.fromFile(str(make_ssh_key(self.dir, "listed", "listed admin")))
        self.other = keys.Key.fromFile(str(make_ssh_key(self.dir, "other", "someone")))
        self.file = self.dir / "authorized_keys"
        self.file.write_text(self.listed.public().toString("openssh").decode() + " listed admin\n")
        self.checker = AuthorizedKeysChecker(self.file)

    def credentials(self, key: keys.Key, *, sign: bool, data: bytes = b"session data") -> SSHPrivateKey:
        signature = key.sign(data) if sign else None
        return SSHPrivateKey(b"admin", b"ssh-ed25519", key.public().blob(), data, signature)

    def test_listed_key_is_asked_to_sign_then_accepted(self) -> None:
        self.failureResultOf(self.checker.requestAvatarId(self.credentials(self.listed, sign=False)), ValidPublicKey)
        admin = self.successResultOf(self.checker.requestAvatarId(self.credentials(self.listed, sign=True)))
        self.assertIsInstance(admin, ManholeAdmin)
        self.assertEqual(admin.actor, "admin (key listed admin)")

    def test_unlisted_key_is_refused_before_any_signature(self) -> None:
        for sign in (False, True):
            failure = self.failureResultOf(self.checker.requestAvatarId(self.credentials(self.other, sign=sign)))
            self.assertTrue(failure.check(UnauthorizedLogin))
            self.assertFalse(failure.check(ValidPublicKey))

    def test_bad_signature_is_refused(self) -> None:
        forged = SSHPrivateKey(
            b"admin", b"ssh-ed25519", self.listed.public().blob(), b"session data", self.other.sign(b"session data")
        )
        self.failureResultOf(self.checker.requestAvatarId(forged), UnauthorizedLogin)

    def test_the_file_is_read_at_every_login(self) -> None:
        self.successResultOf(self.checker.requestAvatarId(self.credentials(self.listed, sign=True)))
        self.file.write_text("# nobody\n")
        self.failureResultOf(self.checker.requestAvatarId(self.credentials(self.listed, sign=True)), UnauthorizedLogin)


class ConfigTests(SynchronousTestCase):
    def parse(self, admin: str) -> Any:
        return parse_config_text(f"[admin]\n{admin}", Path("/etc/gatekeeper")).admin

    def test_off_by_default(self) -> None:
        admin = self.parse("")
        self.assertEqual((admin.manhole, admin.metrics), ("", ""))

    def test_loopback_unless_an_interface_is_named(self) -> None:
        admin = self.parse('manhole = "tcp:2222"\nauthorized_keys = "keys.txt"\n')
        self.assertEqual(admin.manhole, "tcp:2222:interface=127.0.0.1")
        self.assertEqual(admin.authorized_keys, Path("/etc/gatekeeper/keys.txt"))
        admin = self.parse('manhole = "tcp:2222:interface=192.0.2.7"\nauthorized_keys = "keys.txt"\n')
        self.assertEqual(admin.manhole, "tcp:2222:interface=192.0.2.7")

    def test_manhole_needs_authorized_keys(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.parse('manhole = "tcp:2222"\n')
        self.assertEqual(caught.exception.path, "[admin] authorized_keys")


class HostKeyTests(SynchronousTestCase):
    def test_generated_once_encrypted_at_rest(self) -> None:
        harness = GatewayHarness(Path(self.mktemp()).absolute())
        key = ensure_host_key(harness.config)
        path = host_key_path(harness.config)
        data = path.read_bytes()
        self.assertTrue(data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"))
        self.assertIsNone(unencrypted_key(data))
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        self.assertIsInstance(key.toString("openssh"), bytes)
        self.assertEqual(ensure_host_key(harness.config).public().blob(), key.public().blob())
        self.assertEqual(path.read_bytes(), data)
        line = known_hosts_line(key, "127.0.0.1", 2222)
        self.assertTrue(line.startswith("[127.0.0.1]:2222 ssh-ed25519 "))

    def test_a_key_that_does_not_decrypt_is_a_config_error(self) -> None:
        harness = GatewayHarness(Path(self.mktemp()).absolute())
        path = host_key_path(harness.config)
        path.parent.mkdir(mode=0o700)
        from cryptography.hazmat.primitives import serialization

        other = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"not the CA passphrase"),
        )
        path.write_bytes(other)
        with self.assertRaises(ConfigError) as caught:
            ensure_host_key(harness.config)
        self.assertIn("does not decrypt with the CA passphrase", str(caught.exception))


# -- the real thing: OpenSSH against the running gateway ----------------------------------


@functools.cache
def shared_gateway() -> tuple[GatewayHarness, Path, Path]:
    """One gateway directory for the module: the key store, a user, two client keys."""
    root = Path("manhole-gateway").absolute()
    admin_key = make_ssh_key(root / "client", "admin", "test admin key")
    stranger_key = make_ssh_key(root / "client", "stranger", "not listed")
    authorized = root / "manhole_authorized_keys"
    root.mkdir(parents=True, exist_ok=True)
    authorized.write_text(f"# test admins\n{public_line(admin_key)}\n")
    harness = GatewayHarness(
        root / "gateway",
        extra_config=f'[admin]\nmanhole = "tcp:0"\nauthorized_keys = "{authorized}"\n',
    )
    harness.add_user(ALICE, ALICE_PASSWORD)
    return harness, admin_key, stranger_key


class Console:
    """``ssh -tt`` to the manhole on a pipe: send lines, wait for text in the output."""

    def __init__(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.output = b""

    def expect(self, text: bytes, *, after: int = 0, timeout: float = 60.0) -> int:
        """Wait until ``text`` appears at or after offset ``after``; return where it ends."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            found = self.output.find(text, after)
            if found >= 0:
                return found + len(text)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.process.poll() is not None and not self._readable(0)):
                raise AssertionError(f"{text!r} not seen; output so far: {self.output[-2000:]!r}")
            if self._readable(min(remaining, 0.5)):
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk and self.process.poll() is not None:
                    continue
                self.output += chunk

    def _readable(self, timeout: float) -> bool:
        assert self.process.stdout is not None
        return bool(select.select([self.process.stdout], [], [], timeout)[0])

    def send(self, line: str) -> int:
        """Type a line; return the output offset before it."""
        assert self.process.stdin is not None
        start = len(self.output)
        self.process.stdin.write(line.encode("utf-8") + b"\r")
        self.process.stdin.flush()
        return start

    def close(self) -> int:
        """Ctrl-D at an empty prompt ends the console; return ssh's exit status."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(b"\x04")
            self.process.stdin.flush()
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()


def text_of(output: bytes) -> str:
    """Terminal output without escape sequences and carriage returns."""
    return re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[A-Za-z=>]|\r", b"", output).decode("utf-8", "replace")


class ManholeOverSshTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.harness, self.admin_key, self.stranger_key = shared_gateway()
        self.service = self.harness.start(reactor)
        self.addCleanup(self.harness.stop)
        listener = next(s for s in self.service if isinstance(s, ListenerService) and s.what == "manhole (SSH)")
        assert listener.port is not None
        address = listener.port.getHost()
        self.host, self.port = address.host, address.port  # type: ignore[attr-defined]
        self.known_hosts = Path(self.mktemp())
        self.known_hosts.write_text(known_hosts_line(ensure_host_key(self.harness.config), self.host, self.port) + "\n")

    def ssh_argv(self, key: Path, *extra: str, user: str = "admin") -> list[str]:
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(self.port),
            "-i",
            str(key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=30",
            *extra,
            f"{user}@{self.host}",
        ]

    def console_session(self) -> str:
        """List users, add one, look at help and the namespace; return the whole session as text."""
        console = Console(self.ssh_argv(self.admin_key, "-tt"))
        try:
            console.expect(b">>> ")
            start = console.send("gk.users()")
            end = console.expect(b"Deferred #0 called back", after=start)
            console.expect(b">>> ", after=end)
            start = console.send(f"gk.add_user({CAROL!r}, {CAROL_PASSWORD!r})")
            end = console.expect(b"Deferred #1 called back", after=start)
            console.expect(b">>> ", after=end)
            start = console.send("gk.add_user('carol@example.org', 'another password')")
            end = console.expect(b"Deferred #2 failed", after=start)
            console.expect(b">>> ", after=end)
            start = console.send("sorted(k for k in dir() if not k.startswith('_'))")
            console.expect(b"['gk']", after=start)
            start = console.send("help(gk)")
            console.expect(b"stats()", after=start)
            console.expect(b">>> ", after=start)
        finally:
            status = console.close()
        self.assertEqual(status, 0, text_of(console.output)[-3000:])
        return text_of(console.output)

    async def test_users_and_add_user_over_ssh(self) -> None:
        self.assertEqual(self.host, "127.0.0.1")  # "tcp:0" was bound to loopback
        transcript = await deferToThread(self.console_session)
        first = transcript[transcript.index("Deferred #0 called back") :]
        self.assertIn(f"UserInfo(address='{ALICE}'", first[: first.index(">>>")])
        second = transcript[transcript.index("Deferred #1 called back") :]
        self.assertIn(f"UserInfo(address='{CAROL}'", second[: second.index(">>>")])
        self.assertIn("the user already exists: carol@example.org", transcript)
        for name in (
            "users()",
            "add_user(",
            "rotate(",
            "delete_user(",
            "lookup(",
            "flush(",
            "sessions()",
            "kick(",
            "check()",
        ):
            self.assertIn(name, transcript)
        self.assertNotIn(CAROL_PASSWORD, transcript[transcript.index("Deferred #1") :])
        # The user really exists, with keys that open with the password typed in the console.
        stored = self.harness.store.get_user(CAROL)
        assert stored is not None
        from gatekeeper.keys.accounts import unlock

        self.assertEqual(unlock(stored, CAROL_PASSWORD).identity.address, CAROL)
        # ...and the change is audited in the key's owner's name, without the password.
        lines = audit_log_path(self.harness.config).read_text().splitlines()
        records = [json.loads(line) for line in lines]
        added = [r for r in records if r.get("operation") == "add_user" and r.get("target") == CAROL]
        self.assertEqual(len(added), 1)
        self.assertEqual((added[0]["via"], added[0]["actor"]), ("manhole", "admin (key test admin key)"))
        self.assertNotIn(CAROL_PASSWORD, "\n".join(lines))
        # The failed add_user was shown in the console, not left as an unhandled error.
        gc.collect()

    def refused(self, key: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.ssh_argv(key, *extra), "true"], capture_output=True, text=True, timeout=60, check=False
        )

    async def test_a_key_not_in_the_file_is_refused(self) -> None:
        result = await deferToThread(self.refused, self.stranger_key)
        self.assertEqual(result.returncode, 255)
        self.assertIn("Permission denied (publickey)", result.stderr)

    async def test_no_passwords_and_no_commands(self) -> None:
        # The server offers public-key login only: asking for passwords gets nothing else.
        result = await deferToThread(
            self.refused, self.stranger_key, "-o", "PreferredAuthentications=password,keyboard-interactive"
        )
        self.assertEqual(result.returncode, 255)
        self.assertIn("Permission denied (publickey)", result.stderr)
        # An authorized key gets a console, but no command execution.
        result = await deferToThread(self.refused, self.admin_key)
        self.assertEqual(result.returncode, 1)
        self.assertIn("commands are not run here", result.stdout)

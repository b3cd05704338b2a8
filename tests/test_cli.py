"""Tests for the ``gatekeeper`` command line: in-process through ``main()``, and a few as a real process."""

from __future__ import annotations

import getpass
import io
import subprocess
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.admin import cli
from gatekeeper.keys import accounts as accounts_module
from gatekeeper.keys.accounts import unlock
from gatekeeper.keys.store import FileKeyStore
from gatekeeper.testing.pki import TestPKI
from tests.keys_support import openssl

PASSWORD = "cli pässword"


class TtyInput(io.StringIO):
    """Standard input that claims to be a terminal (so the CLI may prompt)."""

    def isatty(self) -> bool:
        return True


def write_config(directory: Path, *, key_type: str | None = "p256", extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    key_line = f'key_type = "{key_type}"' if key_type else ""
    path = directory / "gatekeeper.toml"
    path.write_text(
        f"""
[server]
hostname = "gw.example.org"
[keys]
store = "keys"
{key_line}
[tls]
certificate = "keys/tls/server.crt"
key = "keys/tls/server.key"
{extra}
""",
        encoding="utf-8",
    )
    return path


class CliTestCase(SynchronousTestCase):
    initialise = True

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.config = write_config(self.dir)
        self.store_root = self.dir / "keys"
        self.answers: list[str] = []
        self.patch(getpass, "getpass", self.fake_getpass)
        self.patch(sys, "stdin", TtyInput(""))
        if self.initialise:
            self.assertEqual(self.run_cli("init")[0], 0)

    def fake_getpass(self, prompt: str = "Password: ") -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0)

    prompts: list[str]

    def run_cli(self, *arguments: str, answers: Sequence[str] = (), stdin: str | None = None) -> tuple[int, str, str]:
        """Run ``gatekeeper --config <ours> ARGUMENTS``; return (status, stdout, stderr)."""
        self.answers = list(answers)
        self.prompts = []
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        if stdin is not None:
            self.patch(sys, "stdin", TtyInput(stdin))
        status = cli.main(["--config", str(self.config), *arguments])
        self.assertEqual(self.answers, [], "not every prepared answer was asked for")
        return status, out.getvalue(), err.getvalue()

    def password_file(self, password: str = PASSWORD, name: str = "password") -> str:
        path = self.dir / name
        path.write_text(password + "\n", encoding="utf-8")
        return str(path)

    def store(self) -> FileKeyStore:
        return FileKeyStore(self.store_root)

    def add_alice(self) -> None:
        status, _, err = self.run_cli("user", "add", "alice@example.org", "--password-file", self.password_file())
        self.assertEqual(status, 0, err)


class InitTests(CliTestCase):
    initialise = False

    def test_init_and_if_absent(self) -> None:
        status, out, err = self.run_cli("init")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("created the CA", out)
        self.assertIn("generated the CA passphrase", out)
        self.assertIn("issued the TLS certificate", out)
        self.assertTrue((self.store_root / "ca" / "ca.p12").exists())
        status, out, err = self.run_cli("init")
        self.assertEqual(status, 1)
        self.assertEqual(err.count("\n"), 1)
        self.assertTrue(err.startswith("gatekeeper: the key store is already initialised"))
        status, out, err = self.run_cli("init", "--if-absent")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("already initialised", out)

    def test_commands_need_init(self) -> None:
        status, _, err = self.run_cli("user", "list")
        self.assertEqual(status, 1)
        self.assertIn(f"run `gatekeeper --config {self.config} init` first", err)


class UserTests(CliTestCase):
    def test_add_prompted_twice(self) -> None:
        status, out, err = self.run_cli("user", "add", "Alice@Example.ORG", answers=[PASSWORD, PASSWORD])
        self.assertEqual(status, 0, err)
        self.assertEqual(len(self.prompts), 2)
        self.assertIn("added Alice@example.org", out)
        self.assertNotIn(PASSWORD, out + err)
        user = self.store().get_user("alice@example.org")
        assert user is not None
        self.assertEqual(len(unlock(user, PASSWORD).identity.keys), 1)

    def test_add_mismatch(self) -> None:
        status, _, err = self.run_cli("user", "add", "alice@example.org", answers=[PASSWORD, "typo"])
        self.assertEqual(status, 1)
        self.assertEqual(err, "gatekeeper: the two passwords do not match\n")
        self.assertEqual(self.store().list_users(), [])

    def test_add_without_terminal(self) -> None:
        self.patch(sys, "stdin", io.StringIO(PASSWORD + "\n"))
        status, _, err = self.run_cli("user", "add", "alice@example.org")
        self.assertEqual(status, 2)
        self.assertIn("no terminal", err)
        self.assertEqual(self.store().list_users(), [])

    def test_add_from_stdin(self) -> None:
        status, _, err = self.run_cli("user", "add", "alice@example.org", "--password-file", "-", stdin=PASSWORD + "\n")
        self.assertEqual(status, 0, err)
        user = self.store().get_user("alice@example.org")
        assert user is not None
        unlock(user, PASSWORD)

    def test_add_errors(self) -> None:
        self.add_alice()
        status, _, err = self.run_cli("user", "add", "ALICE@example.org", "--password-file", self.password_file())
        self.assertEqual((status, err), (1, "gatekeeper: the user already exists: ALICE@example.org\n"))
        status, _, err = self.run_cli("user", "add", "not-an-address")
        self.assertEqual(status, 1)
        self.assertIn("not an e-mail address", err)
        status, _, err = self.run_cli("user", "add", "bob@example.org", "--password-file", str(self.dir / "nope"))
        self.assertEqual(status, 2)
        self.assertIn("password file not found", err)

    def test_list(self) -> None:
        status, out, _ = self.run_cli("user", "list")
        self.assertEqual((status, out), (0, "no users\n"))
        self.add_alice()
        self.run_cli("user", "add", "bob@example.org", "--password-file", self.password_file())
        self.run_cli("user", "rotate", "bob@example.org")
        self.store().record_login("alice@example.org")
        status, out, _ = self.run_cli("user", "list")
        self.assertEqual(status, 0)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["ADDRESS", "CERTIFICATE", "EXPIRES", "KEYS", "LAST", "LOGIN"])
        self.assertTrue(lines[1].startswith("alice@example.org"))
        self.assertIn(" UTC", lines[1])
        self.assertIn("1 (+1 pending)", lines[2])
        self.assertTrue(lines[2].endswith("never"))

    def test_passwd(self) -> None:
        self.add_alice()
        status, out, err = self.run_cli("user", "passwd", "alice@example.org", answers=[PASSWORD, "new one", "new one"])
        self.assertEqual(status, 0, err)
        self.assertIn("changed the password", out)
        user = self.store().get_user("alice@example.org")
        assert user is not None
        unlock(user, "new one")
        status, _, err = self.run_cli("user", "passwd", "alice@example.org", answers=[PASSWORD, "x", "x"])
        self.assertEqual(status, 1)
        self.assertIn("does not decrypt", err)
        status, _, err = self.run_cli("user", "passwd", "bob@example.org")
        self.assertEqual((status, err), (1, "gatekeeper: no such user: bob@example.org\n"))

    def test_rotate(self) -> None:
        self.add_alice()
        status, out, err = self.run_cli("user", "rotate", "alice@example.org")
        self.assertEqual(status, 0, err)
        self.assertIn("completed at the user's next login", out)
        status, out, err = self.run_cli("user", "rotate", "alice@example.org", "--password-file", self.password_file())
        self.assertEqual(status, 0, err)
        user = self.store().get_user("alice@example.org")
        assert user is not None
        self.assertEqual((len(user.keys), len(user.pending)), (3, 0))  # the pending one was completed on the way
        status, _, err = self.run_cli("user", "rotate", "alice@example.org", "--ask-password", answers=["wrong"])
        self.assertEqual(status, 1)
        self.assertIn("does not decrypt", err)

    def test_delete(self) -> None:
        self.add_alice()
        self.patch(sys, "stdin", io.StringIO(""))  # not a terminal: no confirmation possible
        status, _, err = self.run_cli("user", "delete", "alice@example.org")
        self.assertEqual(status, 2)
        self.assertIn("--yes", err)
        status, out, _ = self.run_cli("user", "delete", "alice@example.org", stdin="bob@example.org\n")
        self.assertEqual(status, 1)
        self.assertTrue(out.endswith("not deleted\n"))
        self.assertIsNotNone(self.store().get_user("alice@example.org"))
        certificate = self.store().get_user("alice@example.org").current.certificate  # type: ignore[union-attr]
        status, out, err = self.run_cli("user", "delete", "alice@example.org", stdin="ALICE@example.org\n")
        self.assertEqual(status, 0, err)
        self.assertIsNone(self.store().get_user("alice@example.org"))
        crl = x509.load_pem_x509_crl((self.store_root / "ca" / "crl.pem").read_bytes())
        self.assertIsNotNone(crl.get_revoked_certificate_by_serial_number(certificate.serial_number))
        self.add_alice()
        status, _, err = self.run_cli("user", "delete", "alice@example.org", "--yes")
        self.assertEqual(status, 0, err)
        self.assertEqual(self.store().list_users(), [])

    def test_export_read_by_openssl(self) -> None:
        self.add_alice()
        export_password = self.password_file("export pässword", "export-password")
        user = self.store().get_user("alice@example.org")
        assert user is not None
        for legacy in (False, True):
            out_file = self.dir / f"alice-{legacy}.p12"
            arguments = ["user", "export", "alice@example.org", "--out", str(out_file)]
            arguments += ["--legacy"] if legacy else []
            status, out, err = self.run_cli(*arguments, answers=[PASSWORD, "export pässword", "export pässword"])
            self.assertEqual(status, 0, err)
            self.assertIn("3DES" if legacy else "AES-256", out)
            result = openssl(["pkcs12", "-in", str(out_file), "-passin", f"file:{export_password}", "-nodes"])
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(b"PRIVATE KEY", result.stdout)
            self.assertIn(user.current.certificate.public_bytes(serialization.Encoding.PEM), result.stdout)
            info = openssl(["pkcs12", "-in", str(out_file), "-passin", f"file:{export_password}", "-info", "-noout"])
            self.assertIn(b"TripleDES" if legacy else b"AES-256-CBC", info.stderr)
        status, _, err = self.run_cli("user", "export", "alice@example.org", "--out", str(self.dir / "alice-True.p12"))
        self.assertEqual(status, 2)
        self.assertIn("already exists", err)


class CertTests(CliTestCase):
    def test_import_list_remove(self) -> None:
        pki = TestPKI("Partner CA", key_kind="p256", key_index=11)
        bob = pki.user("bob@partner.example", key_kind="p256")
        carol = pki.user("carol@partner.example", key_kind="p256", key_index=1)
        (self.dir / "bob.pem").write_bytes(bob.cert_pem())
        (self.dir / "carol.der").write_bytes(carol.cert_der())
        status, out, err = self.run_cli("cert", "import", str(self.dir / "bob.pem"), str(self.dir / "carol.der"))
        self.assertEqual(status, 0, err)
        self.assertIn("2 certificate(s) imported", out)
        status, out, _ = self.run_cli("cert", "list")
        self.assertIn("bob@partner.example", out)
        self.assertIn("carol@partner.example", out)
        fingerprint = out.split()[0]
        status, out, _ = self.run_cli("cert", "remove", fingerprint)
        self.assertEqual(status, 0)
        status, out, _ = self.run_cli("cert", "list")
        self.assertEqual(len(out.splitlines()), 1)
        self.assertEqual(self.run_cli("cert", "remove", fingerprint)[0], 1)
        self.assertTrue((self.store_root / "keyring").is_dir())

    def test_import_rejects_non_certificates(self) -> None:
        (self.dir / "junk.pem").write_bytes(b"junk")
        status, _, err = self.run_cli("cert", "import", str(self.dir / "junk.pem"))
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("gatekeeper: "))
        self.assertEqual(err.count("\n"), 1)
        status, _, err = self.run_cli("cert", "import", str(self.dir / "missing.pem"))
        self.assertEqual(status, 1)
        self.assertIn("No such file or directory", err)


class ErrorTests(CliTestCase):
    def test_missing_config(self) -> None:
        self.config = self.dir / "nope.toml"
        status, _, err = self.run_cli("user", "list")
        self.assertEqual(status, 2)
        self.assertEqual(err, f"gatekeeper: {self.config}: configuration file not found\n")

    def test_config_errors_name_the_setting(self) -> None:
        write_config(self.dir, extra='[upstream]\nimap = "imap.example.org"\n')
        status, _, err = self.run_cli("user", "list")
        self.assertEqual(status, 2)
        self.assertTrue(err.startswith("gatekeeper: [upstream] imap: "), err)
        self.assertEqual(err.count("\n"), 1)

    def test_usage_errors(self) -> None:
        for arguments in (["user"], ["user", "add"], ["frobnicate"], ["user", "list", "--bogus"]):
            status, _, err = self.run_cli(*arguments)
            self.assertEqual(status, 2, arguments)
            self.assertTrue(err.startswith("gatekeeper: "), err)
            self.assertEqual(err.count("\n"), 1, err)

    def test_unexpected_error_is_one_line(self) -> None:
        def broken(self: object) -> None:
            raise ValueError("internal detail that must not leak")

        self.patch(accounts_module.Accounts, "list", broken)
        status, _, err = self.run_cli("user", "list")
        self.assertEqual(status, 1)
        self.assertEqual(err, "gatekeeper: unexpected error (ValueError); run with --debug for details\n")
        status, _, err = self.run_cli("user", "list", "--debug")
        self.assertEqual(status, 1)
        self.assertIn("Traceback", err)
        self.assertIn("internal detail", err)

    def test_config_after_the_command(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(cli.main(["user", "list", "--config", str(self.config)]), 0)
        self.assertEqual(out.getvalue(), "no users\n")

    def test_help(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(cli.main(["user", "--help"]), 0)
        self.assertIn("export", out.getvalue())


class CommandModulesTests(SynchronousTestCase):
    def test_listed_modules_register(self) -> None:
        parser = cli.build_parser()
        for name in cli.COMMAND_MODULES:
            self.assertTrue(callable(__import__(name, fromlist=["register"]).register), name)
        args = parser.parse_args(["user", "list", "--config", "x.toml"])
        self.assertEqual(args.config, "x.toml")
        self.assertEqual(parser.parse_args(["--config", "y.toml", "init"]).config, "y.toml")
        self.assertEqual(parser.parse_args(["init"]).config, "etc/gatekeeper.toml")

    def test_another_module_gets_config_and_errors(self) -> None:
        seen: list[Any] = []
        module = types.ModuleType("tests.fake_command")

        def register(subparsers: Any) -> None:
            parser = subparsers.add_parser("hello")
            nested = parser.add_subparsers(dest="what", required=True).add_parser("world")
            nested.set_defaults(handler=lambda args: seen.append(args.config) or 3)

        module.register = register  # type: ignore[attr-defined]
        self.patch(sys, "modules", {**sys.modules, "tests.fake_command": module})
        self.patch(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "tests.fake_command"))
        self.assertEqual(cli.main(["hello", "world", "--config", "z.toml"]), 3)
        self.assertEqual(seen, ["z.toml"])


class ProcessTests(SynchronousTestCase):
    """The installed console script, with the production defaults (RSA-3072, 600,000 rounds)."""

    def gatekeeper(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        script = Path(sys.executable).parent / "gatekeeper"
        return subprocess.run(
            [str(script), *arguments],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def test_init_add_list(self) -> None:
        directory = Path(self.mktemp()).absolute()
        config = str(write_config(directory, key_type=None))
        (directory / "password").write_text(PASSWORD + "\n", encoding="utf-8")
        result = self.gatekeeper("--config", config, "init", "--if-absent")
        self.assertEqual(result.returncode, 0, result.stderr)
        result = self.gatekeeper(
            "--config", config, "user", "add", "alice@example.org", "--password-file", str(directory / "password")
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        result = self.gatekeeper("user", "list", "--config", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("alice@example.org", result.stdout)
        user = FileKeyStore(directory / "keys").get_user("alice@example.org")
        assert user is not None
        public = user.current.certificate.public_key()
        self.assertEqual(getattr(public, "key_size", None), 3072)
        self.assertEqual(len(unlock(user, PASSWORD).identity.keys), 1)

    def test_errors_without_traceback(self) -> None:
        directory = Path(self.mktemp()).absolute()
        config = str(write_config(directory, extra="[keys]\n"))  # a duplicate section: not valid TOML
        result = self.gatekeeper("--config", config, "user", "list")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertTrue(result.stderr.startswith("gatekeeper: "))
        self.assertNotIn("Traceback", result.stderr)
        result = self.gatekeeper("--config", config, "user", "add", "alice@example.org")
        self.assertNotIn("Traceback", result.stderr)

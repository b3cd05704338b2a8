"""``gatekeeper smime ...``: the command handlers, through the CLI parser when it is there."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12
from twisted.trial import unittest

from gatekeeper.admin import smime_cmd
from gatekeeper.testing.pki import TestPKI

PKI = TestPKI("Command CA", key_index=50)
ALICE = PKI.user("alice@example.org", key_index=50)
BOB = PKI.user("bob@example.org", key_index=51)
MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: cli\r\n\r\nhello from the command line\r\n"
)


class SmimeCommandTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        for name, issued in (("alice", ALICE), ("bob", BOB)):
            data = pkcs12.serialize_key_and_certificates(
                name.encode(), issued.key, issued.certificate, [PKI.certificate], BestAvailableEncryption(b"pw")
            )
            (self.dir / f"{name}.p12").write_bytes(data)
            (self.dir / f"{name}.pem").write_bytes(issued.cert_pem())
        (self.dir / "ca.pem").write_bytes(PKI.cert_pem())
        (self.dir / "password").write_text("pw\n")
        (self.dir / "message.eml").write_bytes(MESSAGE)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def parse(self, argv: list[str]) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        smime_cmd.register(parser.add_subparsers())
        args = parser.parse_args(argv)
        args.config = self.path("missing.toml")
        return args

    def run_command(self, argv: list[str]) -> int:
        args = self.parse(argv)
        status: int = args.handler(args)
        return status

    def test_sign_encrypt_then_decrypt(self) -> None:
        signer = ["--p12", self.path("alice.p12"), "--password-file", self.path("password")]
        status = self.run_command(
            [
                "smime",
                "sign-encrypt",
                "--in",
                self.path("message.eml"),
                "--out",
                self.path("out.eml"),
                *signer,
                "--to",
                self.path("bob.pem"),
                "--cipher",
                "aes256-gcm",
                "--oaep",
            ]
        )
        self.assertEqual(status, 0)
        reader = ["--p12", self.path("bob.p12"), "--password-file", self.path("password")]
        status = self.run_command(
            [
                "smime",
                "decrypt",
                "--in",
                self.path("out.eml"),
                "--out",
                self.path("plain.eml"),
                *reader,
                "--ca",
                self.path("ca.pem"),
                "--report",
                self.path("report.json"),
            ]
        )
        self.assertEqual(status, 0)
        self.assertIn(b"hello from the command line", (self.dir / "plain.eml").read_bytes())
        report = json.loads((self.dir / "report.json").read_text())
        self.assertTrue(report["valid"])
        self.assertEqual(report["layers"], ["auth-enveloped", "signed"])
        self.assertEqual(report["decryptions"][0]["key_encryption"], "rsa-oaep")
        self.assertEqual(report["signatures"][0]["status"], "valid")
        self.assertEqual(report["sender"], "alice@example.org")

    def test_verify_exit_status(self) -> None:
        signer = ["--p12", self.path("alice.p12"), "--password-file", self.path("password")]
        self.run_command(["smime", "sign", "--in", self.path("message.eml"), "--out", self.path("signed.eml"), *signer])
        verify = [
            "smime",
            "verify",
            "--in",
            self.path("signed.eml"),
            "--out",
            self.path("v.eml"),
            "--report",
            self.path("r.json"),
        ]
        self.assertEqual(self.run_command([*verify, "--ca", self.path("ca.pem")]), 0)
        self.assertEqual(self.run_command([*verify, "--ca", self.path("bob.pem")]), 1)  # not a trusted CA
        self.assertEqual(json.loads((self.dir / "r.json").read_text())["signatures"][0]["status"], "untrusted")
        self.assertEqual(self.run_command([*verify, "--ca", self.path("ca.pem"), "--sender", "eve@example.org"]), 1)
        (self.dir / "plain.eml").write_bytes(MESSAGE)
        unsigned = [
            "smime",
            "verify",
            "--in",
            self.path("plain.eml"),
            "--out",
            self.path("v2.eml"),
            "--ca",
            self.path("ca.pem"),
        ]
        self.assertEqual(self.run_command(unsigned), 1)

    def test_registered_in_cli(self) -> None:
        from gatekeeper.admin import cli

        self.assertIn("gatekeeper.admin.smime_cmd", cli.COMMAND_MODULES)
        signed = self.dir / "signed.eml"
        status = cli.main(
            [
                "smime",
                "sign",
                "--in",
                self.path("message.eml"),
                "--out",
                str(signed),
                "--p12",
                self.path("alice.p12"),
                "--password-file",
                self.path("password"),
                "--opaque",
            ]
        )
        self.assertEqual(status, 0)
        self.assertIn(b"smime-type=signed-data", signed.read_bytes())
        self.assertEqual(
            cli.main(
                [
                    "smime",
                    "sign",
                    "--in",
                    self.path("message.eml"),
                    "--p12",
                    self.path("bob.pem"),
                    "--password-file",
                    self.path("password"),
                ]
            ),
            2,
        )

"""The settings the SMTP proxy adds: [smtp] limits and spooling, [upstream] SMTP login, pool and checks."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.config import Config, parse_config_text
from gatekeeper.errors import ConfigError
from gatekeeper.upstream.smtp import read_smtp_password

UPSTREAM = '[upstream]\nsmtp = "starttls:mail.example.org:587"\npop3 = "tls:mail.example.org:995"\n'
UPSTREAM += 'imap = "tls:mail.example.org:993"\n'


def parse(text: str) -> Config:
    return parse_config_text(text, Path("/srv/gk/etc"))


class SmtpSettingsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        config = parse(UPSTREAM)
        self.assertEqual((config.smtp.max_recipients, config.smtp.spool_threshold), (100, 1024 * 1024))
        self.assertIsNone(config.smtp.spool_directory)
        upstream = config.upstream
        self.assertEqual((upstream.smtp_user, upstream.smtp_connections, upstream.verify_recipients), (None, 10, True))

    def test_spool_directory_is_relative_to_the_file(self) -> None:
        config = parse('[smtp]\nspool_directory = "spool"\nspool_threshold = 0\n')
        self.assertEqual(config.smtp.spool_directory, Path("/srv/gk/etc/spool"))
        self.assertEqual(config.smtp.spool_threshold, 0)

    def test_upstream_login_with_a_password_file(self) -> None:
        secret = Path(self.mktemp()).absolute()
        secret.write_text("s3cret\n")
        config = parse(UPSTREAM + f'smtp_user = "relay@example.org"\nsmtp_password_file = "{secret}"\n')
        self.assertEqual(config.upstream.smtp_user, "relay@example.org")
        self.assertEqual(read_smtp_password(config.upstream), "s3cret")

    def test_password_from_the_environment(self) -> None:
        config = parse(UPSTREAM + 'smtp_user = "relay@example.org"\nsmtp_password_env = "GK_SMTP"\n')
        self.assertEqual(read_smtp_password(config.upstream, {"GK_SMTP": "from env"}), "from env")
        with self.assertRaises(ConfigError) as caught:
            read_smtp_password(config.upstream, {})
        self.assertIn("[upstream] smtp_password_env", str(caught.exception))

    def assertFails(self, text: str, fragment: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse(text)
        self.assertIn(fragment, str(caught.exception))

    def test_no_password_in_the_file(self) -> None:
        self.assertFails(UPSTREAM + 'smtp_user = "r@example.org"\nsmtp_password = "x"\n', "[upstream] smtp_password")

    def test_a_user_needs_a_password_source(self) -> None:
        self.assertFails(UPSTREAM + 'smtp_user = "r@example.org"\n', "set smtp_password_file or smtp_password_env")

    def test_a_password_needs_a_user(self) -> None:
        self.assertFails(UPSTREAM + 'smtp_password_env = "X"\n', "no smtp_user")

    def test_no_password_over_plain_tcp(self) -> None:
        text = '[upstream]\nsmtp = "tcp:127.0.0.1:25"\npop3 = "tcp:127.0.0.1:110"\nimap = "tcp:127.0.0.1:143"\n'
        self.assertFails(text + 'smtp_user = "r@example.org"\nsmtp_password_env = "X"\n', "only sent over TLS")

    def test_example_configuration_documents_the_defaults(self) -> None:
        example = Path(__file__).resolve().parent.parent / "etc" / "gatekeeper.toml"
        config = parse(example.read_text())
        self.assertEqual(config.smtp.max_recipients, 100)
        self.assertEqual(config.smtp.spool_threshold, 1024 * 1024)
        self.assertEqual(config.upstream.smtp_connections, 10)
        self.assertTrue(config.upstream.verify_recipients)
        self.assertFalse(config.policy.outbound_header)

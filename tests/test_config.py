"""The configuration file: defaults, relative paths, and one clear error per bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.config import (
    MIN_KDF_ITERATIONS,
    UpstreamEndpoint,
    load_config,
    parse_config_text,
)
from gatekeeper.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


class DefaultsTests(SynchronousTestCase):
    def test_empty_file_gives_standard_ports_and_embedded_upstream(self) -> None:
        config = parse_config_text("", Path("/srv/gk/etc"))
        self.assertEqual(config.smtp.listen.starttls, "tcp:587")
        self.assertEqual(config.smtp.listen.tls, "tcp:465")
        self.assertEqual(config.pop3.listen.starttls, "tcp:110")
        self.assertEqual(config.pop3.listen.tls, "tcp:995")
        self.assertEqual(config.imap.listen.starttls, "tcp:143")
        self.assertEqual(config.imap.listen.tls, "tcp:993")
        self.assertTrue(config.upstream.embedded)
        self.assertEqual(config.keys.kdf_iterations, MIN_KDF_ITERATIONS)
        self.assertFalse(config.tls.allow_plaintext_on_loopback)

    def test_relative_paths_are_relative_to_the_file(self) -> None:
        config = parse_config_text('[keys]\nstore = "../keys"\n[tls]\ncertificate = "tls/c.pem"\n', Path("/srv/gk/etc"))
        self.assertEqual(config.keys.store, Path("/srv/gk/etc/../keys"))
        self.assertEqual(config.tls.certificate, Path("/srv/gk/etc/tls/c.pem"))
        self.assertEqual(config.tls.key, Path("/srv/gk/etc/keys/tls/server.key"))

    def test_absolute_paths_stay(self) -> None:
        config = parse_config_text('[keys]\nstore = "/var/lib/gk"\n', Path("/srv/gk/etc"))
        self.assertEqual(config.keys.store, Path("/var/lib/gk"))

    def test_upstream_endpoints_are_parsed(self) -> None:
        config = parse_config_text(
            '[upstream]\nsmtp = "starttls:mail.example.org:587"\npop3 = "tls:mail.example.org:995"\n'
            'imap = "tls:[2001:db8::1]:993"\n',
            Path("/etc"),
        )
        self.assertFalse(config.upstream.embedded)
        self.assertEqual(config.upstream.smtp, UpstreamEndpoint("starttls", "mail.example.org", 587))
        self.assertEqual(config.upstream.imap, UpstreamEndpoint("tls", "2001:db8::1", 993))

    def test_domains_are_normalised(self) -> None:
        config = parse_config_text('[server]\ndomains = ["Example.ORG", "bücher.example"]\n', Path("/etc"))
        self.assertEqual(config.server.domains, ("example.org", "xn--bcher-kva.example"))

    def test_listener_can_be_disabled(self) -> None:
        config = parse_config_text('[pop3]\nstarttls = ""\n', Path("/etc"))
        self.assertEqual(config.pop3.listen.starttls, "")
        self.assertEqual(config.pop3.listen.tls, "tcp:995")

    def test_the_shipped_example_loads(self) -> None:
        config = load_config(REPO / "etc" / "gatekeeper.toml")
        self.assertEqual(config.server.domains, ("example.org",))
        self.assertEqual(config.keys.store.resolve(), (REPO / "keys").resolve())


class ErrorTests(SynchronousTestCase):
    """Each bad value gives one error naming the setting and saying what was expected."""

    def assertConfigError(self, text: str, expected: str) -> ConfigError:
        with self.assertRaises(ConfigError) as caught:
            parse_config_text(text, Path("/etc/gatekeeper"))
        self.assertEqual(str(caught.exception), expected)
        return caught.exception

    def test_upstream_endpoint_without_scheme(self) -> None:
        error = self.assertConfigError(
            '[upstream]\nimap = "imap.example.org"\n',
            "[upstream] imap: expected an endpoint like \"tls:mail.example.org:993\", got 'imap.example.org'",
        )
        self.assertEqual(error.path, "[upstream] imap")

    def test_upstream_bad_port(self) -> None:
        self.assertConfigError(
            '[upstream]\nsmtp = "tls:mail.example.org:99999"\npop3 = "tls:a.example:995"\nimap = "tls:a.example:993"\n',
            '[upstream] smtp: expected an endpoint like "starttls:mail.example.org:587", '
            "got 'tls:mail.example.org:99999'",
        )

    def test_upstream_plain_tcp_off_loopback(self) -> None:
        self.assertConfigError(
            '[upstream]\nsmtp = "tcp:mail.example.org:25"\n',
            "[upstream] smtp: plain tcp upstreams are only allowed on loopback; use tls: or starttls:, "
            "got 'tcp:mail.example.org:25'",
        )

    def test_upstream_partial(self) -> None:
        self.assertConfigError(
            '[upstream]\nsmtp = "tls:mail.example.org:465"\n',
            "[upstream] imap: set smtp, pop3 and imap together (or none, for the embedded store)",
        )

    def test_listener_with_ssl_endpoint(self) -> None:
        self.assertConfigError(
            '[imap]\ntls = "ssl:993:privateKey=k.pem"\n',
            '[imap] tls: expected a server endpoint like "tcp:587" or "tcp:587:interface=127.0.0.1", '
            "got 'ssl:993:privateKey=k.pem'",
        )

    def test_listener_bad_port(self) -> None:
        self.assertConfigError(
            '[smtp]\nstarttls = "tcp:70000"\n',
            "[smtp] starttls: expected a port number between 0 and 65535, got 'tcp:70000'",
        )

    def test_listener_bad_interface(self) -> None:
        self.assertConfigError(
            '[smtp]\nstarttls = "tcp:587:interface=localhost"\n',
            "[smtp] starttls: the interface must be an IP address, got 'tcp:587:interface=localhost'",
        )

    def test_kdf_iterations_below_minimum(self) -> None:
        self.assertConfigError(
            "[keys]\nkdf_iterations = 1000\n",
            "[keys] kdf_iterations: must be at least 600000, got 1000",
        )

    def test_wrong_type(self) -> None:
        self.assertConfigError(
            '[keys]\nkdf_iterations = "many"\n',
            "[keys] kdf_iterations: expected a whole number, got 'many'",
        )

    def test_boolean_is_not_a_number(self) -> None:
        self.assertConfigError(
            "[keys]\ncertificate_days = true\n",
            "[keys] certificate_days: expected a whole number, got True",
        )

    def test_bad_choice(self) -> None:
        self.assertConfigError(
            '[keys]\nkey_type = "dsa"\n',
            "[keys] key_type: expected one of rsa2048, rsa3072, rsa4096, p256, p384, got 'dsa'",
        )

    def test_unknown_setting_is_an_error(self) -> None:
        error = self.assertConfigError(
            '[smtp]\nstartls = "tcp:587"\n',
            "[smtp] startls: unknown setting (known: max_message_size, max_recipients, spool_directory, "
            "spool_threshold, starttls, tls)",
        )
        self.assertEqual(error.path, "[smtp] startls")

    def test_unknown_section_is_an_error(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config_text("[smpt]\n", Path("/etc"))
        self.assertTrue(str(caught.exception).startswith("[smpt]: unknown section (known: server, smtp,"))

    def test_section_that_is_not_a_table(self) -> None:
        self.assertConfigError('smtp = "tcp:25"\n', "[smtp]: expected a section (a [table])")

    def test_bad_domain(self) -> None:
        self.assertConfigError(
            '[server]\ndomains = ["not a domain"]\n',
            "[server] domains: not an e-mail address (bad domain): 'postmaster@not a domain'",
        )

    def test_bad_env_name(self) -> None:
        self.assertConfigError(
            '[keys]\nca_passphrase_env = "1-bad"\n',
            "[keys] ca_passphrase_env: expected an environment variable name, got '1-bad'",
        )

    def test_toml_syntax_error_names_the_line(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config_text("[smtp]\nstarttls = \n", Path("/etc"), Path("/etc/gk.toml"))
        self.assertIn("/etc/gk.toml: not valid TOML", str(caught.exception))
        self.assertIn("line 2", str(caught.exception))

    def test_missing_file(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_config(self.mktemp())
        self.assertIn("configuration file not found", str(caught.exception))


class TwistdErrorTests(SynchronousTestCase):
    """``twistd gatekeeper`` with a bad file prints one line naming the key; no traceback."""

    def test_twistd_reports_config_error_without_traceback(self) -> None:
        path = Path(self.mktemp()).absolute()
        path.write_text('[upstream]\nimap = "imap.example.org"\n')
        result = subprocess.run(
            [str(Path(sys.executable).parent / "twistd"), "-n", "gatekeeper", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertIn('[upstream] imap: expected an endpoint like "tls:mail.example.org:993"', output)
        self.assertNotIn("Traceback", output)

"""``gatekeeper check`` and ``gk.check()``: upstream, LDAP, DNS and CRLs, against real servers.

The upstream is the test mail stack (Postfix submission with STARTTLS and AUTH, Dovecot
POP3 with STLS and IMAPS), the directory a real slapd; the command runs as a real
process (it runs the global reactor of its own process). DNS is a Twisted Names server on the test
reactor, checked through the console's ``gk.check()``.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase

import tests.test_smimea as smimea_tests
from gatekeeper.admin.check import CheckReport, CheckRow, Step, _check_crl, check_account
from gatekeeper.admin.facade import Gatekeeper
from gatekeeper.config import parse_config_text
from gatekeeper.errors import ConfigError
from gatekeeper.testing.gateway import GatewayHarness
from gatekeeper.testing.pki import TestPKI
from tests.fixtures.mailstack import MailStack
from tests.fixtures.slapd import READER_DN, SUFFIX, Slapd

CHECK_PASSWORD = "alicepw"  # the mail stack's own test user


def run_cli(config: Path, *arguments: str) -> tuple[int, str, str]:
    """``gatekeeper --config CONFIG ARGUMENTS`` as a real process (it runs its own reactor)."""
    script = Path(sys.executable).parent / "gatekeeper"
    result = subprocess.run(
        [str(script), "--config", str(config), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return result.returncode, result.stdout, result.stderr


def rows(output: str) -> dict[str, dict[str, str]]:
    """The table's rows by check name, each a dict of column -> cell (cut at the header's columns)."""
    header, *body = output.splitlines()[:-1]
    names = header.split()
    starts = [header.index(name) for name in names]
    found = {}
    for line in body:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], len(line) + 1], strict=True)]
        found[cells[0]] = dict(zip(names, cells, strict=True))
    return found


class CheckAgainstTheStackTests(SynchronousTestCase):
    """The command against Dovecot, Postfix and slapd."""

    def setUp(self) -> None:
        self.stack = MailStack.for_class(self)
        self.slapd = Slapd()
        self.addCleanup(self.slapd.close)
        self.slapd.start()
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.password = self.dir / "check.password"
        self.password.write_text(CHECK_PASSWORD + "\n")
        self.reader = self.slapd.config().bind_password_file

    def config(
        self,
        *,
        ca_file: Path | None = None,
        reader: Path | None = None,
        ldap_starttls: bool = False,
        upstream_extra: str = "",
    ) -> Path:
        stack = self.stack
        ldap_url = self.slapd.ldap_url if ldap_starttls else self.slapd.ldaps_url
        extra = f"""
[upstream]
smtp = "starttls:127.0.0.1:{stack.submission_port}"
pop3 = "starttls:127.0.0.1:{stack.pop3_port}"
imap = "tls:127.0.0.1:{stack.imaps_port}"
ca_file = "{ca_file or stack.ca_file}"
timeout_seconds = 10
{upstream_extra}
[directory.ldap]
url = "{ldap_url}"
base_dn = "{SUFFIX}"
bind_dn = "{READER_DN}"
bind_password_file = "{reader or self.reader}"
ca_file = "{self.slapd.ca_file}"
[admin]
check_user = "alice@example.org"
check_password_file = "{self.password}"
"""
        return GatewayHarness(self.dir / "gateway", extra_config=extra).config_path

    def test_all_green(self) -> None:
        status, out, err = run_cli(self.config(), "check")
        self.assertEqual((status, err), (0, ""), out)
        table = rows(out)
        self.assertEqual(sorted(table), ["crl", "ldap", "upstream imap", "upstream pop3", "upstream smtp"])
        for name in ("upstream smtp", "upstream pop3", "upstream imap", "ldap"):
            row = table[name]
            self.assertEqual([row[c] for c in ("REACH", "TLS", "LOGIN", "RESULT")], ["ok"] * 4, out)
            self.assertTrue(row["RTT"].endswith(" ms"))
            self.assertGreater(float(row["RTT"].split()[0]), 0)
        self.assertIn("logged in as alice@example.org", table["upstream pop3"]["DETAIL"])
        self.assertIn("TLSv1.", table["upstream smtp"]["DETAIL"])
        self.assertIn(f"bound as {READER_DN}, base_dn found", table["ldap"]["DETAIL"])
        self.assertEqual(table["crl"]["RESULT"], "ok")
        self.assertEqual(out.splitlines()[-1], "OK: all 5 checks passed.")
        self.assertNotIn(CHECK_PASSWORD, out)

    def test_starttls_directory(self) -> None:
        status, out, _ = run_cli(self.config(ldap_starttls=True), "check")
        self.assertEqual(status, 0, out)
        self.assertEqual(rows(out)["ldap"]["LOGIN"], "ok")
        self.assertEqual(rows(out)["ldap"]["TARGET"], self.slapd.ldap_url)

    def test_smtp_logs_in_as_the_relay_account(self) -> None:
        relay_password = self.dir / "relay.password"
        relay_password.write_text("bobpw\n")
        extra = f'smtp_user = "bob@example.org"\nsmtp_password_file = "{relay_password}"'
        status, out, _ = run_cli(self.config(upstream_extra=extra), "check")
        self.assertEqual(status, 0, out)
        table = rows(out)
        self.assertIn("logged in as bob@example.org", table["upstream smtp"]["DETAIL"])
        self.assertIn("logged in as alice@example.org", table["upstream imap"]["DETAIL"])

    def test_directory_down_is_red_and_fails(self) -> None:
        config = self.config()
        self.slapd.stop()
        status, out, _ = run_cli(config, "check")
        self.assertEqual(status, 1, out)
        table = rows(out)
        self.assertEqual((table["ldap"]["REACH"], table["ldap"]["RESULT"]), ("FAIL", "FAIL"))
        self.assertIn("cannot connect", table["ldap"]["DETAIL"])
        for name in ("upstream smtp", "upstream pop3", "upstream imap", "crl"):
            self.assertEqual(table[name]["RESULT"], "ok", out)
        self.assertEqual(out.splitlines()[-1], "FAILED: 1 of 5 checks failed (ldap).")

    def test_wrong_passwords_fail_the_login_step(self) -> None:
        self.password.write_text("not the password\n")
        wrong_reader = self.dir / "wrong-reader"
        wrong_reader.write_text("not the reader password\n")
        status, out, _ = run_cli(self.config(reader=wrong_reader), "check")
        self.assertEqual(status, 1)
        table = rows(out)
        for name in ("upstream smtp", "upstream pop3", "upstream imap", "ldap"):
            self.assertEqual(
                [table[name][c] for c in ("REACH", "TLS", "LOGIN", "RESULT")], ["ok", "ok", "FAIL", "FAIL"]
            )
        self.assertIn("login as alice@example.org refused", table["upstream imap"]["DETAIL"])
        self.assertIn("invalidCredentials", table["ldap"]["DETAIL"])
        self.assertNotIn("not the password", out)

    def test_an_untrusted_server_certificate_fails_tls(self) -> None:
        other = self.dir / "other-ca.pem"
        other.write_bytes(TestPKI("Unrelated CA", key_index=5).cert_pem())
        status, out, _ = run_cli(self.config(ca_file=other), "check")
        self.assertEqual(status, 1)
        table = rows(out)
        for name in ("upstream smtp", "upstream pop3", "upstream imap"):
            self.assertEqual([table[name][c] for c in ("REACH", "TLS", "LOGIN")], ["ok", "FAIL", "-"], out)
            self.assertIn("not trusted", table[name]["DETAIL"])
        self.assertEqual(table["ldap"]["RESULT"], "ok")


class ReportTests(SynchronousTestCase):
    def test_table_and_verdict(self) -> None:
        report = CheckReport(
            (
                CheckRow(
                    "upstream smtp", "starttls:mail:587", Step.OK, Step.OK, Step.SKIPPED, 0.0012, "no test account"
                ),
                CheckRow("ldap", "ldaps://ldap", Step.FAIL, detail="cannot connect"),
            )
        )
        self.assertFalse(report.ok)
        self.assertEqual([row.name for row in report.failed], ["ldap"])
        lines = report.table()
        self.assertEqual(lines[0].split(), ["CHECK", "TARGET", "REACH", "TLS", "LOGIN", "RTT", "RESULT", "DETAIL"])
        self.assertEqual(lines[1].split()[2:9], ["starttls:mail:587", "ok", "ok", "skip", "1.2", "ms", "ok"])
        self.assertEqual(lines[2].split()[:7], ["ldap", "ldaps://ldap", "FAIL", "-", "-", "-", "FAIL"])
        self.assertEqual(lines[-1], "FAILED: 1 of 2 checks failed (ldap).")
        self.assertEqual(repr(report), "\n".join(lines))
        self.assertTrue(CheckReport((report.rows[0],)).ok)

    def test_check_account(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        (base / "pw").write_text("secret words\n")
        config = parse_config_text(
            '[admin]\ncheck_user = "probe@example.org"\ncheck_password_file = "pw"\n', base, base / "g.toml"
        )
        self.assertEqual(check_account(config, "imap"), ("probe@example.org", "secret words"))
        config = parse_config_text(
            '[admin]\ncheck_user = "probe@example.org"\ncheck_password_env = "GK_CHECK_TEST_PW"\n', base
        )
        with self.assertRaises(ConfigError) as caught:
            check_account(config, "pop3")
        self.assertEqual(caught.exception.path, "[admin] check_password_env")
        self.assertIsNone(check_account(parse_config_text("", base), "smtp"))

    def test_config_rules(self) -> None:
        for text, setting in (
            ('check_password = "x"', "[admin] check_password"),
            ('check_user = "a@b.org"', "[admin] check_user"),
            ('check_password_file = "x"', "[admin] check_user"),
            (
                'check_user = "a@b.org"\ncheck_password_file = "x"\ncheck_password_env = "Y"',
                "[admin] check_password_env",
            ),
        ):
            with self.assertRaises(ConfigError) as caught:
                parse_config_text(f"[admin]\n{text}\n", Path("/etc"))
            self.assertEqual(caught.exception.path, setting)


class CrlTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.ca = TestPKI("CRL Test CA", key_index=7)

    def write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    async def test_a_good_crl(self) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding

        path = self.write("good.crl", self.ca.crl().public_bytes(Encoding.DER))
        row = await _check_crl(path, (self.ca.certificate,))
        self.assertTrue(row.ok, row)
        self.assertIn("next update", row.detail)

    async def test_a_stale_crl_fails(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.serialization import Encoding

        now = datetime.datetime.now(datetime.UTC)
        stale = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca.certificate.subject)
            .last_update(now - datetime.timedelta(days=40))
            .next_update(now - datetime.timedelta(days=10))
            .sign(self.ca.key, hashes.SHA256())  # type: ignore[arg-type]
        )
        path = self.write("stale.crl", stale.public_bytes(Encoding.PEM))
        row = await _check_crl(path, (self.ca.certificate,))
        self.assertFalse(row.ok)
        self.assertIn("stale: its next update was due", row.detail)

    async def test_a_crl_with_a_bad_signature_fails(self) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding

        impostor = TestPKI("CRL Test CA", key_index=8)  # the same name, another key
        path = self.write("forged.crl", impostor.crl().public_bytes(Encoding.PEM))
        row = await _check_crl(path, (self.ca.certificate,))
        self.assertFalse(row.ok)
        self.assertIn("signature does not verify", row.detail)

    async def test_missing_and_garbage(self) -> None:
        row = await _check_crl(self.dir / "absent.crl", ())
        self.assertEqual(row.reach, Step.FAIL)
        row = await _check_crl(self.write("junk.crl", b"not a crl"), ())
        self.assertFalse(row.ok)
        self.assertEqual((row.reach, row.tls, row.login), (Step.OK, Step.NONE, Step.NONE))
        self.assertIn("FAIL", repr(CheckReport((row,))).splitlines()[1])


class ConsoleCheckTests(TestCase):
    """``gk.check()`` on the gateway's reactor: the DNS resolver and the built-in CA's CRL."""

    timeout = 60

    def setUp(self) -> None:
        self.zone = smimea_tests.ZoneResolver()
        factory = smimea_tests.ValidatingResolverFactory(self.zone)
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        self.dns_port = udp.getHost().port

    def gateway(self, resolver_port: int) -> Gatekeeper:
        harness = GatewayHarness(
            Path(self.mktemp()).absolute(),
            extra_config=f'[directory.dns]\nresolver = "127.0.0.1:{resolver_port}"\n',
        )
        service = harness.start(reactor)
        self.addCleanup(harness.stop)
        return Gatekeeper(service.parts)  # type: ignore[attr-defined]

    async def test_resolver_and_crl(self) -> None:
        gk = self.gateway(self.dns_port)
        report = await gk.check(timeout=5)
        self.assertTrue(report.ok, repr(report))
        self.assertEqual([row.name for row in report.rows], ["dns", "crl"])
        dns_row, crl_row = report.rows
        self.assertEqual(dns_row.target, f"127.0.0.1:{self.dns_port}")
        self.assertIn("NXDOMAIN, AD set", dns_row.detail)
        self.assertIsNotNone(dns_row.rtt)
        self.assertIn("issuer CN=Gatekeeper CA gatekeeper.test", crl_row.detail)
        next_update = crl_row.detail.rpartition("next update ")[2]
        self.assertGreater(datetime.date.fromisoformat(next_update), datetime.date.today())

    async def test_resolver_down(self) -> None:
        closed = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        port = closed.getHost().port
        await closed.stopListening()
        gk = self.gateway(port)
        report = await gk.check(timeout=2)
        self.assertFalse(report.ok)
        self.assertEqual([row.name for row in report.failed], ["dns"])
        self.assertIn("cannot reach the resolver", report.failed[0].detail)

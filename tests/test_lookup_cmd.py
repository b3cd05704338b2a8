"""Tests for ``gatekeeper lookup ADDRESS``: the words, and the command against a real slapd."""

from __future__ import annotations

import datetime
import io
import sys
from pathlib import Path

import attrs
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.admin import cli
from gatekeeper.admin.lookup_cmd import EX_TEMPFAIL, describe
from gatekeeper.keys.directory import LookupResult, RefusedCandidate, SourceOutcome, SourceState
from gatekeeper.keys.keyring import KeyRing
from gatekeeper.testing.pki import TestPKI
from tests.fixtures.process import free_ports
from tests.fixtures.slapd import READER_DN, Slapd

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
CA = TestPKI("Lookup CLI CA", key_index=61)
BOB = CA.user("bob@example.org", key_index=62)
BOB_EXPIRED = CA.user("bob@example.org", not_before=NOW - datetime.timedelta(days=90), days=30, key_index=63)


class DescribeTests(SynchronousTestCase):
    def test_every_state_in_words(self) -> None:
        result = LookupResult(
            address="bob@example.org",
            certificates=(BOB.certificate,),
            chain=(),
            source="ldap",
            outcomes=(
                SourceOutcome("keyring", SourceState.REFUSED, 1, 0),
                SourceOutcome("dns", SourceState.UNAVAILABLE, detail="dns: no answer from the resolver 127.0.0.1:53"),
                SourceOutcome("ldap", SourceState.FOUND, 2, 1, "1 entry", 0.012),
                SourceOutcome("external:p", SourceState.SKIPPED_DOMAIN, detail="only for partner.example"),
                SourceOutcome("x", SourceState.NOT_ASKED),
            ),
            refused=(RefusedCandidate("keyring", BOB_EXPIRED.certificate, "expired", ("expired on ...",)),),
            incomplete=True,
        )
        lines = describe(result)
        self.assertEqual(lines[0], "Looking up a certificate for bob@example.org:")
        self.assertEqual(lines[1], "  keyring: found 1 certificate(s), none usable")
        self.assertTrue(
            lines[2].startswith("      refused CN=bob (issuer CN=Lookup CLI CA,O=Gatekeeper Tests, expired ")
        )
        self.assertTrue(lines[2].endswith(": expired: expired on ..."))
        self.assertEqual(lines[3], "  dns: unavailable: dns: no answer from the resolver 127.0.0.1:53")
        self.assertEqual(lines[4], "  ldap: found 2 certificate(s), 1 usable in 12 ms (1 entry)")
        fast = describe(
            attrs.evolve(result, outcomes=(SourceOutcome("keyring", SourceState.NOT_FOUND, seconds=0.0004),))
        )
        self.assertEqual(fast[1], "  keyring: nothing found in 0.4 ms")
        self.assertEqual(lines[5], "  external:p: not asked, only for partner.example")
        self.assertEqual(lines[6], "  x: not asked (an earlier source answered)")
        self.assertTrue(lines[7].startswith("Decision: encrypt to CN=bob (issuer CN=Lookup CLI CA"))
        self.assertIn("found in ldap.", lines[7])
        self.assertIn("could not be asked", lines[8])

    def test_no_certificate(self) -> None:
        result = LookupResult(
            "a@example.org", (), (), None, (SourceOutcome("keyring", SourceState.NOT_FOUND),), (), False
        )
        self.assertEqual(
            describe(result)[-1], "Decision: no usable certificate; mail to this address cannot be encrypted."
        )
        incomplete = LookupResult("a@example.org", (), (), None, (), (), True)
        self.assertIn("may be incomplete", describe(incomplete)[-1])


class LookupCommandTests(SynchronousTestCase):
    """``gatekeeper lookup`` end to end: config file, key ring on disk, slapd, real trust validation."""

    def setUp(self) -> None:
        self.slapd = Slapd()
        self.addCleanup(self.slapd.close)
        self.slapd.start()
        self.slapd.add_person("bob", "bob@example.org", certificates=[BOB.certificate])
        base = self.slapd.dir / "gk"
        base.mkdir()
        (base / "ca.pem").write_bytes(CA.cert_pem())
        KeyRing(base / "keys" / "keyring").import_certificates(BOB_EXPIRED.cert_pem())
        (closed_port,) = free_ports(1)
        self.config = base / "gatekeeper.toml"
        self.config.write_text(
            f"""
[keys]
store = "keys"

[trust]
anchors = ["ca.pem"]

[directory]
timeout_seconds = 2
order = ["keyring", "external", "ldap"]

[directory.ldap]
url = "{self.slapd.ldap_url}"
base_dn = "dc=example,dc=org"
bind_dn = "{READER_DN}"
bind_password_file = "{self.slapd.dir / "reader.password"}"
ca_file = "{self.slapd.ca_file}"

[[directory.external]]
name = "partner"
url = "ldaps://127.0.0.1:{closed_port}"
base_dn = "dc=partner,dc=example"
domains = ["partner.example"]
"""
        )
        self.slapd.config()  # writes reader.password

    def run_cli(self, *argv: str) -> tuple[int, list[str]]:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        status = cli.main(["--config", str(self.config), *argv])
        return status, out.getvalue().splitlines()

    def test_found_in_ldap_after_the_key_ring_refused_an_expired_one(self) -> None:
        status, lines = self.run_cli("lookup", "Bob@Example.org")
        self.assertEqual(status, 0, lines)
        self.assertEqual(lines[0], "Looking up a certificate for Bob@example.org:")
        self.assertTrue(lines[1].startswith("  keyring: found 1 certificate(s), none usable"), lines[1])
        self.assertIn("refused CN=bob", lines[2])
        self.assertIn(": expired: ", lines[2])
        self.assertTrue(lines[3].startswith("  external:partner (ldaps://127.0.0.1:"), lines[3])
        self.assertTrue(lines[3].endswith("not asked, only for partner.example"))
        self.assertTrue(lines[4].startswith(f"  ldap ({self.slapd.ldap_url}): found 1 certificate(s), 1 usable"))
        self.assertIn("Decision: encrypt to CN=bob", lines[5])
        self.assertIn("found in ldap.", lines[5])
        self.assertEqual(len(lines), 6)

    def test_not_found_and_partner_unavailable(self) -> None:
        status, lines = self.run_cli("lookup", "nobody@example.org")
        self.assertEqual(status, 1)
        self.assertEqual(lines[-1], "Decision: no usable certificate; mail to this address cannot be encrypted.")
        status, lines = self.run_cli("lookup", "carol@partner.example")
        self.assertEqual(status, EX_TEMPFAIL)
        self.assertIn("unavailable", lines[2])
        self.assertIn("cannot connect", lines[2])
        self.assertIn("may be incomplete", lines[-1])

    def test_directory_down(self) -> None:
        self.slapd.stop()
        status, lines = self.run_cli("lookup", "bob@example.org")
        self.assertEqual(status, EX_TEMPFAIL)
        self.assertIn("ldap (", lines[-2])
        self.assertIn("unavailable", lines[-2])

    def test_bad_address_is_a_one_line_error(self) -> None:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        status, lines = self.run_cli("lookup", "not-an-address")
        self.assertEqual((status, lines), (1, []))
        self.assertTrue(err.getvalue().startswith("gatekeeper: not an e-mail address"))

    def test_lookup_writes_nothing(self) -> None:
        before = sorted(str(p) for p in Path(self.config.parent).rglob("*"))
        self.run_cli("lookup", "bob@example.org")
        self.assertEqual(sorted(str(p) for p in Path(self.config.parent).rglob("*")), before)

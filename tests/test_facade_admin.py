"""What the facade gained for the web page: paging, password reset, export, the key ring, the audit log reader.

Over a gateway's real parts (key store, CA, key ring), jobs run inline; and ``gatekeeper
admin`` (the web page's administrators) through the command line's entry point.
"""

from __future__ import annotations

import functools
import io
import json
import sys
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives.serialization import Encoding, pkcs12
from hypothesis import given
from hypothesis import strategies as st
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gatekeeper.admin import cli
from gatekeeper.admin.facade import Gatekeeper, _reverse_lines, audit_job
from gatekeeper.admin.web.admins import AdminAccounts, admins_path, check_login
from gatekeeper.audit import AuditLog, audit_log_path
from gatekeeper.errors import BadPassword, UnknownUser
from gatekeeper.keys.accounts import unlock
from gatekeeper.keys.keyring import CertificateFormatError
from gatekeeper.tap import Parts, build_parts, prepare
from gatekeeper.testing.gateway import GatewayHarness
from gatekeeper.testing.pki import TestPKI
from gatekeeper.workers import InlineWorkerPool

ALICE = "alice@example.org"
ALICE_PASSWORD = "facade admin alice password"


@functools.cache
def shared_harness() -> GatewayHarness:
    harness = GatewayHarness(Path("facade-admin-gateway").absolute())
    harness.add_user(ALICE, ALICE_PASSWORD)
    alice = harness.store.get_user(ALICE)
    assert alice is not None
    for number in range(30):
        harness.store.put_user(attrs.evolve(alice, address=f"page{number:03d}@example.org"))
    return harness


class FacadeAdditionsTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.harness = shared_harness()
        self.parts: Parts = build_parts(prepare(self.harness.config), reactor, MultiService())
        self.parts.message_workers = InlineWorkerPool()  # type: ignore[assignment]
        self.gk = Gatekeeper(self.parts, actor="tester", via="test")
        self.addCleanup(self.parts.unlock_cache.drop)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def audited(self) -> list[tuple[str, str]]:
        return [(e["operation"], e["target"]) for e in self.events if e.get("gk_event") == "admin"]

    async def test_users_page(self) -> None:
        page = await self.gk.users_page("PAGE01", offset=5, limit=3)
        self.assertEqual(page.total, 10)
        self.assertEqual(
            [u.address for u in page.users], ["page015@example.org", "page016@example.org", "page017@example.org"]
        )
        everyone = await self.gk.users_page(limit=1000)
        self.assertEqual(everyone.total, len(self.harness.store.list_users()))
        beyond = await self.gk.users_page("page", offset=10_000, limit=50)
        self.assertEqual((beyond.offset, len(beyond.users)), (29, 1))  # the last page that exists
        await self.gk.add_user("page999@example.org", "a password")
        self.assertEqual((await self.gk.users_page("page999")).total, 1)  # the cached index saw the new user
        self.assertEqual((await self.gk.users_page("nothing matches this")).users, ())

    async def test_password_change_keeps_the_keys(self) -> None:
        address = "change@example.org"
        before = await self.gk.add_user(address, "first password")
        with self.assertRaises(BadPassword):
            await self.gk.reset_password(address, "second password", "wrong password")
        reset = await self.gk.reset_password(address, "second password", "first password")
        self.assertFalse(reset.reissued)
        self.assertEqual(reset.user.key_id, before.key_id)
        stored = self.harness.store.get_user(address)
        assert stored is not None
        unlock(stored, "second password")
        with self.assertRaises(BadPassword):
            unlock(stored, "first password")
        self.assertEqual(self.audited()[-1], ("passwd", address))

    async def test_reset_without_the_old_password_reissues(self) -> None:
        address = "forgot@example.org"
        await self.gk.add_user(address, "forgotten password")
        old = self.harness.store.get_user(address)
        assert old is not None
        self.parts.unlock_cache.put(address, "forgotten password", object())  # type: ignore[arg-type]
        reset = await self.gk.reset_password(address, "brand new password")
        self.assertTrue(reset.reissued)
        self.assertNotEqual(reset.user.key_id, old.current.key_id)
        self.assertEqual(reset.user.keys, 1)
        stored = self.harness.store.get_user(address)
        assert stored is not None
        unlock(stored, "brand new password")
        self.assertIn(old.current.certificate.serial_number, self.harness.accounts.ca.revoked_serials())
        self.assertIsNone(self.parts.unlock_cache.get(address, "forgotten password"))
        self.assertEqual(self.audited()[-1], ("reset_password", address))
        with self.assertRaises(UnknownUser):
            await self.gk.reset_password("nobody@example.org", "whatever password")

    async def test_export_and_certificate(self) -> None:
        data = await self.gk.export_pkcs12(ALICE, ALICE_PASSWORD, "export password")
        key, certificate, _ = pkcs12.load_key_and_certificates(data, b"export password")
        assert key is not None and certificate is not None
        address, pem = await self.gk.certificate("ALICE@example.org")
        self.assertEqual(address, ALICE)
        self.assertEqual(pem.decode().count("BEGIN CERTIFICATE"), 1)
        self.assertEqual(certificate.public_bytes(Encoding.PEM), pem)
        self.assertEqual(self.audited()[-1], ("export", ALICE))
        with self.assertRaises(BadPassword):
            await self.gk.export_pkcs12(ALICE, "not it", "export password")

    async def test_key_ring(self) -> None:
        partner = TestPKI("Facade Partner CA", key_index=6)
        address = "erin@partner.example"
        before = await self.parts.key_manager.lookup(address)
        self.assertFalse(before.found)
        imported = await self.gk.import_certificates(partner.user(address).cert_pem())
        self.assertEqual([info.addresses for info in imported], [(address,)])
        self.assertEqual(imported[0].origin, "imported")
        listed = await self.gk.certificates()
        self.assertIn(imported[0].fingerprint, [info.fingerprint for info in listed])
        after = await self.parts.key_manager.lookup(address)
        self.assertNotEqual(after.outcomes, before.outcomes)  # not the cached "nothing" from before
        self.assertIn(("import_cert", imported[0].fingerprint), self.audited())
        with self.assertRaises(CertificateFormatError):
            await self.gk.import_certificates(b"not a certificate")
        removed = await self.gk.remove_certificate(imported[0].fingerprint.upper())
        assert removed is not None
        self.assertEqual(removed.fingerprint, imported[0].fingerprint)
        self.assertIsNone(await self.gk.remove_certificate(imported[0].fingerprint))
        self.assertEqual(self.audited()[-1], ("remove_cert", imported[0].fingerprint))


class AuditReaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        log = AuditLog(self.path)
        for number in range(25):
            event = "key_use" if number % 5 == 0 else "admin"
            log.append(
                {
                    "event": event,
                    "operation": "sign" if event == "key_use" else "add_user",
                    "target": f"user{number}@example.org",
                    "actor": "root",
                    "via": "web",
                }
            )
        log.close()

    def test_newest_first_filters_and_paging(self) -> None:
        page = audit_job(self.path, "", "", "", 0, 10)
        self.assertEqual([r.fields["seq"] for r in page.records], list(range(25, 15, -1)))
        self.assertTrue(page.more)
        last = audit_job(self.path, "", "", "", 20, 10)
        self.assertEqual([r.fields["seq"] for r in last.records], [5, 4, 3, 2, 1])
        self.assertFalse(last.more)
        signs = audit_job(self.path, "", "key_use", "", 0, 100)
        self.assertEqual(
            [r.fields["target"] for r in signs.records], [f"user{n}@example.org" for n in (20, 15, 10, 5, 0)]
        )
        text = audit_job(self.path, "USER1", "", "add_user", 0, 100)
        self.assertEqual(
            {r.fields["target"] for r in text.records},
            {f"user{n}@example.org" for n in (1, 11, 12, 13, 14, 16, 17, 18, 19)},
        )
        truncated = audit_job(self.path, "", "", "", 0, 100, scan_limit=7)
        self.assertEqual((len(truncated.records), truncated.scanned, truncated.truncated), (7, 7, True))

    def test_damaged_and_unfinished_lines(self) -> None:
        with self.path.open("ab") as handle:
            handle.write(b"garbage that is not json\n")
            handle.write(b'{"seq": 99, "event": "adm')  # being written
        page = audit_job(self.path, "", "", "", 0, 2)
        self.assertEqual(page.records[0].fields["event"], "(unreadable)")
        self.assertEqual(page.records[1].fields["seq"], 25)
        self.assertEqual(audit_job(Path(self.mktemp()), "", "", "", 0, 10).records, ())

    @given(
        st.lists(st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\n", b"")).filter(bool), max_size=30),
        st.integers(min_value=1, max_value=50),
        st.booleans(),
    )
    def test_reverse_lines(self, lines: list[bytes], block: int, unfinished: bool) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"".join(line + b"\n" for line in lines) + (b"partial" if unfinished else b""))
        self.assertEqual(list(_reverse_lines(path, block)), lines[::-1])


class AdminCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.harness = GatewayHarness(Path(self.mktemp()).absolute())
        self.config = str(self.harness.config_path)
        self.password = Path(self.mktemp())
        self.password.write_text("cli admin password\n")

    def run_cli(self, *arguments: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        status = cli.main(["--config", self.config, "admin", *arguments])
        return status, out.getvalue(), err.getvalue()

    def test_add_list_replace_remove(self) -> None:
        status, out, _ = self.run_cli("add", "ops", "--password-file", str(self.password))
        self.assertEqual(status, 0)
        path = admins_path(self.harness.config)
        self.assertIn(f"added administrator ops ({path})", out)
        self.assertTrue(check_login(path, "ops", "cli admin password"))
        self.assertNotIn("cli admin password", path.read_text())
        status, _, err = self.run_cli("add", "ops", "--password-file", str(self.password))
        self.assertEqual(status, 2)
        self.assertIn("already exists", err)
        self.password.write_text("a replaced password\n")
        self.assertEqual(self.run_cli("add", "ops", "--replace", "--password-file", str(self.password))[0], 0)
        self.assertTrue(check_login(path, "ops", "a replaced password"))
        self.assertIn("ops  added", self.run_cli("list")[1])
        self.password.write_text("short\n")
        status, _, err = self.run_cli("add", "other", "--password-file", str(self.password))
        self.assertEqual(status, 1)
        self.assertIn("at least 10 characters", err)
        self.assertEqual(self.run_cli("add", "bad name", "--password-file", str(self.password))[0], 1)
        self.assertEqual(self.run_cli("remove", "ops")[0], 0)
        self.assertEqual(self.run_cli("remove", "ops")[0], 1)
        self.assertEqual(AdminAccounts(path).records(), {})
        records = [json.loads(line) for line in audit_log_path(self.harness.config).read_text().splitlines()]
        self.assertEqual(
            [(r["operation"], r["target"], r["via"]) for r in records],
            [("add_admin", "ops", "cli"), ("add_admin", "ops", "cli"), ("remove_admin", "ops", "cli")],
        )

"""The audit log: records of key use and admin changes, hash-chained; ``gatekeeper audit verify``."""

from __future__ import annotations

import functools
import hashlib
import imaplib
import io
import json
import sys
import threading
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gatekeeper.admin import cli
from gatekeeper.admin.facade import Gatekeeper
from gatekeeper.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    AuditObserver,
    AuditService,
    audit_log_path,
    cli_actor,
    record_from_event,
    verify,
)
from gatekeeper.events import emit
from gatekeeper.testing.gateway import GatewayHarness
from gatekeeper.testing.pki import TestPKI
from tests.test_cli import CliTestCase

AUDIT_PASSWORD = "audit test password"
NEW_PASSWORD = "audit test new password"


def write_records(path: Path, count: int) -> list[dict[str, Any]]:
    log = AuditLog(path)
    try:
        return [
            log.append(
                {"time": "2025-01-01T00:00:00.000Z", "event": "key_use", "operation": "unlock", "user": f"u{i}@x.org"}
            )
            for i in range(count)
        ]
    finally:
        log.close()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


class ChainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.records = write_records(self.path, 5)

    def test_an_intact_chain_verifies(self) -> None:
        result = verify(self.path)
        self.assertTrue(result.ok, result.problems)
        self.assertEqual(result.records, 5)
        self.assertEqual(result.head, self.records[-1]["hash"])
        self.assertEqual([r["seq"] for r in self.records], [1, 2, 3, 4, 5])
        self.assertEqual(self.records[0]["prev"], GENESIS)
        self.assertEqual([r["prev"] for r in self.records[1:]], [r["hash"] for r in self.records[:-1]])
        self.assertEqual(self.path.stat().st_mode & 0o777, 0o600)
        # Each line is the record's canonical JSON (sorted keys, no spaces), its hash added last.
        first = lines(self.path)[0].strip()
        record = json.loads(first)
        digest = record.pop("hash")
        canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
        self.assertEqual(first, canonical[:-1] + f',"hash":"{digest}"}}')
        self.assertEqual(digest, hashlib.sha256(canonical.encode()).hexdigest())

    def test_a_removed_line_is_named(self) -> None:
        content = lines(self.path)
        self.path.write_text("".join(content[:2] + content[3:]))
        result = verify(self.path)
        self.assertFalse(result.ok)
        self.assertEqual(
            [str(p) for p in result.problems], ["line 3: 1 record(s) removed after line 2 (seq 3 expected)"]
        )

    def test_removing_the_first_line_is_named(self) -> None:
        self.path.write_text("".join(lines(self.path)[1:]))
        (problem,) = verify(self.path).problems
        self.assertEqual(str(problem), "line 1: 1 record(s) removed at the start of the log (seq 1 expected)")

    def test_an_edited_line_is_named(self) -> None:
        content = lines(self.path)
        content[3] = content[3].replace("u3@x", "someone@x.org")
        self.path.write_text("".join(content))
        (problem,) = verify(self.path).problems
        self.assertEqual(str(problem), "line 4: edited: its content does not match its hash")

    def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(self) -> None:
        content = lines(self.path)
        forged = json.loads(content[1])
        forged["user"] = "someone@x.org"
        del forged["hash"]
        canonical = json.dumps(forged, sort_keys=True, separators=(",", ":"))
        forged["hash"] = hashlib.sha256(canonical.encode()).hexdigest()
        content[1] = json.dumps(forged, sort_keys=True, separators=(",", ":")) + "\n"
        self.path.write_text("".join(content))
        (problem,) = verify(self.path).problems
        self.assertEqual(str(problem), "line 3: does not follow line 2: that line was edited or replaced")

    def test_an_inserted_copy_is_named(self) -> None:
        content = lines(self.path)
        self.path.write_text("".join([*content[:3], content[1], *content[3:]]))
        problems = [str(p) for p in verify(self.path).problems]
        self.assertEqual(problems[0], "line 4: out of sequence (seq 2, 4 expected): inserted")

    def test_a_damaged_line_is_named(self) -> None:
        content = lines(self.path)
        content[2] = content[2][:40] + "\n"
        self.path.write_text("".join(content))
        problems = [str(p) for p in verify(self.path).problems]
        self.assertEqual(problems[0], "line 3: not an audit record (damaged or edited)")

    def test_appending_after_a_check_continues_the_chain(self) -> None:
        more = write_records(self.path, 2)
        self.assertEqual(more[0]["seq"], 6)
        self.assertEqual(more[0]["prev"], self.records[-1]["hash"])
        self.assertTrue(verify(self.path).ok)

    def test_writers_on_separate_file_handles_interleave_safely(self) -> None:
        path = Path(self.mktemp())

        def writer(name: str) -> None:
            log = AuditLog(path)  # its own open file, like the gateway and a CLI process
            for i in range(150):
                log.append({"time": "t", "event": "admin", "operation": "flush", "target": f"{name}{i}"})
            log.close()

        threads = [threading.Thread(target=writer, args=(name,)) for name in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        result = verify(path)
        self.assertTrue(result.ok, result.problems[:3])
        self.assertEqual(result.records, 300)

    def test_a_moved_log_is_reopened_and_a_new_chain_begins(self) -> None:
        log = AuditLog(self.path)
        self.addCleanup(log.close)
        log.append({"time": "t", "event": "admin", "operation": "kick"})
        self.path.rename(self.path.with_suffix(".1"))
        record = log.append({"time": "t", "event": "admin", "operation": "flush"})
        self.assertEqual((record["seq"], record["prev"]), (1, GENESIS))
        self.assertTrue(verify(self.path).ok)
        self.assertTrue(verify(self.path.with_suffix(".1")).ok)

    def test_another_writer_in_between_is_noticed(self) -> None:
        ours, theirs = AuditLog(self.path), AuditLog(self.path)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.append({"time": "t", "event": "admin", "operation": "kick"})
        theirs.append({"time": "t", "event": "admin", "operation": "flush"})
        last = ours.append({"time": "t", "event": "admin", "operation": "kick"})
        self.assertEqual(last["seq"], 8)
        self.assertTrue(verify(self.path).ok)

    def test_an_unreadable_log(self) -> None:
        with self.assertRaises(AuditError):
            verify(Path(self.mktemp()))


class ObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.publisher = LogPublisher()
        self.log = Logger(observer=self.publisher)

    def test_records_hold_only_the_listed_fields(self) -> None:
        event = {
            "log_time": 1735689600.25,
            "gk_event": "key_use",
            "operation": "decrypt",
            "user": "alice@example.org",
            "session": 7,
            "message_id": "<m1@example.org>",
            "peer": "192.0.2.1",
            "password": "never in the audit log",
            "body": b"never either",
        }
        record = record_from_event(event)
        self.assertEqual(
            record,
            {
                "time": "2025-01-01T00:00:00.250Z",
                "event": "key_use",
                "operation": "decrypt",
                "user": "alice@example.org",
                "session": 7,
                "message_id": "<m1@example.org>",
                "peer": "192.0.2.1",
            },
        )

    def test_only_audited_events_are_written(self) -> None:
        observer = AuditObserver(AuditLog(self.path))
        self.publisher.addObserver(observer)
        emit(self.log, "login", "login ok", outcome="ok", user="a@x.org", protocol="smtp", client="c")
        emit(self.log, "key_use", "unlocked", operation="unlock", user="a@x.org", session=None, peer="c")
        emit(self.log, "admin", "flush", operation="flush", target="*", actor="me", via="python")
        self.log.info("an ordinary line")
        written = [json.loads(line) for line in lines(self.path)]
        self.assertEqual([(r["event"], r["operation"]) for r in written], [("key_use", "unlock"), ("admin", "flush")])
        self.assertEqual(observer.written, 2)

    def test_the_service_observes_only_while_running(self) -> None:
        service = AuditService(self.path, publisher=self.publisher)
        emit(self.log, "admin", "before", operation="flush", target="*", actor="me", via="python")
        service.privilegedStartService()
        service.startService()
        emit(self.log, "admin", "during", operation="kick", target="x", actor="me", via="python")
        service.stopService()
        emit(self.log, "admin", "after", operation="flush", target="*", actor="me", via="python")
        self.assertEqual([json.loads(line)["operation"] for line in lines(self.path)], ["kick"])

    def test_a_failed_write_is_reported_not_raised(self) -> None:
        service = AuditService(self.path / "no" / "such" / "dir.log", publisher=self.publisher)
        service.startService()
        self.addCleanup(service.stopService)
        emit(self.log, "admin", "x", operation="flush", target="*", actor="me", via="python")
        self.assertEqual(service.failures, 1)
        self.flushLoggedErrors()


class CliAuditTests(CliTestCase):
    def audit_log(self) -> Path:
        return self.store_root / "audit.log"

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in lines(self.audit_log())]

    def test_cli_changes_are_audited_and_verified(self) -> None:
        first = self.password_file(AUDIT_PASSWORD)
        second = self.password_file(NEW_PASSWORD, "new")
        self.assertEqual(self.run_cli("user", "add", "alice@example.org", "--password-file", first)[0], 0)
        self.assertEqual(
            self.run_cli(
                "user", "passwd", "alice@example.org", "--old-password-file", first, "--new-password-file", second
            )[0],
            0,
        )
        self.assertEqual(self.run_cli("user", "rotate", "alice@example.org")[0], 0)
        certificate = self.dir / "partner.pem"
        certificate.write_bytes(TestPKI("Partner CA").user("bob@partner.example").cert_pem())
        self.assertEqual(self.run_cli("cert", "import", str(certificate))[0], 0)
        self.assertEqual(self.run_cli("user", "delete", "alice@example.org", "--yes")[0], 0)
        self.assertEqual(self.run_cli("user", "list")[0], 0)  # reading changes nothing: not audited
        records = self.records()
        self.assertEqual(
            [(r["operation"], r["target"]) for r in records][:3],
            [("add_user", "alice@example.org"), ("passwd", "alice@example.org"), ("rotate", "alice@example.org")],
        )
        self.assertEqual([r["operation"] for r in records][3:], ["import_cert", "delete_user"])
        self.assertEqual({(r["via"], r["actor"]) for r in records}, {("cli", cli_actor())})
        text = self.audit_log().read_text()
        self.assertNotIn(AUDIT_PASSWORD, text)
        self.assertNotIn(NEW_PASSWORD, text)

        status, out, _ = self.run_cli("audit", "verify")
        self.assertEqual(status, 0)
        self.assertIn("OK: 5 record(s)", out)
        self.assertIn(records[-1]["hash"], out)

        content = lines(self.audit_log())
        self.audit_log().write_text("".join(content[:1] + content[2:]))
        status, out, _ = self.run_cli("audit", "verify")
        self.assertEqual(status, 1)
        self.assertIn("line 2: 1 record(s) removed after line 1", out)

        self.audit_log().write_text("".join(content).replace('"operation":"rotate"', '"operation":"export"'))
        status, out, _ = self.run_cli("audit", "verify")
        self.assertEqual(status, 1)
        self.assertIn("line 3: edited", out)
        self.assertIn("FAILED: 1 problem(s)", out)

    def test_verify_names_a_missing_log(self) -> None:
        status, _, err = self.run_cli("audit", "verify", "--file", str(self.dir / "absent.log"))
        self.assertEqual(status, 1)
        self.assertIn("cannot read the audit log", err)


# -- a gateway run, then verify -------------------------------------------------------------


@functools.cache
def audited_gateway() -> GatewayHarness:
    harness = GatewayHarness(Path("audit-gateway").absolute())
    harness.add_user("alice@example.org", AUDIT_PASSWORD)
    return harness


class GatewayAuditTests(TestCase):
    timeout = 120

    def imap_login(self, port: int, context: Any) -> None:
        client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=30)
        client.login("alice@example.org", AUDIT_PASSWORD)
        client.logout()

    async def test_a_run_is_audited_and_verifies(self) -> None:
        harness = audited_gateway()
        service = harness.start(reactor)
        self.addCleanup(harness.stop)
        path = audit_log_path(harness.config)
        before = verify(path).records if path.exists() else 0
        await deferToThread(self.imap_login, harness.port("imap", "tls"), harness.client_context())
        gk = Gatekeeper(service.parts, actor="test", via="python")  # type: ignore[attr-defined]
        gk.flush("alice@example.org")
        records = [json.loads(line) for line in lines(path)][before:]
        self.assertEqual(
            [(r["event"], r["operation"], r.get("user") or r.get("target")) for r in records],
            [("key_use", "unlock", "alice@example.org"), ("admin", "flush", "alice@example.org")],
        )
        self.assertEqual(records[0]["peer"], "127.0.0.1")
        self.assertNotIn(AUDIT_PASSWORD, path.read_text())
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        status = cli.main(["--config", str(harness.config_path), "audit", "verify"])
        self.assertEqual(status, 0)
        self.assertIn(f"chain intact; head {records[-1]['hash']}", out.getvalue())
        content = lines(path)
        path.write_text("".join(content[:-2] + content[-1:]))
        result = verify(path)
        self.assertEqual([p.line for p in result.problems], [len(content) - 1])
        path.write_text("".join(content))  # leave the chain intact for the next run

"""The web administration page without a browser: the real site, in memory (StringTransport, Clock).

The site is served over an in-memory transport (the TLS wrapper is the listener's
business, tested in the browser tests), on a :class:`Clock` for sessions and the login
throttle, over a gateway's real parts (key store, CA, key ring) with jobs run inline.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gatekeeper.admin.facade import Gatekeeper
from gatekeeper.admin.web.activity import Activity, relay_chart
from gatekeeper.admin.web.admins import (
    AdminAccounts,
    AdminError,
    admins_path,
    check_login,
    hash_password,
    verify_password,
)
from gatekeeper.admin.web.app import MAX_BODY, SESSION_COOKIE, AdminSite, WebAdmin
from gatekeeper.audit import AuditService, audit_log_path
from gatekeeper.keys.accounts import unlock
from gatekeeper.tap import Parts, build_parts, prepare
from gatekeeper.testing.gateway import GatewayHarness
from gatekeeper.testing.pki import TestPKI
from gatekeeper.throttle import LoginThrottle
from gatekeeper.workers import InlineWorkerPool

ADMIN = "admin"
ADMIN_PASSWORD = "unit admin password"
ALICE = "alice@example.org"
ALICE_PASSWORD = "alice unit password"
HOST = "127.0.0.1:8443"


@functools.cache
def shared_harness() -> GatewayHarness:
    harness = GatewayHarness(Path("webadmin-unit").absolute())
    AdminAccounts(admins_path(harness.config)).add(ADMIN, ADMIN_PASSWORD, log_n=12)
    harness.add_user(ALICE, ALICE_PASSWORD)
    alice = harness.store.get_user(ALICE)
    assert alice is not None
    for number in range(120):  # copies of alice's record: cheap users for paging
        harness.store.put_user(attrs.evolve(alice, address=f"bulk{number:04d}@example.org"))
    return harness


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, list[str]]
    body: str

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), [""])[0]

    @property
    def location(self) -> str:
        return self.header("location")

    def csrf(self) -> str:
        found = re.search(r'<input type="hidden" name="csrf" value="([^"]+)"', self.body)
        assert found is not None, self.body
        return found.group(1)


class Browserless:
    """A cookie-keeping HTTP client talking to the site over in-memory connections."""

    def __init__(self, site: AdminSite) -> None:
        self.site = site
        self.cookies: dict[str, str] = {}
        self.set_cookies: list[str] = []

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Answer:
        channel = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.10", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 40000))
        channel.makeConnection(transport)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "Connection: close"]
        if self.cookies:
            lines.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        raw = transport.value()
        channel.connectionLost(None)
        head, _, payload = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        answer_headers: dict[str, list[str]] = {}
        for line in header_lines:
            name, _, value = line.partition(": ")
            answer_headers.setdefault(name.lower(), []).append(value)
        for cookie in answer_headers.get("set-cookie", []):
            self.set_cookies.append(cookie)
            name, _, rest = cookie.partition("=")
            value = rest.split(";")[0]
            if "Max-Age=0" in cookie or not value:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return Answer(int(status_line.split()[1]), answer_headers, payload.decode("utf-8", "replace"))

    def get(self, path: str, **headers: str) -> Answer:
        return self.request("GET", path, headers=headers)

    def post(self, path: str, fields: dict[str, str], **headers: str) -> Answer:
        body = urlencode(fields).encode()
        return self.request("POST", path, body, {"Content-Type": "application/x-www-form-urlencoded", **headers})

    def login(self, password: str = ADMIN_PASSWORD, name: str = ADMIN) -> Answer:
        token = self.get("/login").csrf()
        return self.post("/login", {"csrf": token, "name": name, "password": password})


class SiteTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.harness = shared_harness()
        self.parts: Parts = build_parts(prepare(self.harness.config), reactor, MultiService())
        self.workers = InlineWorkerPool()
        self.parts.message_workers = self.workers  # type: ignore[assignment]
        self.addCleanup(self.parts.unlock_cache.drop)
        self.clock = Clock()
        self.admin = WebAdmin(
            Gatekeeper(self.parts),
            workers=self.workers,
            admins=admins_path(self.harness.config),
            clock=self.clock,
            hostname="gatekeeper.test",
            activity=Activity(self.clock),
            throttle=LoginThrottle(self.clock, free_failures=1, base_seconds=30, max_seconds=300),
            idle_seconds=600,
        )
        self.site = AdminSite(self.admin, reactor=self.clock)
        self.site.doStart()
        self.addCleanup(self.site.doStop)
        self.client = Browserless(self.site)
        audit = AuditService(audit_log_path(self.harness.config))
        audit.startService()
        self.addCleanup(audit.stopService)

    def logged_in(self) -> str:
        answer = self.client.login()
        self.assertEqual((answer.status, answer.location), (303, "/users"))
        return self.client.get("/users").csrf()

    # -- headers, sessions, login

    def test_security_headers_on_every_answer(self) -> None:
        for answer in (self.client.get("/login"), self.client.get("/nowhere"), self.client.get("/static/admin.css")):
            csp = answer.header("content-security-policy")
            self.assertIn("frame-ancestors 'none'", csp)
            self.assertIn("default-src 'none'", csp)
            self.assertNotIn("unsafe-inline", csp)
            self.assertNotIn("script-src", csp)  # no script at all: default-src 'none' covers it
            self.assertEqual(answer.header("referrer-policy"), "no-referrer")
            self.assertEqual(answer.header("x-frame-options"), "DENY")
            self.assertEqual(answer.header("x-content-type-options"), "nosniff")
            self.assertTrue(answer.header("strict-transport-security").startswith("max-age="))
            self.assertEqual(answer.header("cache-control"), "no-store")
            self.assertEqual(answer.header("server"), "Gatekeeper")
        self.assertEqual(self.client.get("/nowhere").status, 404)
        self.assertNotIn("<script", self.client.get("/login").body)

    def test_every_page_needs_a_session(self) -> None:
        for path in (
            "/",
            "/users",
            "/user?address=alice%40example.org",
            "/certificates",
            "/lookup",
            "/status",
            "/audit",
        ):
            answer = self.client.get(path)
            self.assertEqual((answer.status, answer.location), (303, "/login"), path)
        answer = self.client.post("/users/add", {"address": "x@example.org", "password": "p", "confirm": "p"})
        self.assertEqual(answer.location, "/login")
        self.assertIsNone(self.harness.store.get_user("x@example.org"))

    def test_login_sets_a_strict_session_cookie(self) -> None:
        self.logged_in()
        (session_cookie,) = [c for c in self.client.set_cookies if c.startswith(SESSION_COOKIE + "=")]
        attributes = {part.strip().split("=")[0].lower() for part in session_cookie.split(";")[1:]}
        self.assertEqual(attributes, {"path", "secure", "httponly", "samesite"})
        self.assertIn("samesite=strict", session_cookie.lower())
        self.assertIn("Path=/", session_cookie)
        self.assertEqual(self.client.get("/users").status, 200)
        self.assertEqual(len(self.admin.sessions), 1)

    def test_the_login_form_needs_its_token(self) -> None:
        answer = self.client.post("/login", {"name": ADMIN, "password": ADMIN_PASSWORD, "csrf": "x" * 64})
        self.assertEqual(answer.status, 403)
        self.assertNotIn(SESSION_COOKIE, self.client.cookies)
        token = self.client.get("/login").csrf()
        self.client.cookies.pop("__Host-gk_login")
        answer = self.client.post("/login", {"name": ADMIN, "password": ADMIN_PASSWORD, "csrf": token})
        self.assertEqual(answer.status, 403)

    def test_wrong_passwords_are_refused_then_throttled(self) -> None:
        self.assertEqual(self.client.login("wrong password!").status, 403)
        answer = self.client.login("wrong password again")
        self.assertEqual(answer.status, 403)
        self.assertIn("Wrong name or password", answer.body)
        jobs = self.workers.jobs
        answer = self.client.login()  # the right password, but too soon
        self.assertEqual(answer.status, 429)
        self.assertIn("Too many failed logins: try again in", answer.body)
        self.assertEqual(self.workers.jobs, jobs)  # refused without running the KDF
        self.assertNotIn(SESSION_COOKIE, self.client.cookies)
        self.clock.advance(31)
        self.assertEqual(self.client.login().location, "/users")

    def test_unknown_administrator(self) -> None:
        answer = self.client.login(name="nobody")
        self.assertEqual(answer.status, 403)
        self.assertIn("Wrong name or password", answer.body)

    def test_idle_timeout_and_logout(self) -> None:
        csrf = self.logged_in()
        self.clock.advance(599)
        self.assertEqual(self.client.get("/users").status, 200)
        self.clock.advance(601)
        answer = self.client.get("/users")
        self.assertEqual(answer.location, "/login?ended=1")
        self.assertIn("Your session has ended", self.client.get(answer.location).body)
        csrf = self.logged_in()
        answer = self.client.post("/logout", {"csrf": csrf})
        self.assertEqual(answer.location, "/login?out=1")
        self.assertEqual(len(self.admin.sessions), 0)
        self.assertEqual(self.client.get("/users").location, "/login")

    def test_a_removed_administrator_loses_the_session(self) -> None:
        accounts = AdminAccounts(admins_path(self.harness.config))
        accounts.add("temporary", "temporary admin password", log_n=10)
        self.addCleanup(accounts.remove, "temporary")
        self.assertEqual(self.client.login("temporary admin password", name="temporary").location, "/users")
        accounts.remove("temporary")
        self.assertEqual(self.client.get("/users").location, "/login?ended=1")

    def test_csrf_and_origin(self) -> None:
        csrf = self.logged_in()
        fields = {"address": "csrf@example.org", "password": "pw one", "confirm": "pw one"}
        for token in ("", "not the token"):
            answer = self.client.post("/users/add", {**fields, "csrf": token})
            self.assertEqual(answer.status, 403)
            self.assertIn("security token is missing or out of date", answer.body)
        answer = self.client.post("/users/add", {**fields, "csrf": csrf}, **{"Sec-Fetch-Site": "cross-site"})
        self.assertEqual(answer.status, 403)
        answer = self.client.post("/users/add", {**fields, "csrf": csrf}, Origin="https://evil.example")
        self.assertEqual(answer.status, 403)
        self.assertIsNone(self.harness.store.get_user("csrf@example.org"))
        answer = self.client.post("/users/add", {**fields, "csrf": csrf}, Origin="null")
        self.assertEqual(answer.status, 303)
        self.assertIsNotNone(self.harness.store.get_user("csrf@example.org"))

    # -- users

    def flashes(self, answer: Answer) -> list[str]:
        page = self.client.get(answer.location)
        return re.findall(r'<div class="flash [a-z]+" role="[a-z]+">([^<]*)</div>', page.body)

    def test_add_user_bad_input(self) -> None:
        csrf = self.logged_in()
        for fields, expected in (
            ({"address": "not an address", "password": "p", "confirm": "p"}, "ot an"),
            ({"address": ALICE, "password": "p", "confirm": "p"}, "already exists: alice@example.org"),
            ({"address": "new@example.org", "password": "one", "confirm": "two"}, "The two passwords differ"),
            ({"address": "new@example.org", "password": "", "confirm": ""}, "Type a password"),
        ):
            answer = self.client.post("/users/add", {**fields, "csrf": csrf})
            self.assertEqual((answer.status, answer.location), (303, "/users"))
            (message,) = self.flashes(answer)
            self.assertIn(expected, message)
        self.assertIsNone(self.harness.store.get_user("new@example.org"))

    def test_users_paging_and_search(self) -> None:
        self.logged_in()
        first = self.client.get("/users")
        self.assertEqual(first.body.count('<a href="/user?address='), 50)
        self.assertIn("Users 1-50 of", first.body)
        third = self.client.get("/users?q=BULK&page=3")
        self.assertIn("Users 101-120 of 120 matching", third.body)
        self.assertIn("bulk0119@example.org", third.body)
        self.assertNotIn("bulk0099@example.org", third.body)
        self.assertIn("page 3 of 3", third.body)
        self.assertIn("No user matches.", self.client.get("/users?q=zzz").body)
        self.assertEqual(self.client.get("/users?page=banana").status, 200)

    def test_password_change_and_reset(self) -> None:
        csrf = self.logged_in()
        address = "resetme@example.org"
        self.harness.add_user(address, "original password")
        before = self.harness.store.get_user(address)
        assert before is not None
        back = f"/user?address={address.replace('@', '%40')}"
        wrong = self.client.post(
            "/user/password",
            {"csrf": csrf, "address": address, "old_password": "nope", "password": "n1", "confirm": "n1"},
        )
        self.assertEqual(wrong.location, back)
        self.assertEqual(self.flashes(wrong), ["The current password is wrong: nothing was changed."])
        changed = self.client.post(
            "/user/password",
            {
                "csrf": csrf,
                "address": address,
                "old_password": "original password",
                "password": "second password",
                "confirm": "second password",
            },
        )
        self.assertIn("1 key(s) re-encrypted", self.flashes(changed)[0])
        after = self.harness.store.get_user(address)
        assert after is not None
        self.assertEqual(after.current.key_id, before.current.key_id)  # the same key, sealed anew
        unlock(after, "second password")
        unconfirmed = self.client.post(
            "/user/reset", {"csrf": csrf, "address": address, "password": "third", "confirm": "third"}
        )
        self.assertIn("Confirm that the old keys are to be deleted", self.flashes(unconfirmed)[0])
        reset = self.client.post(
            "/user/reset",
            {
                "csrf": csrf,
                "address": address,
                "password": "third password",
                "confirm": "third password",
                "understood": "1",
            },
        )
        self.assertIn("the old keys are deleted and their certificates revoked", self.flashes(reset)[0])
        reissued = self.harness.store.get_user(address)
        assert reissued is not None
        self.assertNotEqual(reissued.current.key_id, before.current.key_id)
        self.assertEqual(len(reissued.keys), 1)
        unlock(reissued, "third password")
        self.assertIn(before.current.certificate.serial_number, self.harness.accounts.ca.revoked_serials())

    def test_unknown_users_and_downloads(self) -> None:
        self.logged_in()
        answer = self.client.get("/user?address=nobody%40example.org")
        self.assertEqual(answer.location, "/users")
        self.assertEqual(self.flashes(answer), ["No such user: nobody@example.org"])
        certificate = self.client.get("/user/certificate?address=ALICE%40example.org")
        self.assertEqual(certificate.status, 200)
        self.assertEqual(certificate.header("content-type"), "application/x-pem-file")
        self.assertEqual(certificate.header("content-disposition"), 'attachment; filename="alice@example.org.pem"')
        self.assertTrue(certificate.body.startswith("-----BEGIN CERTIFICATE-----"))

    def test_unexpected_errors_show_no_traceback(self) -> None:
        self.logged_in()

        def broken(*args: Any) -> Any:
            raise RuntimeError("internal detail that must not be shown")

        self.patch(Gatekeeper, "users_page", broken)
        answer = self.client.get("/users")
        self.assertEqual(answer.status, 500)
        self.assertIn("Something went wrong", answer.body)
        self.assertNotIn("internal detail", answer.body)
        self.assertNotIn("Traceback", answer.body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    # -- certificates and uploads

    def upload(self, csrf: str, data: bytes, declared: int | None = None) -> Answer:
        boundary = "gatekeeper-test-boundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{csrf}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.pem"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return self.client.request(
            "POST", "/certificates/import", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )

    def test_import_and_remove_certificates(self) -> None:
        csrf = self.logged_in()
        partner = TestPKI("Unit Partner CA", key_index=4)
        bundle = partner.user("dave@partner.example").cert_pem() + partner.cert_pem()
        answer = self.upload(csrf, bundle)
        self.assertEqual(answer.location, "/certificates")
        (message,) = self.flashes(answer)
        self.assertIn("Imported 2 certificate(s): dave@partner.example", message)
        listing = self.client.get("/certificates").body
        self.assertIn("dave@partner.example", listing)
        self.assertIn("2 certificate(s) in the key ring.", listing)
        self.assertIn("Nothing imported. Not a certificate", self.flashes(self.upload(csrf, b"\x00garbage"))[0])
        self.assertIn("Choose a certificate file", self.flashes(self.upload(csrf, b""))[0])
        for entry in self.parts.keyring.entries():
            answer = self.client.post("/certificates/remove", {"csrf": csrf, "fingerprint": entry.fingerprint})
            self.assertIn("Removed", self.flashes(answer)[0])
        answer = self.client.post("/certificates/remove", {"csrf": csrf, "fingerprint": "00" * 32})
        self.assertEqual(self.flashes(answer), ["No certificate with that fingerprint is in the key ring."])
        self.assertEqual(self.parts.keyring.entries(), [])

    def test_a_huge_upload_is_refused_unread(self) -> None:
        csrf = self.logged_in()
        answer = self.upload(csrf, b"0" * (MAX_BODY + 1))
        self.assertEqual(answer.location, "/certificates")
        self.assertEqual(self.flashes(answer), ["The upload is too large: at most 1024 KiB is accepted."])
        self.assertEqual(self.parts.keyring.entries(), [])

    def test_lookup_and_audit_pages(self) -> None:
        csrf = self.logged_in()
        page = self.client.post("/lookup", {"csrf": csrf, "address": ALICE})
        self.assertEqual(page.status, 200)
        self.assertIn("Decision: encrypt to", page.body)
        bad = self.client.post("/lookup", {"csrf": csrf, "address": "<script>alert(1)</script>"})
        self.assertNotIn("<script>", bad.body)
        self.assertIn("&lt;script&gt;", bad.body)
        self.client.post(
            "/users/add", {"csrf": csrf, "address": "audit.me@example.org", "password": "a", "confirm": "a"}
        )
        audit = self.client.get("/audit?operation=add_user&q=audit.me")
        self.assertEqual(audit.body.count("<td>audit.me@example.org</td>"), 1)
        self.assertIn("<td>admin</td><td>add_user</td>", audit.body)

    def test_status_page_without_a_check(self) -> None:
        self.logged_in()
        page = self.client.get("/status")
        self.assertIn("Not checked yet", page.body)
        self.assertIn('<svg xmlns="http://www.w3.org/2000/svg"', page.body)


class AdminAccountsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp()) / "admins.json"
        self.accounts = AdminAccounts(self.path)

    def test_hash_and_verify(self) -> None:
        stored = hash_password("correct horse", log_n=10)
        kind, log_n, r, p, _, _ = stored.split("$")
        self.assertEqual((kind, log_n, r, p), ("scrypt", "10", "8", "1"))
        self.assertNotIn("correct horse", stored)
        self.assertTrue(verify_password(stored, "correct horse"))
        self.assertFalse(verify_password(stored, "correct horsf"))
        self.assertNotEqual(hash_password("correct horse", log_n=10), stored)  # a fresh salt each time
        self.assertFalse(verify_password("md5$abc", "correct horse"))

    def test_default_strength(self) -> None:
        self.assertTrue(hash_password("x" * 12).startswith("scrypt$17$8$1$"))

    def test_file(self) -> None:
        self.assertEqual(self.accounts.records(), {})
        self.accounts.add("ops", "operator password", log_n=10)
        with self.assertRaises(AdminError):
            self.accounts.add("ops", "another password", log_n=10)
        self.accounts.add("ops", "another password", replace=True, log_n=10)
        self.assertEqual(self.path.stat().st_mode & 0o777, 0o600)
        self.assertTrue(check_login(self.path, "ops", "another password"))
        self.assertFalse(check_login(self.path, "ops", "operator password"))
        self.assertFalse(check_login(self.path, "nobody", "another password"))
        for name in ("", "a b", "../x", "x" * 65):
            with self.assertRaises(AdminError):
                self.accounts.add(name, "a long enough password", log_n=10)
        self.assertTrue(self.accounts.remove("ops"))
        self.assertFalse(self.accounts.remove("ops"))
        self.path.write_text("{not json")
        with self.assertRaises(AdminError):
            self.accounts.records()
        self.assertFalse(check_login(self.path, "ops", "another password"))


class ActivityTests(SynchronousTestCase):
    def test_minutes_outcomes_and_the_window(self) -> None:
        clock = Clock()
        clock.advance(6000 * 60)
        activity = Activity(clock)
        activity({"gk_event": "relay", "outcome": "encrypted"})
        activity({"gk_event": "relay", "outcome": "encrypted"})
        activity({"gk_event": "login", "outcome": "ok", "protocol": "smtp"})
        activity({"gk_event": "reveal", "outcome": "x"})
        clock.advance(120)
        activity({"gk_event": "relay", "outcome": "rejected"})
        series = activity.relays()
        self.assertEqual(len(series), 60)
        self.assertEqual(series[-1][1], {"rejected": 1})
        self.assertEqual(series[-3][1], {"encrypted": 2})
        self.assertEqual(activity.relay_totals(), {"encrypted": 2, "rejected": 1})
        self.assertEqual(activity.login_totals(), {"smtp ok": 1})
        clock.advance(59 * 60)
        self.assertEqual(activity.relay_totals(), {"rejected": 1})

    def test_chart(self) -> None:
        clock = Clock()
        activity = Activity(clock)
        for outcome in ("encrypted", "encrypted", "signed_only", "<b>odd</b>"):
            activity({"gk_event": "relay", "outcome": outcome})
        from twisted.web.template import flattenString

        svg = self.successResultOf(flattenString(None, relay_chart(activity.relays()))).decode()
        self.assertIn("0 min ago: 2 encrypted, 1 signed_only, 1 &lt;b&gt;odd&lt;/b&gt;", svg)
        self.assertNotIn("<b>", svg)
        self.assertEqual(svg.count("<rect"), 3 + 7)  # three stacked bars, seven legend squares
        self.assertIn(">encrypted (2)</text>", svg)

"""The web administration page in real headless Chromium, against the gateway running in-process.

The gateway runs on the test's reactor with its real key store, CA, worker processes and
HTTPS listener; Chromium (Debian's, driven by Playwright on a thread of its own) pins
the gateway's certificate and nothing else. Every page is used the way a person would:
typing into forms and pressing buttons, without JavaScript of the page's own (there is
none). Downloads are checked with ``openssl``; a screenshot of each page is saved under
``test-artefacts/webadmin/``.
"""

from __future__ import annotations

import functools
import smtplib
import subprocess
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gatekeeper.keys.keyring import KeyRing
from gatekeeper.testing.gateway import GatewayHarness
from gatekeeper.testing.pki import TestPKI
from tests.fixtures.mailstack import MailStack
from tests.fixtures.slapd import READER_DN, SUFFIX, Slapd
from tests.webadmin_support import (
    ADMIN,
    ADMIN_PASSWORD,
    WEB_CONFIG,
    Browser,
    add_admin,
    browser_for,
    screenshot,
    spki_pin,
    web_port,
)

ALICE = "alice@example.org"
ALICE_PASSWORD = "alice web test password"


@functools.cache
def shared_harness() -> GatewayHarness:
    """One key store, CA and administrator for the module (trial runs in its temp directory)."""
    harness = GatewayHarness(Path("webadmin-browser").absolute(), extra_config=WEB_CONFIG)
    add_admin(harness)
    harness.add_user(ALICE, ALICE_PASSWORD)
    return harness


def login(page: Any, base: str, password: str = ADMIN_PASSWORD) -> None:
    """Log in through the form."""
    page.goto(f"{base}/login")
    page.fill("input[name=name]", ADMIN)
    page.fill("input[name=password]", password)
    page.click("button:has-text('Log in')")


def new_page(browser: Any) -> Any:
    """A page in a fresh context (its own cookies), with downloads allowed and scripts off."""
    context = browser.new_context(accept_downloads=True, java_script_enabled=False)
    page = context.new_page()
    page.set_default_timeout(15000)
    return page


def flash(page: Any) -> str:
    """The text of the page's messages."""
    return " ".join(page.locator(".flash").all_inner_texts())


class BrowserTests(TestCase):
    """Users, certificates, lookup and audit in Chromium."""

    timeout = 180

    def setUp(self) -> None:
        self.harness = shared_harness()
        self.harness.start(reactor)
        self.addCleanup(self.harness.stop)
        self.base = f"https://127.0.0.1:{web_port(self.harness)}"
        self.browser: Browser = browser_for(spki_pin(self.harness.config.tls.certificate))
        self.downloads = Path(self.mktemp()).absolute()
        self.downloads.mkdir()

    async def test_login_users_rotate_download_delete(self) -> None:
        address = "web.user@example.org"
        downloads = self.downloads

        def steps(browser: Any) -> dict[str, Any]:
            page = new_page(browser)
            login(page, self.base)
            seen: dict[str, Any] = {"after_login": page.url}
            # Add a user (the password typed twice).
            page.fill("form[action='/users/add'] input[name=address]", address)
            page.fill("input[name=password]", "a new user's password")
            page.fill("input[name=confirm]", "a new user's password")
            page.click("button:has-text('Add user')")
            seen["added"] = flash(page)
            seen["user_url"] = page.url
            screenshot(page, "user")
            # Listed, found by search.
            page.goto(f"{self.base}/users?q=web.user")
            seen["listed"] = page.locator("#users tbody tr").all_inner_texts()
            screenshot(page, "users")
            page.click(f"text={address}")
            # Download the certificate.
            with page.expect_download() as download:
                page.click("text=Download the certificate (PEM)")
            target = downloads / "certificate.pem"
            download.value.save_as(str(target))
            seen["certificate_name"] = download.value.suggested_filename
            seen["key_before"] = page.locator("#user tr:has-text('Current key') td").inner_text()
            # Rotate with the user's password: a new key at once.
            page.fill("form[action='/user/rotate'] input[name=password]", "a new user's password")
            page.click("button:has-text('Rotate')")
            seen["rotated"] = flash(page)
            seen["key_after"] = page.locator("#user tr:has-text('Current key') td").inner_text()
            seen["keys_after"] = page.locator("#user tr:has-text('Keys') td").first.inner_text()
            # Export PKCS#12.
            page.fill("form[action='/user/pkcs12'] input[name=password]", "a new user's password")
            page.fill("form[action='/user/pkcs12'] input[name=export_password]", "file password 1")
            page.fill("form[action='/user/pkcs12'] input[name=export_confirm]", "file password 1")
            with page.expect_download() as p12:
                page.click("button:has-text('Download .p12')")
            p12.value.save_as(str(downloads / "user.p12"))
            # Delete, with the confirmation.
            page.click("text=Delete this user")
            screenshot(page, "delete")
            page.fill("input[name=confirm]", "someone.else@example.org")
            page.click("button:has-text('Delete the user')")
            seen["wrong_confirmation"] = flash(page)
            page.fill("input[name=confirm]", address)
            page.click("button:has-text('Delete the user')")
            seen["deleted"] = flash(page)
            page.goto(f"{self.base}/users?q=web.user")
            seen["listed_after"] = page.locator("#users tbody tr").count()
            page.context.close()
            return seen

        seen = await self.browser.run(steps)
        self.assertTrue(seen["after_login"].endswith("/users"), seen["after_login"])
        self.assertIn(f"Added {address}", seen["added"])
        self.assertIn("/user?address=web.user%40example.org", seen["user_url"])
        self.assertEqual(len(seen["listed"]), 1)
        self.assertIn(address, seen["listed"][0])
        self.assertEqual(seen["certificate_name"], f"{address}.pem")
        # openssl reads the download; it is the certificate of that address, from the built-in CA.
        text = subprocess.run(
            [
                "openssl",
                "x509",
                "-in",
                str(self.downloads / "certificate.pem"),
                "-noout",
                "-subject",
                "-ext",
                "subjectAltName",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        self.assertIn(address, text)
        self.assertIn(f"Rotated {address}: new key", seen["rotated"])
        self.assertNotEqual(seen["key_before"], seen["key_after"])
        self.assertEqual(seen["keys_after"], "2")
        key, certificate, _ = pkcs12.load_key_and_certificates(
            (self.downloads / "user.p12").read_bytes(), b"file password 1"
        )
        assert certificate is not None and key is not None
        self.assertIn(
            address,
            certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.RFC822Name
            ),
        )
        self.assertIn("does not match: nothing was deleted", seen["wrong_confirmation"])
        self.assertIn(f"Deleted {address}", seen["deleted"])
        self.assertEqual(seen["listed_after"], 0)
        self.assertIsNone(self.harness.store.get_user(address))

    async def test_wrong_password_is_refused(self) -> None:
        def steps(browser: Any) -> dict[str, Any]:
            page = new_page(browser)
            login(page, self.base, password="not the admin password")
            seen = {"url": page.url, "message": flash(page)}
            seen["cookies"] = [c["name"] for c in page.context.cookies()]
            page.goto(f"{self.base}/users")
            seen["users_url"] = page.url
            screenshot(page, "login")
            page.context.close()
            return seen

        seen = await self.browser.run(steps)
        self.assertTrue(seen["url"].endswith("/login"), seen["url"])
        self.assertIn("Wrong name or password", seen["message"])
        self.assertNotIn("__Host-gk_admin", seen["cookies"])
        self.assertTrue(seen["users_url"].endswith("/login"), seen["users_url"])

    async def test_a_form_without_its_csrf_token_is_refused(self) -> None:
        address = "csrf.victim@example.org"

        def steps(browser: Any) -> dict[str, Any]:
            context = browser.new_context(java_script_enabled=True)
            page = context.new_page()
            page.set_default_timeout(15000)
            login(page, self.base)
            form = "form[action='/users/add']"
            page.eval_on_selector(f"{form} input[name=csrf]", "element => element.remove()")
            page.fill(f"{form} input[name=address]", address)
            page.fill(f"{form} input[name=password]", "some password")
            page.fill(f"{form} input[name=confirm]", "some password")
            with page.expect_response(lambda r: r.url.endswith("/users/add")) as response:
                page.click("button:has-text('Add user')")
            seen = {"status": response.value.status, "text": page.locator("main").inner_text()}
            context.close()
            return seen

        seen = await self.browser.run(steps)
        self.assertEqual(seen["status"], 403)
        self.assertIn("security token is missing", seen["text"])
        self.assertIsNone(self.harness.store.get_user(address))

    async def test_certificates_import_refuse_and_remove(self) -> None:
        partner = TestPKI("Web Partner CA", key_index=3)
        pem = self.downloads / "carol.pem"
        pem.write_bytes(partner.user("carol@partner.example").cert_pem())
        garbage = self.downloads / "notes.txt"
        garbage.write_bytes(b"this is not a certificate\n")
        huge = self.downloads / "huge.der"
        huge.write_bytes(b"\x30" * (2 * 1024 * 1024))
        keyring = KeyRing(self.harness.config.keys.store / "keyring")

        def steps(browser: Any) -> dict[str, Any]:
            page = new_page(browser)
            login(page, self.base)
            page.click("nav >> text=Certificates")
            seen: dict[str, Any] = {}
            for name, path in (("garbage", garbage), ("huge", huge), ("imported", pem)):
                page.set_input_files("input[name=file]", str(path))
                page.click("button:has-text('Import')")
                seen[name] = flash(page)
            seen["rows"] = page.locator("#certificates tbody tr").all_inner_texts()
            screenshot(page, "certificates")
            page.locator("#certificates tbody tr", has_text="carol@partner.example").locator("button").click()
            seen["removed"] = flash(page)
            seen["rows_after"] = page.locator("#certificates tbody tr").count()
            page.context.close()
            return seen

        seen = await self.browser.run(steps)
        self.assertIn("Nothing imported. Not a certificate", seen["garbage"])
        self.assertIn("The upload is too large: at most 1024 KiB", seen["huge"])
        self.assertIn("Imported 1 certificate(s): carol@partner.example", seen["imported"])
        self.assertEqual(len(seen["rows"]), 1)
        self.assertIn("carol@partner.example", seen["rows"][0])
        self.assertIn("Removed carol@partner.example", seen["removed"])
        self.assertEqual(seen["rows_after"], 0)
        self.assertEqual(keyring.entries(), [])

    async def test_lookup_trace(self) -> None:
        def steps(browser: Any) -> dict[str, Any]:
            page = new_page(browser)
            login(page, self.base)
            page.click("nav >> text=Lookup")
            seen: dict[str, Any] = {}
            page.fill("input[name=address]", "not an address")
            page.click("button:has-text('Look up')")
            seen["invalid"] = flash(page)
            page.fill("input[name=address]", "nobody@elsewhere.example")
            page.click("button:has-text('Look up')")
            seen["missing"] = page.locator("#decision").inner_text()
            page.fill("input[name=address]", ALICE)
            page.click("button:has-text('Look up')")
            seen["decision"] = page.locator("#decision").inner_text()
            seen["trace"] = page.locator("#trace").inner_text()
            screenshot(page, "lookup")
            page.context.close()
            return seen

        seen = await self.browser.run(steps)
        self.assertTrue(seen["invalid"], "no message for an invalid address")
        self.assertIn("Decision: no usable certificate", seen["missing"])
        self.assertIn("Decision: encrypt to", seen["decision"])
        self.assertIn("found in keyring", seen["decision"])
        self.assertIn(f"Looking up a certificate for {ALICE}", seen["trace"])
        self.assertRegex(seen["trace"], r"keyring: found 1 certificate\(s\), 1 usable")

    async def test_audit_page_shows_web_changes(self) -> None:
        address = "audited@example.org"

        def steps(browser: Any) -> dict[str, Any]:
            page = new_page(browser)
            login(page, self.base)
            form = "form[action='/users/add']"
            page.fill(f"{form} input[name=address]", address)
            page.fill(f"{form} input[name=password]", "audited password")
            page.fill(f"{form} input[name=confirm]", "audited password")
            page.click("button:has-text('Add user')")
            page.click("nav >> text=Audit")
            page.select_option("select[name=operation]", "add_user")
            page.fill("input[name=q]", "audited@")
            page.click("button:has-text('Filter')")
            seen = {"url": page.url, "rows": page.locator("#audit tbody tr").all_inner_texts()}
            screenshot(page, "audit")
            page.context.close()
            return seen

        seen = await self.browser.run(steps)
        self.assertIn("operation=add_user", seen["url"])
        self.assertEqual(len(seen["rows"]), 1, seen["rows"])
        cells = seen["rows"][0].split("\t")
        self.assertEqual(cells[2:8], ["admin", "add_user", "", address, ADMIN, "web"])


STACK_PASSWORD = "alicepw"  # the mail stack's own test user


class StatusAgainstTheStackTests(TestCase):
    """The status page against Dovecot, Postfix and slapd: every check green, a live session, a relayed message."""

    timeout = 180

    def setUp(self) -> None:
        self.stack = MailStack.for_class(self)
        self.slapd = Slapd()
        self.addCleanup(self.slapd.close)
        self.slapd.start()
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        password_file = directory / "alice.password"
        password_file.write_text(STACK_PASSWORD + "\n")
        stack = self.stack
        extra = f"""
[upstream]
smtp = "starttls:127.0.0.1:{stack.submission_port}"
pop3 = "starttls:127.0.0.1:{stack.pop3_port}"
imap = "tls:127.0.0.1:{stack.imaps_port}"
ca_file = "{stack.ca_file}"
timeout_seconds = 10
smtp_user = "{ALICE}"
smtp_password_file = "{password_file}"
[directory.ldap]
url = "{self.slapd.ldaps_url}"
base_dn = "{SUFFIX}"
bind_dn = "{READER_DN}"
bind_password_file = "{self.slapd.config().bind_password_file}"
ca_file = "{self.slapd.ca_file}"
{WEB_CONFIG}check_user = "{ALICE}"
check_password_file = "{password_file}"
"""
        self.harness = GatewayHarness(directory / "gateway", extra_config=extra)
        add_admin(self.harness)
        self.harness.add_user(ALICE, ALICE_PASSWORD)
        self.harness.start(reactor)
        self.addCleanup(self.harness.stop)
        self.base = f"https://127.0.0.1:{web_port(self.harness)}"
        self.browser = browser_for(spki_pin(self.harness.config.tls.certificate))

    def send_and_stay(self) -> smtplib.SMTP:
        """Log in to the gateway's SMTP proxy, send one message, and keep the session open."""
        client = smtplib.SMTP("127.0.0.1", self.harness.port("smtp", "starttls"), timeout=30)
        client.starttls(context=self.harness.client_context())
        client.login(ALICE, ALICE_PASSWORD)
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = ALICE, "bob@example.org", "status page test"
        message.set_content("one message for the chart\n")
        client.send_message(message)
        return client

    async def test_status_page_all_green(self) -> None:
        client = await deferToThread(self.send_and_stay)
        self.addCleanup(deferToThread, client.quit)

        def steps(browser: Any) -> dict[str, Any]:
            page = new_page(browser)
            login(page, self.base)
            page.click("nav >> text=Status")
            seen: dict[str, Any] = {"before": page.locator("main").inner_text()}
            page.click("button:has-text('Check now')")
            seen["verdict"] = flash(page)
            seen["rows"] = [
                {
                    "class": row.get_attribute("class"),
                    "cells": row.locator("td").all_inner_texts(),
                }
                for row in page.locator("#checks tbody tr").all()
            ]
            seen["sessions"] = page.locator("#sessions tbody tr").all_inner_texts()
            seen["counters"] = dict(
                (row.locator("th").inner_text(), row.locator("td").inner_text())
                for row in page.locator("#counters tr").all()
            )
            seen["bars"] = page.locator("#chart svg rect[height]").count()
            seen["titles"] = page.locator("#chart svg title").all_text_contents()
            screenshot(page, "status")
            page.context.close()
            return seen

        seen = await self.browser.run(steps)
        self.assertIn("Not checked yet", seen["before"])
        self.assertIn("OK: all 5 checks passed.", seen["verdict"])
        names = [row["cells"][0] for row in seen["rows"]]
        self.assertEqual(sorted(names), ["crl", "ldap", "upstream imap", "upstream pop3", "upstream smtp"])
        for row in seen["rows"]:
            self.assertEqual(row["class"], "ok", row)
            self.assertEqual(row["cells"][6], "ok", row)
            if row["cells"][0] != "crl":
                self.assertEqual(row["cells"][2:5], ["ok", "ok", "ok"], row)
        self.assertEqual(len(seen["sessions"]), 1)
        self.assertIn(ALICE, seen["sessions"][0])
        self.assertIn("smtp", seen["sessions"][0])
        self.assertEqual(seen["counters"]["Messages relayed, last hour"], "1")
        self.assertEqual(seen["counters"]["Sessions"], "smtp 1")
        self.assertIn("smtp ok 1", seen["counters"]["Logins, last hour"])
        busy = [title for title in seen["titles"] if not title.endswith(": none")]
        self.assertEqual(len(busy), 1, busy)  # one minute with traffic: this one or, across a minute's turn, the last
        self.assertRegex(busy[0], r"^[01] min ago: 1 (encrypted|signed_only|plain)$")

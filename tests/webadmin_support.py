"""Helpers for the web administration tests: a gateway with the page on, and real headless Chromium.

:class:`Browser` runs Debian's ``/usr/bin/chromium`` through Playwright's synchronous API
on a thread of its own (Playwright's objects belong to the thread that made them), so
the gateway keeps running on the test's reactor meanwhile: :meth:`Browser.run` hands a
function to that thread and returns a Deferred of its result. Chromium is launched once
per gateway certificate (so once per test module or class), with a fresh profile, and
trusts exactly that certificate: its public key is pinned with
``--ignore-certificate-errors-spki-list``, nothing else is accepted.
"""

from __future__ import annotations

import atexit
import base64
import functools
import hashlib
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from gatekeeper.admin.web.admins import AdminAccounts, admins_path
from gatekeeper.tap import ListenerService
from gatekeeper.testing.gateway import GatewayHarness

REPO = Path(__file__).resolve().parent.parent
ARTEFACTS = REPO / "test-artefacts" / "webadmin"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
ADMIN = "root"
ADMIN_PASSWORD = "web admin test password"
WEB_CONFIG = '[admin]\nweb = "tcp:0"\n'


def add_admin(harness: GatewayHarness, name: str = ADMIN, password: str = ADMIN_PASSWORD) -> None:
    """Add an administrator (a cheaper scrypt than production's: the tests log in often)."""
    AdminAccounts(admins_path(harness.config)).add(name, password, log_n=14)


def web_port(harness: GatewayHarness) -> int:
    """The port the running gateway's web page listens on."""
    assert harness.service is not None
    for child in harness.service:
        if isinstance(child, ListenerService) and child.what == "web admin (HTTPS)":
            assert child.port is not None
            return int(getattr(child.port.getHost(), "port"))  # noqa: B009 - IAddress has no port
    raise KeyError("the web page is not configured")


def spki_pin(certificate_path: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a PEM certificate: what Chromium pins."""
    certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


class Browser:
    """Headless Chromium on its own thread; :meth:`run` calls a function there with the browser."""

    def __init__(self, pin: str) -> None:
        self._jobs: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]] | None] = queue.Queue()
        self._ready: queue.Queue[BaseException | None] = queue.Queue()
        self._thread = threading.Thread(target=self._main, args=(pin,), name="chromium", daemon=True)
        self._thread.start()
        problem = self._ready.get(timeout=120)
        if problem is not None:
            raise problem

    def _main(self, pin: str) -> None:
        from playwright.sync_api import sync_playwright

        try:
            playwright = sync_playwright().start()
            # Playwright gives every launch a fresh --user-data-dir of its own.
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=[*CHROMIUM_FLAGS, f"--ignore-certificate-errors-spki-list={pin}"],
            )
        except BaseException as error:
            self._ready.put(error)
            return
        self._ready.put(None)
        try:
            while (job := self._jobs.get()) is not None:
                function, args, result = job
                try:
                    value = function(browser, *args)
                except BaseException as error:
                    reactor.callFromThread(result.errback, error)
                else:
                    reactor.callFromThread(result.callback, value)
        finally:
            browser.close()
            playwright.stop()

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Call ``function(browser, *args)`` on the browser's thread; a Deferred of what it returns."""
        result: Deferred[Any] = Deferred()
        self._jobs.put((function, args, result))
        return result

    def close(self) -> None:
        """Close the browser and end its thread."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=30)


@functools.cache
def browser_for(pin: str) -> Browser:
    """One browser per pinned certificate for the whole test process (closed at exit)."""
    browser = Browser(pin)
    atexit.register(browser.close)
    return browser


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot under ``test-artefacts/webadmin/`` and print where it is."""
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTEFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path

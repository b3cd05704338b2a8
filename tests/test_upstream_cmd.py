"""``gatekeeper upstream set|show|clear``: per-user upstream logins, sealed to the user's keys."""

from __future__ import annotations

from typing import Any

from twisted.logger import globalLogPublisher

from gatekeeper.keys.accounts import unlock
from gatekeeper.keys.unlocking import identity_to_wire
from gatekeeper.upstream.credentials import CredentialStore, open_sealed
from tests.test_cli import PASSWORD, CliTestCase, write_config

ALICE = "alice@example.org"


class UpstreamCommandTests(CliTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def credentials(self) -> CredentialStore:
        return CredentialStore(self.store_root / "upstream-logins")

    def test_set_show_clear(self) -> None:
        self.add_alice()
        shown = self.run_cli("upstream", "show", ALICE)[1]
        self.assertEqual(shown, f"{ALICE}: pass-through (the gateway login is used upstream)\n")
        secret = self.password_file("upstream sécret", "upstream")
        arguments = ("upstream", "set", ALICE.upper(), "--login", "alice.u", "--password-file", secret)
        status, out, err = self.run_cli(*arguments)
        self.assertEqual(status, 0, err)
        self.assertIn("logs in upstream as alice.u", out)
        sealed = self.credentials().sealed(ALICE)
        assert sealed is not None
        self.assertNotIn("upstream sécret".encode(), sealed)
        self.assertNotIn(b"alice.u", sealed)
        # only the user's own keys, unlocked with the user's password, open it
        user = self.store().get_user(ALICE)
        assert user is not None
        identity = unlock(user, PASSWORD).identity
        self.assertEqual(open_sealed(identity_to_wire(identity), sealed), ("alice.u", "upstream sécret"))
        self.assertIn("a stored upstream login", self.run_cli("upstream", "show", ALICE)[1])
        self.assertEqual(self.run_cli("upstream", "clear", ALICE)[0], 0)
        self.assertIsNone(self.credentials().sealed(ALICE))
        self.assertEqual(self.run_cli("upstream", "clear", ALICE)[0], 1)
        audited = [(e["operation"], e["target"]) for e in self.events if e.get("gk_event") == "admin"]
        self.assertIn(("set_upstream_login", ALICE), audited)
        self.assertIn(("clear_upstream_login", ALICE), audited)

    def test_the_password_is_asked_twice(self) -> None:
        self.add_alice()
        status, _, err = self.run_cli("upstream", "set", ALICE, "--login", "a", answers=["one", "two"])
        self.assertEqual(status, 1)
        self.assertIn("do not match", err)
        status, _, err = self.run_cli("upstream", "set", ALICE, "--login", "a", answers=["same", "same"])
        self.assertEqual(status, 0, err)

    def test_errors(self) -> None:
        status, _, err = self.run_cli("upstream", "set", "nobody@example.org", "--login", "x")
        self.assertEqual((status, err), (1, "gatekeeper: no such user: nobody@example.org\n"))
        status, _, err = self.run_cli("upstream", "set", ALICE)
        self.assertEqual(status, 2)
        self.assertIn("--login", err)
        self.add_alice()
        secret = self.password_file()
        status, _, err = self.run_cli("upstream", "set", ALICE, "--login", "a b\nc", "--password-file", secret)
        self.assertEqual(status, 1)
        self.assertIn("one line", err)

    def test_show_without_pass_through(self) -> None:
        self.config = write_config(self.dir, extra="[upstream]\npass_through = false\n")
        status, out, _ = self.run_cli("upstream", "show", ALICE)
        self.assertEqual(status, 1)
        self.assertIn("cannot fetch mail", out)

"""Tests for the embedded store's settings: ``[upstream.store]`` and building the store from them."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.config import LocalStoreConfig, load_config, parse_config_text
from gatekeeper.errors import ConfigError
from gatekeeper.localstore import INBOX, LocalStore, MailboxFull, NotLocalDomain

REPO = Path(__file__).resolve().parent.parent


class LocalStoreConfigTests(SynchronousTestCase):
    def test_defaults_are_relative_to_the_configuration_file(self) -> None:
        base = Path("/srv/gatekeeper/etc")
        config = parse_config_text("", base)
        self.assertEqual(config.upstream.store, LocalStoreConfig(data_dir=base / "mail"))

    def test_settings(self) -> None:
        base = Path("/srv/gatekeeper/etc")
        text = '[upstream]\nmode = "embedded"\n[upstream.store]\ndata_dir = "../spool/mail"\nquota_bytes = 1000000\n'
        store = parse_config_text(text + "quota_messages = 500\n", base).upstream.store
        self.assertEqual(store.data_dir, base / "../spool/mail")
        self.assertEqual((store.quota_bytes, store.quota_messages), (1_000_000, 500))
        absolute = parse_config_text('[upstream.store]\ndata_dir = "/var/mail/gk"\n', base).upstream.store
        self.assertEqual(absolute.data_dir, Path("/var/mail/gk"))

    def test_mistakes_name_the_setting(self) -> None:
        cases = {
            "[upstream.store]\nquota_bytes = -1\n": "[upstream.store] quota_bytes: must be at least 0, got -1",
            "[upstream.store]\nquota = 5\n": "[upstream.store] quota: unknown setting",
            '[upstream.store]\ndata_dir = ""\n': "[upstream.store] data_dir: expected a path",
            '[upstream]\nstore = "mail"\n': "[upstream] store: expected a table",
        }
        for text, message in cases.items():
            with self.assertRaises(ConfigError, msg=text) as caught:
                parse_config_text(text, Path("/etc/gk"))
            self.assertTrue(str(caught.exception).startswith(message), str(caught.exception))

    def test_the_example_configuration_puts_mail_beside_the_keys(self) -> None:
        config = load_config(REPO / "etc" / "gatekeeper.toml")
        self.assertEqual(config.upstream.store.data_dir.resolve(), REPO / "mail")

    def test_the_store_is_built_from_the_configuration(self) -> None:
        data_dir = Path(self.mktemp()).absolute()
        text = (
            '[server]\ndomains = ["Example.ORG"]\n'
            f'[upstream.store]\ndata_dir = "{data_dir}"\nquota_bytes = 100\nquota_messages = 3\n'
        )
        config = parse_config_text(text, Path("/etc/gk"))
        store = LocalStore.from_config(config, users=lambda address: address.startswith("bob@"))
        self.addCleanup(store.close)
        self.assertEqual(store.data_dir, data_dir)
        self.assertRaises(NotLocalDomain, store.check_recipient, "bob@example.net")
        mailbox = store.mailbox(store.check_recipient("bob@example.org"))
        mailbox.append(INBOX, b"x" * 90)
        self.assertRaises(MailboxFull, mailbox.append, INBOX, b"x" * 20)
        self.assertEqual((mailbox.usage().limit_bytes, mailbox.usage().limit_messages), (100, 3))

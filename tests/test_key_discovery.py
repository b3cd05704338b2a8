"""Building the key manager from ``[directory]`` (no sockets: nothing is asked here)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.config import KeysConfig, parse_config
from gatekeeper.errors import ConfigError
from gatekeeper.keys.cache import SourceGuard
from gatekeeper.keys.discovery import build_key_manager, build_publisher, keyring_path, make_threadpool
from gatekeeper.keys.dns import SmimeaSource
from gatekeeper.keys.keyring import KeyRing, KeyRingSource
from gatekeeper.keys.ldap import LdapPublisher, LdapSource
from gatekeeper.testing.keys import FakeValidator
from gatekeeper.testing.pki import TestPKI
from gatekeeper.testing.threads import ImmediatePool, ImmediateReactor

CA = TestPKI("Discovery CA", key_index=71)
ALICE = CA.user("alice@example.org", key_index=72)

TABLE: dict[str, Any] = {
    "timeout_seconds": 2,
    "backoff_seconds": 1,
    "backoff_max_seconds": 8,
    "negative_cache_seconds": 60,
    "ldap": {
        "url": "ldap://ldap.example.org",
        "base_dn": "dc=example,dc=org",
        "bind_dn": "cn=gk,dc=example,dc=org",
        "bind_password_env": "GK_LDAP_PW",
    },
    "external": [
        {"name": "partner", "url": "ldaps://ldap.partner.example", "base_dn": "dc=p", "domains": ["p.example"]}
    ],
    "dns": {"resolver": "127.0.0.1:5353"},
}


class BuildKeyManagerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="gk-discovery-"))
        self.addCleanup(shutil.rmtree, self.base, True)

    def build(self, table: dict[str, Any], environ: dict[str, str] | None = None) -> Any:
        config = parse_config({"directory": table}, self.base).directory
        keyring = KeyRing(self.base / "keyring")
        return build_key_manager(
            config,
            reactor=ImmediateReactor(),
            threadpool=ImmediatePool(),  # type: ignore[arg-type]
            validator=FakeValidator([CA.certificate]),
            keyring=keyring,
            environ={"GK_LDAP_PW": "pw"} if environ is None else environ,
        )

    def test_sources_in_order_each_guarded(self) -> None:
        manager = self.build(TABLE)
        self.assertEqual([g.name for g in manager.guards], ["keyring", "ldap", "external:partner", "dns"])
        self.assertTrue(all(isinstance(g, SourceGuard) for g in manager.guards))
        self.assertEqual(
            [type(g.source) for g in manager.guards], [KeyRingSource, LdapSource, LdapSource, SmimeaSource]
        )
        self.assertEqual(manager.guards[2].domains, ("p.example",))
        self.assertEqual(
            (manager.guards[1].timeout, manager.guards[1].backoff, manager.guards[1].backoff_max), (2, 1, 8)
        )
        self.assertEqual(manager.guards[3].source.resolver, ("127.0.0.1", 5353))
        self.assertEqual(manager.cache.negative_ttl, 60)
        self.assertEqual(len(manager.ldap_sources), 2)
        self.assertIsNone(manager.publisher)

    def test_order_is_respected_and_keyring_answers(self) -> None:
        manager = self.build({**TABLE, "order": ["dns", "keyring"]})
        self.assertEqual([g.name for g in manager.guards], ["dns", "keyring"])
        manager.keyring.import_certificates(ALICE.cert_pem())
        manager.guards[0].retry_at = float("inf")  # DNS backed off: it must not be asked
        result = self.successResultOf(manager.lookup("alice@example.org"))
        self.assertEqual((result.source, result.incomplete), ("keyring", True))
        self.assertEqual(manager.flush("alice@example.org"), 1)
        manager.reset_backoff()
        self.assertEqual(manager.guards[0].retry_at, 0.0)

    def test_missing_password_is_a_config_error(self) -> None:
        error = self.assertRaises(ConfigError, self.build, TABLE, {})
        self.assertEqual(error.path, "[directory.ldap] bind_password_env")

    def test_publisher_only_when_writable(self) -> None:
        config = parse_config({"directory": TABLE}, self.base).directory
        self.assertIsNone(build_publisher(config, {"GK_LDAP_PW": "pw"}))
        writable = parse_config({"directory": {**TABLE, "ldap": {**TABLE["ldap"], "writable": True}}}, self.base)
        self.assertIsInstance(build_publisher(writable.directory, {"GK_LDAP_PW": "pw"}), LdapPublisher)

    def test_paths_and_pool(self) -> None:
        self.assertEqual(keyring_path(KeysConfig(store=Path("/srv/keys"))), Path("/srv/keys/keyring"))
        config = parse_config({"directory": {"threads": 3}}, self.base).directory
        pool = make_threadpool(config)
        self.assertEqual((pool.max, pool.started), (3, False))

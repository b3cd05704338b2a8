"""Tests for the ``[directory]`` configuration (LDAP, external directories, DNS) and reading bind passwords."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.config import DirectoryConfig, LdapDirectoryConfig, parse_config
from gatekeeper.errors import ConfigError
from gatekeeper.keys.ldap import read_bind_password, search_filter

BASE = Path("/etc/gatekeeper")


def directory(table: dict[str, Any]) -> DirectoryConfig:
    config: DirectoryConfig = parse_config({"directory": table}, BASE).directory
    return config


LDAP = {"url": "ldaps://ldap.example.org", "base_dn": "ou=people,dc=example,dc=org"}


class DirectoryConfigTests(SynchronousTestCase):
    def assertConfigError(self, table: dict[str, Any], path: str, text: str) -> None:
        error = self.assertRaises(ConfigError, directory, table)
        self.assertEqual(error.path, path)
        self.assertIn(text, error.message)

    def test_defaults(self) -> None:
        config = directory({})
        self.assertEqual(config.order, ("keyring",))
        self.assertEqual(
            (config.cache_seconds, config.negative_cache_seconds, config.incomplete_cache_seconds), (3600, 300, 30)
        )
        self.assertEqual((config.timeout_seconds, config.backoff_seconds, config.backoff_max_seconds), (5, 5, 300))
        self.assertEqual(config.threads, 4)
        self.assertIsNone(config.ldap)
        self.assertIsNone(config.dns)

    def test_full_configuration(self) -> None:
        config = directory(
            {
                "timeout_seconds": 2,
                "ldap": {
                    **LDAP,
                    "bind_dn": "cn=gatekeeper,dc=example,dc=org",
                    "bind_password_file": "ldap.password",
                    "ca_file": "/etc/ssl/ldap-ca.pem",
                    "filter": "(&(objectClass=inetOrgPerson)(mail={address}))",
                    "writable": True,
                },
                "external": [
                    {
                        "name": "partner",
                        "url": "ldap://ldap.partner.example:3389",
                        "base_dn": "dc=partner,dc=example",
                        "domains": ["Partner.Example"],
                        "attributes": ["userCertificate;binary"],
                    }
                ],
                "dns": {"resolver": "127.0.0.53:53"},
            }
        )
        self.assertEqual(config.order, ("keyring", "ldap", "external", "dns"))
        ldap = config.ldap
        assert ldap is not None
        self.assertEqual((ldap.host, ldap.port, ldap.starttls), ("ldap.example.org", 636, False))
        self.assertEqual(ldap.bind_password_file, BASE / "ldap.password")
        self.assertEqual(ldap.attributes, ("userSMIMECertificate", "userCertificate;binary", "cACertificate;binary"))
        self.assertTrue(ldap.writable)
        (partner,) = config.external
        self.assertEqual(
            (partner.name, partner.host, partner.port, partner.starttls),
            ("partner", "ldap.partner.example", 3389, True),
        )
        self.assertEqual(partner.domains, ("partner.example",))
        self.assertEqual(partner.attributes, ("userCertificate;binary",))
        assert config.dns is not None
        self.assertEqual(config.dns.resolver, ("127.0.0.53", 53))

    def test_explicit_order(self) -> None:
        config = directory({"order": ["ldap", "keyring"], "ldap": LDAP})
        self.assertEqual(config.order, ("ldap", "keyring"))

    def test_order_names_an_unconfigured_source(self) -> None:
        self.assertConfigError(
            {"order": ["keyring", "ldap"]}, "[directory] order", "[directory.ldap] is not configured"
        )
        self.assertConfigError({"order": ["external"]}, "[directory] order", "[[directory.external]]")
        self.assertConfigError({"order": ["x500"]}, "[directory] order", "unknown key source")
        self.assertConfigError({"order": ["keyring", "keyring"]}, "[directory] order", "twice")

    def test_ldap_errors_name_the_setting(self) -> None:
        self.assertConfigError({"ldap": {**LDAP, "url": "http://x"}}, "[directory.ldap] url", "ldaps://")
        self.assertConfigError({"ldap": {**LDAP, "url": "ldap://x:99999"}}, "[directory.ldap] url", "bad port")
        self.assertConfigError({"ldap": {**LDAP, "base_dn": "people"}}, "[directory.ldap] base_dn", "DN")
        self.assertConfigError({"ldap": {**LDAP, "filter": "(mail=*)"}}, "[directory.ldap] filter", "{address}")
        self.assertConfigError(
            {"ldap": {**LDAP, "filter": "((mail={address})"}}, "[directory.ldap] filter", "unbalanced"
        )
        self.assertConfigError({"ldap": {**LDAP, "attributes": []}}, "[directory.ldap] attributes", "at least one")
        self.assertConfigError({"ldap": {**LDAP, "domains": ["a.example"]}}, "[directory.ldap] domains", "external")
        self.assertConfigError({"ldap": {**LDAP, "size_limit": 0}}, "[directory.ldap] size_limit", "at least 1")
        self.assertConfigError({"ldap": {**LDAP, "tls": True}}, "[directory.ldap] tls", "unknown setting")

    def test_password_never_in_the_file(self) -> None:
        error = self.assertRaises(
            ConfigError, directory, {"ldap": {**LDAP, "bind_dn": "cn=a,dc=b", "bind_password": "hunter2"}}
        )
        self.assertEqual(error.path, "[directory.ldap] bind_password")
        self.assertNotIn("hunter2", str(error))

    def test_password_settings(self) -> None:
        self.assertConfigError({"ldap": {**LDAP, "bind_password_env": "X"}}, "[directory.ldap] bind_dn", "no bind_dn")
        self.assertConfigError(
            {"ldap": {**LDAP, "bind_dn": "cn=a,dc=b", "bind_password_env": "X", "bind_password_file": "f"}},
            "[directory.ldap] bind_password_env",
            "not both",
        )
        self.assertConfigError(
            {"ldap": {**LDAP, "bind_dn": "cn=a,dc=b", "bind_password_env": "1X"}},
            "[directory.ldap] bind_password_env",
            "environment variable",
        )

    def test_external_errors(self) -> None:
        two = [{**LDAP, "name": "p"}, {**LDAP, "name": "p"}]
        self.assertConfigError({"external": two}, "[directory] external", "two external directories")
        self.assertConfigError({"external": [{**LDAP, "writable": True}]}, "[directory.external.0] writable", "only")
        self.assertConfigError({"external": [{**LDAP, "name": "a b"}]}, "[directory.external.0] name", "short name")
        self.assertConfigError({"external": {"url": "x"}}, "[directory] external", "[[directory.external]]")
        self.assertEqual(directory({"external": [LDAP]}).external[0].name, "external-1")

    def test_dns_resolver(self) -> None:
        self.assertEqual(directory({"dns": {"resolver": "[::1]:5353"}}).dns.resolver, ("::1", 5353))  # type: ignore[union-attr]
        self.assertEqual(directory({"dns": {"resolver": "127.0.0.1"}}).dns.resolver, ("127.0.0.1", 53))  # type: ignore[union-attr]
        self.assertConfigError({"dns": {"resolver": "resolver.example"}}, "[directory.dns] resolver", "IP:port")
        self.assertConfigError({"dns": {"resolver": "192.0.2.1:53"}}, "[directory.dns] resolver", "not a loopback")
        trusted = directory({"dns": {"resolver": "192.0.2.1:53", "resolver_trusted": True}}).dns
        assert trusted is not None
        self.assertEqual(trusted.resolver, ("192.0.2.1", 53))

    def test_backoff_bounds(self) -> None:
        self.assertConfigError(
            {"backoff_seconds": 10, "backoff_max_seconds": 5}, "[directory] backoff_max_seconds", "at least"
        )
        self.assertConfigError({"threads": 0}, "[directory] threads", "at least 1")


class BindPasswordTests(SynchronousTestCase):
    def config(self, **kwargs: Any) -> LdapDirectoryConfig:
        return LdapDirectoryConfig(name="ldap", url="ldaps://h", base_dn="dc=x", bind_dn="cn=r,dc=x", **kwargs)

    def test_from_file_without_the_newline(self) -> None:
        directory_path = Path(tempfile.mkdtemp(prefix="gk-pw-"))
        self.addCleanup(lambda: __import__("shutil").rmtree(directory_path))
        path = directory_path / "pw"
        path.write_text("s3cret \n")
        self.assertEqual(read_bind_password(self.config(bind_password_file=path)), "s3cret ")
        error = self.assertRaises(
            ConfigError, read_bind_password, self.config(bind_password_file=directory_path / "no")
        )
        self.assertEqual(error.path, "[directory.ldap] bind_password_file")

    def test_from_environment(self) -> None:
        config = self.config(bind_password_env="GK_TEST_PW")
        self.assertEqual(read_bind_password(config, {"GK_TEST_PW": "x"}), "x")
        error = self.assertRaises(ConfigError, read_bind_password, config, {})
        self.assertIn("GK_TEST_PW is not set", str(error))
        self.assertIsNone(read_bind_password(self.config()))

    def test_filter_escaping(self) -> None:
        self.assertEqual(search_filter("(mail={address})", "a*b(c)d\\e@x.org"), "(mail=a\\2ab\\28c\\29d\\5ce@x.org)")
        self.assertEqual(
            search_filter("(|(mail={address})(mailAlternateAddress={address}))", "*@x.org"),
            "(|(mail=\\2a@x.org)(mailAlternateAddress=\\2a@x.org))",
        )

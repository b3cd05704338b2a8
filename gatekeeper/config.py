"""Gatekeeper's configuration: one TOML file, one frozen attrs class per section.

The file is parsed once (:func:`load_config`) and every problem becomes a
:class:`~gatekeeper.errors.ConfigError` naming the setting, e.g.::

    [upstream] imap: expected an endpoint like "tls:mail.example.org:993", got 'imap.example.org'

Relative paths are relative to the directory of the file itself, so a copied
configuration with its own ``keys/`` works anywhere. Unknown sections and settings are
errors too: a misspelt setting silently falling back to its default is how gateways end
up sending mail in the clear.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from gatekeeper.address import normalize_address
from gatekeeper.errors import ConfigError, InvalidAddress

T = TypeVar("T")

DEFAULT_CONFIG_PATH = "etc/gatekeeper.toml"
MIN_KDF_ITERATIONS = 600_000
KEY_TYPES = ("rsa2048", "rsa3072", "rsa4096", "p256", "p384")


# -- values ------------------------------------------------------------------------


@attrs.frozen
class UpstreamEndpoint:
    """Where and how to reach an upstream server.

    ``security`` is ``"tls"`` (implicit TLS), ``"starttls"`` (plain connect, then
    STARTTLS/STLS, refused if the server does not offer it) or ``"tcp"`` (no TLS; only
    accepted for loopback addresses).
    """

    security: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.security}:{self.host}:{self.port}"


_SERVER_ENDPOINT_RE = re.compile(r"^(tcp|tcp6|unix|systemd):\S*$")
_PORT_RE = re.compile(r"^\d{1,5}$")


def parse_server_endpoint(description: str) -> str:
    """Check a Twisted server endpoint string (``tcp:587:interface=127.0.0.1``).

    Returns it unchanged; raises :class:`ValueError` with the reason when it is not
    usable. TLS is added by Gatekeeper itself (from ``[tls]``), so ``ssl:`` endpoints
    are refused rather than silently given a second certificate.
    """
    if not _SERVER_ENDPOINT_RE.match(description):
        raise ValueError('expected a server endpoint like "tcp:587" or "tcp:587:interface=127.0.0.1"')
    kind, _, rest = description.partition(":")
    if kind in ("tcp", "tcp6"):
        fields = rest.split(":")
        port = fields[0]
        if port.startswith("port="):
            port = port[len("port=") :]
        if not _PORT_RE.match(port) or not 0 <= int(port) <= 65535:
            raise ValueError("expected a port number between 0 and 65535")
        for field in fields[1:]:
            key, eq, value = field.partition("=")
            if not eq or key not in ("interface", "backlog"):
                raise ValueError(f"unknown option {key!r} (known: interface, backlog)")
            if key == "interface":
                try:
                    ipaddress.ip_address(value.replace("\\:", ":"))
                except ValueError:
                    raise ValueError("the interface must be an IP address") from None
    return description


def server_endpoint_interface(description: str) -> str | None:
    """Return the ``interface=`` address of a tcp endpoint string, if any."""
    for field in description.split(":")[2:]:
        key, _, value = field.partition("=")
        if key == "interface":
            return value.replace("\\:", ":")
    return None


def parse_upstream_endpoint(description: str) -> UpstreamEndpoint:
    """Parse ``tls:HOST:PORT``, ``starttls:HOST:PORT`` or ``tcp:HOST:PORT``."""
    security, _, rest = description.partition(":")
    host, _, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if security not in ("tls", "starttls", "tcp") or not host or not _PORT_RE.match(port):
        raise ValueError("bad endpoint")
    port_number = int(port)
    if not 1 <= port_number <= 65535:
        raise ValueError("bad port")
    if security == "tcp" and not _is_loopback(host):
        raise ValueError("plain tcp upstreams are only allowed on loopback; use tls: or starttls:")
    return UpstreamEndpoint(security, host, port_number)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the reader ----------------------------------------------------------------------


class _Section:
    """Reads typed settings out of one TOML table and remembers which were used."""

    def __init__(self, name: str, table: Mapping[str, Any], base_dir: Path) -> None:
        self.name = name
        self.table = table
        self.base_dir = base_dir
        self.used: set[str] = set()

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, f"[{self.name}] {key}")

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        return self.table.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.table

    def string(self, key: str, default: str) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_shown(value)}")
        return value

    def optional_string(self, key: str) -> str | None:
        value = self._get(key, None)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_shown(value)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_shown(value)}")
        return value

    def integer(self, key: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected a whole number, got {_shown(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"must be at most {maximum}, got {value}")
        return value

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {_shown(value)}")
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        return float(value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {_shown(value)}")
        return value

    def string_list(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(key, f"expected a list of strings, got {_shown(value)}")
        return tuple(value)

    def path(self, key: str, default: str) -> Path:
        return self.resolve(key, self.string(key, default))

    def optional_path(self, key: str) -> Path | None:
        value = self.optional_string(key)
        return None if value is None or value == "" else self.resolve(key, value)

    def resolve(self, key: str, value: str) -> Path:
        if not value:
            raise self.fail(key, "expected a path, got an empty string")
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else (self.base_dir / path)

    def listener(self, key: str, default: str) -> str:
        """A server endpoint string; an empty string disables the listener."""
        value = self.string(key, default)
        if value == "":
            return value
        try:
            return parse_server_endpoint(value)
        except ValueError as error:
            raise self.fail(key, f"{error}, got {_shown(value)}") from None

    def upstream(self, key: str, example: str) -> UpstreamEndpoint | None:
        value = self.optional_string(key)
        if value is None or value == "":
            return None
        try:
            return parse_upstream_endpoint(value)
        except ValueError as error:
            detail = str(error)
            if detail in ("bad endpoint", "bad port"):
                detail = f'expected an endpoint like "{example}"'
            raise self.fail(key, f"{detail}, got {_shown(value)}") from None

    def address(self, key: str, value: str) -> str:
        try:
            return normalize_address(value)
        except InvalidAddress as error:
            raise self.fail(key, str(error)) from None

    def table_of(self, key: str) -> Mapping[str, Any]:
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a table, got {_shown(value)}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise self.fail(unknown[0], f"unknown setting (known: {known})")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- sections ------------------------------------------------------------------------


@attrs.frozen
class ServerConfig:
    """``[server]``: who the gateway is and which domains are its own (the secure domain)."""

    hostname: str = "localhost"
    domains: tuple[str, ...] = ()

    @classmethod
    def read(cls, section: _Section) -> ServerConfig:
        """Read this section, naming the setting in any error."""
        hostname = section.string("hostname", "localhost")
        if not re.match(r"^[A-Za-z0-9.-]+$", hostname):
            raise section.fail("hostname", f"expected a host name, got {_shown(hostname)}")
        domains = []
        for domain in section.string_list("domains"):
            domains.append(section.address("domains", f"postmaster@{domain}").partition("@")[2])
        return cls(hostname=hostname, domains=tuple(domains))


@attrs.frozen
class ListenerConfig:
    """The two listeners of a mail protocol: STARTTLS on the plain port, implicit TLS on the other.

    An empty endpoint string disables that listener.
    """

    starttls: str
    tls: str

    @classmethod
    def read(cls, section: _Section, starttls_port: int, tls_port: int) -> ListenerConfig:
        """Read this section, naming the setting in any error."""
        return cls(
            starttls=section.listener("starttls", f"tcp:{starttls_port}"),
            tls=section.listener("tls", f"tcp:{tls_port}"),
        )


@attrs.frozen
class SmtpConfig:
    """``[smtp]``: the submission listeners (587 STARTTLS, 465 implicit TLS) and their limits.

    A message larger than ``spool_threshold`` bytes is written to a private temporary
    file in ``spool_directory`` (default: the system's temporary directory) while it is
    received and protected, and deleted when the transaction ends.
    """

    listen: ListenerConfig = ListenerConfig("tcp:587", "tcp:465")
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    spool_threshold: int = 1024 * 1024
    spool_directory: Path | None = None

    @classmethod
    def read(cls, section: _Section) -> SmtpConfig:
        """Read this section, naming the setting in any error."""
        return cls(
            listen=ListenerConfig.read(section, 587, 465),
            max_message_size=section.integer("max_message_size", 50 * 1024 * 1024, minimum=1024),
            max_recipients=section.integer("max_recipients", 100, minimum=1, maximum=10_000),
            spool_threshold=section.integer("spool_threshold", 1024 * 1024, minimum=0),
            spool_directory=section.optional_path("spool_directory"),
        )


@attrs.frozen
class Pop3Config:
    """``[pop3]``: POP3 with STLS (110) and POP3S (995).

    ``cache_bytes`` bounds the revealed (decrypted) messages one session keeps in memory,
    so that a client listing sizes before it retrieves does not have everything
    decrypted twice; nothing revealed is ever written to disk.
    """

    listen: ListenerConfig = ListenerConfig("tcp:110", "tcp:995")
    cache_bytes: int = 32 * 1024 * 1024

    @classmethod
    def read(cls, section: _Section) -> Pop3Config:
        """Read this section, naming the setting in any error."""
        return cls(
            listen=ListenerConfig.read(section, 110, 995),
            cache_bytes=section.integer("cache_bytes", 32 * 1024 * 1024, minimum=0),
        )


@attrs.frozen
class ImapConfig:
    """``[imap]``: IMAP with STARTTLS (143) and IMAPS (993), and the proxy's limits.

    ``cache_bytes`` bounds each user's in-memory cache of revealed (decrypted) messages,
    kept ``cache_linger_seconds`` after the user's last session; ``encrypt_folders``
    names the mailboxes whose appended messages are encrypted to the user's own
    certificate before they are stored (e.g. ``["Sent", "Drafts"]``); without IDLE
    upstream, a client in IDLE is updated by polling every ``idle_poll_seconds``.
    """

    listen: ListenerConfig = ListenerConfig("tcp:143", "tcp:993")
    cache_bytes: int = 64 * 1024 * 1024
    cache_linger_seconds: float = 300.0
    encrypt_folders: tuple[str, ...] = ()
    idle_poll_seconds: float = 30.0
    max_append_size: int = 50 * 1024 * 1024

    @classmethod
    def read(cls, section: _Section) -> ImapConfig:
        """Read this section, naming the setting in any error."""
        return cls(
            listen=ListenerConfig.read(section, 143, 993),
            cache_bytes=section.integer("cache_bytes", 64 * 1024 * 1024, minimum=0),
            cache_linger_seconds=section.number("cache_linger_seconds", 300.0),
            encrypt_folders=section.string_list("encrypt_folders"),
            idle_poll_seconds=section.number("idle_poll_seconds", 30.0, minimum=1.0),
            max_append_size=section.integer("max_append_size", 50 * 1024 * 1024, minimum=1024),
        )


@attrs.frozen
class TlsConfig:
    """``[tls]``: the certificate clients see, and whether loopback may skip TLS.

    ``allow_plaintext_on_loopback`` lets AUTH/LOGIN happen without TLS, but only for
    connections from a loopback address (a local webmail or a test); everyone else must
    use TLS before any password is sent.
    """

    certificate: Path
    key: Path
    allow_plaintext_on_loopback: bool = False

    @classmethod
    def read(cls, section: _Section) -> TlsConfig:
        """Read this section, naming the setting in any error."""
        return cls(
            certificate=section.path("certificate", "keys/tls/server.crt"),
            key=section.path("key", "keys/tls/server.key"),
            allow_plaintext_on_loopback=section.boolean("allow_plaintext_on_loopback", False),
        )


@attrs.frozen
class LocalStoreConfig:
    """``[upstream.store]``: the embedded mail store, used when no upstream server is configured.

    ``data_dir`` holds each user's folders (Maildirs) and index; ``quota_bytes`` and
    ``quota_messages`` limit each user over all folders (0: no limit).
    """

    data_dir: Path = Path("mail")
    quota_bytes: int = 0
    quota_messages: int = 0

    @classmethod
    def read(cls, section: _Section) -> LocalStoreConfig:
        """Read this table, naming the setting in any error."""
        return cls(
            data_dir=section.path("data_dir", "mail"),
            quota_bytes=section.integer("quota_bytes", 0, minimum=0),
            quota_messages=section.integer("quota_messages", 0, minimum=0),
        )


@attrs.frozen
class UpstreamConfig:
    """``[upstream]``: the real mail server; all three unset means the embedded local store.

    SMTP relaying may log in to the upstream server as ``smtp_user`` (only over TLS) with
    the password from ``smtp_password_file`` or ``smtp_password_env``; up to
    ``smtp_connections`` idle connections are kept for reuse. With ``verify_recipients``
    every ``RCPT TO`` is first asked of the upstream server, so a recipient it refuses
    is refused to the client at once. With the embedded store, ``smarthost`` is where
    mail for other domains is relayed (the same SMTP settings apply to it); without it,
    such recipients are refused.
    """

    smtp: UpstreamEndpoint | None = None
    pop3: UpstreamEndpoint | None = None
    imap: UpstreamEndpoint | None = None
    ca_file: Path | None = None
    timeout_seconds: float = 30.0
    pass_through: bool = True
    smtp_user: str | None = None
    smtp_password_file: Path | None = None
    smtp_password_env: str | None = None
    smtp_connections: int = 10
    verify_recipients: bool = True
    store: LocalStoreConfig = LocalStoreConfig()
    smarthost: UpstreamEndpoint | None = None

    @property
    def embedded(self) -> bool:
        """True when Gatekeeper is its own mail system (no upstream configured)."""
        return self.smtp is None and self.pop3 is None and self.imap is None

    @classmethod
    def read(cls, section: _Section) -> UpstreamConfig:
        """Read this section, naming the setting in any error."""
        mode = section.choice("mode", "proxy", ("proxy", "embedded"))
        smtp = section.upstream("smtp", "starttls:mail.example.org:587")
        smarthost = section.upstream("smarthost", "starttls:relay.example.net:587")
        pop3 = section.upstream("pop3", "tls:mail.example.org:995")
        imap = section.upstream("imap", "tls:mail.example.org:993")
        ca_file = section.optional_path("ca_file")
        timeout = section.number("timeout_seconds", 30.0, minimum=1.0)
        pass_through = section.boolean("pass_through", True)
        smtp_user = section.optional_string("smtp_user") or None
        password_file = section.optional_path("smtp_password_file")
        password_env = section.optional_string("smtp_password_env") or None
        if section.has("smtp_password"):
            raise section.fail(
                "smtp_password",
                "passwords are not kept in the configuration file: use smtp_password_file or smtp_password_env",
            )
        if password_env is not None and not _ENV_NAME_RE.match(password_env):
            raise section.fail(
                "smtp_password_env", f"expected an environment variable name, got {_shown(password_env)}"
            )
        if password_file is not None and password_env is not None:
            raise section.fail("smtp_password_env", "set smtp_password_file or smtp_password_env, not both")
        if (password_file or password_env) and smtp_user is None:
            raise section.fail("smtp_user", "an SMTP password is configured but no smtp_user")
        if smtp_user is not None and not (password_file or password_env):
            raise section.fail("smtp_user", "set smtp_password_file or smtp_password_env for it")
        if smtp_user is not None and smtp is not None and smtp.security == "tcp":
            raise section.fail("smtp_user", "a password is only sent over TLS: use a tls: or starttls: smtp endpoint")
        if smtp_user is not None and smarthost is not None and smarthost.security == "tcp":
            raise section.fail("smtp_user", "a password is only sent over TLS: use a tls: or starttls: smarthost")
        connections = section.integer("smtp_connections", 10, minimum=0, maximum=100)
        verify = section.boolean("verify_recipients", True)
        store_table = _Section(f"{section.name}.store", section.table_of("store"), section.base_dir)
        store = LocalStoreConfig.read(store_table)
        store_table.finish()
        configured = [name for name, value in (("smtp", smtp), ("pop3", pop3), ("imap", imap)) if value]
        if mode == "embedded" or not configured:
            return cls(
                ca_file=ca_file,
                timeout_seconds=timeout,
                smtp_user=smtp_user,
                smtp_password_file=password_file,
                smtp_password_env=password_env,
                smtp_connections=connections,
                verify_recipients=verify,
                pass_through=pass_through,
                store=store,
                smarthost=smarthost,
            )
        if len(configured) != 3:
            missing = sorted({"smtp", "pop3", "imap"} - set(configured))[0]
            raise section.fail(missing, "set smtp, pop3 and imap together (or none, for the embedded store)")
        if smarthost is not None:
            raise section.fail("smarthost", "only used by the embedded store: with smtp set, mail goes there")
        return cls(
            smtp=smtp,
            pop3=pop3,
            imap=imap,
            ca_file=ca_file,
            timeout_seconds=timeout,
            smtp_user=smtp_user,
            smtp_password_file=password_file,
            smtp_password_env=password_env,
            smtp_connections=connections,
            verify_recipients=verify,
            pass_through=pass_through,
            store=store,
        )


@attrs.frozen
class KeysConfig:
    """``[keys]``: the key store, the built-in CA and how user keys are made and unlocked."""

    store: Path
    kdf_iterations: int = MIN_KDF_ITERATIONS
    key_type: str = "rsa3072"
    certificate_days: int = 730
    ca_days: int = 3650
    ca_passphrase_file: Path | None = None
    ca_passphrase_env: str | None = None
    unlock_cache_seconds: float = 300.0
    kdf_workers: int = 0

    @classmethod
    def read(cls, section: _Section) -> KeysConfig:
        """Read this section, naming the setting in any error."""
        store = section.path("store", "keys")
        passphrase_env = section.optional_string("ca_passphrase_env")
        if passphrase_env is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", passphrase_env):
            raise section.fail(
                "ca_passphrase_env", f"expected an environment variable name, got {_shown(passphrase_env)}"
            )
        return cls(
            store=store,
            kdf_iterations=section.integer("kdf_iterations", MIN_KDF_ITERATIONS, minimum=MIN_KDF_ITERATIONS),
            key_type=section.choice("key_type", "rsa3072", KEY_TYPES),
            certificate_days=section.integer("certificate_days", 730, minimum=1, maximum=3650),
            ca_days=section.integer("ca_days", 3650, minimum=30, maximum=36500),
            ca_passphrase_file=section.optional_path("ca_passphrase_file"),
            ca_passphrase_env=passphrase_env,
            unlock_cache_seconds=section.number("unlock_cache_seconds", 300.0),
            kdf_workers=section.integer("kdf_workers", 0, minimum=0, maximum=256),
        )


@attrs.frozen
class LoginConfig:
    """``[login]``: throttling of failed logins (per user and per client address)."""

    free_failures: int = 3
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    forget_after_seconds: float = 3600.0

    @classmethod
    def read(cls, section: _Section) -> LoginConfig:
        """Read this section, naming the setting in any error."""
        return cls(
            free_failures=section.integer("free_failures", 3, minimum=0),
            backoff_base_seconds=section.number("backoff_base_seconds", 1.0),
            backoff_max_seconds=section.number("backoff_max_seconds", 300.0),
            forget_after_seconds=section.number("forget_after_seconds", 3600.0, minimum=1.0),
        )


LDAP_ATTRIBUTES = ("userSMIMECertificate", "userCertificate;binary", "cACertificate;binary")
KEY_SOURCES = ("keyring", "ldap", "external", "dns")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LDAP_URL_RE = re.compile(r"^(ldaps?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?/?$")
_DN_RE = re.compile(r"^[^=]+=.*$")


@attrs.frozen
class LdapDirectoryConfig:
    """One LDAP directory: ``[directory.ldap]`` (the organisation's PKI) or a ``[[directory.external]]``.

    ``url`` is ``ldaps://host[:port]`` (implicit TLS) or ``ldap://host[:port]``, which
    always upgrades with StartTLS: the server certificate is verified against
    ``ca_file`` (or the system's CAs) and must name ``host`` or ``tls_name``. A
    directory is never asked in the clear. ``filter`` contains ``{address}``, which is
    replaced by the recipient address with LDAP filter escaping. ``domains`` restricts
    the directory to recipients in those domains (and their subdomains); empty means
    every recipient. ``writable`` lets ``user add``/``rotate``/``delete`` publish to it.
    The bind password is read from ``bind_password_file`` or ``bind_password_env``.
    """

    name: str
    url: str
    base_dn: str
    filter: str = "(mail={address})"
    attributes: tuple[str, ...] = LDAP_ATTRIBUTES
    bind_dn: str | None = None
    bind_password_file: Path | None = None
    bind_password_env: str | None = None
    ca_file: Path | None = None
    tls_name: str | None = None
    domains: tuple[str, ...] = ()
    writable: bool = False
    size_limit: int = 20

    @property
    def host(self) -> str:
        """The server's host name or IP address, from ``url``."""
        match = _LDAP_URL_RE.match(self.url)
        assert match is not None
        return match.group(2).strip("[]")

    @property
    def port(self) -> int:
        """The server's port, from ``url`` (636 for ldaps, 389 for ldap)."""
        match = _LDAP_URL_RE.match(self.url)
        assert match is not None
        return int(match.group(3)) if match.group(3) else (636 if match.group(1) == "ldaps" else 389)

    @property
    def starttls(self) -> bool:
        """True for ``ldap://`` URLs (StartTLS), False for ``ldaps://``."""
        return self.url.startswith("ldap://")

    @classmethod
    def read(cls, section: _Section, name: str, *, external: bool) -> LdapDirectoryConfig:
        """Read one directory's table, naming the setting in any error."""
        url = section.string("url", "")
        match = _LDAP_URL_RE.match(url)
        if not match:
            raise section.fail(
                "url", f'expected "ldaps://host[:port]" or "ldap://host[:port]" (StartTLS), got {_shown(url)}'
            )
        if match.group(3) and not 1 <= int(match.group(3)) <= 65535:
            raise section.fail("url", f"bad port in {_shown(url)}")
        base_dn = section.string("base_dn", "")
        if not _DN_RE.match(base_dn):
            raise section.fail("base_dn", f'expected a DN like "ou=people,dc=example,dc=org", got {_shown(base_dn)}')
        template = section.string("filter", "(mail={address})")
        if "{address}" not in template or not (template.startswith("(") and template.endswith(")")):
            raise section.fail("filter", f"expected an LDAP filter containing {{address}}, got {_shown(template)}")
        if template.count("(") != template.count(")"):
            raise section.fail("filter", f"unbalanced parentheses in {_shown(template)}")
        attributes = section.string_list("attributes", LDAP_ATTRIBUTES)
        if not attributes:
            raise section.fail("attributes", "name at least one attribute holding certificates")
        bind_dn = section.optional_string("bind_dn") or None
        if bind_dn is not None and not _DN_RE.match(bind_dn):
            raise section.fail(
                "bind_dn", f'expected a DN like "cn=gatekeeper,dc=example,dc=org", got {_shown(bind_dn)}'
            )
        password_file = section.optional_path("bind_password_file")
        password_env = section.optional_string("bind_password_env") or None
        if password_env is not None and not _ENV_NAME_RE.match(password_env):
            raise section.fail(
                "bind_password_env", f"expected an environment variable name, got {_shown(password_env)}"
            )
        if password_file is not None and password_env is not None:
            raise section.fail("bind_password_env", "set bind_password_file or bind_password_env, not both")
        if (password_file or password_env) and bind_dn is None:
            raise section.fail("bind_dn", "a bind password is configured but no bind_dn")
        if section.has("bind_password"):
            raise section.fail(
                "bind_password",
                "passwords are not kept in the configuration file: use bind_password_file or bind_password_env",
            )
        domains = []
        for domain in section.string_list("domains"):
            domains.append(section.address("domains", f"postmaster@{domain}").partition("@")[2])
        if domains and not external:
            raise section.fail("domains", "only external directories are restricted to domains")
        writable = section.boolean("writable", False)
        if writable and external:
            raise section.fail("writable", "only [directory.ldap] (the organisation's directory) can be written")
        if external:
            name = section.string("name", name)
            if not re.match(r"^[A-Za-z0-9_.-]{1,40}$", name):
                raise section.fail("name", f"expected a short name (letters, digits, ._-), got {_shown(name)}")
        tls_name = section.optional_string("tls_name") or None
        return cls(
            name=name,
            url=url,
            base_dn=base_dn,
            filter=template,
            attributes=attributes,
            bind_dn=bind_dn,
            bind_password_file=password_file,
            bind_password_env=password_env,
            ca_file=section.optional_path("ca_file"),
            tls_name=tls_name,
            domains=tuple(domains),
            writable=writable,
            size_limit=section.integer("size_limit", 20, minimum=1, maximum=1000),
        )


@attrs.frozen
class DnsDirectoryConfig:
    """``[directory.dns]``: SMIMEA (RFC 8162) lookups through a validating resolver.

    Answers are used only when the resolver sets the AD (authenticated data) bit, so
    the resolver must validate DNSSEC and the path to it must be trusted: a loopback
    address, unless ``resolver_trusted = true`` says the network path is protected.
    """

    resolver: tuple[str, int] = ("127.0.0.1", 53)
    resolver_trusted: bool = False

    @classmethod
    def read(cls, section: _Section) -> DnsDirectoryConfig:
        """Read this table, naming the setting in any error."""
        text = section.string("resolver", "127.0.0.1:53")
        host, port = text, "53"
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest:
                port = rest[1:] if rest.startswith(":") else "bad"
        elif text.count(":") == 1:
            host, _, port = text.partition(":")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise section.fail("resolver", f'expected "IP:port" of a validating resolver, got {_shown(text)}') from None
        if not _PORT_RE.match(port) or not 1 <= int(port) <= 65535:
            raise section.fail("resolver", f"bad port in {_shown(text)}")
        trusted = section.boolean("resolver_trusted", False)
        if not address.is_loopback and not trusted:
            raise section.fail(
                "resolver",
                f"{_shown(text)} is not a loopback address: the AD bit can be forged on the way; "
                "use a local validating resolver or set resolver_trusted = true",
            )
        return cls(resolver=(str(address), int(port)), resolver_trusted=trusted)


@attrs.frozen
class DirectoryConfig:
    """``[directory]``: how recipients' certificates are discovered (the key manager).

    ``order`` lists the key sources asked, first to last (default: the key ring, then
    every source configured below). Answers are cached for ``cache_seconds`` when a
    certificate was found, ``negative_cache_seconds`` when none was, and
    ``incomplete_cache_seconds`` when a source could not be asked. Each source has
    ``timeout_seconds`` to answer; one that failed is skipped for ``backoff_seconds``,
    doubling up to ``backoff_max_seconds``. ``threads`` bounds the LDAP thread pool.
    The key ring itself is kept in the key store (``<[keys] store>/keyring``).
    """

    order: tuple[str, ...] = ("keyring",)
    cache_seconds: float = 3600.0
    negative_cache_seconds: float = 300.0
    timeout_seconds: float = 5.0
    incomplete_cache_seconds: float = 30.0
    backoff_seconds: float = 5.0
    backoff_max_seconds: float = 300.0
    threads: int = 4
    ldap: LdapDirectoryConfig | None = None
    external: tuple[LdapDirectoryConfig, ...] = ()
    dns: DnsDirectoryConfig | None = None

    @classmethod
    def read(cls, section: _Section) -> DirectoryConfig:
        """Read this section and its ``ldap``, ``external`` and ``dns`` tables, naming the setting in any error."""
        ldap = None
        if section.has("ldap"):
            sub = _Section(f"{section.name}.ldap", section.table_of("ldap"), section.base_dir)
            ldap = LdapDirectoryConfig.read(sub, "ldap", external=False)
            sub.finish()
        external = []
        tables = section._get("external", [])
        if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
            raise section.fail("external", f"expected [[directory.external]] tables, got {_shown(tables)}")
        for index, table in enumerate(tables):
            sub = _Section(f"{section.name}.external.{index}", table, section.base_dir)
            external.append(LdapDirectoryConfig.read(sub, f"external-{index + 1}", external=True))
            sub.finish()
        names = [directory.name for directory in external]
        if len(set(names)) != len(names):
            raise section.fail("external", f"two external directories are named {_shown(sorted(names)[0])}")
        dns = None
        if section.has("dns"):
            sub = _Section(f"{section.name}.dns", section.table_of("dns"), section.base_dir)
            dns = DnsDirectoryConfig.read(sub)
            sub.finish()
        configured = {"keyring": True, "ldap": ldap is not None, "external": bool(external), "dns": dns is not None}
        default_order = tuple(source for source in KEY_SOURCES if configured[source])
        order = section.string_list("order", default_order)
        for source in order:
            if source not in KEY_SOURCES:
                raise section.fail("order", f"unknown key source {_shown(source)} (known: {', '.join(KEY_SOURCES)})")
            if not configured[source]:
                table = "[[directory.external]]" if source == "external" else f"[directory.{source}]"
                raise section.fail("order", f"{_shown(source)} is listed but {table} is not configured")
        if len(set(order)) != len(order):
            raise section.fail("order", "a key source is listed twice")
        backoff = section.number("backoff_seconds", 5.0, minimum=0.1)
        backoff_max = section.number("backoff_max_seconds", 300.0, minimum=0.1)
        if backoff_max < backoff:
            raise section.fail("backoff_max_seconds", f"must be at least backoff_seconds ({backoff})")
        return cls(
            order=order,
            cache_seconds=section.number("cache_seconds", 3600.0),
            negative_cache_seconds=section.number("negative_cache_seconds", 300.0),
            timeout_seconds=section.number("timeout_seconds", 5.0, minimum=0.1),
            incomplete_cache_seconds=section.number("incomplete_cache_seconds", 30.0),
            backoff_seconds=backoff,
            backoff_max_seconds=backoff_max,
            threads=section.integer("threads", 4, minimum=1, maximum=64),
            ldap=ldap,
            external=tuple(external),
            dns=dns,
        )


ENCRYPTION_RULES = ("opportunistic", "mandatory")
SIGN_RULES = ("always", "never")


@attrs.frozen
class PolicyRule:
    """One entry of ``[policy.domains]`` or ``[policy.addresses]``.

    ``target`` is a normalised domain (which covers its subdomains too) or address;
    ``encryption`` and ``sign`` are None where the entry leaves the setting to the
    next less specific rule.
    """

    target: str
    encryption: str | None = None
    sign: str | None = None


@attrs.frozen
class PolicyConfig:
    """``[policy]``: when encryption is mandatory, when mail is signed, who may send as whom.

    ``default`` and ``sign`` apply to every recipient no rule names; ``domains`` and
    ``addresses`` are rules for recipients (an address rule wins over a domain rule, a
    longer domain over a shorter one). Each is written ``"partner.example" =
    "mandatory"`` or ``"partner.example" = { encryption = "mandatory", sign = "never" }``.
    ``sender_aliases`` lists, per user, the other ``MAIL FROM`` addresses the user may
    send as; ``outbound_header`` adds ``X-Gatekeeper-Outbound`` to relayed mail.
    """

    default: str = "opportunistic"
    sign: str = "always"
    domains: tuple[PolicyRule, ...] = ()
    addresses: tuple[PolicyRule, ...] = ()
    sender_aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()
    outbound_header: bool = False

    @classmethod
    def read(cls, section: _Section) -> PolicyConfig:
        """Read this section and its ``domains``, ``addresses`` and ``sender_aliases`` tables."""
        domains = []
        for domain, value in section.table_of("domains").items():
            target = section.address("domains", f"postmaster@{domain}").partition("@")[2]
            domains.append(_policy_rule(section, "domains", domain, target, value))
        addresses = []
        for address, value in section.table_of("addresses").items():
            addresses.append(_policy_rule(section, "addresses", address, section.address("addresses", address), value))
        aliases = []
        for user, value in section.table_of("sender_aliases").items():
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise section.fail("sender_aliases", f"{user}: expected a list of addresses, got {_shown(value)}")
            aliases.append(
                (
                    section.address("sender_aliases", user),
                    tuple(section.address("sender_aliases", item) for item in value),
                )
            )
        return cls(
            default=section.choice("default", "opportunistic", ENCRYPTION_RULES),
            sign=section.choice("sign", "always", SIGN_RULES),
            domains=tuple(domains),
            addresses=tuple(addresses),
            sender_aliases=tuple(aliases),
            outbound_header=section.boolean("outbound_header", False),
        )


def _policy_rule(section: _Section, table: str, name: str, target: str, value: Any) -> PolicyRule:
    """One rule: ``"mandatory"`` or ``{ encryption = "...", sign = "..." }``."""
    where = f"{table}: {name}"
    if isinstance(value, str):
        value = {"encryption": value}
    if not isinstance(value, dict) or not value:
        raise section.fail(where, f'expected "mandatory", "opportunistic" or a table, got {_shown(value)}')
    unknown = sorted(set(value) - {"encryption", "sign"})
    if unknown:
        raise section.fail(where, f"unknown setting {unknown[0]!r} (known: encryption, sign)")
    encryption, sign = value.get("encryption"), value.get("sign")
    if encryption is not None and encryption not in ENCRYPTION_RULES:
        choices = ", ".join(ENCRYPTION_RULES)
        raise section.fail(where, f"encryption: expected one of {choices}, got {_shown(encryption)}")
    if sign is not None and sign not in SIGN_RULES:
        raise section.fail(where, f"sign: expected one of {', '.join(SIGN_RULES)}, got {_shown(sign)}")
    return PolicyRule(target=target, encryption=encryption, sign=sign)


def loopback_by_default(description: str) -> str:
    """Bind a ``tcp:``/``tcp6:`` endpoint without ``interface=`` to loopback (admin listeners)."""
    kind = description.partition(":")[0]
    if kind not in ("tcp", "tcp6") or server_endpoint_interface(description) is not None:
        return description
    return description + (":interface=127.0.0.1" if kind == "tcp" else ":interface=\\:\\:1")


@attrs.frozen
class AdminConfig:
    """``[admin]``: the administrative interfaces (all off unless given an endpoint) and the audit log.

    ``manhole`` (the SSH console, public-key login against ``authorized_keys``) and
    ``metrics`` (Prometheus over HTTP) listen on loopback unless their endpoint names an
    ``interface=``. ``audit_log`` defaults to ``audit.log`` in the key store.
    ``check_user`` with ``check_password_file``/``check_password_env`` is the test
    account ``gatekeeper check`` logs in to upstream with.
    ``web`` is the administration page (HTTPS with the ``[tls]`` certificate, loopback
    unless it names an ``interface=``); its administrators are in ``web_admins`` (default
    ``web-admins.json`` in the key store, written by ``gatekeeper admin add``), and a
    session ends after ``web_idle_minutes`` without a request.
    """

    manhole: str = ""
    authorized_keys: Path | None = None
    metrics: str = ""
    audit_log: Path | None = None
    check_user: str | None = None
    check_password_file: Path | None = None
    check_password_env: str | None = None
    web: str = ""
    web_admins: Path | None = None
    web_idle_minutes: int = 15

    @classmethod
    def read(cls, section: _Section) -> AdminConfig:
        """Read this section, naming the setting in any error."""
        manhole = loopback_by_default(section.listener("manhole", ""))
        authorized_keys = section.optional_path("authorized_keys")
        if manhole and authorized_keys is None:
            raise section.fail("authorized_keys", "the manhole needs an authorized-keys file (public-key login only)")
        if section.has("check_password"):
            raise section.fail(
                "check_password",
                "passwords are not kept in the configuration file: use check_password_file or check_password_env",
            )
        check_user = section.optional_string("check_user") or None
        password_file = section.optional_path("check_password_file")
        password_env = section.optional_string("check_password_env") or None
        if password_env is not None and not _ENV_NAME_RE.match(password_env):
            raise section.fail(
                "check_password_env", f"expected an environment variable name, got {_shown(password_env)}"
            )
        if password_file is not None and password_env is not None:
            raise section.fail("check_password_env", "set check_password_file or check_password_env, not both")
        if (password_file is None and password_env is None) != (check_user is None):
            raise section.fail("check_user", "set check_user together with check_password_file or check_password_env")
        return cls(
            manhole=manhole,
            authorized_keys=authorized_keys,
            metrics=loopback_by_default(section.listener("metrics", "")),
            audit_log=section.optional_path("audit_log"),
            check_user=check_user,
            check_password_file=password_file,
            check_password_env=password_env,
            web=loopback_by_default(section.listener("web", "")),
            web_admins=section.optional_path("web_admins"),
            web_idle_minutes=section.integer("web_idle_minutes", 15, minimum=1, maximum=24 * 60),
        )


@attrs.frozen
class TrustConfig:
    """``[trust]``: the certification authorities whose certificates are trusted, and local CRLs.

    ``anchors`` are PEM/DER files (a PEM file may hold several certificates),
    ``anchor_dirs`` directories of such files; the built-in CA is trusted in addition.
    ``system_anchors`` adds the operating system's bundle (off: the public web PKI is not
    an S/MIME PKI). ``crls`` are CRL files (PEM or DER) checked for every chain.
    """

    anchors: tuple[Path, ...] = ()
    anchor_dirs: tuple[Path, ...] = ()
    system_anchors: bool = False
    crls: tuple[Path, ...] = ()

    @classmethod
    def read(cls, section: _Section) -> TrustConfig:
        """Read this section, naming the setting in any error."""
        return cls(
            anchors=tuple(section.resolve("anchors", p) for p in section.string_list("anchors")),
            anchor_dirs=tuple(section.resolve("anchor_dirs", p) for p in section.string_list("anchor_dirs")),
            system_anchors=section.boolean("system_anchors", False),
            crls=tuple(section.resolve("crls", p) for p in section.string_list("crls")),
        )


@attrs.frozen
class InboundConfig:
    """``[inbound]``: how fetched mail is reported.

    ``plain_from_local``: what plain (unsigned, unencrypted) mail whose From is in one of
    ``[server] domains`` gets: ``warn`` (the same warning as mail from outside: its
    sender cannot be verified), ``note`` (a neutral report) or ``none`` (only the
    ``X-Gatekeeper-Security`` header).
    """

    plain_from_local: str = "warn"

    @classmethod
    def read(cls, section: _Section) -> InboundConfig:
        """Read this section, naming the setting in any error."""
        return cls(plain_from_local=section.choice("plain_from_local", "warn", ("warn", "note", "none")))


_SECTIONS: dict[str, Callable[[_Section], Any]] = {
    "server": ServerConfig.read,
    "smtp": SmtpConfig.read,
    "pop3": Pop3Config.read,
    "imap": ImapConfig.read,
    "tls": TlsConfig.read,
    "upstream": UpstreamConfig.read,
    "keys": KeysConfig.read,
    "login": LoginConfig.read,
    "directory": DirectoryConfig.read,
    "policy": PolicyConfig.read,
    "admin": AdminConfig.read,
    "trust": TrustConfig.read,
    "inbound": InboundConfig.read,
}


@attrs.frozen
class Config:
    """The whole configuration, one attribute per section."""

    path: Path
    server: ServerConfig
    smtp: SmtpConfig
    pop3: Pop3Config
    imap: ImapConfig
    tls: TlsConfig
    upstream: UpstreamConfig
    keys: KeysConfig
    login: LoginConfig
    directory: DirectoryConfig
    policy: PolicyConfig
    admin: AdminConfig
    trust: TrustConfig = TrustConfig()
    inbound: InboundConfig = InboundConfig()


def parse_config(data: Mapping[str, Any], base_dir: Path, path: Path | None = None) -> Config:
    """Build a :class:`Config` from an already parsed TOML document."""
    for name, value in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section (known: {', '.join(_SECTIONS)})", f"[{name}]")
        if not isinstance(value, dict):
            raise ConfigError("expected a section (a [table])", f"[{name}]")
    sections = {}
    for name, read in _SECTIONS.items():
        section = _Section(name, data.get(name, {}), base_dir)
        sections[name] = read(section)
        section.finish()
    return Config(path=path or base_dir / "gatekeeper.toml", **sections)


def parse_config_text(text: str, base_dir: Path, path: Path | None = None) -> Config:
    """Parse TOML text into a :class:`Config`; syntax errors name the line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"not valid TOML: {error}", str(path or "config")) from None
    return parse_config(data, base_dir, path)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check the configuration file at ``path``."""
    config_path = Path(path).absolute()
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("configuration file not found", str(config_path)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the configuration file: {error}", str(config_path)) from None
    return parse_config_text(text, config_path.parent, config_path)

"""LDAP key sources and the LDAP certificate publisher (ldap3, in a bounded thread pool).

ldap3 is synchronous, so :class:`LdapSource` runs every search in an injected
``twisted.python.threadpool.ThreadPool`` (its size bounds how many searches run at
once) and hands the answer back to the reactor. Bound connections are kept and reused,
one per worker at most; a connection that fails is dropped and the search retried
once on a fresh one, so a directory restart costs one reconnect, not an outage.

The directory is only ever talked to over TLS (``ldaps://``, or ``ldap://`` upgraded
with StartTLS) with the server certificate verified. The recipient address goes into
the configured filter template with ldap3's filter escaping, so ``*``, ``(`` or ``\\``
in an address cannot widen the search.

:class:`LdapPublisher` is the separate, explicit write path (``user add``/``rotate``
publish, ``user delete`` unpublishes); a lookup never writes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from ldap3 import (
    ANONYMOUS,
    AUTO_BIND_NO_TLS,
    AUTO_BIND_TLS_BEFORE_BIND,
    MODIFY_REPLACE,
    NONE,
    SIMPLE,
    SUBTREE,
    SYNC,
    Connection,
    Server,
    Tls,
)
from ldap3.core.exceptions import (
    LDAPBindError,
    LDAPCertificateError,
    LDAPCommunicationError,
    LDAPException,
    LDAPSocketOpenError,
    LDAPSSLConfigurationError,
    LDAPStartTLSError,
)
from ldap3.utils.conv import escape_filter_chars
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from gatekeeper.address import normalize_address
from gatekeeper.config import LdapDirectoryConfig
from gatekeeper.errors import ConfigError, InvalidAddress, PermanentError, SourceUnavailable
from gatekeeper.interfaces import ICertificatePublisher, IKeySource
from gatekeeper.keys.directory import Candidate, SourceAnswer
from gatekeeper.keys.keyring import CertificateFormatError, load_certificates

log = Logger()

# Result codes that mean "nothing there" rather than "the directory has a problem".
_EMPTY_RESULTS = ("success", "noSuchObject")


class PublishError(PermanentError):
    """The certificate could not be published: no entry, several entries, or no right to write."""


def read_bind_password(config: LdapDirectoryConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """Return the bind password from ``bind_password_file`` or ``bind_password_env`` (or None).

    One trailing newline of the file is dropped. Errors name the setting, never the value.
    """
    environ = os.environ if environ is None else environ
    section = "[directory.ldap]" if config.name == "ldap" else f"[[directory.external]] {config.name}"
    if config.bind_password_file is not None:
        try:
            text = config.bind_password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            detail = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise ConfigError(
                f"cannot read {config.bind_password_file}: {detail}", f"{section} bind_password_file"
            ) from None
        return text[:-1] if text.endswith("\n") else text
    if config.bind_password_env is not None:
        value = environ.get(config.bind_password_env)
        if value is None:
            raise ConfigError(
                f"environment variable {config.bind_password_env} is not set", f"{section} bind_password_env"
            )
        return value
    return None


def search_filter(template: str, address: str) -> str:
    """Put ``address`` into a filter template (``{address}``) with RFC 4515 escaping."""
    return template.replace("{address}", escape_filter_chars(address))


def parse_values(values: list[bytes]) -> tuple[list[x509.Certificate], int]:
    """Parse attribute values (DER certificates or PKCS#7 bundles); return (certificates, unreadable)."""
    certificates: list[x509.Certificate] = []
    unreadable = 0
    for value in values:
        if not value:
            continue
        try:
            certificates.extend(load_certificates(value))
        except CertificateFormatError:
            unreadable += 1
    return certificates, unreadable


class LdapConnector:
    """Opens bound, TLS-protected ldap3 connections to one directory."""

    def __init__(self, config: LdapDirectoryConfig, password: str | None, *, timeout: float = 5.0) -> None:
        self.config = config
        self.timeout = timeout
        self._password = password
        host = config.host
        try:
            tls = Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=str(config.ca_file) if config.ca_file else None,
                valid_names=[config.tls_name] if config.tls_name else None,
                sni=config.tls_name or (None if _is_ip(host) else host),
            )
        except LDAPSSLConfigurationError:
            raise ConfigError(f"cannot read the CA file {config.ca_file}", f"{_section(config)} ca_file") from None
        self.tls = tls

    def server(self) -> Server:
        """A fresh ldap3 Server for one new connection.

        ldap3 marks a server address that failed as unavailable for several seconds, in
        the Server object; a new one per connection leaves availability to our own
        back-off, so a directory that is back is used at once.
        """
        return Server(
            self.config.host,
            port=self.config.port,
            use_ssl=not self.config.starttls,
            tls=self.tls,
            get_info=NONE,
            connect_timeout=self.timeout,
        )

    def __repr__(self) -> str:
        # Never the password: this object may end up in a log line or a traceback.
        return f"<LdapConnector {self.config.name} {self.config.url}>"

    def connect(self, *, read_only: bool = True) -> Connection:
        """Open, secure and bind a connection; raise :class:`SourceUnavailable` (or a ConfigError) if not possible."""
        authenticated = self.config.bind_dn is not None
        try:
            return Connection(
                self.server(),
                user=self.config.bind_dn,
                password=self._password if authenticated else None,
                authentication=SIMPLE if authenticated else ANONYMOUS,
                auto_bind=AUTO_BIND_TLS_BEFORE_BIND if self.config.starttls else AUTO_BIND_NO_TLS,
                client_strategy=SYNC,
                read_only=read_only,
                receive_timeout=max(1, math.ceil(self.timeout)),  # ldap3 packs it into SO_RCVTIMEO as an integer
                auto_referrals=False,  # a referral could point anywhere, without our TLS checks
                return_empty_attributes=False,
                raise_exceptions=False,
            )
        except (LDAPException, OSError) as error:
            raise SourceUnavailable(self.describe(error)) from None

    def describe(self, error: BaseException) -> str:
        """Say what went wrong in words safe for logs and clients (no password, no certificate dump)."""
        name, url = self.config.name, self.config.url
        if isinstance(error, LDAPBindError):
            return f"{name}: {url} refused the bind as {self.config.bind_dn or 'anonymous'}"
        if isinstance(error, LDAPCertificateError):
            return f"{name}: the server certificate of {url} does not name {self.config.tls_name or self.config.host}"
        if isinstance(error, LDAPStartTLSError) or "SSL" in type(error).__name__ or "certificate verify" in str(error):
            return f"{name}: TLS with {url} failed (StartTLS refused or server certificate not trusted)"
        if isinstance(error, LDAPSocketOpenError):
            return f"{name}: cannot connect to {url}"
        if isinstance(error, LDAPCommunicationError):
            return f"{name}: connection to {url} lost or timed out"
        text = str(error)
        if self._password:
            text = text.replace(self._password, "***")
        return f"{name}: {url}: {type(error).__name__}: {text[:160]}"


@implementer(IKeySource)
class LdapSource:
    """Finds certificates in one LDAP directory; searches run in ``threadpool``.

    ``name`` (``"ldap"`` or the external directory's name) appears in lookup traces;
    ``domains`` restricts the source to recipients of those domains (empty: all).
    """

    def __init__(
        self,
        config: LdapDirectoryConfig,
        *,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        password: str | None = None,
        timeout: float = 5.0,
        name: str | None = None,
    ) -> None:
        self.config = config
        self.name = name or config.name
        self.domains = config.domains
        self.reactor = reactor
        self.threadpool = threadpool
        self.connector = LdapConnector(config, password, timeout=timeout)
        self.timeout = timeout
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def find(self, address: str) -> Deferred[list[x509.Certificate]]:
        """Return a Deferred with the certificates the directory holds for ``address``."""
        return self.find_detailed(address).addCallback(lambda answer: [c.certificate for c in answer.candidates])

    def find_detailed(self, address: str) -> Deferred[SourceAnswer]:
        """Search in the thread pool; the Deferred fails with SourceUnavailable on an outage."""
        return deferToThreadPool(self.reactor, self.threadpool, self.search, address)

    def search(self, address: str) -> SourceAnswer:
        """The blocking search (runs in a worker thread; callable directly from scripts).

        The address is used as given (the directory normalises before asking); the
        filter escaping alone keeps it from changing the filter's meaning.
        """
        if not address or len(address) > 320:
            raise InvalidAddress("refusing to search for an empty or overlong address")
        query = search_filter(self.config.filter, address)
        return self._with_connection(lambda connection: self._search(connection, query))

    def close(self) -> None:
        """Unbind the idle connections (call when stopping)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            _unbind(connection)

    def _with_connection(self, operation: Callable[[Connection], SourceAnswer]) -> SourceAnswer:
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        reused = connection is not None
        for attempt in (1, 2):
            if connection is None:
                connection = self.connector.connect()
            try:
                answer = operation(connection)
            except (LDAPException, OSError) as error:
                _unbind(connection)
                connection = None
                if reused and attempt == 1:
                    continue  # a kept connection may have died with a directory restart: one fresh try
                raise SourceUnavailable(self.connector.describe(error)) from None
            except SourceUnavailable:
                _unbind(connection)
                raise
            with self._lock:
                if len(self._idle) < max(1, self.threadpool.max):
                    self._idle.append(connection)
                    connection = None
            if connection is not None:
                _unbind(connection)
            return answer
        raise AssertionError("unreachable")  # pragma: no cover

    def _search(self, connection: Connection, query: str) -> SourceAnswer:
        connection.search(
            self.config.base_dn,
            query,
            search_scope=SUBTREE,
            attributes=list(self.config.attributes),
            size_limit=self.config.size_limit,
            time_limit=max(1, math.ceil(self.timeout)),
        )
        result: dict[str, Any] = connection.result or {}
        description = str(result.get("description", ""))
        notes = []
        if description == "sizeLimitExceeded":
            notes.append(f"more than {self.config.size_limit} entries match; the first were used")
        elif description not in _EMPTY_RESULTS:
            if not result:
                raise SourceUnavailable(f"{self.name}: no answer from {self.config.url}")
            raise SourceUnavailable(f"{self.name}: {self.config.url} answered {description or 'an error'}")
        entries = [r for r in (connection.response or []) if r.get("type") == "searchResEntry"]
        certificates: list[x509.Certificate] = []
        unreadable = 0
        for entry in entries:
            for values in entry.get("raw_attributes", {}).values():
                found, bad = parse_values(list(values))
                certificates.extend(found)
                unreadable += bad
        if unreadable:
            notes.append(f"{unreadable} attribute value(s) were not certificates")
        if entries:
            notes.insert(0, f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
        return SourceAnswer(tuple(Candidate(c) for c in certificates), "; ".join(notes))


@implementer(ICertificatePublisher)
class LdapPublisher:
    """Publishes users' certificates to the organisation's directory (synchronous).

    The entry is the one the search filter finds for the address; exactly one must
    match. ``publish`` replaces ``userCertificate;binary`` (DER) and
    ``userSMIMECertificate`` (a PKCS#7 certs-only bundle, as RFC 2798 says) with the
    new certificate; ``unpublish`` removes both attributes.
    """

    def __init__(self, config: LdapDirectoryConfig, password: str | None, *, timeout: float = 5.0) -> None:
        if not config.writable:
            raise ConfigError("the directory is not configured writable", f"{_section(config)} writable")
        self.config = config
        self.connector = LdapConnector(config, password, timeout=timeout)

    def publish(self, address: str, certificate: x509.Certificate) -> None:
        """Make ``certificate`` the published certificate of ``address``."""
        der = certificate.public_bytes(serialization.Encoding.DER)
        bundle = pkcs7.serialize_certificates([certificate], serialization.Encoding.DER)
        self._modify(address, {"userCertificate;binary": [der], "userSMIMECertificate": [bundle]}, "publish")
        log.info("published a certificate for {address} to {directory}", address=address, directory=self.config.name)

    def unpublish(self, address: str) -> None:
        """Remove every certificate published for ``address``."""
        self._modify(address, {"userCertificate;binary": [], "userSMIMECertificate": []}, "unpublish")
        log.info("removed the certificates of {address} from {directory}", address=address, directory=self.config.name)

    def _modify(self, address: str, values: dict[str, list[bytes]], what: str) -> None:
        address = normalize_address(address)
        connection = self.connector.connect(read_only=False)
        try:
            connection.search(
                self.config.base_dn,
                search_filter(self.config.filter, address),
                search_scope=SUBTREE,
                attributes=[],
                size_limit=2,
            )
            entries = [r["dn"] for r in (connection.response or []) if r.get("type") == "searchResEntry"]
            if not entries:
                raise PublishError(f"cannot {what}: {self.config.name} has no entry for {address}")
            if len(entries) > 1:
                raise PublishError(f"cannot {what}: several {self.config.name} entries match {address}")
            changes = {attribute: [(MODIFY_REPLACE, list(v))] for attribute, v in values.items()}
            if not connection.modify(entries[0], changes):
                description = (connection.result or {}).get("description", "an error")
                raise PublishError(f"cannot {what} for {address}: {self.config.name} answered {description}")
        except (LDAPException, OSError) as error:
            raise SourceUnavailable(self.connector.describe(error)) from None
        finally:
            _unbind(connection)


def _unbind(connection: Connection) -> None:
    # It is being thrown away anyway: a failing unbind changes nothing.
    with contextlib.suppress(LDAPException, OSError):
        connection.unbind()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _section(config: LdapDirectoryConfig) -> str:
    return "[directory.ldap]" if config.name == "ldap" else f"[[directory.external]] {config.name}"

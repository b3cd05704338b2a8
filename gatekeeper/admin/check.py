"""Is the gateway in communication with the network? Upstream, directories, DNS and CRLs, checked now.

:func:`run_checks` tries everything the configuration names, concurrently, and returns
a :class:`CheckReport`: one :class:`CheckRow` per server or file with what worked
(reached, TLS handshake with the certificate verified, login with the test account),
the round-trip time of the TCP connection, and in words what failed. The same function
serves ``gatekeeper check`` (on a private reactor) and the console's ``gk.check()`` (on
the gateway's reactor); nothing here prints.

- Upstream SMTP, POP3 and IMAP (not in the embedded mode): connected exactly as the
  proxies connect (:func:`gatekeeper.upstream.connect`: TLS verified by host name,
  TCP_NODELAY), STARTTLS/STLS where the endpoint says so, then a login with
  ``[upstream] smtp_user`` (SMTP) or ``[admin] check_user`` when configured.
- Each LDAP directory: TCP, then TLS (ldaps or StartTLS, certificate verified) and the
  configured bind, then a base search of ``base_dn`` (in a thread: ldap3 blocks).
- The DNS resolver of ``[directory.dns]``: an SMIMEA query, answered or not.
- Every CRL file (``[trust] crls`` and the built-in CA's): readable, signed by its
  issuer when that is a trust anchor, and not past its next update.

Passwords are sent only to the server they belong to and appear in no result text.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime
import enum
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from ldap3 import BASE, Connection
from ldap3.core.exceptions import LDAPException
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeeper.config import Config, LdapDirectoryConfig, UpstreamEndpoint
from gatekeeper.errors import ConfigError, GatekeeperError, SourceUnavailable
from gatekeeper.keys.ca import ca_directory
from gatekeeper.keys.dns import SmimeaSource, smimea_name
from gatekeeper.keys.ldap import LdapConnector, read_bind_password
from gatekeeper.trust import load_certificates, validator_from_config
from gatekeeper.upstream import client_tls_options, connect

__all__ = [
    "DEFAULT_TIMEOUT",
    "CheckReport",
    "CheckRow",
    "Step",
    "check_account",
    "configured_anchors",
    "run_checks",
]

DEFAULT_TIMEOUT = 10.0
MAX_REPLY_TEXT = 120


class Step(enum.StrEnum):
    """How one step of a check went."""

    OK = "ok"
    FAIL = "FAIL"
    SKIPPED = "skip"  # could have been tried, but nothing to try it with (no test account)
    NONE = "-"  # does not apply (no TLS on a loopback tcp: upstream, a CRL has no login)


@attrs.frozen
class CheckRow:
    """One thing checked: reached, TLS, login, the TCP round trip, the verdict and why.

    ``invalid`` marks a failure that is none of the steps (a stale or forged CRL).
    """

    name: str
    target: str
    reach: Step
    tls: Step = Step.NONE
    login: Step = Step.NONE
    rtt: float | None = None
    detail: str = ""
    invalid: bool = False

    @property
    def ok(self) -> bool:
        """True when no step failed."""
        return not self.invalid and Step.FAIL not in (self.reach, self.tls, self.login)


@attrs.frozen
class CheckReport:
    """Every row, and the verdict: :attr:`ok` only when every row is."""

    rows: tuple[CheckRow, ...]

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(row.ok for row in self.rows)

    @property
    def failed(self) -> tuple[CheckRow, ...]:
        """The rows that failed."""
        return tuple(row for row in self.rows if not row.ok)

    @property
    def verdict(self) -> str:
        """One line: all passed, or which failed."""
        if self.ok:
            return f"OK: all {len(self.rows)} checks passed."
        names = ", ".join(row.name for row in self.failed)
        return f"FAILED: {len(self.failed)} of {len(self.rows)} checks failed ({names})."

    def table(self) -> list[str]:
        """The report as aligned text lines, the verdict last."""
        header = ("CHECK", "TARGET", "REACH", "TLS", "LOGIN", "RTT", "RESULT", "DETAIL")
        cells = [header]
        for row in self.rows:
            rtt = "-" if row.rtt is None else f"{row.rtt * 1000:.1f} ms"
            result = "ok" if row.ok else "FAIL"
            cells.append((row.name, row.target, row.reach, row.tls, row.login, rtt, result, row.detail))
        widths = [max(len(str(line[column])) for line in cells) for column in range(len(header) - 1)]
        lines = [
            "  ".join(str(cell).ljust(width) for cell, width in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
            for line in cells
        ]
        return [line.rstrip() for line in lines] + [self.verdict]

    def __repr__(self) -> str:
        # The console shows a result with repr: make that the table.
        return "\n".join(self.table())


# -- the test account --------------------------------------------------------------------


def check_account(config: Config, protocol: str) -> tuple[str, str] | None:
    """The account to log in to upstream ``protocol`` with, or None.

    SMTP uses the relay's own ``[upstream] smtp_user`` when there is one; otherwise
    (and for POP3 and IMAP) ``[admin] check_user``.
    """
    upstream = config.upstream
    relay_user = getattr(upstream, "smtp_user", None)  # the relay's own login, when it has one
    if protocol == "smtp" and relay_user:
        password = _secret(
            getattr(upstream, "smtp_password_file", None),
            getattr(upstream, "smtp_password_env", None),
            "[upstream] smtp_password",
        )
        return str(relay_user), password
    admin = config.admin
    if admin.check_user is None:
        return None
    return admin.check_user, _secret(admin.check_password_file, admin.check_password_env, "[admin] check_password")


def _secret(path: Path | None, env: str | None, setting: str) -> str:
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            detail = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read {path}: {detail}", f"{setting}_file") from None
        return text[:-1] if text.endswith("\n") else text
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"environment variable {env} is not set", f"{setting}_env")
        return value
    raise ConfigError("no password configured", setting)


# -- running everything ------------------------------------------------------------------


async def run_checks(
    config: Config,
    reactor: Any,
    *,
    anchors: Sequence[x509.Certificate] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> CheckReport:
    """Check everything ``config`` names, concurrently; rows in a fixed order.

    ``reactor`` provides TCP, UDP, time and a thread pool (``getThreadPool``, for
    ldap3); ``anchors`` are the trust anchors CRL signatures are checked against.
    """
    checks: list[Callable[[], Awaitable[CheckRow]]] = []
    upstream = config.upstream
    if not upstream.embedded:
        for protocol in ("smtp", "pop3", "imap"):
            endpoint = getattr(upstream, protocol)
            if endpoint is not None:
                checks.append(_bind(_check_upstream, reactor, config, protocol, endpoint, timeout))
    directory = config.directory
    for ldap in ((directory.ldap,) if directory.ldap else ()) + directory.external:
        checks.append(_bind(_check_ldap, reactor, ldap, timeout))
    if directory.dns is not None:
        domain = config.server.domains[0] if config.server.domains else "example.org"
        checks.append(_bind(_check_dns, reactor, directory.dns.resolver, domain, timeout))
    for path in (*config.trust.crls, ca_directory(config.keys) / "crl.pem"):
        checks.append(_bind(_check_crl, path, tuple(anchors)))
    results = await DeferredList(
        [Deferred.fromCoroutine(_guarded(check)) for check in checks], consumeErrors=True, fireOnOneErrback=False
    )
    return CheckReport(tuple(row for _, row in results))


def _bind(function: Callable[..., Awaitable[CheckRow]], *args: Any) -> Callable[[], Awaitable[CheckRow]]:
    return lambda: function(*args)


async def _guarded(check: Callable[[], Awaitable[CheckRow]]) -> CheckRow:
    try:
        return await check()
    except GatekeeperError as error:  # a configuration problem (an unreadable password file...)
        return CheckRow("config", "-", Step.FAIL, detail=str(error))


def _since(started: float) -> float:
    return time.perf_counter() - started


def _short(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text if len(text) <= MAX_REPLY_TEXT else text[: MAX_REPLY_TEXT - 3] + "..."


# -- upstream mail servers -----------------------------------------------------------------


class _Closed(Exception):
    """The server closed the connection (or TLS failed) while the check waited for it."""

    def __init__(self, reason: Failure) -> None:
        super().__init__(_failure_text(reason))


def _failure_text(reason: Failure) -> str:
    text = reason.getErrorMessage()
    if "certificate verify failed" in text:
        return "the server certificate is not trusted (certificate verify failed)"
    if "VerificationError" in type(reason.value).__name__ or "does not match" in text:
        return "the server certificate does not name the server"
    if "SSL" in type(reason.value).__module__ or "SSL" in text:
        return f"TLS failed: {_short(text)}"
    return f"connection closed: {_short(text)}"


@implementer(IHandshakeListener)
class _Dialogue(LineOnlyReceiver):
    """A line-based client the checks talk through, one awaited line at a time."""

    delimiter = b"\r\n"
    MAX_LENGTH = 65536

    def __init__(self, clock: Any, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self.lines: collections.deque[bytes] = collections.deque()
        self.lost: Failure | None = None
        self.secured = False
        self._waiter: Deferred[Any] | None = None
        self._closed: list[Deferred[None]] = []

    def lineReceived(self, line: bytes) -> None:
        """Hand the line to the waiting reader, or keep it."""
        self.lines.append(line)
        self._wake(None)

    def handshakeCompleted(self) -> None:
        """The TLS handshake succeeded (the certificate was verified)."""
        self.secured = True
        self._wake(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Fail whoever waits; remember why."""
        self.lost = reason
        self._wake(_Closed(reason))
        closed, self._closed = self._closed, []
        for waiter in closed:
            waiter.callback(None)

    def _wake(self, error: Exception | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            if error is None:
                waiter.callback(None)
            else:
                waiter.errback(error)

    async def _wait(self) -> None:
        """Wait for the next line, handshake or loss, within the time limit."""
        waiter: Deferred[None] = Deferred()
        self._waiter = waiter
        waiter.addTimeout(self.timeout, self.clock)
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None

    async def read(self) -> bytes:
        """The next line from the server."""
        while not self.lines:
            if self.lost is not None:
                raise _Closed(self.lost)
            await self._wait()
        return self.lines.popleft()

    async def handshake(self) -> None:
        """Wait until TLS is established (implicit TLS, or after :meth:`start_tls`)."""
        while not self.secured:
            if self.lost is not None:
                raise _Closed(self.lost)
            await self._wait()

    def send(self, line: bytes) -> None:
        """Send one command line."""
        self.sendLine(line)

    async def start_tls(self, host: str, ca_file: Path | None) -> None:
        """Upgrade the connection and wait for the handshake (certificate verified by host name)."""
        self.transport.startTLS(client_tls_options(host, ca_file))  # type: ignore[union-attr]
        await self.handshake()

    def tls_version(self) -> str:
        """The negotiated TLS version, e.g. ``TLSv1.3`` (empty if unknown)."""
        transport = self.transport
        for candidate in (transport, getattr(transport, "protocol", None)):
            get_handle = getattr(candidate, "getHandle", None)
            handle = get_handle() if get_handle is not None else None
            version = getattr(handle, "get_protocol_version_name", None)
            if version is not None:
                return str(version())
        return ""

    async def close(self) -> None:
        """Close the connection and wait until it is gone (aborting it if that takes too long)."""
        if self.lost is not None or self.transport is None:
            return
        waiter: Deferred[None] = Deferred()
        self._closed.append(waiter)
        self.transport.loseConnection()
        delayed = self.clock.callLater(self.timeout, self._abort)
        await waiter
        if delayed.active():
            delayed.cancel()

    def _abort(self) -> None:
        if self.lost is None and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


@attrs.define
class _Progress:
    """How far a dialogue got; a failure counts against the step it was in."""

    stage: str = "reach"
    tls: Step = Step.NONE
    login: Step = Step.NONE
    notes: list[str] = attrs.field(factory=list)


class _Failed(Exception):
    """The server refused a step (the message says how, in the server's words)."""


async def _check_upstream(
    reactor: Any, config: Config, protocol: str, endpoint: UpstreamEndpoint, timeout: float
) -> CheckRow:
    name = f"upstream {protocol}"
    account = check_account(config, protocol)
    factory = Factory.forProtocol(lambda: _Dialogue(reactor, timeout))
    started = time.perf_counter()
    try:
        client: _Dialogue = await connect(
            reactor, endpoint, factory, ca_file=config.upstream.ca_file, timeout=min(timeout, 30.0)
        )
    except GatekeeperError as error:
        return CheckRow(name, str(endpoint), Step.FAIL, detail=str(error))
    rtt = _since(started)
    progress = _Progress()
    dialogue = {"smtp": _smtp, "pop3": _pop3, "imap": _imap}[protocol]
    reach = Step.OK
    try:
        await dialogue(client, endpoint, config, account, progress)
    except Exception as error:
        if isinstance(error, _Failed | _Closed):
            problem = str(error)
        elif "Timeout" in type(error).__name__:
            problem = f"no answer within {timeout:g} s"
        else:  # unexpected: name it, without its text (it could hold anything)
            problem = f"unexpected {type(error).__name__}"
        if progress.stage == "tls":
            progress.tls = Step.FAIL
        elif progress.stage == "login":
            progress.login = Step.FAIL
        elif progress.stage == "reach":
            reach = Step.FAIL
        if progress.stage != "done":
            progress.notes.append(problem)
    finally:
        await client.close()
    return CheckRow(name, str(endpoint), reach, progress.tls, progress.login, rtt, "; ".join(progress.notes))


async def _secure(client: _Dialogue, endpoint: UpstreamEndpoint, config: Config, progress: _Progress) -> None:
    """Implicit TLS: wait for the handshake before the greeting."""
    if endpoint.security == "tls":
        progress.stage = "tls"
        await client.handshake()
        _secured(client, progress)
    progress.stage = "reach"


async def _upgrade(client: _Dialogue, endpoint: UpstreamEndpoint, config: Config, progress: _Progress) -> None:
    """STARTTLS: the command was accepted; now the handshake."""
    await client.start_tls(endpoint.host, config.upstream.ca_file)
    _secured(client, progress)


def _secured(client: _Dialogue, progress: _Progress) -> None:
    progress.tls = Step.OK
    version = client.tls_version()
    if version:
        progress.notes.append(version)


def _login_stage(account: tuple[str, str] | None, progress: _Progress) -> bool:
    """Enter the login step; False (and a note) when there is no test account."""
    if account is None:
        progress.login = Step.SKIPPED
        progress.notes.append("no test account")
        return False
    progress.stage = "login"
    return True


def _logged_in(account: tuple[str, str], progress: _Progress) -> None:
    progress.login = Step.OK
    progress.notes.append(f"logged in as {account[0]}")
    progress.stage = "done"


async def _reply(client: _Dialogue) -> tuple[int, bytes]:
    """An SMTP reply: the code and the text of its lines."""
    lines = []
    while True:
        line = await client.read()
        if len(line) < 3 or not line[:3].isdigit():
            raise _Failed(f"not an SMTP reply: {_short(line)}")
        lines.append(line[4:])
        if line[3:4] != b"-":
            return int(line[:3]), b"\n".join(lines)


async def _expect(client: _Dialogue, code: int, what: str) -> bytes:
    got, text = await _reply(client)
    if got != code:
        raise _Failed(f"{what}: {got} {_short(text)}")
    return text


def _plain(account: tuple[str, str]) -> bytes:
    user, password = account
    return base64.b64encode(b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8"))


async def _smtp(
    client: _Dialogue,
    endpoint: UpstreamEndpoint,
    config: Config,
    account: tuple[str, str] | None,
    progress: _Progress,
) -> None:
    await _secure(client, endpoint, config, progress)
    await _expect(client, 220, "greeting")
    hello = b"EHLO " + config.server.hostname.encode("ascii")
    client.send(hello)
    capabilities = await _expect(client, 250, "EHLO refused")
    if endpoint.security == "starttls":
        progress.stage = "tls"
        if b"STARTTLS" not in capabilities.upper().split(b"\n"):
            raise _Failed("the server does not offer STARTTLS")
        client.send(b"STARTTLS")
        await _expect(client, 220, "STARTTLS refused")
        await _upgrade(client, endpoint, config, progress)
        client.send(hello)
        capabilities = await _expect(client, 250, "EHLO refused")
    if _login_stage(account, progress):
        assert account is not None
        mechanisms = [line.split()[1:] for line in capabilities.upper().split(b"\n") if line.startswith(b"AUTH")]
        if not any(b"PLAIN" in offered for offered in mechanisms):
            progress.login = Step.SKIPPED
            progress.notes.append("the server offers no AUTH PLAIN")
        else:
            client.send(b"AUTH PLAIN " + _plain(account))
            await _expect(client, 235, f"login as {account[0]} refused")
            _logged_in(account, progress)
    progress.stage = "done"
    client.send(b"QUIT")


async def _ok(client: _Dialogue, what: str) -> bytes:
    line = await client.read()
    if not line.startswith(b"+OK"):
        raise _Failed(f"{what}: {_short(line)}")
    return line


async def _pop3(
    client: _Dialogue,
    endpoint: UpstreamEndpoint,
    config: Config,
    account: tuple[str, str] | None,
    progress: _Progress,
) -> None:
    await _secure(client, endpoint, config, progress)
    await _ok(client, "greeting")
    if endpoint.security == "starttls":
        progress.stage = "tls"
        client.send(b"STLS")
        await _ok(client, "STLS refused")
        await _upgrade(client, endpoint, config, progress)
    if _login_stage(account, progress):
        assert account is not None
        client.send(b"USER " + account[0].encode("utf-8"))
        await _ok(client, f"USER {account[0]} refused")
        client.send(b"PASS " + account[1].encode("utf-8"))
        await _ok(client, f"login as {account[0]} refused")
        _logged_in(account, progress)
    progress.stage = "done"
    client.send(b"QUIT")


async def _tagged(client: _Dialogue, tag: bytes, what: str) -> bytes:
    while True:
        line = await client.read()
        if line.startswith(tag + b" "):
            status = line[len(tag) + 1 :]
            if status.upper().startswith(b"OK"):
                return line
            raise _Failed(f"{what}: {_short(status)}")


async def _imap(
    client: _Dialogue,
    endpoint: UpstreamEndpoint,
    config: Config,
    account: tuple[str, str] | None,
    progress: _Progress,
) -> None:
    await _secure(client, endpoint, config, progress)
    greeting = await client.read()
    if not greeting.upper().startswith((b"* OK", b"* PREAUTH")):
        raise _Failed(f"greeting: {_short(greeting)}")
    if endpoint.security == "starttls":
        progress.stage = "tls"
        client.send(b"c1 STARTTLS")
        await _tagged(client, b"c1", "STARTTLS refused")
        await _upgrade(client, endpoint, config, progress)
    if _login_stage(account, progress):
        assert account is not None
        client.send(b"c2 AUTHENTICATE PLAIN")
        line = await client.read()
        if not line.startswith(b"+"):
            raise _Failed(f"AUTHENTICATE PLAIN refused: {_short(line)}")
        client.send(_plain(account))
        await _tagged(client, b"c2", f"login as {account[0]} refused")
        _logged_in(account, progress)
    progress.stage = "done"
    client.send(b"c3 LOGOUT")


# -- LDAP ------------------------------------------------------------------------------


async def _tcp_rtt(reactor: Any, host: str, port: int, timeout: float) -> float:
    """Open and close a TCP connection; return how long the connect took."""
    started = time.perf_counter()
    endpoint = HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
    protocol = _Probe()
    await endpoint.connect(Factory.forProtocol(lambda: protocol))
    rtt = _since(started)
    protocol.transport.loseConnection()  # type: ignore[union-attr]
    await protocol.closed
    return rtt


class _Probe(Protocol):
    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


async def _check_ldap(reactor: Any, config: LdapDirectoryConfig, timeout: float) -> CheckRow:
    name = "ldap" if config.name == "ldap" else f"external:{config.name}"
    try:
        rtt = await _tcp_rtt(reactor, config.host, config.port, timeout)
    except Exception as error:
        return CheckRow(name, config.url, Step.FAIL, detail=f"cannot connect to {config.url} ({type(error).__name__})")
    password = read_bind_password(config)
    connector = LdapConnector(config, password, timeout=timeout)
    tls, login, detail = await deferToThreadPool(reactor, reactor.getThreadPool(), _ldap_session, connector, password)
    return CheckRow(name, config.url, Step.OK, tls, login, rtt, detail)


def _ldap_session(connector: LdapConnector, password: str | None) -> tuple[Step, Step, str]:
    """TLS, bind and a base search, step by step (runs in a thread)."""
    config = connector.config
    who = config.bind_dn or "anonymous"
    connection = Connection(
        connector.server(),
        user=config.bind_dn,
        password=password if config.bind_dn else None,
        read_only=True,
        receive_timeout=max(1, int(connector.timeout + 0.999)),
        auto_referrals=False,
        raise_exceptions=False,
    )
    try:
        try:
            connection.open()
            if config.starttls and not connection.start_tls():
                return Step.FAIL, Step.NONE, f"StartTLS refused: {_short(str(connection.result))}"
        except (LDAPException, OSError) as error:
            return Step.FAIL, Step.NONE, connector.describe(error)
        version = ""
        socket = getattr(connection, "socket", None)
        if socket is not None and hasattr(socket, "version"):
            version = str(socket.version() or "")
        try:
            if not connection.bind():
                return Step.OK, Step.FAIL, f"bind as {who} refused: {connection.result.get('description', '?')}"
            found = connection.search(config.base_dn, "(objectClass=*)", search_scope=BASE, attributes=["1.1"])
        except (LDAPException, OSError) as error:
            return Step.OK, Step.FAIL, connector.describe(error)
        if not found:
            description = connection.result.get("description", "?")
            return Step.OK, Step.FAIL, f"bound as {who}, but base_dn {config.base_dn} not found ({description})"
        return Step.OK, Step.OK, ", ".join(part for part in (version, f"bound as {who}, base_dn found") if part)
    finally:
        with contextlib.suppress(LDAPException, OSError):
            connection.unbind()


# -- DNS ----------------------------------------------------------------------------------


async def _check_dns(reactor: Any, resolver: tuple[str, int], domain: str, timeout: float) -> CheckRow:
    host, port = resolver
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    source = SmimeaSource(resolver, reactor=reactor, timeout=timeout)
    started = time.perf_counter()
    try:
        message = await source.query(smimea_name(f"postmaster@{domain}"))
    except SourceUnavailable as error:
        return CheckRow("dns", target, Step.FAIL, detail=str(error))
    rtt = _since(started)
    codes = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}
    code = codes.get(message.rCode, f"rcode {message.rCode}")
    authenticated = "AD set" if message.authenticData else "AD not set"
    detail = f"SMIMEA query for postmaster@{domain}: {code}, {authenticated}"
    reach = Step.OK if message.rCode in (0, 3) else Step.FAIL
    return CheckRow("dns", target, reach, rtt=rtt, detail=detail)


# -- CRLs ----------------------------------------------------------------------------------


async def _check_crl(path: Path, anchors: tuple[x509.Certificate, ...]) -> CheckRow:
    name = "crl"
    try:
        data = path.read_bytes()
    except OSError as error:
        return CheckRow(name, str(path), Step.FAIL, detail=f"cannot read: {error.strerror}")
    try:
        crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
    except ValueError:
        return CheckRow(name, str(path), Step.OK, detail="not a CRL (PEM or DER)", invalid=True)
    issuer = crl.issuer.rfc4514_string()
    notes = [f"issuer {issuer}"]
    problem = ""
    signers = [anchor for anchor in anchors if anchor.subject == crl.issuer]
    if signers:
        if not any(_signed_by(crl, anchor) for anchor in signers):
            problem = "its signature does not verify with the issuer's certificate"
    else:
        notes.append("issuer not a trust anchor (checked against intermediates when used)")
    next_update = crl.next_update_utc
    now = datetime.datetime.now(datetime.UTC)
    if next_update is not None:
        if next_update < now:
            problem = problem or f"stale: its next update was due {next_update:%Y-%m-%d %H:%M} UTC"
        else:
            notes.append(f"next update {next_update:%Y-%m-%d}")
    if problem:
        return CheckRow(name, str(path), Step.OK, detail="; ".join([problem, *notes]), invalid=True)
    return CheckRow(name, str(path), Step.OK, detail="; ".join(notes))


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return bool(crl.is_signature_valid(issuer.public_key()))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def configured_anchors(config: Config) -> list[x509.Certificate]:
    """The trust anchors of ``[trust]`` plus the built-in CA, as the gateway's validator has them."""
    builtin = ca_directory(config.keys) / "ca.pem"
    extra = load_certificates(builtin) if builtin.exists() else []
    return list(validator_from_config(config.trust, extra_anchors=extra).anchors)

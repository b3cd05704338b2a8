"""Relaying submitted mail to the upstream SMTP server: :class:`SmtpRelay`.

Each connection is made by :func:`gatekeeper.upstream.connect` (TCP_NODELAY, implicit
TLS verified for ``tls:`` endpoints) and set up by Twisted's ESMTP client
(:class:`UpstreamConnection`, a :class:`twisted.mail.smtp.ESMTPClient`): ``EHLO``,
``STARTTLS`` verified against ``[upstream] ca_file`` (required for ``starttls:``
endpoints: a server that does not offer it is refused), and ``AUTH PLAIN``/``LOGIN``
when ``[upstream] smtp_user`` is set. From then on the connection runs transactions
one after the other, pipelined when the server offers ``PIPELINING``; idle connections
are kept (at most ``smtp_connections``, each for at most :data:`IDLE_SECONDS`) so that a
message costs no new TCP or TLS handshake.

:meth:`SmtpRelay.relay` gives every copy its own connection and sends ``MAIL``,
``RCPT`` and ``DATA`` and the data for all of them, but the final ``.`` of each only
once every copy got that far: a refusal before that point closes the connections
mid-data (the server discards what it got), so nothing is kept. Every wait has a time
limit (``[upstream] timeout_seconds``); a timeout or a lost connection is an
:class:`~gatekeeper.errors.UpstreamUnavailable`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail._cred import LOGINAuthenticator, PLAINAuthenticator
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeeper.address import address_key
from gatekeeper.config import UpstreamConfig, UpstreamEndpoint
from gatekeeper.errors import ConfigError, RelayRefused, UpstreamUnavailable
from gatekeeper.events import emit
from gatekeeper.interfaces import IRelayTransaction, ISubmissionRelay, RelayCopy, RelayOutcome, RelayReply
from gatekeeper.upstream import client_tls_options, connect

log = Logger()

IDLE_SECONDS = 30.0
MAX_TRANSACTIONS = 1000  # per connection, then a fresh one
WHOLE_FILE = 4 * 1024 * 1024  # a spooled copy up to this size is sent from memory
_LOST = RelayReply(451, "4.4.2 connection to the mail server lost")


def read_smtp_password(config: UpstreamConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The upstream SMTP password from ``smtp_password_file`` or ``smtp_password_env`` (or None).

    One trailing newline of the file is dropped. Errors name the setting, never the value.
    """
    environ = os.environ if environ is None else environ
    if config.smtp_password_file is not None:
        try:
            text = config.smtp_password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            detail = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise ConfigError(
                f"cannot read {config.smtp_password_file}: {detail}", "[upstream] smtp_password_file"
            ) from None
        return text[:-1] if text.endswith("\n") else text
    if config.smtp_password_env is not None:
        value = environ.get(config.smtp_password_env)
        if value is None:
            raise ConfigError(
                f"environment variable {config.smtp_password_env} is not set", "[upstream] smtp_password_env"
            )
        return value
    return None


def dot_stuffed(message: bytes) -> bytes:
    """The data as sent after ``DATA``: a leading dot doubled on every line, ending in CRLF (no final dot)."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed


class _Stuffer:
    """Dot-stuffing of a file sent in chunks: a line start may fall on a chunk boundary."""

    def __init__(self, on_chunk: Callable[[], None]) -> None:
        self.tail = b"\r\n"  # the data starts at the start of a line
        self.on_chunk = on_chunk

    def __call__(self, chunk: bytes) -> bytes:
        self.on_chunk()
        combined = (self.tail + chunk).replace(b"\r\n.", b"\r\n..")
        self.tail = (self.tail + chunk)[-2:]
        return combined[2:]  # the two tail bytes hold no line start of their own

    @property
    def ends_with_crlf(self) -> bool:
        """Whether the data sent so far ends with a line end."""
        return self.tail == b"\r\n"


class UpstreamConnection(smtp.ESMTPClient):
    """One connection to the upstream server: Twisted's ESMTP set-up, then pipelined transactions.

    ``ready`` fires with the connection once EHLO, STARTTLS and AUTH are done, or fails
    with :class:`UpstreamUnavailable`. :meth:`commands` sends commands (as a pipelined
    group when the server allows) and returns their replies.
    """

    debug = False  # Twisted's line log would hold the AUTH exchange; it is never kept

    def __init__(
        self,
        *,
        identity: bytes,
        context: Any,
        require_tls: bool,
        user: bytes | None,
        password: bytes | None,
        clock: Any,
        timeout: float,
    ) -> None:
        super().__init__(password, context, identity)
        self.requireTransportSecurity = require_tls
        self.requireAuthentication = user is not None
        self.heloFallback = not require_tls and user is None
        if user is not None:
            self.registerAuthenticator(PLAINAuthenticator(user))
            self.registerAuthenticator(LOGINAuthenticator(user))
        self.callLater = clock.callLater  # type: ignore[method-assign]  # time-outs on the injected clock
        self.timeout = timeout  # type: ignore[assignment]
        self.limit = timeout
        self.ready: Deferred[UpstreamConnection] = Deferred()
        self.extensions: dict[bytes, bytes | None] = {}
        self.transactions = 0
        self.reused = False
        self.closed = False
        self.on_lost: Callable[[UpstreamConnection], None] = lambda connection: None
        self._waiting: deque[Deferred[RelayReply]] = deque()
        self._error = "connection lost"

    # -- set-up (Twisted's state machine) --------------------------------------------------

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        """Remember the extensions the server offers (after STARTTLS, the second EHLO's)."""
        self.extensions = {}
        for line in resp.splitlines():
            name, _, value = line.partition(b" ")
            self.extensions[name.upper()] = value or None
        super().esmtpState_serverConfig(code, resp)

    def smtpState_from(self, code: int, resp: bytes) -> None:
        """Twisted would start its own transaction here: the connection is ready for ours instead."""
        if self.ready.called:
            return
        self._expected = range(1000)  # type: ignore[assignment]  # every reply goes to _reply
        self._okresponse = self._failresponse = self._reply
        self.setTimeout(None)  # idle now; every command sets its own time limit
        self.ready.callback(self)

    def sendError(self, exc: Exception) -> None:
        """A failure of the set-up or a time-out: report it and drop the connection."""
        if isinstance(exc, smtp.SMTPTimeoutError):
            reason = "timed out"
        elif isinstance(exc, smtp.TLSRequiredError):
            reason = "the server does not offer STARTTLS"
        elif isinstance(exc, smtp.AUTHRequiredError):
            reason = "the server offers no AUTH mechanism Gatekeeper can use"
        elif isinstance(exc, smtp.AUTHDeclinedError):
            reason = f"AUTH refused: {exc.code} {_text(exc.resp)}"
        elif isinstance(exc, smtp.SMTPClientError) and exc.code and exc.code > 0:
            reason = f"{exc.code} {_text(exc.resp)}"
        else:
            reason = type(exc).__name__
        self._error = reason
        self.abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Fail whatever was waiting; a TLS failure says so."""
        super().connectionLost(reason)
        self.closed = True
        if self._error == "connection lost" and reason is not None and "SSL" in type(reason.value).__module__:
            self._error = "TLS handshake failed (is the server certificate trusted for this host name?)"
        error = UpstreamUnavailable(f"upstream SMTP: {self._error}")
        if not self.ready.called:
            self.ready.errback(error)
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            if not waiter.called:  # a cancelled wait is already answered
                waiter.errback(UpstreamUnavailable(f"upstream SMTP: {self._error}"))
        self.on_lost(self)

    def abort(self) -> None:
        """Drop the connection at once (mid-data, the server discards the message)."""
        if self.transport is not None and not self.closed:
            if hasattr(self.transport, "abortConnection"):
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()

    def quit(self) -> None:
        """Say goodbye and close (an idle connection)."""
        if self.transport is not None and not self.closed:
            self._send([b"QUIT"])[0].addErrback(lambda _: None)
            self.transport.loseConnection()

    # -- transactions ----------------------------------------------------------------------

    @property
    def pipelining(self) -> bool:
        """Whether the server allows pipelined command groups."""
        return b"PIPELINING" in self.extensions

    @property
    def usable(self) -> bool:
        """Whether the connection can run another transaction."""
        return not self.closed and self.ready.called and not self._waiting

    def _reply(self, code: int, resp: bytes) -> None:
        if not self._waiting:
            # Nothing asked: a server shutting down (421) or confused. Not for reuse.
            self._error = f"unexpected reply {code} {_text(resp)}"
            self.abort()
            return
        waiter = self._waiting.popleft()
        if not self._waiting:
            self.setTimeout(None)
        if not waiter.called:  # a cancelled wait is already answered
            waiter.callback(RelayReply(code, _text(resp)))

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _send(self, lines: Sequence[bytes]) -> list[Deferred[RelayReply]]:
        waiters: list[Deferred[RelayReply]] = [Deferred() for _ in lines]
        self._waiting.extend(waiters)
        self._write(b"".join(line + b"\r\n" for line in lines))
        self.setTimeout(self.limit)
        return waiters

    async def commands(self, lines: Sequence[bytes]) -> list[RelayReply]:
        """Send commands and return their replies (one pipelined group when allowed)."""
        if self.closed:
            raise UpstreamUnavailable(f"upstream SMTP: {self._error}")
        if self.pipelining:
            replies = []
            for ok, value in await gather(self._send(lines)):
                if not ok:
                    value.raiseException()
                replies.append(value)
            return replies
        replies = []
        for line in lines:
            replies.append(await self._send([line])[0])
        return replies

    async def send_data(self, message: bytes | Path) -> None:
        """Send the data of a message after ``354``, without the final dot."""
        self.setTimeout(self.limit)
        if isinstance(message, Path) and message.stat().st_size <= WHOLE_FILE:
            message = message.read_bytes()  # one read: cheaper than a producer for a small file
        if isinstance(message, bytes):
            self._write(dot_stuffed(message))
        else:
            stuffer = _Stuffer(self.resetTimeout)
            with message.open("rb") as stream:
                sender = FileSender()
                sender.CHUNK_SIZE = 65536
                try:
                    await sender.beginFileTransfer(stream, self.transport, stuffer)
                except Exception:
                    raise UpstreamUnavailable(f"upstream SMTP: {self._error}") from None
            if not stuffer.ends_with_crlf:
                self._write(b"\r\n")
        if not self._waiting:
            self.setTimeout(None)

    async def finish_data(self) -> RelayReply:
        """Send the final dot and return the server's verdict on the message."""
        return await self._send([b"."])[0]


async def gather(deferreds: Sequence[Deferred[Any]]) -> list[tuple[bool, Any]]:
    """Wait for all; (True, result) or (False, Failure) for each, in order."""
    results: list[tuple[bool, Any]] = await DeferredList(list(deferreds), consumeErrors=True)
    return results


def _text(resp: bytes | str | None) -> str:
    if resp is None:
        return ""
    text = resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp)
    return " ".join(text.split())[:500]


def _address(address: str) -> bytes:
    return b"<" + address.encode("utf-8") + b">"


class _ConnectionFactory(ClientFactory):
    def __init__(self, build: Callable[[], UpstreamConnection]) -> None:
        self.build = build

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        protocol = self.build()
        protocol.factory = self
        return protocol


@implementer(ISubmissionRelay)
class SmtpRelay:
    """The upstream SMTP server as an :class:`~gatekeeper.interfaces.ISubmissionRelay`."""

    def __init__(
        self,
        reactor: Any,
        endpoint: UpstreamEndpoint,
        *,
        hostname: str,
        ca_file: Path | None = None,
        timeout: float = 30.0,
        user: str | None = None,
        password: str | None = None,
        pool_size: int = 10,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.hostname = hostname
        self.ca_file = ca_file
        self.timeout = timeout
        self.user = user
        self.password = password
        self.pool_size = pool_size
        self.idle_seconds = idle_seconds
        self._context = client_tls_options(endpoint.host, ca_file) if endpoint.security == "starttls" else None
        self._idle: list[tuple[UpstreamConnection, Any]] = []
        self._open: set[UpstreamConnection] = set()
        self._closing: list[Deferred[None]] = []
        self._connecting = 0
        self._closed = False
        self.connections_made = 0

    @classmethod
    def from_config(cls, reactor: Any, config: UpstreamConfig, hostname: str) -> SmtpRelay | None:
        """The relay for ``[upstream]``, or None when no SMTP upstream is configured."""
        if config.smtp is None:
            return None
        return cls(
            reactor,
            config.smtp,
            hostname=hostname,
            ca_file=config.ca_file,
            timeout=config.timeout_seconds,
            user=config.smtp_user,
            password=read_smtp_password(config),
            pool_size=config.smtp_connections,
        )

    # -- connections -----------------------------------------------------------------------

    def _build(self) -> UpstreamConnection:
        protocol = UpstreamConnection(
            identity=self.hostname.encode("ascii"),
            context=self._context,
            require_tls=self.endpoint.security == "starttls",
            user=self.user.encode("utf-8") if self.user is not None else None,
            password=self.password.encode("utf-8") if self.password is not None else None,
            clock=self.reactor,
            timeout=self.timeout,
        )
        protocol.on_lost = self._lost
        self._open.add(protocol)
        return protocol

    def _lost(self, protocol: UpstreamConnection) -> None:
        self._open.discard(protocol)
        for index, (idle, timer) in enumerate(self._idle):
            if idle is protocol:
                del self._idle[index]
                if timer.active():
                    timer.cancel()
                break
        self._maybe_closed()

    def _maybe_closed(self) -> None:
        if self._closed and not self._open and not self._connecting:
            closing, self._closing = self._closing, []
            for waiter in closing:
                waiter.callback(None)

    async def _connect(self) -> UpstreamConnection:
        if self._closed:
            raise UpstreamUnavailable("the upstream relay is shutting down")
        # A connection still being made when the relay closes must be waited for and
        # dropped, or it would open after close() had reported everything closed.
        self._connecting += 1
        try:
            protocol: UpstreamConnection = await connect(
                self.reactor,
                self.endpoint,
                _ConnectionFactory(self._build),
                ca_file=self.ca_file,
                timeout=self.timeout,
            )
            if self._closed:
                protocol.ready.addErrback(lambda _: None)  # the abort fails it; nobody waits for it now
                protocol.abort()
                raise UpstreamUnavailable("the upstream relay is shutting down")
            await protocol.ready
        except UpstreamUnavailable as error:
            emit(log, "upstream", "upstream SMTP unavailable: {detail}", level="warn", protocol="smtp",
                 outcome="timeout" if "timed out" in str(error) else "error", detail=str(error))  # fmt: skip
            raise
        finally:
            self._connecting -= 1
            self._maybe_closed()
        self.connections_made += 1
        return protocol

    async def _acquire(self) -> UpstreamConnection:
        while self._idle:
            protocol, timer = self._idle.pop()
            if timer.active():
                timer.cancel()
            if protocol.usable:
                protocol.reused = True
                return protocol
        protocol = await self._connect()
        protocol.reused = False
        return protocol

    def _release(self, protocol: UpstreamConnection) -> None:
        protocol.transactions += 1
        if self._closed:
            protocol.quit()
            return
        if not protocol.usable:
            protocol.abort()
            return
        if len(self._idle) >= self.pool_size or protocol.transactions >= MAX_TRANSACTIONS:
            protocol.quit()
            return
        timer = self.reactor.callLater(self.idle_seconds, self._expire, protocol)
        self._idle.append((protocol, timer))

    def _expire(self, protocol: UpstreamConnection) -> None:
        self._idle = [(p, t) for p, t in self._idle if p is not protocol]
        protocol.quit()

    def close(self) -> Deferred[None]:
        """Close every connection (and those still being made); fires when all are gone."""
        self._closed = True
        done: Deferred[None] = Deferred()
        idle, self._idle = self._idle, []
        for protocol, timer in idle:
            if timer.active():
                timer.cancel()
            protocol.quit()
        for protocol in list(self._open):
            if protocol not in (p for p, _ in idle):
                protocol.abort()
        self._closing.append(done)
        self._maybe_closed()
        return done

    @property
    def idle(self) -> int:
        """How many connections wait in the pool."""
        return len(self._idle)

    # -- ISubmissionRelay ------------------------------------------------------------------

    def _mail_from(self, protocol: UpstreamConnection, sender: str, size: int | None, eight_bit: bool) -> bytes:
        line = b"MAIL FROM:" + _address(sender)
        if eight_bit and b"8BITMIME" in protocol.extensions:
            line += b" BODY=8BITMIME"
        if size is not None and b"SIZE" in protocol.extensions:
            line += b" SIZE=%d" % size
        return line

    def transaction(self, sender: str) -> SmtpTransaction:
        """Begin a mail transaction from ``sender`` (nothing is sent until the first recipient)."""
        return SmtpTransaction(self, sender)

    async def verify(self, sender: str, recipient: str) -> RelayReply:
        """Ask the server about one recipient (``MAIL``, ``RCPT``, ``RSET``); return its reply."""
        transaction = self.transaction(sender)
        try:
            return await transaction.add_recipient(recipient)
        finally:
            transaction.abort()

    async def relay(self, copies: Sequence[RelayCopy]) -> tuple[RelayOutcome, ...]:
        """See :meth:`ISubmissionRelay.relay`."""
        results = await gather([Deferred.fromCoroutine(self._prepare(copy)) for copy in copies])
        failures = [value for ok, value in results if not ok]
        prepared = [value for ok, value in results if ok]
        if failures:
            for protocol, _ in prepared:
                protocol.abort()  # mid-data: the server discards the copy
            refusals = [f.value for f in failures if isinstance(f.value, RelayRefused)]
            permanent = [r for r in refusals if not r.temporary]
            raise (permanent or refusals or [f.value for f in failures])[0]
        # Every copy got as far as its final dot: commit them all together.
        answers = await gather([Deferred.fromCoroutine(protocol.finish_data()) for protocol, _ in prepared])
        outcomes = []
        for (protocol, recipients), (ok, value) in zip(prepared, answers, strict=True):
            reply = value if ok else _LOST
            if ok:
                self._release(protocol)
            else:
                protocol.abort()
            outcomes.append(RelayOutcome(recipients, reply))
        if not any(outcome.accepted for outcome in outcomes):
            reply = outcomes[0].reply
            raise RelayRefused(f"the mail server refused the message: {reply}", code=reply.code, status=reply.status)
        return tuple(outcomes)

    async def _prepare(self, copy: RelayCopy) -> tuple[UpstreamConnection, tuple[tuple[str, RelayReply], ...]]:
        """Open the transaction for one copy and send its data, all but the final dot."""
        size = len(copy.message) if isinstance(copy.message, bytes) else copy.message.stat().st_size
        for attempt in range(2):
            protocol = await self._acquire()
            try:
                replies = await protocol.commands(
                    [
                        self._mail_from(protocol, copy.sender, size, copy.eight_bit),
                        *(b"RCPT TO:" + _address(r) for r in copy.recipients),
                        b"DATA",
                    ]
                )
            except UpstreamUnavailable:
                protocol.abort()
                if protocol.reused and attempt == 0:
                    continue
                raise
            except BaseException:
                protocol.abort()
                raise
            mail, rcpts, data = replies[0], replies[1:-1], replies[-1]
            recipients = tuple(zip(copy.recipients, rcpts, strict=True))
            try:
                if not mail.accepted:
                    raise RelayRefused(f"sender {copy.sender or '<>'}: {mail}", code=mail.code, status=mail.status)
                for recipient, reply in recipients:
                    if not reply.accepted:
                        raise RelayRefused(f"{recipient}: {reply}", code=reply.code, status=reply.status,
                                           recipient=recipient)  # fmt: skip
                if data.code != 354:
                    raise RelayRefused(f"DATA: {data}", code=data.code, status=data.status)
                await protocol.send_data(copy.message)
            except RelayRefused:
                if data.code == 354:
                    protocol.abort()  # the server waits for data we will not send: drop the connection
                else:
                    await self._reset(protocol)
                raise
            except (CancelledError, Exception):
                protocol.abort()
                raise
            return protocol, recipients
        raise AssertionError("unreachable")

    async def _begin(self, sender: str, recipient: str) -> tuple[UpstreamConnection, RelayReply, RelayReply]:
        """``MAIL`` and a first ``RCPT`` on a connection of the pool (a fresh one if a kept one was stale)."""
        for attempt in range(2):
            protocol = await self._acquire()
            # BODY=8BITMIME may announce 7-bit content too, and the copy is not built yet.
            mail_from = self._mail_from(protocol, sender, None, True)
            try:
                mail, rcpt = await protocol.commands([mail_from, b"RCPT TO:" + _address(recipient)])
            except UpstreamUnavailable:
                protocol.abort()
                if protocol.reused and attempt == 0:
                    continue  # the server had closed the idle connection: once more on a new one
                raise
            except BaseException:
                protocol.abort()
                raise
            return protocol, mail, rcpt
        raise AssertionError("unreachable")

    async def _reset(self, protocol: UpstreamConnection) -> None:
        try:
            await protocol.commands([b"RSET"])
        except UpstreamUnavailable:
            return
        self._release(protocol)


@implementer(IRelayTransaction)
class SmtpTransaction:
    """One client transaction, held open upstream while the client sends its message.

    Each recipient is put to the server with ``RCPT`` on one connection as the client
    names it, so a refusal reaches the client at once. When the message becomes a single
    copy for exactly those recipients (the common case), its data goes on that same
    transaction: no second ``MAIL``/``RCPT`` round. Otherwise (several copies, a
    recipient the policy refused, a connection the server closed meanwhile) the held
    transaction is reset and :meth:`SmtpRelay.relay` sends the copies.
    """

    def __init__(self, relay: SmtpRelay, sender: str) -> None:
        self.relay = relay
        self.sender = sender
        self.protocol: UpstreamConnection | None = None
        self.recipients: list[tuple[str, RelayReply]] = []

    async def add_recipient(self, recipient: str) -> RelayReply:
        """Put ``RCPT TO`` to the server; return its reply (or the reply to ``MAIL`` if that was refused)."""
        protocol = self.protocol
        try:
            if protocol is None or protocol.closed:
                self._drop()
                protocol, mail, reply = await self.relay._begin(self.sender, recipient)
                if not mail.accepted:
                    Deferred.fromCoroutine(self.relay._reset(protocol))
                    return mail
                self.protocol = protocol
            else:
                [reply] = await protocol.commands([b"RCPT TO:" + _address(recipient)])
        except BaseException:
            self._drop()
            raise
        if reply.accepted:
            self.recipients.append((recipient, reply))
        return reply

    def _drop(self) -> None:
        protocol, self.protocol = self.protocol, None
        self.recipients = []
        if protocol is not None:
            protocol.abort()

    def abort(self) -> None:
        """Forget the transaction upstream (``RSET``; the connection goes back to the pool)."""
        protocol, self.protocol = self.protocol, None
        self.recipients = []
        if protocol is not None and protocol.usable:
            Deferred.fromCoroutine(self.relay._reset(protocol))
        elif protocol is not None:
            protocol.abort()

    def _fits(self, copies: Sequence[RelayCopy]) -> bool:
        if len(copies) != 1 or self.protocol is None or not self.protocol.usable:
            return False
        [copy] = copies
        held = {address_key(r) for r, _ in self.recipients}
        return copy.sender == self.sender and {address_key(r) for r in copy.recipients} == held

    async def send(self, copies: Sequence[RelayCopy]) -> tuple[RelayOutcome, ...]:
        """Deliver the copies (see :meth:`ISubmissionRelay.relay`), on the held transaction when they fit it."""
        if not self._fits(copies):
            self.abort()
            return await self.relay.relay(copies)
        protocol, self.protocol = self.protocol, None
        assert protocol is not None
        recipients, self.recipients = tuple(self.recipients), []
        [copy] = copies
        try:
            [data] = await protocol.commands([b"DATA"])
            if data.code != 354:
                Deferred.fromCoroutine(self.relay._reset(protocol))
                raise RelayRefused(f"DATA: {data}", code=data.code, status=data.status)
            await protocol.send_data(copy.message)
        except UpstreamUnavailable:
            protocol.abort()
            return await self.relay.relay(copies)  # nothing was committed: once more from the start
        except (CancelledError, Exception):
            protocol.abort()
            raise
        try:
            reply = await protocol.finish_data()
        except UpstreamUnavailable:
            protocol.abort()
            reply = _LOST
        else:
            self.relay._release(protocol)
        if not reply.accepted:
            raise RelayRefused(f"the mail server refused the message: {reply}", code=reply.code, status=reply.status)
        return (RelayOutcome(recipients, reply),)

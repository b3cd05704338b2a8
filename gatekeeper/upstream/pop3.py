"""The upstream POP3 client: users' maildrops on the real mail server.

:class:`NetworkPop3Upstream` implements :class:`~gatekeeper.interfaces.IPop3Upstream`
with Twisted's POP3 client, connected by :func:`gatekeeper.upstream.connect`: POP3S
(``tls:``) or STLS (``starttls:``, refused if the server does not offer it), the
server's certificate verified by host name, ``TCP_NODELAY`` on. It logs in with
``USER``/``PASS`` (never APOP) and takes the message list (``UIDL`` and ``LIST``) at
once; :class:`NetworkMaildrop` is the session.

Two things differ from Twisted's client:

- a message (``RETR``/``TOP``) is received in bulk: the chunks are kept as they arrive
  and the terminating ``CRLF.CRLF`` is searched for in C, then dots are unstuffed with
  one ``bytes.replace``, instead of one Python call per line (about 900 for 64 KB);
- every command must see the server answer, or at least send something, within
  ``[upstream] timeout_seconds``; otherwise the connection is dropped and the request
  fails with :class:`~gatekeeper.errors.UpstreamUnavailable` (an idle session waiting
  for the client has no time limit here: the POP3 server's own applies).

Deletions are sent only at :meth:`NetworkMaildrop.commit` (``DELE``... then ``QUIT``);
:meth:`NetworkMaildrop.close` drops the connection without ``QUIT``, and POP3 servers
then delete nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from OpenSSL.SSL import Error as SSLError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.mail._except import LineTooLong
from twisted.mail.pop3 import AdvancedPOP3Client, ServerErrorResponse, TLSNotSupportedError
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeeper.config import UpstreamEndpoint
from gatekeeper.errors import UpstreamRefused, UpstreamUnavailable
from gatekeeper.events import emit
from gatekeeper.interfaces import IPop3Maildrop, IPop3Upstream, MaildropEntry, UpstreamLogin
from gatekeeper.upstream import client_tls_options, connect

log = Logger()

_CODE = re.compile(rb"^\[([A-Za-z0-9/-]+)\]")
_TERMINATOR = b"\r\n.\r\n"


def response_code(response: bytes) -> str | None:
    """The RFC 2449 response code at the start of a ``-ERR`` text (``AUTH``, ``IN-USE``...), upper-case."""
    found = _CODE.match(response.strip())
    return found.group(1).decode("ascii").upper() if found else None


def _bulk_marker(line: bytes) -> bytes:
    """Marks a multi-line command whose answer is a message body, to be taken in bulk (never called)."""
    return line


class _Bulk:
    """Collects one message body as raw chunks until the line holding only a dot."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.tail = b"\r\n"  # the body starts at a line start: as if after a line end

    def feed(self, data: bytes) -> tuple[bytes | None, bytes]:
        """Take ``data``; return (the unstuffed body, the bytes after it) once complete, else (None, b"")."""
        joint = self.tail + data[:4]
        found = joint.find(_TERMINATOR)
        if found >= 0:
            end = found - len(self.tail) + 2  # where the body ends in ``data`` (after the CRLF before the dot)
        else:
            found = data.find(_TERMINATOR)
            if found < 0:
                self.chunks.append(data)
                self.tail = (self.tail + data)[-4:] if len(data) < 4 else data[-4:]
                return None, b""
            end = found + 2
        if end >= 0:
            self.chunks.append(data[:end])
        else:
            self._trim(-end)  # the terminator began in the chunks already kept
        body = b"".join(self.chunks)
        self.chunks = []
        if body.startswith(b".."):
            body = body[1:]
        # bytes.replace returns the same object when there is nothing to unstuff: no copy.
        return body.replace(b"\r\n..", b"\r\n."), data[end + 3 :]

    def _trim(self, count: int) -> None:
        while count and self.chunks:
            last = self.chunks.pop()
            if len(last) > count:
                self.chunks.append(last[:-count])
                return
            count -= len(last)


class Pop3UpstreamClient(AdvancedPOP3Client):
    """Twisted's POP3 client, with message bodies taken in bulk and a time limit per command.

    ``clock`` schedules the time limit of ``seconds``; :attr:`greeted` fires with the
    server's greeting (or fails when the connection ends first).
    """

    timeout = 0  # Twisted's idle time-out would also drop a session that waits for its client

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self._clock = clock
        self._seconds = seconds
        self._deadline: IDelayedCall | None = None
        self._bulk: _Bulk | None = None
        self.greeted: Deferred[bytes] = Deferred()
        self.disconnected: Deferred[None] = Deferred()
        self.timed_out = False

    # -- the time limit -----------------------------------------------------------------

    def _arm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self._seconds)
        else:
            self._deadline = self._clock.callLater(self._seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        self.timed_out = True
        self.abort()

    def abort(self) -> None:
        """Drop the connection at once (no QUIT: the server deletes nothing)."""
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionMade(self) -> None:
        """Wait, within the time limit, for the greeting."""
        super().connectionMade()
        self._arm()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """Fail whatever was waiting."""
        self._disarm()
        if not self.greeted.called:
            self.greeted.errback(reason)
        super().connectionLost(reason)
        self.disconnected.callback(None)

    def serverGreeting(self, greeting: bytes) -> None:
        """The server said ``+OK``: commands may follow."""
        if not self.greeted.called:
            self.greeted.callback(greeting)

    def sendLine(self, line: bytes) -> None:
        """Send a command: its answer must begin within the time limit."""
        self._arm()
        super().sendLine(line)

    def _unblock(self) -> None:
        # Twisted's state machine calls this when an answer is complete; with nothing
        # else outstanding the session is idle, which has no time limit.
        super()._unblock()
        if self._waiting is None:
            self._disarm()

    # -- message bodies in bulk ---------------------------------------------------------

    def retrieve_bulk(self, index: int, lines: int | None = None) -> Deferred[bytes]:
        """``RETR`` (or ``TOP index lines``) of a 0-based message; fires with the message, unstuffed."""
        received: list[bytes] = []
        number = b"%d" % (index + 1,)
        command, args = (b"RETR", number) if lines is None else (b"TOP", number + b" %d" % (lines,))
        d: Deferred[Any] = self.sendLong(command, args, received.append, _bulk_marker)
        return d.addCallback(lambda _: received[0] if received else b"")

    def state_LONG_INITIAL(self, line: bytes) -> str:
        """The first line of a multi-line answer; ``+OK`` to a message body switches to bulk."""
        bulk = self._xform is _bulk_marker
        state: str = super().state_LONG_INITIAL(line)
        if state == "LONG" and bulk:
            self._bulk = _Bulk()
        return state

    def dataReceived(self, data: bytes) -> None:
        """Split lines as ``LineOnlyReceiver`` does, but hand a message body over in bulk."""
        if self._deadline is not None:
            self._arm()  # the server is sending: it gets the whole time limit again
        while data:
            if self._bulk is not None:
                body, data = self._bulk.feed(data)
                if body is None:
                    return
                self._bulk = None
                self._consumer(body)
                self.lineReceived(b".")  # Twisted's state machine ends the answer
                continue
            buffer, data = self._buffer + data, b""
            start = 0
            while self._bulk is None:
                end = buffer.find(b"\r\n", start)
                if end < 0:
                    break
                line, start = buffer[start:end], end + 2
                if self.transport is None or getattr(self.transport, "disconnecting", False):
                    self._buffer = b""
                    return
                self.lineReceived(line)
            rest = buffer[start:]
            self._buffer = b""
            if self._bulk is not None:
                data = rest
            elif len(rest) > self.MAX_LENGTH:
                self.lineLengthExceeded(rest)
                return
            else:
                self._buffer = rest


class _ClientFactory(ClientFactory):
    noisy = False

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds

    def buildProtocol(self, addr: Any) -> Pop3UpstreamClient:
        protocol = Pop3UpstreamClient(self.clock, self.seconds)
        protocol.factory = self
        return protocol


# -- the maildrop ---------------------------------------------------------------------------


def _event(outcome: str, detail: str, user: str) -> None:
    emit(
        log,
        "upstream",
        "upstream POP3 for {user}: {outcome} ({detail})",
        protocol="pop3",
        outcome=outcome,
        detail=detail,
        user=user,
    )


def _translate(failure: BaseException, protocol: Pop3UpstreamClient | None, what: str, seconds: float) -> Exception:
    """The error to raise for a failed upstream request; ``what`` names it for people."""
    if isinstance(failure, ServerErrorResponse):
        text = failure.args[0] if failure.args and isinstance(failure.args[0], bytes) else b""
        code = response_code(text)
        if what == "login":
            return UpstreamRefused("the mail server refused the login", code=code or "AUTH")
        return UpstreamRefused(f"the mail server refused {what}", code=code)
    if isinstance(failure, UpstreamUnavailable | UpstreamRefused):
        return failure
    if protocol is not None and protocol.timed_out:
        return UpstreamUnavailable(f"the mail server did not answer within {seconds:g} s")
    if isinstance(failure, TLSNotSupportedError):
        return UpstreamUnavailable("the mail server does not offer STLS")
    if isinstance(failure, LineTooLong):
        return UpstreamUnavailable("the mail server sent a line that is too long")
    if isinstance(failure, SSLError):
        return UpstreamUnavailable("TLS with the mail server failed (its certificate was not accepted?)")
    return UpstreamUnavailable(f"the connection to the mail server was lost during {what}")


@implementer(IPop3Upstream)
class NetworkPop3Upstream:
    """Opens maildrops on the upstream POP3 server ``endpoint`` (see the module docstring)."""

    def __init__(self, reactor: Any, endpoint: UpstreamEndpoint, *, ca_file: Path | None, timeout: float) -> None:
        self._reactor = reactor
        self.endpoint = endpoint
        self._ca_file = ca_file
        self._timeout = timeout

    async def open(self, login: UpstreamLogin) -> NetworkMaildrop:
        """Connect, secure the connection, log in and list the messages."""
        factory = _ClientFactory(self._reactor, self._timeout)
        try:
            protocol: Pop3UpstreamClient = await connect(
                self._reactor, self.endpoint, factory, ca_file=self._ca_file, timeout=self._timeout
            )
        except UpstreamUnavailable as error:
            _event("error", str(error), login.address)
            raise
        step = "the greeting"
        try:
            await protocol.greeted
            if self.endpoint.security == "starttls":
                step = "STLS"
                await protocol.startTLS(client_tls_options(self.endpoint.host, self._ca_file))
            step = "login"
            await protocol.user(login.user.encode("utf-8"))
            await protocol.password(login.password.encode("utf-8"))
            step = "the message list"
            uids = await protocol.listUID()
            sizes = await protocol.listSize()
        except Exception as error:
            protocol.abort()
            translated = _translate(error, protocol, step, self._timeout)
            _event("timeout" if protocol.timed_out else "error", str(translated), login.address)
            raise translated from None
        if len(uids) != len(sizes) or any(uid is None for uid in uids):
            protocol.abort()
            _event("error", "inconsistent UIDL and LIST", login.address)
            raise UpstreamUnavailable("the mail server's message list is inconsistent")
        _event("ok", f"logged in, {len(uids)} messages", login.address)
        entries = tuple(MaildropEntry(uid, size) for uid, size in zip(uids, sizes, strict=True))
        return NetworkMaildrop(protocol, entries, login.address, self._timeout)


@implementer(IPop3Maildrop)
class NetworkMaildrop:
    """One logged-in session on the upstream POP3 server."""

    def __init__(
        self, protocol: Pop3UpstreamClient, entries: Sequence[MaildropEntry], address: str, seconds: float
    ) -> None:
        self._protocol = protocol
        self.entries = entries
        self._address = address
        self._seconds = seconds

    async def _request(self, d: Deferred[Any], what: str) -> Any:
        try:
            return await d
        except Exception as error:
            translated = _translate(error, self._protocol, what, self._seconds)
            _event("timeout" if self._protocol.timed_out else "error", str(translated), self._address)
            raise translated from None

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self.entries):
            raise IndexError("no such message")

    async def retrieve(self, index: int) -> bytes:
        """``RETR``."""
        self._check(index)
        data: bytes = await self._request(self._protocol.retrieve_bulk(index), "RETR")
        return data

    async def top(self, index: int, lines: int) -> bytes:
        """``TOP``."""
        self._check(index)
        data: bytes = await self._request(self._protocol.retrieve_bulk(index, lines), "TOP")
        return data

    async def commit(self, deleted: Sequence[int]) -> None:
        """``DELE`` each message, then ``QUIT``: the deletions are permanent once QUIT is answered."""
        refused = 0
        for index in sorted(set(deleted)):
            self._check(index)
            try:
                await self._request(self._protocol.delete(index), "DELE")
            except UpstreamRefused:
                refused += 1
        await self._request(self._protocol.quit(), "QUIT")
        self.close()
        _event("ok", f"{len(set(deleted)) - refused} deleted", self._address)
        if refused:
            raise UpstreamRefused(f"the mail server did not delete {refused} message(s)")

    def close(self) -> None:
        """Drop the connection at once, without ``QUIT``: the server deletes nothing."""
        if not self._protocol.disconnected.called:
            self._protocol.abort()

    def closed(self) -> Deferred[None]:
        """A Deferred that fires once the connection is gone."""
        done: Deferred[None] = Deferred()
        self._protocol.disconnected.addBoth(lambda _: done.callback(None))
        return done

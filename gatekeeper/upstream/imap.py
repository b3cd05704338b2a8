"""The IMAP proxy's client to the upstream server: Twisted's IMAP4Client, extended.

Twisted's ``IMAP4Client`` parses every response with ``parseNestedParens`` when its
command finishes (a 10,000-message listing is held and parsed twice), drops untagged
``EXPUNGE`` responses it did not ask for, and has no IDLE, MOVE or UIDPLUS. The proxy
keeps its connection handling, literal assembly and tagged-command machinery
(``sendCommand(Command)``, tags, queueing) and, once the greeting is in, switches the
protocol into its own ``"proxy"`` state, whose ``response_PROXY`` (the client's own
``response_<STATE>`` dispatch) handles each response as it arrives:

- ``FETCH`` responses go, as received, to the running command's sink (streamed to the
  client) or, unsolicited, to the session's :class:`~gatekeeper.interfaces.IMailStoreEvents`;
- ``EXISTS``, ``RECENT``, ``EXPUNGE`` and ``UIDVALIDITY`` always go to the events (the
  proxy's state machine, :mod:`gatekeeper.imap_state`), whichever command is running;
- the commands Twisted lacks (``IDLE``/``DONE``, ``UID MOVE``, ``UID EXPUNGE``,
  ``COPYUID``/``APPENDUID`` codes) are :class:`ProxyCommand` objects sent through
  ``sendCommand``.

Every command has a deadline (``[upstream] timeout_seconds``, restarted whenever data
arrives); when it passes, the connection is dropped and every waiting command fails
with :class:`~gatekeeper.errors.UpstreamUnavailable`: a slow server never hangs a client.
The server's own words (its NO/BAD text, its BYE) are never shown to a client or logged
beyond their response code: they may quote the client's data.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeeper import imap_syntax as syntax
from gatekeeper.config import UpstreamConfig, UpstreamEndpoint
from gatekeeper.errors import UpstreamRefused, UpstreamUnavailable
from gatekeeper.events import emit
from gatekeeper.interfaces import (
    Appended,
    CopiedUids,
    FetchResponse,
    IMailStoreEvents,
    IMailStoreSession,
    MailboxEntry,
    MailStoreError,
    SelectInfo,
)
from gatekeeper.upstream import client_tls_options, connect

log = Logger()

MAX_RESPONSE_LINE = 4 * 1024 * 1024
_NUMBERED = re.compile(rb"(\d+) ([A-Za-z]+)")
_LEADING_UID = re.compile(rb"\(UID (\d+)[ )]")
_FETCH_WITH_UID = re.compile(rb"(\d+) FETCH \(UID (\d+)[ )]")
_CODE = re.compile(rb"\[([^\]]*)\]")
_REFUSED_LOGIN_CODES = frozenset({"AUTHENTICATIONFAILED", "AUTHORIZATIONFAILED", "EXPIRED", "PRIVACYREQUIRED"})

FetchSink = Callable[[FetchResponse], None]


def mailbox_name(name: str) -> bytes:
    """A mailbox name as an IMAP astring in modified UTF-7 (RFC 3501 5.1.3)."""
    return syntax.astring(name.encode("imap4-utf-7"))


def decode_mailbox_name(raw: bytes) -> str:
    """A mailbox name from the wire (modified UTF-7) as text."""
    return raw.decode("imap4-utf-7")


def _code_of(text: bytes) -> tuple[str | None, bytes]:
    """The response code of a status response (``[UIDVALIDITY 3]`` -> ("UIDVALIDITY", b"3"))."""
    match = _CODE.match(text.lstrip())
    if match is None:
        return None, b""
    name, _, value = match.group(1).partition(b" ")
    return name.decode("ascii", "replace").upper(), value


class ProxyCommand(imap4.Command):
    """A tagged command with its own handlers for untagged responses and continuations.

    ``untagged(keyword, rest)`` sees the untagged responses that arrive while this
    command runs (after the events have seen theirs); ``sink`` receives FETCH responses;
    ``proceed(text)`` answers a ``+`` continuation. The Deferred fires with the text of
    the tagged OK (response code included), or fails with :class:`MailStoreError`.
    """

    def __init__(
        self,
        command: bytes,
        args: bytes | None = None,
        *,
        untagged: Callable[[bytes, bytes], None] | None = None,
        sink: FetchSink | None = None,
        proceed: Callable[[bytes], None] | None = None,
        what: str | None = None,
    ) -> None:
        super().__init__(command, args, (), self._continue)
        self.untagged = untagged
        self.sink = sink
        self.proceed = proceed
        self.what = what or command.decode("ascii")

    def _continue(self, text: bytes) -> None:
        if self.proceed is None:
            raise imap4.IllegalServerResponse(b"unexpected continuation")
        self.proceed(text)


class UpstreamImapProtocol(imap4.IMAP4Client):
    """The connection to the upstream IMAP server (see the module docstring)."""

    MAX_LENGTH = MAX_RESPONSE_LINE

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        super().__init__()
        self._clock = clock
        self._command_timeout = timeout
        self._deadline: IDelayedCall | None = None
        self.greeted: Deferred[dict[bytes, Any] | None] = Deferred()
        self.events: IMailStoreEvents | None = None
        self.bye = False
        self.timed_out = False
        self.lost = False
        self.idling = False
        self._on_lost: list[Callable[[str], None]] = []

    # -- connection -----------------------------------------------------------------------

    def serverGreeting(self, caps: dict[bytes, Any] | None) -> None:
        """The greeting is in: from now on every response goes to :meth:`response_PROXY`."""
        self.state = "proxy"
        if not self.greeted.called:
            self.greeted.callback(caps)

    def dataReceived(self, data: bytes) -> None:
        """Restart the deadline of the running command whenever the server says something."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self._command_timeout)
        super().dataReceived(data)
        command = self._current()
        if command is not None and command.sink is not None:
            flush = getattr(command.sink, "flush", None)
            if flush is not None:
                flush()

    def lineLengthExceeded(self, line: bytes) -> None:
        """A response line past the limit: the connection cannot be followed any more."""
        log.warn("upstream IMAP response line too long ({size} bytes); dropping the connection", size=len(line))
        self._transport().abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Fail every waiting command with UpstreamUnavailable and tell the session."""
        self.lost = True
        self._disarm()
        why = "timed out" if self.timed_out else ("closed by the server" if self.bye else "connection lost")
        error = UpstreamUnavailable(f"the upstream IMAP server {why}")
        pending = [c for c in (self.tags or {}).values() if c is not None] + list(self.queued or [])
        self.tags = None  # type: ignore[assignment]
        self.queued = None  # type: ignore[assignment]
        for command in pending:
            if command.defer is not None:
                d, command.defer = command.defer, None
                d.errback(error)
        if not self.greeted.called:
            self.greeted.errback(error)
        for callback in self._on_lost:
            callback(why)
        self._on_lost.clear()

    def when_lost(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` once the connection is gone."""
        if self.lost:
            callback("connection lost")
        else:
            self._on_lost.append(callback)

    def _transport(self) -> Any:
        return self.transport

    # -- commands ------------------------------------------------------------------------

    def run(self, command: ProxyCommand) -> Deferred[bytes]:
        """Send ``command`` (queued behind the running one); fires with its tagged OK text."""
        if self.lost or self.tags is None:
            return Deferred.fromCoroutine(_fail(UpstreamUnavailable("the upstream IMAP session is closed")))
        d: Deferred[bytes] = self.sendCommand(command)
        self._arm()
        return d

    def _current(self) -> ProxyCommand | None:
        if not self.waiting or self.tags is None:
            return None
        command = self.tags.get(self.waiting)
        return command if isinstance(command, ProxyCommand) else None

    def _arm(self) -> None:
        if self.idling:
            return
        if self._deadline is None or not self._deadline.active():
            self._deadline = self._clock.callLater(self._command_timeout, self._expired)

    def _rearm(self) -> None:
        """A command finished: give the next one a full deadline, or stop watching."""
        self._disarm()
        if self.waiting:
            self._arm()

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.waiting or self.queued:
            self.timed_out = True
            emit(log, "upstream", "upstream IMAP command timed out", level="warn", protocol="imap", outcome="timeout")
            self._transport().abortConnection()

    def start_idle(self) -> None:
        """The running IDLE was accepted: no deadline while idling."""
        self.idling = True
        self._disarm()

    def send_done(self) -> None:
        """End IDLE; its tagged OK now has a deadline like any answer."""
        if self.idling:
            self.idling = False
            self.sendLine(b"DONE")
            self._arm()

    def send_literal(self, data: bytes) -> None:
        """Send literal data after a continuation, and the end of the command line."""
        self._transport().writeSequence([data, b"\r\n"])

    # -- responses -----------------------------------------------------------------------

    def response_PROXY(self, tag: bytes, rest: bytes) -> None:
        """Handle one complete response (literals inline) in the proxy state."""
        if tag == b"*":
            self._untagged(rest)
        elif tag == b"+":
            command = self._current()
            if command is None:
                raise imap4.IllegalServerResponse(b"continuation without a command")
            command.continuation(rest)
        else:
            self._tagged(tag, rest)

    def _untagged(self, rest: bytes) -> None:
        command = self._current()
        quick = _FETCH_WITH_UID.match(rest)
        if quick is not None:
            # the common case, one per message of a listing: "N FETCH (UID u ..."
            response = FetchResponse(int(quick.group(1)), int(quick.group(2)), rest[quick.start(2) - 5 :])
            if command is not None and command.sink is not None:
                command.sink(response)
            elif self.events is not None:
                self.events.fetched(response)
            return
        numbered = _NUMBERED.match(rest)
        if numbered is not None:
            number = int(numbered.group(1))
            keyword = numbered.group(2).upper()
            if keyword == b"FETCH":
                data = rest[numbered.end() :].lstrip(b" ")
                uid_match = _LEADING_UID.match(data)
                uid = int(uid_match.group(1)) if uid_match is not None else _uid_item(data)
                response = FetchResponse(number, uid, data)
                if command is not None and command.sink is not None:
                    command.sink(response)
                elif self.events is not None:
                    self.events.fetched(response)
                return
            if self.events is not None:
                if keyword == b"EXISTS":
                    self.events.exists(number)
                elif keyword == b"EXPUNGE":
                    self.events.expunged(number)
                elif keyword == b"RECENT":
                    self.events.recent(number)
            if command is not None and command.untagged is not None:
                command.untagged(keyword, numbered.group(1))
            return
        keyword, _, tail = rest.partition(b" ")
        keyword = keyword.upper()
        if keyword == b"BYE":
            self.bye = True
            return
        if keyword == b"OK" and self.events is not None:
            code, value = _code_of(tail)
            selecting = command is not None and command.command in (b"SELECT", b"EXAMINE")
            if code == "UIDVALIDITY" and not selecting and value.isdigit():
                self.events.uidvalidity(int(value))
        if command is not None and command.untagged is not None:
            command.untagged(keyword, tail)

    def _tagged(self, tag: bytes, rest: bytes) -> None:
        if self.tags is None or tag not in self.tags:
            raise imap4.IllegalServerResponse(b"unknown tag")
        command = self.tags.pop(tag)
        self.waiting = None
        status, _, text = rest.partition(b" ")
        d, command.defer = command.defer, None
        self._flushQueue()
        self._rearm()
        if d is None:
            return
        if status.upper() == b"OK":
            d.callback(text)
        else:
            code, _ = _code_of(text)
            what = getattr(command, "what", command.command.decode("ascii", "replace"))
            d.errback(MailStoreError(f"the upstream server refused {what}", code))


async def _fail(error: Exception) -> Any:
    raise error


def _uid_item(data: bytes) -> int | None:
    """The UID item of a FETCH list, wherever it is (the slow path)."""
    try:
        for name, value in syntax.fetch_items(data):
            if name == b"UID":
                return int(value)
    except (syntax.ImapSyntaxError, ValueError):
        return None
    return None


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout

    def buildProtocol(self, addr: Any) -> UpstreamImapProtocol:
        protocol = UpstreamImapProtocol(self.clock, self.timeout)
        protocol.factory = self
        return protocol


def _capabilities(text: bytes) -> frozenset[str]:
    return frozenset(word.decode("ascii", "replace").upper() for word in text.split())


def _flag_list(value: syntax.Value) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(v.decode("ascii", "replace") for v in value if isinstance(v, bytes))
    return ()


@implementer(IMailStoreSession)
class UpstreamImapSession:
    """One logged-in session with the upstream IMAP server (see the module docstring)."""

    def __init__(self, protocol: UpstreamImapProtocol, capabilities: frozenset[str], delimiter: str | None) -> None:
        self.protocol = protocol
        self.capabilities = capabilities
        self.delimiter = delimiter
        self._idle_command: ProxyCommand | None = None
        self._idle_done: Deferred[bytes] | None = None

    @property
    def lost(self) -> bool:
        """Whether the connection is gone."""
        return self.protocol.lost

    def pause(self) -> None:
        """Stop reading from the server (the client is slow to take what was read)."""
        transport = self.protocol.transport
        if transport is not None and not self.protocol.lost:
            transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        """Read from the server again."""
        transport = self.protocol.transport
        if transport is not None and not self.protocol.lost:
            transport.resumeProducing()  # type: ignore[attr-defined]

    def set_listener(self, events: IMailStoreEvents) -> None:
        """Send unsolicited responses (and the loss of the session) to ``events``."""
        self.protocol.events = events
        self.protocol.when_lost(events.session_lost)

    async def _run(self, command: ProxyCommand) -> bytes:
        if self._idle_command is not None:
            await self._stop_idle()
        return await self.protocol.run(command)

    # -- mailboxes -----------------------------------------------------------------------

    def list_mailboxes(
        self, reference: str, pattern: str, subscribed: bool = False
    ) -> Deferred[builtins.list[MailboxEntry]]:
        """LIST or LSUB."""
        return Deferred.fromCoroutine(self._list(reference, pattern, subscribed))

    async def _list(self, reference: str, pattern: str, subscribed: bool) -> builtins.list[MailboxEntry]:
        keyword = b"LSUB" if subscribed else b"LIST"
        found: builtins.list[MailboxEntry] = []

        def untagged(word: bytes, rest: bytes) -> None:
            if word != keyword:
                return
            values = syntax.parse_line(rest)
            if len(values) < 3 or not isinstance(values[2], bytes):
                return
            delimiter = values[1].decode("ascii", "replace") if isinstance(values[1], bytes) else None
            found.append(MailboxEntry(decode_mailbox_name(values[2]), delimiter, _flag_list(values[0])))

        args = mailbox_name(reference) + b" " + syntax.nstring(pattern.encode("imap4-utf-7"))
        await self._run(ProxyCommand(keyword, args, untagged=untagged))
        return found

    def status(self, mailbox: str, items: Sequence[str]) -> Deferred[dict[str, int]]:
        """STATUS."""
        return Deferred.fromCoroutine(self._status(mailbox, items))

    async def _status(self, mailbox: str, items: Sequence[str]) -> dict[str, int]:
        result: dict[str, int] = {}

        def untagged(word: bytes, rest: bytes) -> None:
            if word != b"STATUS":
                return
            values = syntax.parse_line(rest)
            if len(values) >= 2 and isinstance(values[1], list):
                pairs = values[1]
                for name, value in zip(pairs[::2], pairs[1::2], strict=False):
                    if isinstance(name, bytes) and isinstance(value, bytes) and value.isdigit():
                        result[name.decode("ascii").upper()] = int(value)

        names = " ".join(items).encode("ascii")
        await self._run(ProxyCommand(b"STATUS", mailbox_name(mailbox) + b" (" + names + b")", untagged=untagged))
        return result

    def select(self, mailbox: str, readonly: bool = False) -> Deferred[SelectInfo]:
        """SELECT or EXAMINE, then the UIDs of every message."""
        return Deferred.fromCoroutine(self._select(mailbox, readonly))

    async def _select(self, mailbox: str, readonly: bool) -> SelectInfo:
        seen: dict[str, Any] = {"exists": 0, "recent": 0}

        def untagged(word: bytes, rest: bytes) -> None:
            if word == b"FLAGS":
                seen["flags"] = _flag_list(syntax.parse_value(rest)[0])
            elif word in (b"EXISTS", b"RECENT"):
                seen[word.decode().lower()] = int(rest)
            elif word == b"OK":
                code, value = _code_of(rest)
                if code in ("UIDVALIDITY", "UIDNEXT", "UNSEEN"):
                    seen[code.lower()] = int(value or b"0")
                elif code == "PERMANENTFLAGS":
                    seen["permanent_flags"] = _flag_list(syntax.parse_value(value)[0])

        keyword = b"EXAMINE" if readonly else b"SELECT"
        text = await self._run(ProxyCommand(keyword, mailbox_name(mailbox), untagged=untagged))
        code, _ = _code_of(text)
        uids: builtins.list[int] = []
        if seen["exists"]:
            uids = await self._search(b"ALL", None, seen)
        return SelectInfo(
            name=mailbox,
            uidvalidity=seen.get("uidvalidity", 0),
            uidnext=seen.get("uidnext", (uids[-1] + 1) if uids else 1),
            uids=uids,
            flags=seen.get("flags", ()),
            permanent_flags=seen.get("permanent_flags"),
            recent=seen["recent"],
            exists=seen["exists"],
            unseen=seen.get("unseen"),
            readonly=readonly or code == "READ-ONLY",
        )

    def close(self) -> Deferred[bytes]:
        """CLOSE."""
        return Deferred.fromCoroutine(self._run(ProxyCommand(b"CLOSE")))

    def unselect(self) -> Deferred[bytes]:
        """UNSELECT (RFC 3691), or, on a server without it, EXAMINE + CLOSE (read-only: expunges nothing)."""
        return Deferred.fromCoroutine(self._unselect())

    async def _unselect(self) -> bytes:
        if "UNSELECT" in self.capabilities:
            return await self._run(ProxyCommand(b"UNSELECT"))
        # EXAMINE of a name no mailbox can have fails, and a failed EXAMINE leaves no mailbox selected
        with contextlib.suppress(MailStoreError):
            await self._run(ProxyCommand(b"EXAMINE", syntax.quote(b"\x00gatekeeper-unselect")))
        return b""

    def _simple(self, command: bytes, *names: str) -> Deferred[bytes]:
        args = b" ".join(mailbox_name(n) for n in names)
        return Deferred.fromCoroutine(self._run(ProxyCommand(command, args)))

    def create(self, mailbox: str) -> Deferred[bytes]:
        """CREATE."""
        return self._simple(b"CREATE", mailbox)

    def delete(self, mailbox: str) -> Deferred[bytes]:
        """DELETE."""
        return self._simple(b"DELETE", mailbox)

    def rename(self, old: str, new: str) -> Deferred[bytes]:
        """RENAME."""
        return self._simple(b"RENAME", old, new)

    def subscribe(self, mailbox: str) -> Deferred[bytes]:
        """SUBSCRIBE."""
        return self._simple(b"SUBSCRIBE", mailbox)

    def unsubscribe(self, mailbox: str) -> Deferred[bytes]:
        """UNSUBSCRIBE."""
        return self._simple(b"UNSUBSCRIBE", mailbox)

    # -- messages ------------------------------------------------------------------------

    def fetch(self, uids: bytes, items: bytes, sink: FetchSink) -> Deferred[bytes]:
        """UID FETCH, every answer to ``sink`` as it arrives."""
        command = ProxyCommand(b"UID FETCH", uids + b" " + items, sink=sink, what="FETCH")
        return Deferred.fromCoroutine(self._run(command))

    def search(self, criteria: bytes, charset: str | None = None) -> Deferred[builtins.list[int]]:
        """UID SEARCH."""
        return Deferred.fromCoroutine(self._search(criteria, charset))

    async def _search(
        self, criteria: bytes, charset: str | None, seen: dict[str, Any] | None = None
    ) -> builtins.list[int]:
        found: builtins.list[int] = []

        def untagged(word: bytes, rest: bytes) -> None:
            if word == b"SEARCH":
                found.extend(int(n) for n in rest.split() if n.isdigit())
            elif word == b"EXISTS" and seen is not None:
                seen["exists"] = int(rest)  # mail that arrived while SELECT's search ran

        args = (b"CHARSET " + charset.encode("ascii") + b" " if charset else b"") + criteria
        await self._run(ProxyCommand(b"UID SEARCH", args, untagged=untagged, what="SEARCH"))
        return sorted(set(found))

    def store(self, uids: bytes, operation: bytes, flags: Sequence[str]) -> Deferred[bytes]:
        """UID STORE; the FETCH answers go to the events."""
        args = uids + b" " + operation + b" (" + " ".join(flags).encode("ascii") + b")"
        return Deferred.fromCoroutine(self._run(ProxyCommand(b"UID STORE", args, what="STORE")))

    def copy(self, uids: bytes, mailbox: str) -> Deferred[CopiedUids | None]:
        """UID COPY, with UIDPLUS's COPYUID when the server gives it."""
        return Deferred.fromCoroutine(self._copy(b"UID COPY", uids, mailbox))

    def move(self, uids: bytes, mailbox: str) -> Deferred[CopiedUids | None]:
        """UID MOVE (RFC 6851)."""
        return Deferred.fromCoroutine(self._copy(b"UID MOVE", uids, mailbox))

    async def _copy(self, command: bytes, uids: bytes, mailbox: str) -> CopiedUids | None:
        codes: builtins.list[bytes] = []

        def untagged(word: bytes, rest: bytes) -> None:
            if word == b"OK":
                codes.append(rest)  # MOVE reports COPYUID in an untagged OK

        text = await self._run(
            ProxyCommand(command, uids + b" " + mailbox_name(mailbox), untagged=untagged, what=command[4:].decode())
        )
        for candidate in [text, *codes]:
            code, value = _code_of(candidate)
            if code == "COPYUID":
                parts = value.split()
                if len(parts) == 3:
                    return CopiedUids(int(parts[0]), tuple(_expand(parts[1])), tuple(_expand(parts[2])))
        return None

    def expunge(self, uids: bytes | None = None) -> Deferred[bytes]:
        """EXPUNGE, or UID EXPUNGE (RFC 4315) of ``uids``."""
        if uids is None:
            return Deferred.fromCoroutine(self._run(ProxyCommand(b"EXPUNGE")))
        return Deferred.fromCoroutine(self._run(ProxyCommand(b"UID EXPUNGE", uids, what="EXPUNGE")))

    def append(
        self, mailbox: str, message: bytes, flags: Sequence[str] = (), date: bytes | None = None
    ) -> Deferred[Appended]:
        """APPEND with a synchronising literal."""
        return Deferred.fromCoroutine(self._append(mailbox, message, flags, date))

    async def _append(self, mailbox: str, message: bytes, flags: Sequence[str], date: bytes | None) -> Appended:
        args = mailbox_name(mailbox)
        if flags:
            args += b" (" + " ".join(flags).encode("ascii") + b")"
        if date:
            args += b" " + syntax.quote(date)
        args += b" {%d}" % len(message)

        def proceed(_text: bytes) -> None:
            self.protocol.send_literal(message)

        text = await self._run(ProxyCommand(b"APPEND", args, proceed=proceed))
        code, value = _code_of(text)
        if code == "APPENDUID":
            parts = value.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                return Appended(int(parts[0]), int(parts[1]))
        return Appended()

    def noop(self) -> Deferred[bytes]:
        """NOOP."""
        return Deferred.fromCoroutine(self._run(ProxyCommand(b"NOOP")))

    # -- IDLE ----------------------------------------------------------------------------

    def idle(self) -> Deferred[None]:
        """IDLE (RFC 2177); fires once the server has accepted it."""
        return Deferred.fromCoroutine(self._idle())

    async def _idle(self) -> None:
        if "IDLE" not in self.capabilities:
            raise MailStoreError("the upstream server does not support IDLE")
        if self._idle_command is not None:
            return
        started: Deferred[None] = Deferred()

        def proceed(_text: bytes) -> None:
            self.protocol.start_idle()
            if not started.called:
                started.callback(None)

        command = ProxyCommand(b"IDLE", proceed=proceed)
        self._idle_command = command
        done = self.protocol.run(command)
        self._idle_done = done

        def ended(result: object) -> object:
            self._idle_command = None
            self._idle_done = None
            self.protocol.idling = False
            if not started.called:
                if isinstance(result, Failure):
                    started.errback(result)
                    return None
                started.callback(None)
            return result

        done.addBoth(ended)
        await started

    def stop_idle(self) -> Deferred[None]:
        """DONE; fires when the server has ended IDLE."""
        return Deferred.fromCoroutine(self._stop_idle())

    async def _stop_idle(self) -> None:
        done = self._idle_done
        if done is None:
            return
        self.protocol.send_done()
        await done

    def logout(self) -> Deferred[None]:
        """LOGOUT, then close; never fails."""
        return Deferred.fromCoroutine(self._logout())

    async def _logout(self) -> None:
        if self.protocol.lost:
            return
        try:
            if self._idle_command is not None:
                await self._stop_idle()
            await self.protocol.run(ProxyCommand(b"LOGOUT"))
        except Exception:  # noqa: S110 - logging out of a broken session is best effort
            pass
        finally:
            if not self.protocol.lost:
                gone: Deferred[None] = Deferred()

                def closed(_reason: str) -> None:
                    if not gone.called:
                        gone.callback(None)

                self.protocol.when_lost(closed)
                transport = self.protocol._transport()
                with contextlib.suppress(Exception):  # the server may have closed it already
                    transport.loseConnection()
                # wait for the close (a silent server gets the deadline, then is cut off)
                timer = self.protocol._clock.callLater(self.protocol._command_timeout, transport.abortConnection)
                await gone
                if timer.active():
                    timer.cancel()


def _expand(numbers: bytes) -> list[int]:
    """``3:5,9`` -> [3, 4, 5, 9] (COPYUID sets are small: one command's messages)."""
    found: list[int] = []
    for part in numbers.split(b","):
        low, _, high = part.partition(b":")
        a, b = int(low), int(high or low)
        found.extend(range(min(a, b), max(a, b) + 1))
    return found


async def open_session(
    reactor: Any,
    upstream: UpstreamConfig,
    username: str,
    password: str,
    *,
    endpoint: UpstreamEndpoint | None = None,
) -> UpstreamImapSession:
    """Connect to the upstream IMAP server, secure the connection, and log in.

    Raises :class:`UpstreamUnavailable` when the server cannot be reached, will not
    secure the connection, or is too slow; :class:`~gatekeeper.errors.UpstreamRefused` (code ``AUTH``)
    when it refuses the credentials.
    """
    endpoint = endpoint or upstream.imap
    if endpoint is None:
        raise UpstreamUnavailable("no upstream IMAP server is configured")
    timeout = upstream.timeout_seconds
    try:
        protocol: UpstreamImapProtocol = await connect(
            reactor, endpoint, _Factory(reactor, timeout), ca_file=upstream.ca_file, timeout=timeout
        )
    except UpstreamUnavailable:
        emit(
            log,
            "upstream",
            "upstream IMAP unreachable: {detail}",
            level="warn",
            protocol="imap",
            outcome="error",
            detail=str(endpoint),
        )
        raise
    try:
        return await _log_in(reactor, protocol, endpoint, upstream, username, password)
    except BaseException:
        if protocol.transport is not None:
            protocol._transport().abortConnection()
        raise


async def _log_in(
    reactor: Any,
    protocol: UpstreamImapProtocol,
    endpoint: UpstreamEndpoint,
    upstream: UpstreamConfig,
    username: str,
    password: str,
) -> UpstreamImapSession:
    timeout = upstream.timeout_seconds
    greeting = protocol.greeted
    timer = reactor.callLater(timeout, lambda: greeting.called or protocol._transport().abortConnection())
    try:
        await greeting
    finally:
        if timer.active():
            timer.cancel()
    capabilities = await _capability(protocol)
    if endpoint.security == "starttls":
        if "STARTTLS" not in capabilities:
            emit(
                log,
                "upstream",
                "upstream IMAP offers no STARTTLS",
                level="warn",
                protocol="imap",
                outcome="error",
                detail=str(endpoint),
            )
            raise UpstreamUnavailable("the upstream IMAP server does not offer STARTTLS")
        await protocol.run(ProxyCommand(b"STARTTLS"))
        protocol._transport().startTLS(client_tls_options(endpoint.host, upstream.ca_file))
        protocol.startedTLS = True
        capabilities = await _capability(protocol)
    user = username.encode("utf-8")
    secret = password.encode("utf-8")
    try:
        if "AUTH=PLAIN" in capabilities:
            token = base64.b64encode(b"\0" + user + b"\0" + secret)
            if "SASL-IR" in capabilities:
                text = await protocol.run(ProxyCommand(b"AUTHENTICATE", b"PLAIN " + token, what="the login"))
            else:

                def proceed(_challenge: bytes) -> None:
                    protocol.sendLine(token)

                text = await protocol.run(ProxyCommand(b"AUTHENTICATE", b"PLAIN", proceed=proceed, what="the login"))
        elif "LOGINDISABLED" in capabilities:
            raise UpstreamUnavailable("the upstream IMAP server allows no login on this connection")
        else:
            if not (user + secret).isascii():
                raise UpstreamUnavailable("the upstream IMAP server cannot take this user name or password")
            text = await protocol.run(
                ProxyCommand(b"LOGIN", syntax.quote(user) + b" " + syntax.quote(secret), what="the login")
            )
    except MailStoreError as error:
        if error.code in _REFUSED_LOGIN_CODES or error.code is None:
            emit(
                log,
                "upstream",
                "upstream IMAP refused the login of {user}",
                level="warn",
                protocol="imap",
                outcome="error",
                detail="login refused",
                user=username,
            )
            raise UpstreamRefused("the upstream server refused the login", code="AUTH") from None
        raise UpstreamUnavailable("the upstream IMAP server cannot log in now") from None
    code, value = _code_of(text)
    capabilities = _capabilities(value) if code == "CAPABILITY" else await _capability(protocol)
    delimiter: list[str | None] = [None]

    def untagged(word: bytes, rest: bytes) -> None:
        if word == b"LIST":
            values = syntax.parse_line(rest)
            if len(values) >= 2 and isinstance(values[1], bytes):
                delimiter[0] = values[1].decode("ascii", "replace")

    await protocol.run(ProxyCommand(b"LIST", b'"" ""', untagged=untagged))
    emit(
        log,
        "upstream",
        "upstream IMAP session for {user}",
        protocol="imap",
        outcome="ok",
        detail=str(endpoint),
        user=username,
    )
    return UpstreamImapSession(protocol, capabilities, delimiter[0])


async def _capability(protocol: UpstreamImapProtocol) -> frozenset[str]:
    found: list[frozenset[str]] = []

    def untagged(word: bytes, rest: bytes) -> None:
        if word == b"CAPABILITY":
            found.append(_capabilities(rest))

    await protocol.run(ProxyCommand(b"CAPABILITY", untagged=untagged))
    return found[0] if found else frozenset()

"""The POP3 adapter: Twisted's POP3 server with STLS, SASL PLAIN/LOGIN and no APOP.

Twisted's server lacks STLS (RFC 2595), and its ``AUTH`` only does CRAM-MD5-shaped
exchanges; APOP carries a hash, which cannot decrypt a private key. This subclass adds
STLS and a real SASL exchange through the protocol's own ``do_X`` dispatch, refuses
passwords before TLS, and answers with RFC 2449/3206 response codes.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IPullProducer, ITLSTransport
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeeper.auth import AvatarFactory, LoginThrottledError, Session, connection_portal
from gatekeeper.connections import Connections
from gatekeeper.errors import GatekeeperError, UpstreamRefused, UpstreamUnavailable
from gatekeeper.inbound import Revealer
from gatekeeper.interfaces import IPop3Maildrop, IPop3Upstream, MaildropEntry, UpstreamLogin
from gatekeeper.keys.identity import Identity
from gatekeeper.tls import secrets_allowed, transport_is_secure
from gatekeeper.upstream import set_nodelay
from gatekeeper.upstream.credentials import LoginResolver

log = Logger()

CHALLENGERS: dict[bytes, Callable[[], Any]] = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}
MAX_SASL_LINE = 4096


class Pop3Server(pop3.POP3):
    """POP3 for Gatekeeper: STLS on port 110, implicit TLS on 995, passwords only over TLS."""

    AUTH_CMDS = [b"CAPA", b"USER", b"PASS", b"AUTH", b"STLS", b"APOP", b"QUIT"]

    def __init__(self, context_factory: CertificateOptions | None, *, allow_plaintext_on_loopback: bool) -> None:
        self.context_factory = context_factory
        self._allow_plaintext_on_loopback = allow_plaintext_on_loopback
        self._sasl: Any = None

    connections: Connections | None = None
    _lost = False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Clean up the session (nothing is deleted upstream), then tell the listener this connection is gone."""
        self._lost = True
        super().connectionLost(reason)
        if self.connections is not None:
            self.connections.remove(self)

    def _secrets_allowed(self) -> bool:
        return secrets_allowed(self.transport, allow_plaintext_on_loopback=self._allow_plaintext_on_loopback)

    def _can_start_tls(self) -> bool:
        return (
            self.context_factory is not None
            and ITLSTransport.providedBy(self.transport)
            and not transport_is_secure(self.transport)
        )

    def connectionMade(self) -> None:
        """Greet without an APOP timestamp (APOP is not offered), with Nagle off.

        A message's last small segment must not wait for the client's delayed ACK.
        """
        set_nodelay(self)
        self.successResponse(b"Gatekeeper POP3 ready")
        self.setTimeout(self.timeOut)

    def state_COMMAND(self, line: bytes) -> None:
        """Dispatch one command; a bad or premature command is an answer, not a logged traceback."""
        try:
            self.processCommand(*line.split(b" "))
        except pop3.POP3Error as error:
            self.failResponse(b" ".join(error.args) if error.args else b"command failed")
        except (TypeError, ValueError):
            # Wrong number of arguments or a bad message number: the client's mistake.
            self.failResponse(b"bad command arguments")

    def listCapabilities(self) -> list[bytes]:
        """CAPA: what this server does, in the current state of the connection."""
        capabilities = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"IMPLEMENTATION Gatekeeper"]
        if self.mbox is None:
            if self._can_start_tls():
                capabilities.append(b"STLS")
            if self._secrets_allowed():
                capabilities += [b"USER", b"SASL " + b" ".join(CHALLENGERS)]
        return capabilities

    def do_STLS(self) -> None:
        """Start TLS (RFC 2595); only before login and only once."""
        if self.mbox is not None or self.context_factory is None or not self._can_start_tls():
            self.failResponse(b"STLS not available")
            return
        self.successResponse(b"Begin TLS negotiation now")
        ITLSTransport(self.transport).startTLS(self.context_factory)
        # Forget anything said before TLS (RFC 2595 section 4).
        self._userIs = None

    def do_APOP(self, user: bytes, digest: bytes) -> None:
        """APOP sends a hash of the password, which cannot unlock a key: refuse it."""
        self.failResponse(b"[AUTH] APOP is not supported; use USER/PASS or AUTH PLAIN over TLS")

    def _refuse_without_tls(self) -> bool:
        if self._secrets_allowed():
            return False
        self.failResponse(b"[AUTH] Authentication requires TLS; use STLS first")
        return True

    def do_USER(self, user: bytes) -> None:
        """Accept a user name, but only over TLS (the password follows it)."""
        if self._refuse_without_tls():
            return
        super().do_USER(user)

    def do_PASS(self, password: bytes, *words: bytes) -> None:
        """Log in; later pipelined commands wait until the KDF has answered."""
        if self._refuse_without_tls():
            return
        if self._userIs is None:
            self.failResponse(b"USER required before PASS")
            return
        user, self._userIs = self._userIs, None
        self._login(user, b" ".join((password, *words)))

    def do_AUTH(self, mechanism: bytes | None = None, initial: bytes | None = None) -> None:
        """SASL (RFC 5034): PLAIN, with or without an initial response, and LOGIN."""
        if mechanism is None:
            self.successResponse(b"Supported authentication methods:")
            for name in CHALLENGERS:
                self.sendLine(name)
            self.sendLine(b".")
            return
        if self._refuse_without_tls():
            return
        factory = CHALLENGERS.get(mechanism.upper())
        if factory is None:
            self.failResponse(b"Unsupported SASL mechanism")
            return
        self._sasl = factory()
        if initial is not None and initial != b"=":
            self._sasl_response(initial)
        else:
            self._sasl_challenge()

    def _sasl_challenge(self) -> None:
        self.sendLine(b"+ " + base64.b64encode(self._sasl.getChallenge()))
        self.state = "AUTH"

    def state_AUTH(self, line: bytes) -> None:
        """One client line of a SASL exchange."""
        self.state = "COMMAND"
        if line.strip() == b"*":
            self._sasl = None
            self.failResponse(b"Authentication cancelled")
            return
        self._sasl_response(line)

    def _sasl_response(self, encoded: bytes) -> None:
        try:
            if len(encoded) > MAX_SASL_LINE:
                raise ValueError("too long")
            self._sasl.setResponse(base64.b64decode(encoded.strip(), validate=True))
        except Exception:  # bad base64, a wrong number of PLAIN parts: all one answer
            self._sasl = None
            self.failResponse(b"Malformed SASL response")
            return
        if self._sasl.moreChallenges():
            self._sasl_challenge()
            return
        credentials, self._sasl = self._sasl, None
        self._login(credentials.username, credentials.password)

    def _login(self, user: bytes, password: bytes) -> None:
        self._longOperation(Deferred.fromCoroutine(self._login_and_open(user, password)))

    async def _login_and_open(self, user: bytes, password: bytes) -> None:
        """Unlock the keys (the login), then open the maildrop upstream before saying +OK."""
        try:
            result = await maybeDeferred(self.authenticateUserPASS, user, password)
        except Exception:
            self._login_failed(Failure())
            return
        _, mailbox, logout = result
        if isinstance(mailbox, ProxyMailbox):
            try:
                await mailbox.open(password.decode("utf-8", "replace"))
            except Exception as error:
                logout()
                self.failResponse(_error_reply(error))
                return
        if self._lost:
            logout()
            return
        self._cbMailbox(result, user)

    def _login_failed(self, failure: Failure) -> None:
        if failure.check(LoginThrottledError):
            self.failResponse(b"[SYS/TEMP] Too many failed logins, try again later")
        elif failure.check(UnauthorizedLogin):
            self.failResponse(b"[AUTH] Authentication failed")
        else:
            self.failResponse(b"[SYS/TEMP] Temporary authentication failure, try again later")

    # -- the transaction state: every command answers from the proxy mailbox ------------

    def _box(self) -> ProxyMailbox:
        assert isinstance(self.mbox, ProxyMailbox)
        return self.mbox

    def _transaction(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a command's coroutine; later pipelined commands wait, failures become ``-ERR``."""
        d = Deferred.fromCoroutine(work)
        d.addErrback(self._transaction_failed)
        self._longOperation(d)

    @property
    def _out(self) -> Any:
        return self.transport

    def _transaction_failed(self, failure: Failure) -> None:
        error: BaseException = failure.value  # type: ignore[assignment]
        if not isinstance(error, NoSuchMessage | MessageDeleted | GatekeeperError):
            log.failure("POP3 command failed", failure)
        self.failResponse(_error_reply(error))

    def do_STAT(self) -> None:
        """STAT: count and total size of the messages not deleted (sizes as RETR sends them)."""
        self._transaction(self._stat())

    async def _stat(self) -> None:
        box = self._box()
        sizes = await box.sizes(box.live())
        self.successResponse(b"%d %d" % (len(sizes), sum(sizes)))

    def do_LIST(self, number: bytes | None = None) -> None:
        """LIST [n]: sizes of the revealed messages."""
        self._transaction(self._list(number))

    async def _list(self, number: bytes | None) -> None:
        box = self._box()
        if number is not None:
            index = box.index(_number(number))
            self.successResponse(b"%d %d" % (index + 1, await box.size(index)))
            return
        live = box.live()
        sizes = await box.sizes(live)
        self.successResponse(b"%d messages (%d octets)" % (len(live), sum(sizes)))
        self._out.writeSequence([b"%d %d\r\n" % (i + 1, size) for i, size in zip(live, sizes, strict=True)])
        self._out.write(b".\r\n")

    def do_UIDL(self, number: bytes | None = None) -> None:
        """UIDL [n]: upstream's unique ids."""
        self._transaction(self._uidl(number))

    async def _uidl(self, number: bytes | None) -> None:
        box = self._box()
        if number is not None:
            index = box.index(_number(number))
            self.successResponse(b"%d %s" % (index + 1, box.uid(index)))
            return
        self.successResponse(b"unique-id listing follows")
        self._out.writeSequence([b"%d %s\r\n" % (i + 1, box.uid(i)) for i in box.live()])
        self._out.write(b".\r\n")

    def do_RETR(self, number: bytes) -> None:
        """RETR n: the revealed message."""
        self._transaction(self._retr(number))

    async def _retr(self, number: bytes) -> None:
        box = self._box()
        index = box.index(_number(number))
        data = await box.revealed(index)
        box.retrieved(index)
        self.successResponse(b"%d octets" % len(data))
        await self._send(data)

    def do_TOP(self, number: bytes, lines: bytes) -> None:
        """TOP n lines: the revealed message's header and first body lines."""
        self._transaction(self._top(number, lines))

    async def _top(self, number: bytes, lines: bytes) -> None:
        box = self._box()
        index = box.index(_number(number))
        if not lines.isdigit():
            raise NoSuchMessage("invalid line count")
        data = await box.top(index, int(lines))
        self.successResponse(b"top of message follows")
        await self._send(data)

    async def _send(self, data: bytes) -> None:
        if len(data) <= _CHUNK:
            self._out.writeSequence(list(stuffed_pieces(data)))
            return
        sender = _MessageSender(self.transport, stuffed_pieces(data))
        del data
        self._out.registerProducer(sender, False)
        await sender.done

    def do_DELE(self, number: bytes) -> None:
        """DELE n: mark a message as deleted (upstream only hears of it at QUIT)."""
        self._transaction(self._dele(number))

    async def _dele(self, number: bytes) -> None:
        box = self._box()
        box.delete(box.index(_number(number)))
        self.successResponse(b"message deleted")

    def do_RSET(self) -> None:
        """RSET: unmark the deleted messages."""
        self._box().reset()
        self.successResponse(b"")

    def do_QUIT(self) -> None:
        """QUIT: in the transaction state, delete the marked messages upstream first."""
        if self.mbox is None:
            super().do_QUIT()
            return
        self._longOperation(Deferred.fromCoroutine(self._quit()))

    async def _quit(self) -> None:
        try:
            count = await self._box().commit()
        except Exception as error:
            if not isinstance(error, GatekeeperError):
                log.failure("POP3 QUIT failed", Failure())
            reason = _error_reply(error)
            self.failResponse(reason + b"; the messages you deleted may still be there")
        else:
            self.successResponse(b"Gatekeeper POP3 done, %d message(s) deleted" % count)
        self._out.loseConnection()


class Pop3Factory(ServerFactory):
    """Builds one :class:`Pop3Server` per connection, tagged with the client's address."""

    noisy = False

    def __init__(
        self,
        portal: Portal,
        context_factory: CertificateOptions | None,
        *,
        allow_plaintext_on_loopback: bool = False,
        scheduler: Callable[[Any], Any] | None = None,
    ) -> None:
        """``scheduler`` replaces Twisted's cooperator for writing listings (tests pass ``list``)."""
        self.portal = portal
        self.context_factory = context_factory
        self.allow_plaintext_on_loopback = allow_plaintext_on_loopback
        self.scheduler = scheduler
        self.connections = Connections()

    def buildProtocol(self, addr: IAddress | None) -> Pop3Server:  # type: ignore[override]
        """Give the new connection its own view of the portal."""
        protocol = Pop3Server(self.context_factory, allow_plaintext_on_loopback=self.allow_plaintext_on_loopback)
        protocol.factory = self  # type: ignore[assignment]
        if self.scheduler is not None:
            protocol.schedule = self.scheduler  # type: ignore[assignment]
        protocol.portal = connection_portal(self.portal, "pop3", protocol, addr)  # type: ignore[assignment]
        protocol.connections = self.connections
        self.connections.add(protocol)
        return protocol


def _number(argument: bytes) -> int:
    if not argument.isdigit() or len(argument) > 9:
        raise NoSuchMessage("invalid message number")
    return int(argument)


def _error_reply(error: BaseException) -> bytes:
    """The ``-ERR`` text for a failure: its RFC 3206 code and a message safe to show."""
    text = str(error)
    shown = (text[:1].upper() + text[1:]).encode("utf-8", "replace")
    if isinstance(error, NoSuchMessage | MessageDeleted):
        return shown
    if isinstance(error, UpstreamRefused):
        return b"[%s] %s" % (error.code.encode("ascii", "replace"), shown) if error.code else shown
    if isinstance(error, GatekeeperError) and error.temporary:
        return b"[SYS/TEMP] " + shown
    return b"[SYS/TEMP] Internal error, try again later"


# -- the proxy mailbox -------------------------------------------------------------------


class NoSuchMessage(ValueError):
    """The client named a message number the maildrop does not have."""


class MessageDeleted(ValueError):
    """The client named a message it has marked as deleted."""


@implementer(IPop3Maildrop)
class EmptyMaildrop:
    """A maildrop with nothing in it: the POP3 service when no upstream POP3 server is configured."""

    entries: tuple[MaildropEntry, ...] = ()

    async def retrieve(self, index: int) -> bytes:
        """No messages."""
        raise IndexError("no such message")

    async def top(self, index: int, lines: int) -> bytes:
        """No messages."""
        raise IndexError("no such message")

    async def commit(self, deleted: Sequence[int]) -> None:
        """Nothing to delete."""

    def close(self) -> None:
        """Nothing to close."""


@implementer(IPop3Upstream)
class EmptyPop3Upstream:
    """Opens an :class:`EmptyMaildrop` for everyone."""

    async def open(self, login: UpstreamLogin) -> EmptyMaildrop:
        """The empty maildrop."""
        return EmptyMaildrop()


class _Shared:
    """One reveal in progress that several requests may wait for."""

    def __init__(self, work: Deferred[bytes]) -> None:
        self._waiters: list[Deferred[bytes]] = []
        self._result: bytes | Failure | None = None
        work.addBoth(self._done)

    def _done(self, result: bytes | Failure) -> None:
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def wait(self) -> Deferred[bytes]:
        """A Deferred firing with the result (each waiter gets its own)."""
        if self._result is None:
            waiter: Deferred[bytes] = Deferred()
            self._waiters.append(waiter)
            return waiter
        if isinstance(self._result, Failure):
            return fail(self._result)
        return succeed(self._result)


class ProxyMailbox:
    """One POP3 session's view of the user's maildrop, revealed (see :mod:`gatekeeper.inbound`).

    Message numbers and UIDs are upstream's. Each message is revealed on first need
    (``RETR``, ``TOP``, or a size for ``LIST``/``STAT``, which must equal what ``RETR``
    returns) and its size kept for the session; revealed messages are kept in a
    per-session cache of at most ``cache_bytes`` (least recently used out first; a
    message leaves it once retrieved), so a client that lists before it retrieves does
    not have everything decrypted twice. After a ``RETR``, the next message is revealed
    ahead, while the client reads. Deletions are marks until :meth:`commit` (``QUIT``).
    """

    def __init__(
        self,
        identity: Identity,
        session: Session,
        *,
        upstream: IPop3Upstream,
        resolver: LoginResolver | None,
        revealer: Revealer | None,
        cache_bytes: int = 32 * 1024 * 1024,
        parallel: int = 2,
        read_ahead: bool = True,
    ) -> None:
        self.identity = identity
        self.session = session
        self._upstream = upstream
        self._resolver = resolver
        self._revealer = revealer
        self._cache_limit = cache_bytes
        self._parallel = max(1, parallel)
        self._read_ahead = read_ahead
        self.maildrop: IPop3Maildrop | None = None
        self.deleted: set[int] = set()
        self._sizes: dict[int, int] = {}
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._working: dict[int, _Shared] = {}
        self.closed = False

    # -- the session -------------------------------------------------------------------

    async def open(self, password: str) -> None:
        """Log in upstream (pass-through or stored credentials) and take the message list."""
        login = (
            await self._resolver.resolve(self.identity, password)
            if self._resolver is not None
            else UpstreamLogin(self.identity.address, self.identity.address, password)
        )
        maildrop = await self._upstream.open(login)
        if self.closed:  # the client went away meanwhile
            maildrop.close()
            return
        self.maildrop = maildrop

    def _drop(self) -> IPop3Maildrop:
        if self.maildrop is None:
            raise UpstreamUnavailable("the session with the mail server is closed")
        return self.maildrop

    @property
    def entries(self) -> Sequence[MaildropEntry]:
        """Upstream's message list (fixed for the session)."""
        return self.maildrop.entries if self.maildrop is not None else ()

    def index(self, number: int) -> int:
        """The 0-based index of message ``number`` (1-based), which must exist and not be deleted."""
        index = number - 1
        if not 0 <= index < len(self.entries):
            raise NoSuchMessage("no such message")
        if index in self.deleted:
            raise MessageDeleted("message is deleted")
        return index

    def live(self) -> list[int]:
        """The indexes of the messages not marked as deleted."""
        return [i for i in range(len(self.entries)) if i not in self.deleted]

    def uid(self, index: int) -> bytes:
        """Upstream's unique id of a message."""
        return self.entries[index].uid

    # -- revealing ---------------------------------------------------------------------

    async def _reveal(self, index: int) -> bytes:
        if self._revealer is None:
            raise UpstreamUnavailable("messages cannot be revealed here")
        data = await self._drop().retrieve(index)
        revealed, _ = await self._revealer.reveal(
            self.identity, data, protocol="pop3", session=self.session.session_id, peer=self.session.client
        )
        del data
        self._sizes[index] = len(revealed)
        if len(revealed) <= self._cache_limit and not self.closed:
            self._cache[index] = revealed
            self._cached_bytes += len(revealed)
            while self._cached_bytes > self._cache_limit:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= len(evicted)
        return revealed

    def _start(self, index: int) -> _Shared:
        shared = self._working.get(index)
        if shared is None:
            work = Deferred.fromCoroutine(self._reveal(index))
            shared = self._working[index] = _Shared(work)
            work.addBoth(self._finished, index)
        return shared

    def _finished(self, result: object, index: int) -> None:
        self._working.pop(index, None)

    async def revealed(self, index: int) -> bytes:
        """The revealed message (from the cache, or revealed now)."""
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        return await self._start(index).wait()

    async def size(self, index: int) -> int:
        """The size of the revealed message, as ``RETR`` will send it."""
        if index not in self._sizes:
            await self.revealed(index)
        return self._sizes[index]

    async def sizes(self, indexes: Sequence[int]) -> list[int]:
        """The sizes of several messages, ``parallel`` revealed at once (upstream sends one while workers decrypt)."""
        pending = iter([i for i in indexes if i not in self._sizes])

        async def lane() -> None:
            for index in pending:
                await self.size(index)

        lanes = [Deferred.fromCoroutine(lane()) for _ in range(self._parallel)]
        try:
            await gatherResults(lanes, consumeErrors=True)
        except FirstError as error:
            error.subFailure.raiseException()
        return [self._sizes[i] for i in indexes]

    def retrieved(self, index: int) -> None:
        """``RETR`` sent message ``index``: drop it from the cache and reveal the next ones ahead.

        Up to ``parallel`` messages are revealed ahead (one per worker), as long as their
        stored sizes fit in what the cache has left: while the client reads one message,
        upstream sends the next ones and the workers decrypt them.
        """
        cached = self._cache.pop(index, None)
        if cached is not None:
            self._cached_bytes -= len(cached)
        if not self._read_ahead or self.closed:
            return
        room = self._cache_limit - self._cached_bytes
        for following in range(index + 1, min(index + 1 + self._parallel, len(self.entries))):
            if following in self.deleted or following in self._cache:
                continue
            room -= self.entries[following].size
            if room < 0:
                break
            if following not in self._working:
                # Failures are forgotten: the RETR that needs the message will try again.
                self._start(following).wait().addErrback(lambda _: None)

    async def top(self, index: int, lines: int) -> bytes:
        """The revealed message's header and the first ``lines`` lines of its body."""
        data = await self.revealed(index)
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return data
        position = end + 4
        for _ in range(lines):
            found = data.find(b"\r\n", position)
            if found < 0:
                return data
            position = found + 2
        return data[:position]

    # -- deleting ---------------------------------------------------------------------

    def delete(self, index: int) -> None:
        """Mark a message as deleted (nothing happens upstream before :meth:`commit`)."""
        self.deleted.add(index)
        cached = self._cache.pop(index, None)
        if cached is not None:
            self._cached_bytes -= len(cached)

    def reset(self) -> None:
        """RSET: unmark every deleted message."""
        self.deleted.clear()

    async def commit(self) -> int:
        """QUIT: delete the marked messages upstream and end the session; returns how many."""
        count = len(self.deleted)
        await self._drop().commit(sorted(self.deleted))
        self.closed = True
        self.maildrop = None
        return count

    def close(self) -> None:
        """End the session without deleting anything (the client is gone)."""
        self.closed = True
        self._cache.clear()
        self._cached_bytes = 0
        maildrop, self.maildrop = self.maildrop, None
        if maildrop is not None:
            maildrop.close()


def make_mailbox_avatar(
    upstream: IPop3Upstream | None = None,
    *,
    resolver: LoginResolver | None = None,
    revealer: Revealer | None = None,
    cache_bytes: int = 32 * 1024 * 1024,
    parallel: int = 2,
) -> AvatarFactory:
    """Return the realm's avatar factory for POP3 sessions (no ``upstream``: an empty maildrop)."""
    source = upstream if upstream is not None else EmptyPop3Upstream()

    def make(identity: Identity, session: Session) -> tuple[Any, Callable[[], None]]:
        mailbox = ProxyMailbox(
            identity,
            session,
            upstream=source,
            resolver=resolver,
            revealer=revealer,
            cache_bytes=cache_bytes,
            parallel=parallel,
        )
        return mailbox, mailbox.close

    return make


# -- sending a message -------------------------------------------------------------------

_CHUNK = 256 * 1024


def stuffed_pieces(data: bytes, chunk: int = _CHUNK) -> Iterator[bytes]:
    """``data`` as the body of a multi-line answer: dot-stuffed, then the terminating ``.`` line.

    Pieces are about ``chunk`` bytes, cut after a line end where there is one, never
    between CR and LF, so a message of any size is sent without a stuffed copy of it.
    """
    start, length, at_line_start = 0, len(data), True
    while start < length:
        end = min(start + chunk, length)
        if end < length:
            cut = data.rfind(b"\r\n", start, end)
            if cut >= start:
                end = cut + 2
            elif data[end - 1 : end] == b"\r":
                end += 1
        piece = data[start:end].replace(b"\r\n.", b"\r\n..")
        if at_line_start and piece.startswith(b"."):
            piece = b"." + piece
        at_line_start = piece.endswith(b"\r\n")
        yield piece
        start = end
    if length and not at_line_start:
        yield b"\r\n"
    yield b".\r\n"


@implementer(IPullProducer)
class _MessageSender:
    """Writes the pieces of a message as the transport asks for more (a pull producer)."""

    def __init__(self, transport: Any, pieces: Iterator[bytes]) -> None:
        self._transport = transport
        self._pieces = pieces
        self.done: Deferred[None] = Deferred()

    def resumeProducing(self) -> None:
        """Write the next piece, or finish."""
        piece = next(self._pieces, None)
        if piece is None:
            self._transport.unregisterProducer()
            if not self.done.called:
                self.done.callback(None)
            return
        self._transport.write(piece)

    def stopProducing(self) -> None:
        """The connection is gone: stop."""
        self._pieces = iter(())
        if not self.done.called:
            self.done.callback(None)

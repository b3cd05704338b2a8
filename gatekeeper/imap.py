"""The IMAP4 adapter: Twisted's IMAP4Server in front of the IMAP proxy core.

Login: LOGIN and AUTHENTICATE (PLAIN, LOGIN) are only accepted over TLS: on port 143
the server says ``LOGINDISABLED`` and advertises no AUTH= mechanism until STARTTLS.
A login succeeds when the password unlocks the user's keys *and* the mail store
behind the proxy accepts the user (pass-through credentials by default, see
:mod:`gatekeeper.upstream.credentials`); only then is ``OK`` sent. Failures carry RFC
5530 response codes (``AUTHENTICATIONFAILED``, ``UNAVAILABLE``).

After login every command is translated, through the protocol's own ``do_X`` /
``auth_X`` / ``select_X`` dispatch, into a call on
:class:`~gatekeeper.imap_proxy.ProxySession` (which never sees a Twisted mail type):

- FETCH hands the parsed query down (:func:`fetch_items`), so the proxy asks upstream
  for exactly those items and streams the answers; Twisted's own ``IMailbox.fetch``
  path, which is not told the query, is never used;
- UID gains MOVE and EXPUNGE (UIDPLUS, RFC 4315; MOVE, RFC 6851), and MOVE and UNSELECT
  are commands of their own;
- untagged EXPUNGE/EXISTS/FETCH FLAGS updates are sent where IMAP allows them: before
  the tagged answer of any command but FETCH, STORE and SEARCH (which get no
  expunges), and at once during IDLE;
- commands run one at a time: later pipelined lines wait (Twisted's ``blocked`` queue),
  so a FETCH pipelined after SELECT runs in the selected state.

Errors: the store's NO becomes ``NO`` with its RFC 5530 code when it is a standard one
(never its text); an unreachable or slow store, or busy workers, ``NO [UNAVAILABLE]``;
a lost upstream session ``* BYE`` and the connection is closed. Nothing hangs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeeper import imap_syntax as syntax
from gatekeeper.auth import AvatarFactory, LoginThrottledError, Session, connection_portal
from gatekeeper.config import ImapConfig, UpstreamConfig
from gatekeeper.connections import Connections
from gatekeeper.errors import GatekeeperError, TemporaryError, UpstreamRefused, UpstreamUnavailable
from gatekeeper.imap_proxy import (
    CommandError,
    EncryptFunction,
    FetchItem,
    MailCaches,
    ProxySession,
    RevealedMessage,
    RevealFunction,
    Section,
)
from gatekeeper.imap_state import Updates
from gatekeeper.inbound import Revealer
from gatekeeper.interfaces import IMailStoreSession, MailStoreError, UpstreamLogin
from gatekeeper.keys.identity import Identity
from gatekeeper.tls import secrets_allowed

log = Logger()

CHALLENGERS = {b"PLAIN": imap4.PLAINCredentials, b"LOGIN": imap4.LOGINCredentials}
MAX_COMMAND_LINE = 64 * 1024
WRITE_BATCH = 64 * 1024
# response codes of the store that may be passed on (RFC 3501, 4315, 5530): never its text
SAFE_CODES = frozenset(
    {"TRYCREATE", "NONEXISTENT", "ALREADYEXISTS", "CANNOT", "LIMIT", "OVERQUOTA", "NOPERM", "INUSE"}
    | {"EXPUNGEISSUED", "CONTACTADMIN", "UNAVAILABLE", "SERVERBUG", "CLIENTBUG", "READ-ONLY"}
)


class _Ok(bytes):
    """The text of a tagged OK."""


def fetch_items(query: Sequence[Any]) -> list[FetchItem]:
    """Translate Twisted's parsed FETCH attributes into the proxy's :class:`FetchItem` list."""
    items = []
    for part in query:
        kind = part.type
        if kind == "body":
            if part.header is not None:
                fields = tuple(f.upper() for f in (part.header.fields or ()))
                if part.header.fields:
                    specifier = "HEADER.FIELDS.NOT" if part.header.negate else "HEADER.FIELDS"
                else:
                    specifier = "HEADER"
            elif part.text is not None:
                specifier, fields = "TEXT", ()
            elif part.mime is not None:
                specifier, fields = "MIME", ()
            elif part.empty:
                specifier, fields = "", ()
            else:
                items.append(FetchItem("BODY"))  # BODY without a section: the structure
                continue
            partial = None
            if part.partialBegin is not None:
                partial = (int(part.partialBegin), int(part.partialLength))
            section = Section(tuple(p + 1 for p in part.part), specifier, fields)
            items.append(FetchItem("SECTION", section=section, partial=partial, peek=bool(part.peek)))
        else:
            items.append(FetchItem({"rfc822header": "RFC822.HEADER", "rfc822text": "RFC822.TEXT",
                                    "rfc822size": "RFC822.SIZE"}.get(kind, kind.upper())))  # fmt: skip
    return items


def _ranges(messages: imap4.MessageSet) -> list[tuple[int | None, int | None]]:
    return [(low, high) for low, high in messages.ranges]


def _mailbox(name: bytes | str) -> str:
    if isinstance(name, str):
        return name
    try:
        return name.decode("imap4-utf-7")
    except (UnicodeDecodeError, ValueError):
        raise CommandError("the mailbox name is not valid modified UTF-7", bad=True) from None


def _wire_name(name: str) -> bytes:
    return syntax.astring(name.encode("imap4-utf-7"))


class _Writer:
    """FETCH answers, written to the client in batches."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.pending: list[bytes] = []
        self.size = 0

    def write(self, seq: int, data: bytes) -> None:
        line = b"* %d FETCH %s\r\n" % (seq, data)
        self.pending.append(line)
        self.size += len(line)
        if self.size >= WRITE_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.transport.writeSequence(self.pending)
            self.pending = []
            self.size = 0


@implementer(imap4.IAccount, imap4.INamespacePresenter)
class ProxyAccount:
    """A logged-in IMAP user: the proxy session once :meth:`open` has reached the store."""

    def __init__(self, identity: Identity, session: Session, backend: ImapBackend) -> None:
        self.identity = identity
        self.session = session
        self.backend = backend
        self.proxy: ProxySession | None = None

    async def open(self, password: str) -> None:
        """Log in to the store (pass-through or stored credentials) and start the proxy."""
        self.proxy = await self.backend.open(self.identity, self.session, password)

    def close(self) -> None:
        """The client is gone: log out of the store and let the user's cache go."""
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            self.closing = Deferred.fromCoroutine(proxy.logout())
            self.closing.addErrback(lambda _: None)
            self.backend.caches.release(self.identity.address)

    closing: Deferred[None] | None = None

    # IAccount: the adapter calls the proxy itself; these answer Twisted's direct uses.
    def addMailbox(self, name: str, mbox: object = None) -> bool:
        """Not used: mailboxes are the store's."""
        raise imap4.MailboxException("not supported")

    def create(self, pathspec: str) -> bool:
        """Not used (CREATE goes to the proxy)."""
        raise imap4.MailboxException("not supported")

    def select(self, name: str, rw: bool = True) -> None:
        """Not used (SELECT goes to the proxy)."""
        return None

    def delete(self, name: str) -> None:
        """Not used (DELETE goes to the proxy)."""
        raise imap4.MailboxException("not supported")

    def rename(self, oldname: str, newname: str) -> None:
        """Not used (RENAME goes to the proxy)."""
        raise imap4.MailboxException("not supported")

    def isSubscribed(self, name: str) -> bool:
        """Not used (LSUB goes to the proxy)."""
        return False

    def subscribe(self, name: str) -> None:
        """Not used (SUBSCRIBE goes to the proxy)."""
        raise imap4.MailboxException("not supported")

    def unsubscribe(self, name: str) -> None:
        """Not used (UNSUBSCRIBE goes to the proxy)."""
        raise imap4.MailboxException("not supported")

    def listMailboxes(self, ref: str, wildcard: str) -> list[tuple[str, Any]]:
        """Not used (LIST goes to the proxy)."""
        return []

    # INamespacePresenter
    def getPersonalNamespaces(self) -> list[list[Any]]:
        """One personal namespace, with the store's hierarchy delimiter."""
        delimiter = self.proxy.store.delimiter if self.proxy is not None else None
        return [["", delimiter or "/"]]

    def getSharedNamespaces(self) -> None:
        """None."""
        return None

    def getOtherNamespaces(self) -> None:
        """None."""
        return None

    def getUserNamespaces(self) -> None:
        """None."""
        return None


StoreOpener = Callable[[UpstreamLogin], Awaitable[IMailStoreSession]]
LoginResolve = Callable[[Identity, str], Awaitable[UpstreamLogin]]
RevealFactory = Callable[[Identity, Session], RevealFunction]
EncryptFactory = Callable[[Identity], EncryptFunction]


@attrs.define
class ImapBackend:
    """What an IMAP session is built from (one per gateway, made in ``tap.imap_factory``).

    ``open_store`` logs in to the mail store; ``resolve`` chooses the credentials
    (pass-through or stored); ``make_reveal`` and ``make_encrypt`` give a user's reveal
    and encrypt-to-self functions (worker jobs); ``caches`` keeps each user's revealed
    messages and index.
    """

    open_store: StoreOpener
    resolve: LoginResolve
    make_reveal: RevealFactory
    caches: MailCaches
    clock: IReactorTime
    make_encrypt: EncryptFactory | None = None
    encrypt_folders: tuple[str, ...] = ()
    idle_poll_seconds: float = 30.0

    async def open(self, identity: Identity, session: Session, password: str) -> ProxySession:
        """Log ``identity`` in to the store and build its proxy session."""
        login = await self.resolve(identity, password)
        store = await self.open_store(login)
        return ProxySession(
            store,
            self.caches.acquire(identity.address),
            self.make_reveal(identity, session),
            self.clock,
            user=identity.address,
            encrypt=self.make_encrypt(identity) if self.make_encrypt is not None else None,
            encrypt_folders=self.encrypt_folders,
            idle_poll_seconds=self.idle_poll_seconds,
        )


class ImapServer(imap4.IMAP4Server):
    """IMAP4rev1 for Gatekeeper: STARTTLS on 143, implicit TLS on 993, the proxy behind."""

    IDENT = b"Gatekeeper IMAP4rev1 ready"
    MAX_LENGTH = MAX_COMMAND_LINE

    def __init__(
        self,
        context_factory: CertificateOptions | None,
        *,
        allow_plaintext_on_loopback: bool,
        max_append_size: int = 50 * 1024 * 1024,
    ) -> None:
        super().__init__(chal=dict(CHALLENGERS), contextFactory=context_factory)
        self._allow_plaintext_on_loopback = allow_plaintext_on_loopback
        self._max_append_size = max_append_size
        self._idle_tag: bytes | None = None

    connections: Connections | None = None

    # -- connection ---------------------------------------------------------------------------

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Clean up the session; the listener forgets it once the store session is closed too."""
        super().connectionLost(reason)
        closing = self.account.closing if isinstance(self.account, ProxyAccount) else None
        if closing is not None and not closing.called:
            closing.addBoth(self._forget)
        else:
            self._forget(None)

    def _forget(self, result: object) -> object:
        if self.connections is not None:
            self.connections.remove(self)
        return result

    def _secrets_allowed(self) -> bool:
        return secrets_allowed(self.transport, allow_plaintext_on_loopback=self._allow_plaintext_on_loopback)

    @property
    def proxy(self) -> ProxySession:
        """The proxy session of the logged-in user."""
        account = self.account
        proxy = account.proxy if isinstance(account, ProxyAccount) else None
        if proxy is None:
            raise UpstreamUnavailable("the mail store session is closed")
        return proxy

    def capabilities(self) -> dict[bytes, Any]:
        """Before TLS: STARTTLS and LOGINDISABLED; after login: what the store lets us offer."""
        capabilities: dict[bytes, Any] = super().capabilities()
        if self._secrets_allowed():
            capabilities.pop(b"LOGINDISABLED", None)
        else:
            capabilities[b"AUTH"] = []
            capabilities[b"LOGINDISABLED"] = None
        account = self.account
        if isinstance(account, ProxyAccount) and account.proxy is not None:
            capabilities.pop(b"AUTH", None)
            capabilities.pop(b"STARTTLS", None)
            for name in account.proxy.capabilities:
                capabilities[name.encode("ascii")] = None
        return capabilities

    # -- login ----------------------------------------------------------------------------------

    def do_LOGIN(self, tag: bytes, user: bytes, passwd: bytes) -> None:
        """LOGIN, refused before TLS."""
        if not self._secrets_allowed():
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] LOGIN is disabled before STARTTLS")
            return
        self._serve(tag, self._login(user, passwd), updates=False)

    unauth_LOGIN = (do_LOGIN, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_finalastring)  # type: ignore[assignment]

    def do_AUTHENTICATE(self, tag: bytes, args: bytes) -> None:
        """AUTHENTICATE PLAIN/LOGIN, refused before TLS."""
        if not self._secrets_allowed():
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] Authentication requires STARTTLS first")
            return
        super().do_AUTHENTICATE(tag, args)

    unauth_AUTHENTICATE = (do_AUTHENTICATE, imap4.IMAP4Server.arg_atom)  # type: ignore[assignment]

    def authenticate(self, chal: Any, tag: bytes) -> None:
        """Run the SASL exchange, then log in exactly as LOGIN does."""
        if self.portal is None:
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Temporary authentication failure")
            return
        try:
            challenge = chal.getChallenge()
        except Exception:
            self.sendBadResponse(tag, b"Authentication failed")
            return
        self.parseState = "pending"
        pending: Deferred[bytes] = Deferred()
        self._pendingLiteral = pending
        self.sendLine(b"+ " + base64.b64encode(challenge))
        pending.addCallback(self._sasl_response, chal, tag)

    def _sasl_response(self, line: bytes, chal: Any, tag: bytes) -> None:
        if line.strip() == b"*":
            self.sendBadResponse(tag, b"AUTHENTICATE cancelled")
            return
        try:
            chal.setResponse(base64.b64decode(line.strip(), validate=True))
        except (binascii.Error, ValueError, imap4.IllegalClientResponse):
            self.sendBadResponse(tag, b"Malformed SASL response")
            return
        if chal.moreChallenges():
            self.authenticate(chal, tag)
            return
        self._serve(tag, self._login(chal.username, chal.password), updates=False)

    async def _login(self, user: bytes, password: bytes) -> bytes:
        try:
            portal: Any = self.portal
            result = await portal.login(UsernamePassword(user, password), None, imap4.IAccount)
        except LoginThrottledError:
            raise CommandError("Too many failed logins, try again later", code="UNAVAILABLE") from None
        except UnauthorizedLogin:
            raise CommandError("Authentication failed", code="AUTHENTICATIONFAILED") from None
        except Exception:
            raise CommandError("Temporary authentication failure, try again later", code="UNAVAILABLE") from None
        _interface, avatar, logout = result
        opener = getattr(avatar, "open", None)
        if opener is not None:
            try:
                await opener(password.decode("utf-8"))
            except BaseException as error:
                logout()
                if isinstance(error, UpstreamRefused) and not error.temporary:
                    raise CommandError("The mail server refused the login", code="AUTHENTICATIONFAILED") from None
                if isinstance(error, GatekeeperError | MailStoreError | UnicodeDecodeError):
                    raise CommandError(
                        "The mail server is not available, try again later", code="UNAVAILABLE"
                    ) from None
                raise
        self.account = avatar
        self._onLogout = logout
        self.state = "auth"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        if isinstance(avatar, ProxyAccount) and avatar.proxy is not None:
            avatar.proxy.on_lost = self._store_lost
        return b"[CAPABILITY " + b" ".join(self.listCapabilities()) + b"] LOGIN completed"

    def _store_lost(self, reason: str) -> None:
        if self.transport is not None and self.state not in ("unauth", "logout"):
            self.sendUntaggedResponse(b"BYE [UNAVAILABLE] Lost the connection to the mail server")
            self.state = "logout"
            self.transport.loseConnection()

    # -- running commands ----------------------------------------------------------------------

    def _serve(self, tag: bytes, work: Awaitable[bytes | None], *, updates: bool = True, expunges: bool = True) -> None:
        """Run one command: later lines wait; errors become NO/BAD; updates go before the OK."""
        blocked_here = self.blocked is None
        if blocked_here:
            self.blocked = []
        d = Deferred.fromCoroutine(self._answer(tag, work, updates, expunges))

        def done(_: object) -> None:
            if blocked_here and self.transport is not None and not getattr(self.transport, "disconnecting", False):
                self._unblock()

        d.addErrback(lambda failure: log.failure("IMAP command failed unexpectedly", failure))
        d.addBoth(done)

    async def _answer(self, tag: bytes, work: Awaitable[bytes | None], updates: bool, expunges: bool) -> None:
        try:
            text = await work
        except CommandError as error:
            message = (f"[{error.code}] " if error.code else "") + str(error)
            if error.bad:
                self.sendBadResponse(tag, message.encode("utf-8", "replace"))
            else:
                self.sendNegativeResponse(tag, message.encode("utf-8", "replace"))
            return
        except MailStoreError as error:
            code = f"[{error.code}] " if error.code in SAFE_CODES else ""
            self.sendNegativeResponse(tag, (code + str(error)).encode("utf-8", "replace"))
            return
        except (TemporaryError, UpstreamUnavailable):
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] The mail server is not available, try again later")
            return
        if updates and isinstance(self.account, ProxyAccount) and self.account.proxy is not None:
            # the command itself succeeded: updates that cannot be had now come with the next one
            with contextlib.suppress(GatekeeperError, MailStoreError):
                self._send_updates(await self.account.proxy.sync(allow_expunge=expunges))
        self.sendPositiveResponse(tag, text or b"completed")

    def _send_updates(self, updates: Updates) -> None:
        for seq in updates.expunged:
            self.sendUntaggedResponse(b"%d EXPUNGE" % seq)
        if updates.exists is not None:
            self.sendUntaggedResponse(b"%d EXISTS" % updates.exists)
        if updates.recent is not None:
            self.sendUntaggedResponse(b"%d RECENT" % updates.recent)
        for seq, uid, flags in updates.flags:
            self.sendUntaggedResponse(b"%d FETCH (UID %d FLAGS (%s))" % (seq, uid, " ".join(flags).encode()))

    # -- mailboxes -----------------------------------------------------------------------------

    def _listWork(self, tag: bytes, ref: bytes, mbox: bytes, sub: int, cmdName: bytes) -> None:
        self._serve(tag, self._list(ref, mbox, bool(sub), cmdName))

    auth_LIST = (_listWork, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_astring, 0, b"LIST")  # type: ignore[assignment]
    select_LIST = auth_LIST  # type: ignore[assignment]
    auth_LSUB = (_listWork, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_astring, 1, b"LSUB")  # type: ignore[assignment]
    select_LSUB = auth_LSUB  # type: ignore[assignment]

    async def _list(self, ref: bytes, pattern: bytes, subscribed: bool, keyword: bytes) -> bytes:
        entries = await self.proxy.list_mailboxes(_mailbox(ref), _mailbox(pattern), subscribed=subscribed)
        for entry in entries:
            attributes = " ".join(entry.attributes).encode("ascii", "replace")
            delimiter = syntax.quote(entry.delimiter.encode()) if entry.delimiter else b"NIL"
            self.sendUntaggedResponse(keyword + b" (" + attributes + b") " + delimiter + b" " + _wire_name(entry.name))
        return keyword + b" completed"

    def do_STATUS(self, tag: bytes, mailbox: bytes, names: Sequence[bytes]) -> None:
        """STATUS."""
        self._serve(tag, self._status(mailbox, names))

    auth_STATUS = (do_STATUS, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_plist)  # type: ignore[assignment]
    select_STATUS = auth_STATUS  # type: ignore[assignment]

    async def _status(self, mailbox: bytes, names: Sequence[bytes]) -> bytes:
        name = _mailbox(mailbox)
        found = await self.proxy.status(name, [n.decode("ascii", "replace") for n in names])
        items = b" ".join(b"%s %d" % (k.encode(), v) for k, v in found.items())
        self.sendUntaggedResponse(b"STATUS " + _wire_name(name) + b" (" + items + b")")
        return b"STATUS completed"

    def _selectWork(self, tag: bytes, name: bytes, rw: int, cmdName: bytes) -> None:
        if self.mbox is not None:
            self.mbox = None
            self.state = "auth"
        self._serve(tag, self._select(name, bool(rw), cmdName), updates=False)

    auth_SELECT = (_selectWork, imap4.IMAP4Server.arg_astring, 1, b"SELECT")  # type: ignore[assignment]
    select_SELECT = auth_SELECT  # type: ignore[assignment]
    auth_EXAMINE = (_selectWork, imap4.IMAP4Server.arg_astring, 0, b"EXAMINE")  # type: ignore[assignment]
    select_EXAMINE = auth_EXAMINE  # type: ignore[assignment]

    async def _select(self, name: bytes, rw: bool, keyword: bytes) -> bytes:
        proxy = self.proxy
        info = await proxy.select(_mailbox(name), readonly=not rw)
        send = self.sendUntaggedResponse
        send(b"FLAGS (" + " ".join(info.flags).encode() + b")")
        if info.permanent_flags is not None and not info.readonly:
            send(b"OK [PERMANENTFLAGS (" + " ".join(info.permanent_flags).encode() + b")] Limited")
        send(b"%d EXISTS" % proxy.state.exists)
        send(b"%d RECENT" % info.recent)
        if info.unseen:
            send(b"OK [UNSEEN %d] First unseen" % info.unseen)
        send(b"OK [UIDVALIDITY %d] UIDs valid" % info.uidvalidity)
        send(b"OK [UIDNEXT %d] Predicted next UID" % info.uidnext)
        self.state = "select"
        self.mbox = proxy
        return (b"[READ-ONLY] " if info.readonly else b"[READ-WRITE] ") + keyword + b" completed"

    def _mailbox_command(self, tag: bytes, command: str, *names: bytes) -> None:
        async def run() -> bytes:
            await self.proxy.mailbox_command(command, *(_mailbox(n) for n in names))
            return command.upper().encode() + b" completed"

        self._serve(tag, run())

    def do_CREATE(self, tag: bytes, name: bytes) -> None:
        """CREATE."""
        self._mailbox_command(tag, "create", name)

    auth_CREATE = (do_CREATE, imap4.IMAP4Server.arg_finalastring)  # type: ignore[assignment]
    select_CREATE = auth_CREATE  # type: ignore[assignment]

    def do_DELETE(self, tag: bytes, name: bytes) -> None:
        """DELETE."""
        self._mailbox_command(tag, "delete", name)

    auth_DELETE = (do_DELETE, imap4.IMAP4Server.arg_finalastring)  # type: ignore[assignment]
    select_DELETE = auth_DELETE  # type: ignore[assignment]

    def do_RENAME(self, tag: bytes, oldname: bytes, newname: bytes) -> None:
        """RENAME."""
        self._mailbox_command(tag, "rename", oldname, newname)

    auth_RENAME = (do_RENAME, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_finalastring)  # type: ignore[assignment]
    select_RENAME = auth_RENAME  # type: ignore[assignment]

    def do_SUBSCRIBE(self, tag: bytes, name: bytes) -> None:
        """SUBSCRIBE."""
        self._mailbox_command(tag, "subscribe", name)

    auth_SUBSCRIBE = (do_SUBSCRIBE, imap4.IMAP4Server.arg_finalastring)  # type: ignore[assignment]
    select_SUBSCRIBE = auth_SUBSCRIBE  # type: ignore[assignment]

    def do_UNSUBSCRIBE(self, tag: bytes, name: bytes) -> None:
        """UNSUBSCRIBE."""
        self._mailbox_command(tag, "unsubscribe", name)

    auth_UNSUBSCRIBE = (do_UNSUBSCRIBE, imap4.IMAP4Server.arg_finalastring)  # type: ignore[assignment]
    select_UNSUBSCRIBE = auth_UNSUBSCRIBE  # type: ignore[assignment]

    def arg_literal(self, line: bytes) -> Any:
        """A literal argument (APPEND's message), refused before it is sent when too large."""
        if line[:1] == b"{" and line[-1:] == b"}" and line[1:-1].isdigit() and int(line[1:-1]) > self._max_append_size:
            raise imap4.IllegalClientResponse("message too large")
        return super().arg_literal(line)

    def do_APPEND(self, tag: bytes, mailbox: bytes, flags: Any, date: bytes | None, message: Any) -> None:
        """APPEND (encrypted first for the encrypt folders)."""
        self._serve(tag, self._append(mailbox, flags or [], date, message))

    auth_APPEND = (do_APPEND, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.opt_plist,  # type: ignore[assignment]
                   imap4.IMAP4Server.opt_datetime, arg_literal)  # fmt: skip
    select_APPEND = auth_APPEND  # type: ignore[assignment]

    async def _append(self, mailbox: bytes, flags: Sequence[bytes], date: bytes | None, message: Any) -> bytes:
        message.seek(0)
        data = message.read()
        names = [f.decode("ascii", "replace") for f in flags]
        appended = await self.proxy.append(_mailbox(mailbox), data, names, date)
        if appended.uid is not None and appended.uidvalidity is not None:
            return b"[APPENDUID %d %d] APPEND completed" % (appended.uidvalidity, appended.uid)
        return b"APPEND completed"

    # -- the selected mailbox ---------------------------------------------------------------------

    def do_NOOP(self, tag: bytes) -> None:
        """NOOP: upstream reports its changes, which the client is told."""
        if isinstance(self.account, ProxyAccount) and self.account.proxy is not None:

            async def run() -> bytes:
                await self.proxy.noop()
                return b"NOOP completed"

            self._serve(tag, run())
        else:
            self.sendPositiveResponse(tag, b"NOOP completed")

    unauth_NOOP = (do_NOOP,)  # type: ignore[assignment]
    auth_NOOP = unauth_NOOP  # type: ignore[assignment]
    select_NOOP = unauth_NOOP  # type: ignore[assignment]

    def do_CHECK(self, tag: bytes) -> None:
        """CHECK: like NOOP."""
        self.do_NOOP(tag)

    select_CHECK = (do_CHECK,)  # type: ignore[assignment]

    def do_CLOSE(self, tag: bytes) -> None:
        """CLOSE: \\Deleted messages go (read-write only), no EXPUNGE responses, back to authenticated."""
        self._serve(tag, self._close(expunge=True), updates=False)

    select_CLOSE = (do_CLOSE,)  # type: ignore[assignment]

    def do_UNSELECT(self, tag: bytes) -> None:
        """UNSELECT (RFC 3691): leave the mailbox, removing nothing."""
        self._serve(tag, self._close(expunge=False), updates=False)

    select_UNSELECT = (do_UNSELECT,)

    async def _close(self, *, expunge: bool) -> bytes:
        await self.proxy.close(expunge=expunge)
        self.mbox = None
        self.state = "auth"
        return b"CLOSE completed" if expunge else b"UNSELECT completed"

    def do_EXPUNGE(self, tag: bytes) -> None:
        """EXPUNGE."""

        async def run() -> bytes:
            await self.proxy.expunge()
            return b"EXPUNGE completed"

        self._serve(tag, run())

    select_EXPUNGE = (do_EXPUNGE,)  # type: ignore[assignment]

    def do_SEARCH(self, tag: bytes, charset: bytes | None, query: Sequence[Any], uid: int = 0) -> None:
        """SEARCH and UID SEARCH."""

        async def run() -> bytes:
            found = await self.proxy.search(
                query, uid=bool(uid), charset=charset.decode("ascii", "replace") if charset else None
            )
            self.sendUntaggedResponse(b"SEARCH" + b"".join(b" %d" % n for n in found))
            return b"SEARCH completed"

        self._serve(tag, run(), expunges=False)

    select_SEARCH = (do_SEARCH, imap4.IMAP4Server.opt_charset, imap4.IMAP4Server.arg_searchkeys)  # type: ignore[assignment]

    def do_FETCH(self, tag: bytes, messages: imap4.MessageSet, query: Sequence[Any], uid: int = 0) -> None:
        """FETCH: the query goes down to the proxy, which streams the answers."""
        items = fetch_items(query)

        async def run() -> bytes:
            transport: Any = self.transport
            writer = _Writer(transport)
            proxy = self.proxy
            producer = _ReadingThrottle(proxy.store)
            transport.registerProducer(producer, True)
            try:
                await proxy.fetch(_ranges(messages), items, writer, uid=bool(uid))
            finally:
                writer.flush()
                producer.resumeProducing()
                transport.unregisterProducer()
            return b"FETCH completed"

        self._serve(tag, run(), expunges=False)

    select_FETCH = (do_FETCH, imap4.IMAP4Server.arg_seqset, imap4.IMAP4Server.arg_fetchatt)  # type: ignore[assignment]

    def do_STORE(
        self, tag: bytes, messages: imap4.MessageSet, mode: bytes, flags: Sequence[bytes], uid: int = 0
    ) -> None:
        """STORE: the new flags come back from upstream as FETCH responses."""
        operation = mode.upper()
        if operation.lstrip(b"+-") not in (b"FLAGS", b"FLAGS.SILENT"):
            self.sendBadResponse(tag, b"STORE needs FLAGS, +FLAGS or -FLAGS")
            return

        async def run() -> bytes:
            names = [f.decode("ascii", "replace") for f in flags]
            stored = await self.proxy.store_flags(_ranges(messages), operation, names, uid=bool(uid))
            if operation.endswith(b".SILENT"):
                self.proxy.state.forget_flag_changes(stored)
            return b"STORE completed"

        self._serve(tag, run(), expunges=False)

    select_STORE = (do_STORE, imap4.IMAP4Server.arg_seqset, imap4.IMAP4Server.arg_atom,  # type: ignore[assignment]
                    imap4.IMAP4Server.arg_flaglist)  # fmt: skip

    def do_COPY(self, tag: bytes, messages: imap4.MessageSet, mailbox: bytes, uid: int = 0) -> None:
        """COPY, with COPYUID when the store gives it."""

        async def run() -> bytes:
            copied = await self.proxy.copy(_ranges(messages), _mailbox(mailbox), uid=bool(uid))
            return _copyuid(copied) + b"COPY completed"

        self._serve(tag, run())

    select_COPY = (do_COPY, imap4.IMAP4Server.arg_seqset, imap4.IMAP4Server.arg_finalastring)  # type: ignore[assignment]

    def do_MOVE(self, tag: bytes, messages: imap4.MessageSet, mailbox: bytes, uid: int = 0) -> None:
        """MOVE (RFC 6851): COPYUID first, then the expunges, then OK."""

        async def run() -> bytes:
            moved = await self.proxy.move(_ranges(messages), _mailbox(mailbox), uid=bool(uid))
            if moved is not None:
                self.sendPositiveResponse(None, _copyuid(moved) + b"Moved")
            return b"MOVE completed"

        self._serve(tag, run())

    select_MOVE = (do_MOVE, imap4.IMAP4Server.arg_seqset, imap4.IMAP4Server.arg_finalastring)

    def do_UID(self, tag: bytes, command: bytes, line: bytes) -> None:
        """UID COPY/FETCH/STORE/SEARCH, and UID MOVE and UID EXPUNGE."""
        command = command.upper()
        if command == b"EXPUNGE":
            messages, rest = self.arg_seqset(line)
            if rest:
                raise imap4.IllegalClientResponse("too many arguments")

            async def run() -> bytes:
                await self.proxy.expunge(_ranges(messages))
                return b"UID EXPUNGE completed"

            self._serve(tag, run())
            return
        if command not in (b"COPY", b"FETCH", b"STORE", b"SEARCH", b"MOVE"):
            raise imap4.IllegalClientResponse(command)
        self.dispatchCommand(tag, command, line, uid=1)

    select_UID = (do_UID, imap4.IMAP4Server.arg_atom, imap4.IMAP4Server.arg_line)  # type: ignore[assignment]

    # -- IDLE ----------------------------------------------------------------------------------

    def do_IDLE(self, tag: bytes) -> None:
        """IDLE (RFC 2177): upstream changes are sent as they happen, until DONE."""
        self.sendContinuationRequest(b"idling")
        self._idle_tag = tag
        self.lastState = self.parseState
        self.parseState = "idle"
        if isinstance(self.account, ProxyAccount) and self.account.proxy is not None:
            d = Deferred.fromCoroutine(self.account.proxy.begin_idle(self._send_updates))
            d.addErrback(self._idle_failed)

    select_IDLE = (do_IDLE,)  # type: ignore[assignment]
    auth_IDLE = select_IDLE  # type: ignore[assignment]

    def _idle_failed(self, failure: Failure) -> None:
        if not failure.check(GatekeeperError, MailStoreError):
            log.failure("IDLE could not start", failure)

    def parse_idle(self, line: bytes) -> None:
        """The line that ends IDLE (``DONE``)."""
        self.parseState = self.lastState
        del self.lastState
        tag, self._idle_tag = self._idle_tag or b"*", None

        async def run() -> bytes:
            if line.strip().upper() != b"DONE":
                raise CommandError("expected DONE", bad=True)
            if isinstance(self.account, ProxyAccount) and self.account.proxy is not None:
                await self.account.proxy.end_idle()
            return b"IDLE terminated"

        self._serve(tag, run())


def _copyuid(copied: Any) -> bytes:
    if copied is None or not copied.source:
        return b""
    return b"[COPYUID %d %s %s] " % (
        copied.uidvalidity,
        syntax.sequence_set(copied.source) if list(copied.source) == sorted(copied.source) else
        b",".join(b"%d" % n for n in copied.source),
        b",".join(b"%d" % n for n in copied.destination),
    )  # fmt: skip


@attrs.define
class _ReadingThrottle:
    """Pauses reading from the store while the client is slow to take a FETCH answer."""

    store: Any
    paused: bool = False

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            pause = getattr(self.store, "pause", None)
            if pause is not None:
                pause()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            resume = getattr(self.store, "resume", None)
            if resume is not None:
                resume()

    def stopProducing(self) -> None:
        self.resumeProducing()


class ImapFactory(ServerFactory):
    """Builds one :class:`ImapServer` per connection, tagged with the client's address."""

    def __init__(
        self,
        portal: Portal,
        context_factory: CertificateOptions | None,
        *,
        allow_plaintext_on_loopback: bool = False,
        max_append_size: int = 50 * 1024 * 1024,
        on_stop: Callable[[], object] | None = None,
    ) -> None:
        """``on_stop`` runs when the last listener stops (dropping the users' caches)."""
        self.portal = portal
        self.context_factory = context_factory
        self.allow_plaintext_on_loopback = allow_plaintext_on_loopback
        self.max_append_size = max_append_size
        self.on_stop = on_stop
        self.connections = Connections()

    def stopFactory(self) -> None:
        """The listeners are closed: forget what was cached for the users."""
        if self.on_stop is not None:
            self.on_stop()

    def buildProtocol(self, addr: IAddress | None) -> ImapServer:
        """Give the new connection its own view of the portal."""
        protocol = ImapServer(
            self.context_factory,
            allow_plaintext_on_loopback=self.allow_plaintext_on_loopback,
            max_append_size=self.max_append_size,
        )
        protocol.factory = self
        protocol.portal = connection_portal(self.portal, "imap", protocol, addr)  # type: ignore[assignment]
        protocol.connections = self.connections
        self.connections.add(protocol)
        return protocol


def make_account_avatar(backend: ImapBackend | None = None) -> AvatarFactory:
    """Return the realm's avatar factory for IMAP sessions (no backend: a store with no mailboxes)."""
    chosen = backend or empty_backend()

    def make(identity: Identity, session: Session) -> tuple[Any, Callable[[], None]]:
        account = ProxyAccount(identity, session, chosen)
        return account, account.close

    return make


def empty_backend() -> ImapBackend:
    """A backend whose store has no mailboxes (no mail store configured): nothing lost, nothing shown."""
    from twisted.internet.task import Clock

    from gatekeeper.imap_proxy import EmptyMailStore, reveal_unavailable

    async def open_store(login: UpstreamLogin) -> IMailStoreSession:
        return EmptyMailStore()

    async def resolve(identity: Identity, password: str) -> UpstreamLogin:
        return UpstreamLogin(identity.address, identity.address, password)

    clock = Clock()
    return ImapBackend(
        open_store=open_store,
        resolve=resolve,
        make_reveal=lambda identity, session: reveal_unavailable,
        caches=MailCaches(clock, 0, 0),
        clock=clock,
    )


def proxy_backend(
    reactor: Any,
    upstream: UpstreamConfig,
    imap: ImapConfig,
    *,
    revealer: Revealer,
    resolve: LoginResolve,
    workers: Any,
    open_store: StoreOpener | None = None,
) -> ImapBackend:
    """The backend of the IMAP proxy to the upstream IMAP server (``[upstream] imap``).

    Revealing and encrypting run in ``workers`` (keys cross as a ``WireIdentity``);
    trusted signers are harvested by ``revealer`` on the reactor. ``open_store``
    replaces the upstream server (the embedded store's sessions).
    """
    from gatekeeper.imap_proxy import encrypt_to_self, reveal_for_imap
    from gatekeeper.keys.unlocking import identity_to_wire
    from gatekeeper.upstream.imap import open_session

    async def open_upstream(login: UpstreamLogin) -> IMailStoreSession:
        return await open_session(reactor, upstream, login.user, login.password)

    def make_reveal(identity: Identity, session: Session) -> RevealFunction:
        wire: list[Any] = []

        async def reveal(message: bytes) -> RevealedMessage:
            if not wire:
                wire.append(identity_to_wire(identity))
            started = reactor.seconds()
            revealed, report, view = await workers.run(
                reveal_for_imap, wire[0], message, revealer.trust, revealer.options
            )
            # harvest trusted signers, emit the reveal and key_use events
            revealer.record(
                identity,
                report,
                protocol="imap",
                session=session.session_id,
                peer=session.client,
                seconds=reactor.seconds() - started,
            )
            return RevealedMessage(revealed, view, report.decrypted, report.signature, ",".join(report.key_ids) or None)

        return reveal

    def make_encrypt(identity: Identity) -> EncryptFunction:
        certificates = (identity.current.certificate.public_bytes(Encoding.DER),)

        async def encrypt(message: bytes) -> bytes:
            result: bytes = await workers.run(encrypt_to_self, certificates, message)
            return result

        return encrypt

    return ImapBackend(
        open_store=open_store or open_upstream,
        resolve=resolve,
        make_reveal=make_reveal,
        caches=MailCaches(reactor, imap.cache_bytes, imap.cache_linger_seconds),
        clock=reactor,
        make_encrypt=make_encrypt,
        encrypt_folders=imap.encrypt_folders,
        idle_poll_seconds=imap.idle_poll_seconds,
    )

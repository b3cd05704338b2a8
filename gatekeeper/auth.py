"""Login: a password is right exactly when it decrypts the user's private key.

One :class:`KeyUnlockingChecker` serves the SMTP, POP3 and IMAP portals. A login

1. is refused at once while the user name or the client address is throttled;
2. is answered from the :class:`UnlockCache` when the same password unlocked the same
   keys less than ``unlock_cache_seconds`` ago (no KDF);
3. otherwise unlocks the keys in a worker process (reading the record, the KDF, the
   PKCS#12 parsing: see :mod:`gatekeeper.keys.unlocking` for why not a thread), so the
   reactor keeps serving other sessions (``bench/login.py``). Unknown users run the
   same KDF on a dummy record, so they cost the same time as known ones.

The avatar id a login yields is the user's :class:`~gatekeeper.keys.identity.Identity`
(their decrypted keys); protocol realms turn it into avatars and register the session.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from gatekeeper.address import address_key, normalize_address
from gatekeeper.errors import BadPassword, InvalidAddress
from gatekeeper.events import emit
from gatekeeper.keys.identity import Identity
from gatekeeper.throttle import LoginThrottle

log = Logger()

MAX_USERNAME = 254
MAX_PASSWORD = 1024


# -- errors the protocols translate -------------------------------------------------


class LoginRefused(UnauthorizedLogin):
    """Wrong password or unknown user (deliberately the same)."""

    def __init__(self) -> None:
        super().__init__("authentication failed")


class LoginThrottledError(UnauthorizedLogin):
    """Too many failed logins for this user name or client address."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many failed logins; try again later")
        self.retry_after = retry_after


class LoginUnavailable(Exception):
    """A temporary problem (the key store could not be read); the client should retry."""

    def __init__(self) -> None:
        super().__init__("temporary authentication failure; try again later")


# -- credentials that know where they came from -------------------------------------


@attrs.frozen
class ConnectionInfo:
    """Where a login comes from: used for throttling, logs and the session list."""

    protocol: str
    client: str
    disconnect: Callable[[], None] = attrs.field(default=lambda: None, eq=False)


@implementer(IUsernamePassword)
@attrs.frozen(repr=False)
class AddressedCredentials:
    """A user name and password together with the connection they arrived on."""

    username: bytes
    password: bytes = attrs.field(repr=False)
    connection: ConnectionInfo

    def checkPassword(self, password: bytes) -> bool:
        """Compare in constant time (part of IUsernamePassword; our checker never uses it)."""
        return hmac.compare_digest(self.password, password)

    def __repr__(self) -> str:
        return f"<AddressedCredentials {self.username!r} from {self.connection.client}>"


class SessionPortal:
    """A per-connection view of a portal that tags credentials with the connection.

    Twisted's protocols call ``self.portal.login(credentials, mind, *interfaces)``;
    handing them this object instead of the shared :class:`Portal` lets the checker
    throttle by client address and the realm record the session, without touching the
    protocols' login code.
    """

    def __init__(self, portal: Portal, connection: ConnectionInfo) -> None:
        self.portal = portal
        self.connection = connection

    def login(self, credentials: Any, mind: object, *interfaces: type[Interface]) -> Deferred[Any]:
        """Log in with IUsernamePassword credentials; anything else is refused."""
        if not IUsernamePassword.providedBy(credentials):
            raise UnauthorizedLogin("unsupported credentials")
        username = credentials.username
        password = credentials.password
        if isinstance(username, str):
            username = username.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")
        tagged = AddressedCredentials(username, password, self.connection)
        return self.portal.login(tagged, self.connection, *interfaces)


def connection_portal(portal: Portal, protocol_name: str, protocol: Any, addr: Any) -> SessionPortal:
    """Return the portal view for a new connection of ``protocol`` from ``addr``.

    The connection info carries a way to disconnect the session (the admin's "kick").
    """

    def disconnect() -> None:
        if protocol.transport is not None:
            protocol.transport.loseConnection()

    return SessionPortal(portal, ConnectionInfo(protocol_name, getattr(addr, "host", "unknown"), disconnect))


# -- the cache of unlocked keys ----------------------------------------------------


@attrs.define
class _CacheEntry:
    verifier: bytes
    identity: Identity
    expiry: IDelayedCall


class UnlockCache:
    """Recently unlocked identities, so a client's repeated logins skip the KDF.

    An entry is found only with the same password: the cache keeps an HMAC of it under
    a random per-process key and compares in constant time, never the password itself.
    Entries expire ``ttl`` seconds after the KDF ran (not after last use), and are
    dropped at once when an admin changes the user's keys.
    """

    def __init__(self, clock: IReactorTime, ttl: float) -> None:
        self._clock = clock
        self._ttl = ttl
        self._secret = secrets.token_bytes(32)
        self._entries: dict[str, _CacheEntry] = {}

    def _verifier(self, key: str, password: str) -> bytes:
        message = key.encode("utf-8") + b"\0" + password.encode("utf-8")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def get(self, address: str, password: str) -> Identity | None:
        """Return the cached identity when ``password`` is the one that unlocked it."""
        key = address_key(address)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not hmac.compare_digest(entry.verifier, self._verifier(key, password)):
            return None
        return entry.identity

    def put(self, address: str, password: str, identity: Identity) -> None:
        """Remember an identity just unlocked with ``password``."""
        if self._ttl <= 0:
            return
        key = address_key(address)
        self.drop(address)
        expiry = self._clock.callLater(self._ttl, self._entries.pop, key, None)
        self._entries[key] = _CacheEntry(self._verifier(key, password), identity, expiry)

    def drop(self, address: str | None = None) -> None:
        """Forget one user's unlocked keys, or everyone's."""
        keys = list(self._entries) if address is None else [address_key(address)]
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is not None and entry.expiry.active():
                entry.expiry.cancel()

    def __len__(self) -> int:
        return len(self._entries)


# -- the checker -------------------------------------------------------------------

UnlockFunction = Callable[[str | None, str | None], Awaitable[Identity]]


@implementer(ICredentialsChecker)
class KeyUnlockingChecker:
    """Authenticates ``IUsernamePassword`` by decrypting the user's private keys.

    ``unlock(address, password)`` does the expensive part (in production: the key
    store's login in a worker process, see :mod:`gatekeeper.keys.unlocking`). It gets
    ``None`` for a user name or password that cannot be valid, and must then spend the
    same time as a real unlock and fail with :class:`BadPassword`, as for an unknown
    user, so that nothing tells the cases apart.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, *, cache: UnlockCache, throttle: LoginThrottle, unlock: UnlockFunction) -> None:
        self._cache = cache
        self._throttle = throttle
        self._unlock = unlock

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[Any]:
        """Return a Deferred firing with the user's unlocked :class:`Identity`."""
        return Deferred.fromCoroutine(self.authenticate(credentials))

    async def authenticate(self, credentials: IUsernamePassword) -> Identity:
        """Check the credentials; raise a :class:`UnauthorizedLogin` subclass on failure."""
        connection = getattr(credentials, "connection", None) or ConnectionInfo("unknown", "unknown")
        raw_user = bytes(credentials.username)[:MAX_USERNAME]
        user_text = raw_user.decode("utf-8", "replace")
        throttle_key = user_text.casefold()
        wait = self._throttle.retry_after(throttle_key, connection.client)
        if wait > 0:
            emit(
                log,
                "login",
                "login throttled: {user} from {client} ({protocol}), retry in {wait:.0f} s",
                outcome="throttled",
                user=user_text,
                client=connection.client,
                protocol=connection.protocol,
                wait=wait,
            )
            raise LoginThrottledError(wait)

        address, password = _parse(raw_user, bytes(credentials.password))
        if address is not None and password is not None:
            cached = self._cache.get(address, password)
            if cached is not None:
                self._succeeded(throttle_key, cached, connection, cached=True)
                return cached
        try:
            identity = await self._unlock(address, password)
        except BadPassword:
            self._throttle.failed(throttle_key, connection.client)
            emit(
                log,
                "login",
                "login failed: {user} from {client} ({protocol})",
                outcome="failed",
                user=user_text,
                client=connection.client,
                protocol=connection.protocol,
            )
            raise LoginRefused() from None
        except Exception as error:
            # Never echo the exception: it could describe the key file. Log its type only.
            emit(
                log,
                "login",
                "login could not be checked for {user} ({protocol}): {kind}",
                level="error",
                outcome="unavailable",
                user=user_text,
                client=connection.client,
                protocol=connection.protocol,
                kind=type(error).__name__,
            )
            raise LoginUnavailable() from None
        assert address is not None and password is not None
        self._cache.put(address, password, identity)
        self._succeeded(throttle_key, identity, connection, cached=False)
        return identity

    def _succeeded(self, throttle_key: str, identity: Identity, connection: ConnectionInfo, *, cached: bool) -> None:
        self._throttle.succeeded(throttle_key)
        emit(
            log,
            "login",
            "login ok: {user} from {client} ({protocol}{how})",
            outcome="cached" if cached else "ok",
            user=identity.address,
            client=connection.client,
            protocol=connection.protocol,
            how=", cached" if cached else "",
        )
        if not cached:
            emit(
                log,
                "key_use",
                "keys unlocked: {user} ({protocol} login from {peer})",
                operation="unlock",
                user=identity.address,
                session=None,
                message_id=None,
                peer=connection.client,
                protocol=connection.protocol,
            )


def _parse(raw_user: bytes, raw_password: bytes) -> tuple[str | None, str | None]:
    """Decode a user name and password; None marks what cannot be a valid login."""
    try:
        address: str | None = normalize_address(raw_user.decode("utf-8"))
    except (UnicodeDecodeError, InvalidAddress):
        address = None
    try:
        password: str | None = raw_password.decode("utf-8") if len(raw_password) <= MAX_PASSWORD else None
    except UnicodeDecodeError:
        password = None
    return address, password


# -- sessions and realms -----------------------------------------------------------


@attrs.define(eq=False)
class Session:
    """One logged-in connection: who, over what, from where, since when."""

    session_id: int
    address: str
    protocol: str
    client: str
    since: float
    disconnect: Callable[[], None] = attrs.field(repr=False)


class SessionRegistry:
    """The live sessions of all protocols, for the admin console (never holds secrets)."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._ids = itertools.count(1)
        self._sessions: dict[int, Session] = {}

    def open(self, identity: Identity, connection: ConnectionInfo) -> Session:
        """Register a new session and return it."""
        session = Session(
            next(self._ids),
            identity.address,
            connection.protocol,
            connection.client,
            self._clock.seconds(),
            connection.disconnect,
        )
        self._sessions[session.session_id] = session
        return session

    def close(self, session: Session) -> None:
        """Forget a session that has logged out or disconnected."""
        self._sessions.pop(session.session_id, None)

    def sessions(self) -> list[Session]:
        """Return the live sessions, oldest first."""
        return sorted(self._sessions.values(), key=lambda s: s.session_id)

    def kick(self, session_id: int) -> bool:
        """Disconnect a session; returns False when there is no such session."""
        session = self._sessions.get(session_id)
        if session is None:
            return False
        session.disconnect()
        return True


AvatarFactory = Callable[[Identity, Session], tuple[Any, Callable[[], None]]]


@implementer(IRealm)
class GatekeeperRealm:
    """Turns an unlocked identity into one protocol's avatar and tracks the session.

    ``make_avatar(identity, session)`` returns ``(avatar, on_logout)``; the realm adds
    the session bookkeeping around ``on_logout``.
    """

    def __init__(self, interface: type[Interface], make_avatar: AvatarFactory, sessions: SessionRegistry) -> None:
        self._interface = interface
        self._make_avatar = make_avatar
        self._sessions = sessions

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        """Build the avatar for the one interface this realm serves."""
        if self._interface not in interfaces:
            raise NotImplementedError(f"this realm only serves {self._interface.__name__}")
        connection = mind if isinstance(mind, ConnectionInfo) else ConnectionInfo("unknown", "unknown")
        session = self._sessions.open(avatarId, connection)
        avatar, on_logout = self._make_avatar(avatarId, session)
        self._session_event(session, "open")

        def logout() -> None:
            self._sessions.close(session)
            self._session_event(session, "close")
            on_logout()

        return self._interface, avatar, logout

    @staticmethod
    def _session_event(session: Session, action: str) -> None:
        emit(
            log,
            "session",
            "session {session} {action}: {user} ({protocol} from {client})",
            action=action,
            session=session.session_id,
            user=session.address,
            protocol=session.protocol,
            client=session.client,
        )

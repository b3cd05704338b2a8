"""Administrators' sessions on the web page: server-side, with an idle and an absolute time-out.

A session is a random 256-bit token in the ``__Host-gk_admin`` cookie (``Secure;
HttpOnly; SameSite=Strict; Path=/``, no ``Domain``); the server keeps, per token, who
logged in, when it was last used, the session's CSRF token and the messages to show on
the next page. A new token is made at every login (no fixation) and forgotten at
logout, after :attr:`SessionStore.idle_seconds` without a request, or
:attr:`SessionStore.max_age_seconds` after the login whatever happens. The table is
capped (oldest sessions dropped first).

Before the login there is no session: the login form's CSRF token is an HMAC, under a
key made at start-up, of a random nonce held in the short-lived ``__Host-gk_login``
cookie (:func:`login_token`), so a flood of anonymous visitors costs no memory.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime

__all__ = ["AdminSession", "SessionStore", "login_token", "tokens_match"]


@attrs.define(repr=False)
class AdminSession:
    """One administrator's session (the token itself is the table's key)."""

    name: str
    client: str
    csrf: str
    created: float
    last_seen: float
    flashes: list[tuple[str, str]] = attrs.Factory(list)

    def flash(self, kind: str, text: str) -> None:
        """Keep a message (``kind`` ``ok`` or ``error``) for the next page shown."""
        self.flashes.append((kind, text))

    def take_flashes(self) -> list[tuple[str, str]]:
        """The kept messages, forgotten once taken."""
        taken, self.flashes = self.flashes, []
        return taken

    def __repr__(self) -> str:
        return f"<AdminSession {self.name} from {self.client}>"


def tokens_match(given: str | None, expected: str) -> bool:
    """Compare a submitted token with the expected one in constant time."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("ascii"))


def login_token(key: bytes, nonce: str) -> str:
    """The login form's CSRF token for the nonce of the ``__Host-gk_login`` cookie."""
    return hmac.new(key, b"gatekeeper web login\0" + nonce.encode("utf-8", "replace"), hashlib.sha256).hexdigest()


class SessionStore:
    """The live sessions, by token."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        idle_seconds: float = 900.0,
        max_age_seconds: float = 12 * 3600.0,
        max_sessions: int = 200,
    ) -> None:
        self.clock = clock
        self.idle_seconds = idle_seconds
        self.max_age_seconds = max_age_seconds
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, AdminSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, name: str, client: str) -> tuple[str, AdminSession]:
        """Start a session for ``name``; return its new token and the session."""
        now = self.clock.seconds()
        token = secrets.token_urlsafe(32)
        session = AdminSession(name, client, secrets.token_urlsafe(32), now, now)
        self._sessions[token] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return token, session

    def get(self, token: str | None) -> AdminSession | None:
        """The live session of ``token`` (its idle clock restarted), or None when unknown or expired."""
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        now = self.clock.seconds()
        if now - session.last_seen > self.idle_seconds or now - session.created > self.max_age_seconds:
            del self._sessions[token]
            return None
        session.last_seen = now
        self._sessions.move_to_end(token)
        return session

    def end(self, token: str | None) -> None:
        """Forget a session (logout)."""
        if token:
            self._sessions.pop(token, None)

    def end_all(self, name: str) -> int:
        """Forget every session of ``name`` (an administrator removed); return how many."""
        doomed = [token for token, session in self._sessions.items() if session.name == name]
        for token in doomed:
            del self._sessions[token]
        return len(doomed)

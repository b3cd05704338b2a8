"""An in-memory POP3 upstream: maildrops as lists of messages, for tests of the POP3 proxy.

:class:`MemoryPop3Upstream` implements :class:`~gatekeeper.interfaces.IPop3Upstream`.
Each address has a list of ``(uid, message)``; a session sees the list as it was when it
opened, and :meth:`MemoryMaildrop.commit` removes the deleted messages from it, as a
POP3 server's UPDATE state does. ``hold`` makes every request wait on a Deferred the
test fires (a slow or stuck upstream); ``error`` makes the next requests fail.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from twisted.internet.defer import Deferred
from zope.interface import implementer

from gatekeeper.address import address_key
from gatekeeper.errors import UpstreamRefused
from gatekeeper.interfaces import IPop3Maildrop, IPop3Upstream, MaildropEntry, UpstreamLogin


@implementer(IPop3Upstream)
class MemoryPop3Upstream:
    """Maildrops in memory, with the password each one accepts."""

    def __init__(self) -> None:
        self.boxes: dict[str, list[tuple[bytes, bytes]]] = {}
        self.passwords: dict[str, str] = {}
        self.logins: list[UpstreamLogin] = []
        self.retrieved: list[int] = []
        self.sessions: list[MemoryMaildrop] = []
        self.hold: Deferred[None] | None = None
        self.error: Exception | None = None
        self._uids = itertools.count(1)

    def add_user(self, user: str, password: str) -> None:
        """Accept ``user`` with ``password`` (an empty maildrop)."""
        self.passwords[address_key(user)] = password
        self.boxes.setdefault(address_key(user), [])

    def deliver(self, user: str, message: bytes) -> bytes:
        """Add a message to ``user``'s maildrop; returns its UID."""
        uid = b"uid-%06d" % next(self._uids)
        self.boxes[address_key(user)].append((uid, message))
        return uid

    def messages(self, user: str) -> list[bytes]:
        """What ``user``'s maildrop holds now."""
        return [message for _, message in self.boxes.get(address_key(user), [])]

    async def _wait(self) -> None:
        if self.hold is not None:
            await self.hold
        if self.error is not None:
            raise self.error

    async def open(self, login: UpstreamLogin) -> MemoryMaildrop:
        """Log in: the password must be the one given to :meth:`add_user`."""
        self.logins.append(login)
        await self._wait()
        if self.passwords.get(address_key(login.user)) != login.password:
            raise UpstreamRefused("the mail server refused the login", code="AUTH")
        session = MemoryMaildrop(self, address_key(login.user))
        self.sessions.append(session)
        return session


@implementer(IPop3Maildrop)
class MemoryMaildrop:
    """One session: the maildrop as it was when it opened."""

    def __init__(self, upstream: MemoryPop3Upstream, key: str) -> None:
        self._upstream = upstream
        self._key = key
        self._snapshot = list(upstream.boxes[key])
        self.entries = tuple(MaildropEntry(uid, len(message)) for uid, message in self._snapshot)
        self.closed = False
        self.committed: list[int] | None = None

    async def retrieve(self, index: int) -> bytes:
        """The message at ``index``."""
        await self._upstream._wait()
        self._upstream.retrieved.append(index)
        return self._snapshot[index][1]

    async def top(self, index: int, lines: int) -> bytes:
        """The header and ``lines`` body lines of the message at ``index``."""
        await self._upstream._wait()
        head, _, body = self._snapshot[index][1].partition(b"\r\n\r\n")
        return head + b"\r\n\r\n" + b"".join(line + b"\r\n" for line in body.split(b"\r\n")[:lines])

    async def commit(self, deleted: Sequence[int]) -> None:
        """Remove the deleted messages from the maildrop and end the session."""
        await self._upstream._wait()
        gone = {self._snapshot[i][0] for i in deleted}
        box = self._upstream.boxes[self._key]
        box[:] = [(uid, message) for uid, message in box if uid not in gone]
        self.committed = sorted(deleted)
        self.closed = True

    def close(self) -> None:
        """End the session, deleting nothing."""
        self.closed = True

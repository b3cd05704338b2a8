"""``gk``: the administrator's view of the running gateway, for the SSH console and the web page.

One object, :class:`Gatekeeper`, over the running service's shared parts. It calls the
same core code as the ``gatekeeper`` command (:class:`~gatekeeper.keys.accounts.Accounts`
opened as ``gatekeeper user`` opens it, the key manager's lookup and its trace, the
connectivity checks of :mod:`gatekeeper.admin.check`) and returns plain values (attrs
classes, lists, numbers), never printing, so any front end can show them.

Slow work (key generation, the KDF, reading every user record) runs in the gateway's
worker processes; those methods return a Deferred. Every change is audited (an
``admin`` event naming the operation, its target, who did it and through which front
end) and drops the affected user's unlocked keys from the login cache, so the next
login reads the new record.
"""

from __future__ import annotations

import datetime
from collections import Counter
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred

from gatekeeper.address import normalize_address, same_address
from gatekeeper.admin.check import CheckReport, configured_anchors, run_checks
from gatekeeper.audit import admin_event
from gatekeeper.config import Config
from gatekeeper.interfaces import StoredUser
from gatekeeper.keys.accounts import current_certificate

if TYPE_CHECKING:
    from gatekeeper.tap import Parts

__all__ = ["Deleted", "Flushed", "Gatekeeper", "LookupTrace", "SessionInfo", "Stats", "UserInfo", "user_info"]

# -- what the methods return -------------------------------------------------------------


@attrs.frozen
class UserInfo:
    """A user as the console shows it: no key material, no password."""

    address: str
    key_id: str
    certificate_expires: datetime.datetime
    keys: int
    pending: int
    created: datetime.datetime
    last_login: datetime.datetime | None


def user_info(user: StoredUser) -> UserInfo:
    """Summarise a stored user record."""
    return UserInfo(
        address=user.address,
        key_id=user.pending[0].key_id if user.pending else user.current.key_id,
        certificate_expires=current_certificate(user).not_valid_after_utc,
        keys=len(user.keys),
        pending=len(user.pending),
        created=user.created,
        last_login=user.last_login,
    )


@attrs.frozen
class Deleted:
    """A deleted user, and how many of their live sessions were closed."""

    address: str
    sessions_closed: int


@attrs.frozen
class Flushed:
    """What :meth:`Gatekeeper.flush` forgot: cached lookup answers and unlocked-key entries."""

    lookups: int
    unlocked: int


@attrs.frozen
class SessionInfo:
    """A live session: who, over what, from where, since when (no secrets)."""

    session: int
    user: str
    protocol: str
    client: str
    since: datetime.datetime
    seconds: float


@attrs.frozen
class Stats:
    """The gateway at a glance."""

    sessions: dict[str, int]
    unlocked_users: int
    lookup_cache_entries: int
    lookup_cache_hits: int
    lookup_cache_misses: int
    worker_queue: int
    worker_processes: int


@attrs.frozen(repr=False)
class LookupTrace:
    """A lookup's answer and its trace in words (what ``gatekeeper lookup`` prints).

    ``result`` is the :class:`~gatekeeper.keys.directory.LookupResult`; its repr is the
    trace, so the console shows it as text.
    """

    result: Any
    lines: tuple[str, ...]

    @property
    def found(self) -> bool:
        """True when a usable certificate was found."""
        return bool(self.result.found)

    def __repr__(self) -> str:
        return "\n".join(self.lines)


# -- jobs for the worker processes ----------------------------------------------------------


def _accounts(config: Config) -> Any:
    # The CLI's own way of opening the accounts (store, CA on demand, publisher).
    from gatekeeper.admin.user_cmd import open_accounts

    return open_accounts(config)


def list_users_job(config: Config) -> list[UserInfo]:
    """Every user, summarised (in a worker: reads and parses every record)."""
    return [user_info(user) for user in _accounts(config).list()]


def add_user_job(config: Config, address: str, password: str) -> UserInfo:
    """Create a user (in a worker: key generation and the KDF)."""
    return user_info(_accounts(config).add(address, password))


def rotate_job(config: Config, address: str, password: str | None) -> UserInfo:
    """Rotate a user's key pair (in a worker)."""
    return user_info(_accounts(config).rotate(address, password))


def delete_user_job(config: Config, address: str) -> str:
    """Delete a user and revoke their certificates (in a worker); return the normalised address."""
    accounts = _accounts(config)
    user = accounts.get(address)
    accounts.delete(user.address)
    return str(user.address)


# -- the facade -----------------------------------------------------------------------------


class Gatekeeper:
    """The running gateway, for administrators.  Methods marked (Deferred) return one.

    Users and keys:
      users()                       every user: address, current key, certificate expiry,
                                    number of keys and pending rotations, last login (Deferred)
      add_user(address, password)   create a user with a new key pair and certificate (Deferred)
      rotate(address, password=None)
                                    a new key pair; without the password it is completed at
                                    the user's next login (Deferred)
      delete_user(address)          revoke every certificate, delete the keys, close the
                                    user's sessions (Deferred)

    Certificates of others:
      lookup(address, cached=False) ask the key sources now and show the trace (Deferred)
      flush(address=None)           forget cached lookups and unlocked keys (one user or all)

    Sessions and health:
      sessions()                    who is logged in where, since when
      kick(session)                 disconnect a session (its number, or a SessionInfo)
      check()                       upstream, directories, DNS, CRLs: reachable, TLS,
                                    login, round trip (Deferred; its repr is the table)
      stats()                       sessions per protocol, caches, worker queue

    Every change is written to the audit log with who made it (``actor``) and through
    which front end (``via``); :meth:`acting_as` gives a view for another actor.
    """

    def __init__(self, parts: Parts, *, actor: str = "console", via: str = "python") -> None:
        self._parts = parts
        self.actor = actor
        self.via = via

    def acting_as(self, actor: str, via: str) -> Gatekeeper:
        """The same gateway, with changes audited as made by ``actor`` through ``via``."""
        return Gatekeeper(self._parts, actor=actor, via=via)

    def __repr__(self) -> str:
        return f"<gk: Gatekeeper {self._parts.config.server.hostname} as {self.actor} via {self.via}; help(gk)>"

    # -- users

    def users(self) -> Deferred[list[UserInfo]]:
        """Every user, sorted by address (read in a worker process)."""
        return Deferred.fromCoroutine(self._parts.message_workers.run(list_users_job, self._parts.config))

    def add_user(self, address: str, password: str) -> Deferred[UserInfo]:
        """Create ``address`` with a new key pair and certificate sealed under ``password``."""
        return Deferred.fromCoroutine(self._add_user(address, password))

    async def _add_user(self, address: str, password: str) -> UserInfo:
        normalized = normalize_address(address)
        info: UserInfo = await self._parts.message_workers.run(add_user_job, self._parts.config, normalized, password)
        self._changed(info.address)
        self._audit("add_user", info.address)
        return info

    def rotate(self, address: str, password: str | None = None) -> Deferred[UserInfo]:
        """Give ``address`` a new key pair; old keys stay for old mail.

        Without ``password`` the new private key is sealed to the current key and
        completed at the user's next login; its certificate is published at once.
        """
        return Deferred.fromCoroutine(self._rotate(address, password))

    async def _rotate(self, address: str, password: str | None) -> UserInfo:
        normalized = normalize_address(address)
        info: UserInfo = await self._parts.message_workers.run(rotate_job, self._parts.config, normalized, password)
        self._changed(info.address)
        self._audit("rotate", info.address)
        return info

    def delete_user(self, address: str) -> Deferred[Deleted]:
        """Revoke every certificate of ``address``, delete their keys and close their sessions."""
        return Deferred.fromCoroutine(self._delete_user(address))

    async def _delete_user(self, address: str) -> Deleted:
        normalized = normalize_address(address)
        deleted: str = await self._parts.message_workers.run(delete_user_job, self._parts.config, normalized)
        self._changed(deleted)
        closed = 0
        for session in self._parts.sessions.sessions():
            if same_address(session.address, deleted) and self._parts.sessions.kick(session.session_id):
                closed += 1
        self._audit("delete_user", deleted)
        return Deleted(deleted, closed)

    def _changed(self, address: str) -> None:
        """A user's keys or certificate changed: forget what was cached about them."""
        self._parts.unlock_cache.drop(address)
        self._parts.key_manager.flush(address)

    # -- certificates

    def lookup(self, address: str, cached: bool = False) -> Deferred[LookupTrace]:
        """Find the certificate mail to ``address`` would be encrypted to, with every source's answer.

        Asks the sources now (``cached=True``: through the gateway's lookup cache).
        """
        return Deferred.fromCoroutine(self._lookup(address, cached))

    async def _lookup(self, address: str, cached: bool) -> LookupTrace:
        from gatekeeper.admin.lookup_cmd import describe

        manager = self._parts.key_manager
        result = await (manager.lookup(address) if cached else manager.directory.lookup(address))
        return LookupTrace(result, tuple(describe(result, self._parts.config)))

    def flush(self, address: str | None = None) -> Flushed:
        """Forget cached lookup answers and unlocked keys, for ``address`` or for everyone."""
        target = None if address is None else normalize_address(address)
        lookups = self._parts.key_manager.flush(target)
        cache = self._parts.unlock_cache
        before = len(cache)
        cache.drop(target)
        self._audit("flush", target or "*")
        return Flushed(lookups, before - len(cache))

    # -- sessions and health

    def sessions(self) -> list[SessionInfo]:
        """The live sessions, oldest first."""
        now = self._parts.reactor.seconds()
        return [
            SessionInfo(
                session=session.session_id,
                user=session.address,
                protocol=session.protocol,
                client=session.client,
                since=datetime.datetime.fromtimestamp(session.since, datetime.UTC),
                seconds=max(0.0, now - session.since),
            )
            for session in self._parts.sessions.sessions()
        ]

    def kick(self, session: int | SessionInfo) -> bool:
        """Disconnect a session; False when there is no such session."""
        number = session.session if isinstance(session, SessionInfo) else int(session)
        found = [s for s in self._parts.sessions.sessions() if s.session_id == number]
        if not found or not self._parts.sessions.kick(number):
            return False
        self._audit("kick", f"{found[0].address} (session {number}, {found[0].protocol} from {found[0].client})")
        return True

    def check(self, timeout: float = 10.0) -> Deferred[CheckReport]:
        """Check upstream, the directories, DNS and the CRLs now (``gatekeeper check``)."""
        config = self._parts.config
        anchors = configured_anchors(config)
        return Deferred.fromCoroutine(run_checks(config, self._parts.reactor, anchors=anchors, timeout=timeout))

    def stats(self) -> Stats:
        """Sessions per protocol, cache sizes and counters, the worker queue."""
        parts = self._parts
        cache = parts.key_manager.cache
        return Stats(
            sessions=dict(sorted(Counter(s.protocol for s in parts.sessions.sessions()).items())),
            unlocked_users=len(parts.unlock_cache),
            lookup_cache_entries=len(cache),
            lookup_cache_hits=cache.stats.hits,
            lookup_cache_misses=cache.stats.misses,
            worker_queue=parts.message_workers.pending,
            worker_processes=parts.message_workers.processes,
        )

    # -- audit

    def _audit(self, operation: str, target: str) -> None:
        admin_event(operation, target, actor=self.actor, via=self.via)

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
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred

from gatekeeper.address import normalize_address, same_address
from gatekeeper.admin.check import CheckReport, configured_anchors, run_checks
from gatekeeper.audit import admin_event, audit_log_path
from gatekeeper.config import Config
from gatekeeper.interfaces import StoredUser
from gatekeeper.keys.accounts import current_certificate
from gatekeeper.keys.keyring import KeyRing, KeyRingEntry, certificate_addresses, fingerprint, normalize_fingerprint

if TYPE_CHECKING:
    from gatekeeper.tap import Parts

__all__ = [
    "AuditPage",
    "AuditRecord",
    "CertificateInfo",
    "Deleted",
    "Flushed",
    "Gatekeeper",
    "LookupTrace",
    "PasswordReset",
    "SessionInfo",
    "Stats",
    "UserInfo",
    "UserPage",
    "user_info",
]

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
class UserPage:
    """One page of users matching a search: ``total`` matches, these from ``offset`` on."""

    users: tuple[UserInfo, ...]
    total: int
    offset: int
    limit: int


@attrs.frozen
class PasswordReset:
    """A changed password: the user, and whether a new key pair replaced the old keys.

    ``reissued`` is False when the old password re-encrypted every key (nothing else
    changed) and True when, without it, the old keys were deleted and their
    certificates revoked (:meth:`~gatekeeper.keys.accounts.Accounts.reissue`).
    """

    user: UserInfo
    reissued: bool


@attrs.frozen
class CertificateInfo:
    """A certificate of the key ring as the admin pages show it (no key material)."""

    fingerprint: str
    addresses: tuple[str, ...]
    subject: str
    issuer: str
    not_after: datetime.datetime
    origin: str
    added: datetime.datetime | None

    @classmethod
    def of(cls, certificate: x509.Certificate, entry: KeyRingEntry | None = None) -> CertificateInfo:
        """Summarise a certificate (and its key ring entry, when there is one)."""
        return cls(
            fingerprint=fingerprint(certificate),
            addresses=certificate_addresses(certificate),
            subject=certificate.subject.rfc4514_string(),
            issuer=certificate.issuer.rfc4514_string(),
            not_after=certificate.not_valid_after_utc,
            origin=entry.origin if entry is not None else "imported",
            added=entry.added if entry is not None else None,
        )


@attrs.frozen
class AuditRecord:
    """One line of the audit log: its fields (``seq``, ``time``, ``event``, ``operation``, ...)."""

    fields: dict[str, Any]


@attrs.frozen
class AuditPage:
    """Audit records matching a filter, newest first, from the ``offset``-th match on.

    ``more`` tells whether older matches follow; ``scanned`` counts the lines read and
    ``truncated`` says the search stopped at its limit before the start of the log.
    """

    records: tuple[AuditRecord, ...]
    offset: int
    more: bool
    scanned: int
    truncated: bool


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


# Worker processes keep the sorted address list while the users directory is unchanged:
# paging through 10,000 users then reads 50 records a page, not 10,000.
_address_index: dict[str, tuple[int, list[str]]] = {}


def _addresses(config: Config) -> list[str]:
    accounts = _accounts(config)
    root = str(accounts.store.users_root)
    stamp = os.stat(root).st_mtime_ns
    cached = _address_index.get(root)
    if cached is None or cached[0] != stamp:
        cached = (stamp, list(accounts.store.list_users()))
        _address_index[root] = cached
    return cached[1]


def users_page_job(config: Config, query: str, offset: int, limit: int) -> UserPage:
    """The users whose address contains ``query`` (case-insensitive), one page (in a worker)."""
    wanted = query.strip().casefold()
    everyone = _addresses(config)
    matching = [a for a in everyone if wanted in a.casefold()] if wanted else everyone
    offset = max(0, min(offset, max(0, len(matching) - 1)))
    accounts = _accounts(config)
    page = []
    for address in matching[offset : offset + limit]:
        user = accounts.store.get_user(address)
        if user is not None:  # deleted since the listing
            page.append(user_info(user))
    return UserPage(tuple(page), len(matching), offset, limit)


def user_job(config: Config, address: str) -> UserInfo:
    """One user, summarised (in a worker)."""
    return user_info(_accounts(config).get(address))


def reset_password_job(config: Config, address: str, new_password: str, old_password: str | None) -> PasswordReset:
    """Change a password with the old one (re-encrypting every key), else reissue (in a worker)."""
    accounts = _accounts(config)
    if old_password is not None:
        return PasswordReset(user_info(accounts.change_password(address, old_password, new_password)), False)
    return PasswordReset(user_info(accounts.reissue(address, new_password)), True)


def export_job(config: Config, address: str, password: str, export_password: str, legacy: bool) -> bytes:
    """The user's current key and certificate as PKCS#12 (in a worker: the KDFs)."""
    return bytes(_accounts(config).export(address, password, export_password, legacy=legacy))


def certificate_job(config: Config, address: str) -> tuple[str, bytes]:
    """The user's current certificate in PEM, with the user's address (in a worker)."""
    user = _accounts(config).get(address)
    return user.address, current_certificate(user).public_bytes(serialization.Encoding.PEM)


def keyring_job(root: Path) -> list[CertificateInfo]:
    """Every certificate of the key ring, oldest first (in a worker: parses every file)."""
    return [CertificateInfo.of(entry.certificate, entry) for entry in KeyRing(root).entries()]


def import_job(root: Path, data: bytes) -> list[CertificateInfo]:
    """Import PEM, DER or PKCS#7 certificates into the key ring (in a worker); return them."""
    keyring = KeyRing(root)
    return [CertificateInfo.of(c, keyring.entry(fingerprint(c))) for c in keyring.import_certificates(data)]


def remove_job(root: Path, fingerprint_hex: str) -> CertificateInfo | None:
    """Remove a certificate from the key ring by fingerprint; return what was removed (in a worker)."""
    keyring = KeyRing(root)
    entry = keyring.entry(fingerprint_hex)
    if entry is None or not keyring.remove(fingerprint_hex):
        return None
    return CertificateInfo.of(entry.certificate, entry)


AUDIT_SCAN_LIMIT = 200_000  # lines read per search, newest first
_AUDIT_TEXT_FIELDS = ("operation", "user", "target", "actor", "via", "message_id", "peer", "protocol")


def audit_job(
    path: Path, query: str, event: str, operation: str, offset: int, limit: int, scan_limit: int = AUDIT_SCAN_LIMIT
) -> AuditPage:
    """Audit records matching the filters, newest first (in a worker: reads the file backwards).

    ``query`` matches any text field case-insensitively; ``event`` and ``operation``
    match exactly (empty: any). At most ``scan_limit`` lines are read per search.
    """
    wanted = query.strip().casefold()
    found: list[AuditRecord] = []
    matched = scanned = 0
    more = truncated = False
    for raw in _reverse_lines(path):
        if scanned >= scan_limit:
            truncated = True
            break
        scanned += 1
        try:
            fields = json.loads(raw)
            if not isinstance(fields, dict):
                raise ValueError(raw[:20])
        except ValueError:
            fields = {"event": "(unreadable)", "target": "a damaged line: `gatekeeper audit verify` says more"}
        if event and fields.get("event") != event:
            continue
        if operation and fields.get("operation") != operation:
            continue
        if wanted and not any(wanted in str(fields.get(name, "")).casefold() for name in _AUDIT_TEXT_FIELDS):
            continue
        matched += 1
        if matched <= offset:
            continue
        if len(found) == limit:
            more = True
            break
        found.append(AuditRecord(fields))
    return AuditPage(tuple(found), offset, more, scanned, truncated)


def _reverse_lines(path: Path, block: int = 1 << 16) -> Iterator[bytes]:
    """The file's complete lines, last first (a last line still being written is left out)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        position = handle.seek(0, os.SEEK_END)
        rest = b""
        skip_last = True  # what follows the file's last newline is empty or incomplete
        while position > 0:
            step = min(block, position)
            position -= step
            handle.seek(position)
            parts = (handle.read(step) + rest).split(b"\n")
            rest = parts.pop(0)  # may continue in the block before
            if skip_last and parts:
                parts.pop()
                skip_last = False
            for line in reversed(parts):
                if line:
                    yield line
        if rest and not skip_last:
            yield rest


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
      users_page(query, offset, limit)
                                    one page of the users whose address contains query (Deferred)
      user(address)                 one user (Deferred)
      add_user(address, password)   create a user with a new key pair and certificate (Deferred)
      rotate(address, password=None)
                                    a new key pair; without the password it is completed at
                                    the user's next login (Deferred)
      delete_user(address)          revoke every certificate, delete the keys, close the
                                    user's sessions (Deferred)
      reset_password(address, new_password, old_password=None)
                                    with the old password: every key re-encrypted; without it:
                                    a new key pair, the old keys deleted and revoked (Deferred)
      export_pkcs12(address, password, export_password, legacy=False)
                                    the current key as PKCS#12 bytes (Deferred)
      certificate(address)          (address, the current certificate in PEM) (Deferred)

    Certificates of others:
      lookup(address, cached=False) ask the key sources now and show the trace (Deferred)
      flush(address=None)           forget cached lookups and unlocked keys (one user or all)
      certificates()                the key ring: imported and harvested certificates (Deferred)
      import_certificates(data)     import PEM, DER or PKCS#7 bytes into the key ring (Deferred)
      remove_certificate(fingerprint)
                                    remove one by SHA-256 fingerprint; None if absent (Deferred)

    Sessions and health:
      sessions()                    who is logged in where, since when
      kick(session)                 disconnect a session (its number, or a SessionInfo)
      check()                       upstream, directories, DNS, CRLs: reachable, TLS,
                                    login, round trip (Deferred; its repr is the table)
      stats()                       sessions per protocol, caches, worker queue

    Audit:
      audit_log(query, event, operation, offset, limit)
                                    the audit log, newest first, filtered (Deferred)

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

    def users_page(self, query: str = "", offset: int = 0, limit: int = 50) -> Deferred[UserPage]:
        """The users whose address contains ``query`` (any case), sorted, ``limit`` from ``offset`` on."""
        limit = max(1, min(int(limit), 1000))
        return Deferred.fromCoroutine(
            self._parts.message_workers.run(users_page_job, self._parts.config, query, max(0, int(offset)), limit)
        )

    def user(self, address: str) -> Deferred[UserInfo]:
        """One user, summarised (:class:`~gatekeeper.errors.UnknownUser` if there is none)."""
        return Deferred.fromCoroutine(self._parts.message_workers.run(user_job, self._parts.config, address))

    def reset_password(
        self, address: str, new_password: str, old_password: str | None = None
    ) -> Deferred[PasswordReset]:
        """Give ``address`` a new password.

        With ``old_password`` every key is re-encrypted under the new one (audited
        ``passwd``). Without it the keys cannot be re-encrypted: a new key pair is
        issued under the new password, the old keys are deleted and their certificates
        revoked, so mail encrypted to them can no longer be read (audited ``reset_password``).
        """
        return Deferred.fromCoroutine(self._reset_password(address, new_password, old_password))

    async def _reset_password(self, address: str, new_password: str, old_password: str | None) -> PasswordReset:
        normalized = normalize_address(address)
        reset: PasswordReset = await self._parts.message_workers.run(
            reset_password_job, self._parts.config, normalized, new_password, old_password
        )
        self._changed(reset.user.address)
        self._audit("reset_password" if reset.reissued else "passwd", reset.user.address)
        return reset

    def export_pkcs12(self, address: str, password: str, export_password: str, legacy: bool = False) -> Deferred[bytes]:
        """The current key, certificate and chain of ``address`` as PKCS#12 protected by ``export_password``.

        ``password`` (the user's) must decrypt the key. Audited (``export``).
        """
        return Deferred.fromCoroutine(self._export(address, password, export_password, legacy))

    async def _export(self, address: str, password: str, export_password: str, legacy: bool) -> bytes:
        normalized = normalize_address(address)
        data: bytes = await self._parts.message_workers.run(
            export_job, self._parts.config, normalized, password, export_password, legacy
        )
        self._audit("export", normalized)
        return data

    def certificate(self, address: str) -> Deferred[tuple[str, bytes]]:
        """The user's address as stored and current certificate in PEM (public: not audited)."""
        return Deferred.fromCoroutine(self._parts.message_workers.run(certificate_job, self._parts.config, address))

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

    def certificates(self) -> Deferred[list[CertificateInfo]]:
        """Every certificate of the key ring (imported or harvested), oldest first."""
        return Deferred.fromCoroutine(self._parts.message_workers.run(keyring_job, self._parts.keyring.root))

    def import_certificates(self, data: bytes) -> Deferred[list[CertificateInfo]]:
        """Import PEM, DER or PKCS#7 certs-only ``data`` into the key ring; each one is audited.

        Raises :class:`~gatekeeper.keys.keyring.CertificateFormatError` (saying what was
        expected) when nothing in ``data`` is a certificate. Cached lookups of the
        addresses they name are forgotten.
        """
        return Deferred.fromCoroutine(self._import(data))

    async def _import(self, data: bytes) -> list[CertificateInfo]:
        imported: list[CertificateInfo] = await self._parts.message_workers.run(
            import_job, self._parts.keyring.root, bytes(data)
        )
        for info in imported:
            for address in info.addresses:
                self._parts.key_manager.flush(address)
            self._audit("import_cert", info.fingerprint)
        return imported

    def remove_certificate(self, fingerprint_hex: str) -> Deferred[CertificateInfo | None]:
        """Remove the key ring's certificate with this SHA-256 fingerprint (audited); None if absent."""
        return Deferred.fromCoroutine(self._remove_certificate(fingerprint_hex))

    async def _remove_certificate(self, fingerprint_hex: str) -> CertificateInfo | None:
        wanted = normalize_fingerprint(fingerprint_hex)
        removed: CertificateInfo | None = await self._parts.message_workers.run(
            remove_job, self._parts.keyring.root, wanted
        )
        if removed is not None:
            for address in removed.addresses:
                self._parts.key_manager.flush(address)
            self._audit("remove_cert", removed.fingerprint)
        return removed

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

    def audit_log(
        self, query: str = "", event: str = "", operation: str = "", offset: int = 0, limit: int = 100
    ) -> Deferred[AuditPage]:
        """The audit log, newest first: records whose text fields contain ``query``, of ``event``/``operation``."""
        path = audit_log_path(self._parts.config)
        limit = max(1, min(int(limit), 1000))
        return Deferred.fromCoroutine(
            self._parts.message_workers.run(audit_job, path, query, event, operation, max(0, int(offset)), limit)
        )

    def _audit(self, operation: str, target: str) -> None:
        admin_event(operation, target, actor=self.actor, via=self.via)

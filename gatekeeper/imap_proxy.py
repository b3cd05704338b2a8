"""The IMAP proxy's core: one client session's view of the user's mail store, revealed.

A :class:`ProxySession` sits between the IMAP adapter (:mod:`gatekeeper.imap`, which
speaks to the client through Twisted's ``IMAP4Server``) and one logged-in
:class:`~gatekeeper.interfaces.IMailStoreSession` (upstream, or a local store). It
never imports ``twisted.mail``: the adapter translates Twisted's parsed commands into
the plain values here (:class:`FetchItem`, sequence ranges, search keys as nested lists).

What it adds to plain proxying:

- **Sequence numbers** are the client's: every message set is turned into upstream
  UIDs through :class:`~gatekeeper.imap_state.SessionState`, and upstream's changes
  reach the client only when IMAP allows (:meth:`ProxySession.sync`).
- **Revealed messages.** A message whose top-level ``Content-Type`` is S/MIME
  (``application/pkcs7-mime``, ``multipart/signed``) or which carries an
  ``X-Gatekeeper-Security`` header is *revealed*: decrypted and verified in a worker
  process, with the report attached, and every FETCH item that depends on its content
  (RFC822.SIZE, ENVELOPE, BODYSTRUCTURE, ``BODY[...]`` sections and partials) describes
  the revealed bytes, consistently (:mod:`gatekeeper.imap_mime`). Other messages are
  passed through byte for byte: IMAP has no way to add a report to a message list
  without downloading every body.
- **Queries reach the store.** For plain messages the client's FETCH items are sent
  upstream as they are, and upstream's answers are streamed back unchanged (only the
  message number is the client's): a header listing never downloads a body. Which
  messages are revealed is learned from two header fields per message, once
  (:class:`UserMailCache` remembers it per UID), and the sizes, envelopes and structures
  of revealed messages are remembered too, so a second listing costs no decryption.
- **SEARCH** goes upstream, except TEXT and BODY criteria on revealed messages, which
  are answered from the revealed bytes (every revealed message of the mailbox is then
  revealed once: that is the documented cost of searching encrypted mail).
- **APPEND** to the folders named in ``[imap] encrypt_folders`` encrypts the message to
  the user's own certificate first (encryption at rest on the mail server).

Nothing here deletes upstream mail the client did not delete: STORE, COPY, MOVE and
EXPUNGE go upstream with the UIDs the client named, and MOVE is only offered when
upstream can move (MOVE) or expunge by UID (UIDPLUS).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from gatekeeper import imap_mime
from gatekeeper import imap_syntax as syntax
from gatekeeper.errors import UpstreamUnavailable
from gatekeeper.imap_mime import MessageView
from gatekeeper.imap_state import Phase, SessionState, UidValidityChanged, Updates
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

log = Logger()

CLASSIFY_ITEMS = b"(UID BODY.PEEK[HEADER.FIELDS (CONTENT-TYPE X-GATEKEEPER-SECURITY)])"
LISTING_CHUNK = 50_000  # messages per upstream FETCH when no body is asked for (answers stream: no buffering)
BODY_CHUNK = 25  # messages per upstream FETCH when bodies are (bounds memory)
IDLE_RESTART_SECONDS = 25 * 60  # RFC 2177: re-issue IDLE before 29 minutes
_CONTENT_TYPE = re.compile(rb"(?im)^content-type:\s*([a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+)")
_SECURITY_HEADER = re.compile(rb"(?im)^x-gatekeeper-security:")
_REVEALED_TYPES = frozenset(
    {b"application/pkcs7-mime", b"application/x-pkcs7-mime", b"multipart/signed", b"application/pkcs7-signature"}
)
_FLAG = re.compile(r"^\\?[!#$&'+-Z^-z|}~]+$")
_DATE = re.compile(rb"^\d{1,2}-[A-Za-z]{3}-\d{4}$")


class CommandError(Exception):
    """A client command that cannot be done as given (answered ``NO``; ``bad`` for ``BAD``)."""

    def __init__(self, message: str, *, bad: bool = False, code: str | None = None) -> None:
        super().__init__(message)
        self.bad = bad
        self.code = code


# -- what the client asked for --------------------------------------------------------------


@attrs.frozen
class Section:
    """A ``BODY[...]`` section: part numbers (1-based), the specifier, and header field names."""

    numbers: tuple[int, ...] = ()
    specifier: str = ""
    fields: tuple[bytes, ...] = ()

    def wire(self) -> bytes:
        """The section as IMAP syntax, without brackets."""
        text = b".".join(b"%d" % n for n in self.numbers)
        if self.specifier:
            text += (b"." if text else b"") + self.specifier.encode("ascii")
        if self.fields:
            text += b" (" + b" ".join(syntax.astring(f) for f in self.fields) + b")"
        return text


CONTENT_KINDS = frozenset(
    {"ENVELOPE", "RFC822.SIZE", "BODYSTRUCTURE", "BODY", "SECTION", "RFC822", "RFC822.HEADER", "RFC822.TEXT"}
)
BYTES_KINDS = frozenset({"SECTION", "RFC822", "RFC822.HEADER", "RFC822.TEXT"})
SEEN_KINDS = frozenset({"RFC822", "RFC822.TEXT"})


@attrs.frozen
class FetchItem:
    """One FETCH data item the client asked for.

    ``kind`` is ``UID``, ``FLAGS``, ``INTERNALDATE``, ``ENVELOPE``, ``RFC822.SIZE``,
    ``BODYSTRUCTURE``, ``BODY`` (the structure without extensions), ``SECTION``
    (``BODY[...]``, with ``section``, ``partial`` and ``peek``), ``RFC822``,
    ``RFC822.HEADER`` or ``RFC822.TEXT``.
    """

    kind: str
    section: Section | None = None
    partial: tuple[int, int] | None = None
    peek: bool = False

    @property
    def content(self) -> bool:
        """Whether the item depends on the message's content (differs for revealed messages)."""
        return self.kind in CONTENT_KINDS

    @property
    def needs_bytes(self) -> bool:
        """Whether answering it for a revealed message needs the revealed bytes."""
        if self.kind == "SECTION":
            section = self.section or Section()
            # a header listing of a revealed message is answered from the remembered header
            return not (not section.numbers and section.specifier in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"))
        return self.kind in ("RFC822", "RFC822.TEXT")

    @property
    def sets_seen(self) -> bool:
        """Whether fetching it sets \\Seen (RFC 3501 6.4.5)."""
        return (self.kind == "SECTION" and not self.peek) or self.kind in SEEN_KINDS

    def wire(self) -> bytes:
        """The item as sent upstream."""
        if self.kind == "SECTION":
            section = self.section or Section()
            text = (b"BODY.PEEK[" if self.peek else b"BODY[") + section.wire() + b"]"
            if self.partial is not None:
                text += b"<%d.%d>" % self.partial
            return text
        return self.kind.encode("ascii")

    def response_name(self) -> bytes:
        """The item's name in a FETCH response."""
        if self.kind == "SECTION":
            section = self.section or Section()
            text = b"BODY[" + section.wire() + b"]"
            if self.partial is not None:
                text += b"<%d>" % self.partial[0]
            return text
        return self.kind.encode("ascii")


class FetchWriter(Protocol):
    """Where FETCH answers go: ``write(seq, data)`` with ``data`` the parenthesised item list."""

    def write(self, seq: int, data: bytes) -> None:
        """Send ``* seq FETCH data``."""

    def flush(self) -> None:
        """Send what was written so far."""


# -- revealed messages and the per-user cache -----------------------------------------------


@attrs.frozen
class RevealedMessage:
    """A message as the user sees it, and what reveal said about it (for the events)."""

    message: bytes = attrs.field(repr=False)
    view: MessageView = attrs.field(repr=False)
    decrypted: str = "no"
    signature: str = "none"
    key_id: str | None = None


RevealFunction = Callable[[bytes], Awaitable[RevealedMessage]]
EncryptFunction = Callable[[bytes], Awaitable[bytes]]

_PLAIN = False
_TO_REVEAL = True
Kind = bool | MessageView  # False: plain; True: revealed, not yet described; a view once it is


class UserMailCache:
    """What Gatekeeper remembers about one user's mail, shared by the user's sessions.

    - per mailbox (name and UIDVALIDITY) and UID: plain or revealed, and for revealed
      messages their :class:`MessageView` (size, envelope, structure, offsets: small);
    - a least-recently-used cache of revealed messages' bytes, at most ``limit`` bytes.

    Nothing here is ever written to disk. UIDs never change meaning within one
    UIDVALIDITY, so nothing here goes stale.
    """

    def __init__(self, limit: int, *, max_entries: int = 500_000) -> None:
        self.limit = limit
        self.max_entries = max_entries
        self._kinds: collections.OrderedDict[tuple[str, int], dict[int, Kind]] = collections.OrderedDict()
        self._entries = 0
        self._bytes: collections.OrderedDict[tuple[str, int, int], bytes] = collections.OrderedDict()
        self._size = 0
        self.in_flight: dict[tuple[str, int, int], Deferred[RevealedMessage]] = {}
        self.hits = 0
        self.misses = 0

    def kinds(self, mailbox: str, uidvalidity: int) -> dict[int, Kind]:
        """The per-UID kinds of one mailbox (created empty)."""
        key = (mailbox, uidvalidity)
        found = self._kinds.get(key)
        if found is None:
            found = self._kinds[key] = {}
        else:
            self._kinds.move_to_end(key)
        return found

    def note_added(self, count: int) -> None:
        """Account for ``count`` new kind entries; forget whole mailboxes past the limit."""
        self._entries += count
        while self._entries > self.max_entries and len(self._kinds) > 1:
            _, dropped = self._kinds.popitem(last=False)
            self._entries -= len(dropped)

    def get_bytes(self, key: tuple[str, int, int]) -> bytes | None:
        """Revealed bytes of a message, if still cached."""
        data = self._bytes.get(key)
        if data is None:
            self.misses += 1
            return None
        self.hits += 1
        self._bytes.move_to_end(key)
        return data

    def put_bytes(self, key: tuple[str, int, int], data: bytes) -> None:
        """Remember revealed bytes; the least recently used go beyond ``limit``."""
        if len(data) > self.limit:
            return
        old = self._bytes.pop(key, None)
        if old is not None:
            self._size -= len(old)
        self._bytes[key] = data
        self._size += len(data)
        while self._size > self.limit and self._bytes:
            _, dropped = self._bytes.popitem(last=False)
            self._size -= len(dropped)

    @property
    def cached_bytes(self) -> int:
        """Bytes of revealed messages held now."""
        return self._size

    def clear(self) -> None:
        """Forget everything (the user's keys were dropped)."""
        self._kinds.clear()
        self._bytes.clear()
        self._entries = self._size = 0


class MailCaches:
    """One :class:`UserMailCache` per user, kept ``linger`` seconds after the user's last session."""

    def __init__(self, clock: IReactorTime, limit: int, linger: float) -> None:
        self._clock = clock
        self._limit = limit
        self._linger = linger
        self._caches: dict[str, tuple[UserMailCache, int]] = {}
        self._expiry: dict[str, IDelayedCall] = {}

    def acquire(self, user: str) -> UserMailCache:
        """The cache of ``user``, for one more session."""
        key = user.casefold()
        timer = self._expiry.pop(key, None)
        if timer is not None and timer.active():
            timer.cancel()
        cache, users = self._caches.get(key, (None, 0))
        if cache is None:
            cache = UserMailCache(self._limit)
        self._caches[key] = (cache, users + 1)
        return cache

    def release(self, user: str) -> None:
        """One session of ``user`` ended; the cache goes ``linger`` seconds after the last."""
        key = user.casefold()
        entry = self._caches.get(key)
        if entry is None:
            return
        cache, users = entry
        if users > 1:
            self._caches[key] = (cache, users - 1)
            return
        self._caches[key] = (cache, 0)
        if self._linger <= 0:
            self._drop(key)
        else:
            self._expiry[key] = self._clock.callLater(self._linger, self._drop, key)

    def _drop(self, key: str) -> None:
        self._expiry.pop(key, None)
        entry = self._caches.get(key)
        if entry is not None and entry[1] == 0:
            del self._caches[key]
            entry[0].clear()

    def drop_all(self) -> None:
        """Forget every user's cache (shutdown)."""
        for timer in self._expiry.values():
            if timer.active():
                timer.cancel()
        self._expiry.clear()
        for cache, _ in self._caches.values():
            cache.clear()
        self._caches.clear()

    def __len__(self) -> int:
        return len(self._caches)


def classify_header(header: bytes | None) -> bool:
    """True when a message with these header fields is to be revealed (S/MIME, or a report header)."""
    if not header:
        return False
    if _SECURITY_HEADER.search(header):
        return True
    match = _CONTENT_TYPE.search(header)
    return match is not None and match.group(1).lower() in _REVEALED_TYPES


# -- the session ----------------------------------------------------------------------------


@implementer(IMailStoreEvents)
class ProxySession:
    """One client session's proxy: state machine, upstream store, revealing and caching."""

    def __init__(
        self,
        store: IMailStoreSession,
        cache: UserMailCache,
        reveal: RevealFunction,
        clock: IReactorTime,
        *,
        user: str,
        encrypt: EncryptFunction | None = None,
        encrypt_folders: Iterable[str] = (),
        idle_poll_seconds: float = 30.0,
    ) -> None:
        self.store = store
        self.cache = cache
        self.reveal = reveal
        self.clock = clock
        self.user = user
        self.encrypt = encrypt
        self.encrypt_folders = frozenset(f.casefold() for f in encrypt_folders)
        self.idle_poll_seconds = idle_poll_seconds
        self.state = SessionState()
        self.on_push: Callable[[Updates], None] | None = None
        self.on_lost: Callable[[str], None] | None = None
        self.closed = False
        self._idle_lock = DeferredLock()
        self._upstream_idling = False
        self._idle_timer: IDelayedCall | None = None
        self._push_scheduled: IDelayedCall | None = None
        self._broken: str | None = None
        store.set_listener(self)

    # -- capabilities ---------------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[str]:
        """What the client may be offered beyond IMAP4rev1 (depends on what upstream can do)."""
        upstream = self.store.capabilities
        offered = {"IDLE", "NAMESPACE", "UNSELECT"}
        if "UIDPLUS" in upstream:
            offered.add("UIDPLUS")
        if "MOVE" in upstream or "UIDPLUS" in upstream:
            offered.add("MOVE")
        return frozenset(offered)

    # -- events from the store (IMailStoreEvents) ------------------------------------------

    def exists(self, count: int) -> None:
        """Upstream's EXISTS."""
        self.state.upstream_exists(count)
        self._changed()

    def recent(self, count: int) -> None:
        """Upstream's RECENT."""
        self.state.upstream_recent(count)

    def expunged(self, seq: int) -> None:
        """Upstream's EXPUNGE."""
        self.state.upstream_expunge(seq)
        self._changed()

    def fetched(self, response: FetchResponse) -> None:
        """An unsolicited FETCH: remember new flags for the client."""
        flags = None
        if b"FLAGS" in response.data:
            try:
                for name, value in syntax.fetch_items(response.data):
                    if name == b"FLAGS":
                        flags = syntax.flags_of(value)
            except syntax.ImapSyntaxError:
                self.state.anomalies += 1
                return
        self.state.upstream_fetch(response.seq, response.uid, flags)
        if flags is not None:
            self._changed()

    def uidvalidity(self, value: int) -> None:
        """UIDVALIDITY changed under the selected mailbox: the session cannot go on."""
        try:
            self.state.upstream_uidvalidity(value)
        except UidValidityChanged:
            self._broken = "the mailbox was recreated on the server"
            if self.on_lost is not None:
                self.on_lost(self._broken)

    def session_lost(self, reason: str) -> None:
        """The upstream session is gone."""
        self.state.lost()
        self._cancel_idle_timers()
        if not self.closed and self.on_lost is not None:
            self.on_lost(reason)

    def _changed(self) -> None:
        if self.on_push is not None and self._push_scheduled is None:
            self._push_scheduled = self.clock.callLater(0, self._push)

    # -- helpers ---------------------------------------------------------------------------

    def _check(self) -> None:
        if self._broken is not None:
            raise UpstreamUnavailable(self._broken)
        if self.state.phase is Phase.LOST:
            raise UpstreamUnavailable("the upstream IMAP session is closed")

    def _uids(self, ranges: Sequence[tuple[int | None, int | None]], uid: bool) -> list[int]:
        if uid:
            return self.state.uids_for_uid_set(ranges)
        return self.state.uids_for_sequence_set(ranges)

    def _mailbox_key(self) -> tuple[str, int]:
        return (self.state.mailbox or "", self.state.uidvalidity)

    async def sync(self, *, allow_expunge: bool = True) -> Updates:
        """Learn the UIDs of new messages, then return what the client must be told now."""
        if self.state.unknown_uids and self.state.is_selected and self.state.phase is not Phase.LOST:
            await self._learn_uids()
        return self.state.flush(allow_expunge=allow_expunge)

    async def _learn_uids(self) -> None:
        found: list[int] = []
        top = self.state.highest_known_uid

        def sink(response: FetchResponse) -> None:
            if response.uid is not None:
                found.append(response.uid)

        await self.store.fetch(b"%d:*" % (top + 1), b"(UID)", sink)
        self.state.learn_uids(found)

    # -- mailboxes ---------------------------------------------------------------------------

    async def list_mailboxes(self, reference: str, pattern: str, *, subscribed: bool = False) -> list[MailboxEntry]:
        """LIST / LSUB."""
        self._check()
        result: list[MailboxEntry] = await self.store.list_mailboxes(reference, pattern, subscribed)
        return result

    async def status(self, mailbox: str, items: Sequence[str]) -> dict[str, int]:
        """STATUS (the counts are upstream's; sizes are not offered)."""
        self._check()
        wanted = [i.upper() for i in items]
        unknown = [i for i in wanted if i not in ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN")]
        if unknown:
            raise CommandError(f"unknown STATUS item {unknown[0]}", bad=True)
        result: dict[str, int] = await self.store.status(mailbox, wanted)
        return result

    async def mailbox_command(self, command: str, *names: str) -> None:
        """CREATE, DELETE, RENAME, SUBSCRIBE or UNSUBSCRIBE."""
        self._check()
        method = getattr(self.store, command)
        await method(*names)

    async def select(self, mailbox: str, *, readonly: bool) -> SelectInfo:
        """SELECT or EXAMINE: the previous mailbox is left, the new one's state begins."""
        self._check()
        await self._leave_idle()
        self.state.begin_select(mailbox)
        try:
            info: SelectInfo = await self.store.select(mailbox, readonly)
        except BaseException:
            if self.state.phase is Phase.SELECTING:
                self.state.select_failed()
            raise
        self.state.selected(info)
        return info

    async def close(self, *, expunge: bool) -> None:
        """CLOSE (``expunge``) or UNSELECT: leave the mailbox; CLOSE also removes \\Deleted messages."""
        self._check()
        if expunge and not self.state.readonly:
            await self.store.close()
        else:
            await self.store.unselect()
        self.state.closed()

    # -- FETCH -------------------------------------------------------------------------------

    async def fetch(
        self,
        ranges: Sequence[tuple[int | None, int | None]],
        items: Sequence[FetchItem],
        writer: FetchWriter,
        *,
        uid: bool = False,
    ) -> None:
        """Answer FETCH: plain messages from upstream's own answers, revealed ones from their views."""
        self._check()
        uids = self._uids(ranges, uid)
        if not uids:
            return
        want_uid = uid or any(item.kind == "UID" for item in items)
        content = any(item.content for item in items)
        bodies = any(item.kind in BYTES_KINDS for item in items)
        size = BODY_CHUNK if bodies else LISTING_CHUNK
        kinds = self.cache.kinds(*self._mailbox_key())
        listing = not any(item.needs_bytes for item in items)
        for chunk in syntax.chunks(uids, size):
            if content:
                await self._classify(chunk, kinds)
            if listing:
                # one upstream FETCH for all: revealed messages' content items come from their views
                await self._stream_listing(chunk, items, kinds, writer, want_uid, content=content)
                continue
            plain = [u for u in chunk if kinds.get(u) is _PLAIN]
            revealed = [u for u in chunk if kinds.get(u) is not _PLAIN and u in kinds]
            answers = await self._revealed_answers(revealed, items, kinds, want_uid) if revealed else []
            await self._stream_plain(plain, items, answers, writer, want_uid)
        writer.flush()

    async def _stream_listing(
        self,
        uids: Sequence[int],
        items: Sequence[FetchItem],
        kinds: dict[int, Kind],
        writer: FetchWriter,
        want_uid: bool,
        *,
        content: bool,
    ) -> None:
        """A FETCH that needs no revealed bytes: upstream's answers, revealed items replaced from the views."""
        if content:
            revealed = [u for u in uids if kinds.get(u) is not _PLAIN and u in kinds]
            if revealed:
                await self._reveal_many(revealed, kinds, need_bytes=False)
        wanted = set(uids)
        query = b"(UID " + b" ".join(i.wire() for i in items if i.kind != "UID") + b")"
        seq_of = self.state.seq_of
        has_uid_item = any(item.kind == "UID" for item in items)
        meta_names = frozenset(i.kind.encode() for i in items if i.kind in ("FLAGS", "INTERNALDATE"))

        def sink(response: FetchResponse) -> None:
            uid = response.uid
            if uid is None or uid not in wanted:
                self.fetched(response)  # an unsolicited flag change during the FETCH
                return
            seq = seq_of(uid)
            if seq is None:
                return
            view = kinds.get(uid, _PLAIN) if content else _PLAIN
            if isinstance(view, MessageView):
                meta = syntax.fetch_items_named(response.data, meta_names)
                parts = [item.response_name() + b" " + (_revealed_item(item, uid, view, None, meta) or b"NIL")
                         for item in items]  # fmt: skip
                if want_uid and not has_uid_item:
                    parts.append(b"UID %d" % uid)
                writer.write(seq, b"(" + b" ".join(parts) + b")")
                return
            data = response.data
            if not want_uid:
                data = _strip_uid(data)
            writer.write(seq, data)

        sink.flush = writer.flush  # type: ignore[attr-defined]
        await self.store.fetch(syntax.sequence_set(uids), query, sink)

    async def _classify(self, uids: Sequence[int], kinds: dict[int, Kind]) -> None:
        """Learn which of ``uids`` are to be revealed, from two header fields each."""
        unknown = [u for u in uids if u not in kinds]
        if not unknown:
            return
        learned = 0

        def sink(response: FetchResponse) -> None:
            nonlocal learned
            if response.uid is None or response.uid in kinds:
                return
            header = None
            for name, value in syntax.fetch_items(response.data):
                if name.startswith(b"BODY["):
                    header = syntax.unliteral(value)
            kinds[response.uid] = _TO_REVEAL if classify_header(header) else _PLAIN
            learned += 1

        await self.store.fetch(syntax.sequence_set(unknown), CLASSIFY_ITEMS, sink)
        self.cache.note_added(learned)

    async def _stream_plain(
        self,
        plain: Sequence[int],
        items: Sequence[FetchItem],
        answers: list[tuple[int, bytes]],
        writer: FetchWriter,
        want_uid: bool,
    ) -> None:
        """Pass upstream's answers for ``plain`` to the client, with ``answers`` (seq, data) in order."""
        pending = collections.deque(sorted(answers))
        if plain:
            wanted = set(plain)
            query = b"(UID " + b" ".join(i.wire() for i in items if i.kind != "UID") + b")"
            state = self.state

            def sink(response: FetchResponse) -> None:
                uid = response.uid
                if uid is None or uid not in wanted:
                    self.fetched(response)  # an unsolicited flag change during the FETCH
                    return
                seq = state.seq_of(uid)
                if seq is None:
                    return
                while pending and pending[0][0] < seq:
                    writer.write(*pending.popleft())
                data = response.data
                if not want_uid:
                    data = _strip_uid(data)
                writer.write(seq, data)

            sink.flush = writer.flush  # type: ignore[attr-defined]
            await self.store.fetch(syntax.sequence_set(plain), query, sink)
        while pending:
            writer.write(*pending.popleft())

    async def _revealed_answers(
        self, uids: list[int], items: Sequence[FetchItem], kinds: dict[int, Kind], want_uid: bool
    ) -> list[tuple[int, bytes]]:
        """Build the FETCH answers of revealed messages (revealing those not yet described)."""
        if any(item.sets_seen for item in items) and not self.state.readonly:
            # not silent: upstream's FETCH FLAGS answer becomes an update the client is sent
            await self.store.store(syntax.sequence_set(uids), b"+FLAGS", ["\\Seen"])
        meta_items = [i for i in items if i.kind in ("FLAGS", "INTERNALDATE")]
        meta: dict[int, dict[bytes, bytes]] = {}

        def sink(response: FetchResponse) -> None:
            if response.uid is not None and response.uid in kinds:
                meta[response.uid] = dict(syntax.fetch_items(response.data))

        query = b"(UID" + b"".join(b" " + i.wire() for i in meta_items) + b")"
        await self.store.fetch(syntax.sequence_set(uids), query, sink)
        present = [u for u in uids if u in meta]
        need_bytes = any(item.needs_bytes for item in items)
        messages = await self._reveal_many(present, kinds, need_bytes=need_bytes)
        answers = []
        for uid in present:
            seq = self.state.seq_of(uid)
            revealed = messages.get(uid)
            view = kinds.get(uid)
            if seq is None or not isinstance(view, MessageView):
                continue
            parts = []
            for item in items:
                value = _revealed_item(item, uid, view, revealed, meta[uid])
                if value is not None:
                    parts.append(item.response_name() + b" " + value)
            if want_uid and not any(item.kind == "UID" for item in items):
                parts.append(b"UID %d" % uid)
            answers.append((seq, b"(" + b" ".join(parts) + b")"))
        return answers

    async def _reveal_many(self, uids: list[int], kinds: dict[int, Kind], *, need_bytes: bool) -> dict[int, bytes]:
        """Reveal (or find in the cache) ``uids``; return the revealed bytes where ``need_bytes``."""
        mailbox, validity = self._mailbox_key()
        result: dict[int, bytes] = {}
        missing = []
        for uid in uids:
            kind = kinds.get(uid)
            if isinstance(kind, MessageView) and not need_bytes:
                continue
            data = self.cache.get_bytes((mailbox, validity, uid)) if isinstance(kind, MessageView) else None
            if data is not None:
                result[uid] = data
            else:
                missing.append(uid)
        for chunk in syntax.chunks(missing, BODY_CHUNK):
            revealed = await self._reveal_chunk(list(chunk), kinds)
            for uid, message in revealed.items():
                if need_bytes:
                    result[uid] = message
        return result

    async def _reveal_chunk(self, uids: list[int], kinds: dict[int, Kind]) -> dict[int, bytes]:
        mailbox, validity = self._mailbox_key()
        waits: dict[int, Deferred[RevealedMessage]] = {}
        download = []
        for uid in uids:
            running = self.cache.in_flight.get((mailbox, validity, uid))
            if running is not None:
                waits[uid] = _follow(running)
            else:
                download.append(uid)
        if download:
            raw: dict[int, bytes] = {}

            def sink(response: FetchResponse) -> None:
                if response.uid is None:
                    return
                for name, value in syntax.fetch_items(response.data):
                    if name == b"BODY[]":
                        body = syntax.unliteral(value)
                        if body is not None:
                            raw[response.uid] = body

            await self.store.fetch(syntax.sequence_set(download), b"(UID BODY.PEEK[])", sink)
            for uid in download:
                if uid not in raw:
                    continue  # gone upstream meanwhile
                key = (mailbox, validity, uid)
                running = Deferred.fromCoroutine(self._reveal_one(key, raw.pop(uid), kinds))
                self.cache.in_flight[key] = running
                running.addBoth(_forget_in_flight, self.cache.in_flight, key)
                waits[uid] = _follow(running)
        results = await gatherResults(list(waits.values()), consumeErrors=True) if waits else []
        return {uid: revealed.message for uid, revealed in zip(waits, results, strict=True)}

    async def _reveal_one(self, key: tuple[str, int, int], message: bytes, kinds: dict[int, Kind]) -> RevealedMessage:
        """Reveal one message (the reveal function emits the ``reveal`` and ``key_use`` events)."""
        revealed = await self.reveal(message)
        kinds[key[2]] = revealed.view
        self.cache.put_bytes(key, revealed.message)
        return revealed

    # -- SEARCH -------------------------------------------------------------------------------

    async def search(self, query: Sequence[Any], *, uid: bool, charset: str | None = None) -> list[int]:
        """SEARCH: upstream answers, except TEXT/BODY on revealed messages (answered here)."""
        self._check()
        program = SearchProgram.parse(query)
        literal_plus = "LITERAL+" in self.store.capabilities
        if program.has_text():
            everything = self.state.uids_for_sequence_set([(1, None)])
            kinds = self.cache.kinds(*self._mailbox_key())
            for chunk in syntax.chunks(everything, LISTING_CHUNK):
                await self._classify(chunk, kinds)
            revealed = [u for u in everything if kinds.get(u) not in (None, _PLAIN)]
        else:
            revealed = []
        criteria = program.wire(self.state, literal_plus=literal_plus)
        found: set[int] = set(await self.store.search(criteria, charset))
        if revealed:
            found.difference_update(revealed)
            matches = await self._text_matches(program, revealed, kinds)
            restricted = (
                b"UID "
                + syntax.sequence_set(revealed)
                + b" "
                + program.wire(self.state, literal_plus=literal_plus, text_matches=matches)
            )
            found.update(await self.store.search(restricted, charset))
        result = []
        for match in sorted(found):
            seq = self.state.seq_of(match)
            if seq is not None:
                result.append(match if uid else seq)
        return sorted(result)

    async def _text_matches(self, program: SearchProgram, uids: list[int], kinds: dict[int, Kind]) -> list[set[int]]:
        """For each TEXT/BODY key of ``program``, the revealed messages that match it."""
        messages = await self._reveal_many(uids, kinds, need_bytes=True)
        keys = program.text_keys()
        matches: list[set[int]] = [set() for _ in keys]
        for uid, data in messages.items():
            view = kinds.get(uid)
            if not isinstance(view, MessageView):
                continue
            header = data[: view.root.body_start].decode("utf-8", "replace").casefold()
            body = imap_mime.searchable_text(data, view.root).casefold()
            for index, (kind, needle) in enumerate(keys):
                text = needle.decode("utf-8", "replace").casefold()
                if text in body or (kind == "TEXT" and text in header):
                    matches[index].add(uid)
        return matches

    # -- changes -------------------------------------------------------------------------------

    async def store_flags(
        self, ranges: Sequence[tuple[int | None, int | None]], operation: bytes, flags: Sequence[str], *, uid: bool
    ) -> list[int]:
        """STORE; the new flags come back as updates (unless .SILENT). Returns the UIDs stored."""
        self._check()
        for flag in flags:
            if not _FLAG.match(flag):
                raise CommandError("invalid flag", bad=True)
        uids = self._uids(ranges, uid)
        if uids:
            await self.store.store(syntax.sequence_set(uids), operation, flags)
        return uids

    async def copy(
        self, ranges: Sequence[tuple[int | None, int | None]], mailbox: str, *, uid: bool
    ) -> CopiedUids | None:
        """COPY (revealed messages are copied as upstream stores them: still encrypted)."""
        self._check()
        uids = self._uids(ranges, uid)
        if not uids:
            return None
        result: CopiedUids | None = await self.store.copy(syntax.sequence_set(uids), mailbox)
        return result

    async def move(
        self, ranges: Sequence[tuple[int | None, int | None]], mailbox: str, *, uid: bool
    ) -> CopiedUids | None:
        """MOVE: upstream MOVE, or COPY + \\Deleted + UID EXPUNGE of exactly these messages."""
        self._check()
        uids = self._uids(ranges, uid)
        if not uids:
            return None
        selection = syntax.sequence_set(uids)
        if "MOVE" in self.store.capabilities:
            moved: CopiedUids | None = await self.store.move(selection, mailbox)
            return moved
        if "UIDPLUS" not in self.store.capabilities:
            raise CommandError("MOVE is not available with this mail server", code="CANNOT")
        copied: CopiedUids | None = await self.store.copy(selection, mailbox)
        await self.store.store(selection, b"+FLAGS.SILENT", ["\\Deleted"])
        await self.store.expunge(selection)
        return copied

    async def expunge(self, ranges: Sequence[tuple[int | None, int | None]] | None = None) -> None:
        """EXPUNGE, or UID EXPUNGE of the UIDs in ``ranges`` (only those: RFC 4315)."""
        self._check()
        if self.state.readonly:
            raise CommandError("the mailbox is read-only", code="READ-ONLY")
        if ranges is None:
            await self.store.expunge(None)
            return
        if "UIDPLUS" not in self.store.capabilities:
            raise CommandError("UID EXPUNGE is not available with this mail server", bad=True)
        uids = self.state.uids_for_uid_set(ranges)
        if uids:
            await self.store.expunge(syntax.sequence_set(uids))

    async def append(self, mailbox: str, message: bytes, flags: Sequence[str], date: bytes | None) -> Appended:
        """APPEND; to an encrypt folder, encrypted to the user first (unless already S/MIME)."""
        self._check()
        for flag in flags:
            if not _FLAG.match(flag):
                raise CommandError("invalid flag", bad=True)
        if self.encrypt is not None and mailbox.casefold() in self.encrypt_folders:
            header_end = message.find(b"\r\n\r\n")
            header = message[: header_end + 2] if header_end >= 0 else message
            match = _CONTENT_TYPE.search(header)
            if not (match and match.group(1).lower() in (b"application/pkcs7-mime", b"application/x-pkcs7-mime")):
                message = await self.encrypt(message)
        appended: Appended = await self.store.append(mailbox, message, flags, date)
        return appended

    async def noop(self) -> None:
        """NOOP / CHECK: let upstream report changes."""
        self._check()
        await self.store.noop()

    # -- IDLE ---------------------------------------------------------------------------------

    async def begin_idle(self, push: Callable[[Updates], None]) -> None:
        """The client started IDLE: report upstream changes through ``push`` as they happen."""
        self._check()
        self.state.begin_idle()
        self.on_push = push
        if self.state.is_selected:
            await self._enter_upstream_idle()
            self._changed()  # anything that arrived before

    async def _enter_upstream_idle(self) -> None:
        await self._idle_lock.acquire()
        try:
            if "IDLE" in self.store.capabilities:
                await self.store.idle()
                self._upstream_idling = True
                self._idle_timer = self.clock.callLater(IDLE_RESTART_SECONDS, self._restart_idle)
            else:
                self._idle_timer = self.clock.callLater(self.idle_poll_seconds, self._poll)
        finally:
            self._idle_lock.release()

    async def _leave_upstream_idle(self) -> None:
        await self._idle_lock.acquire()
        try:
            self._cancel_idle_timers()
            if self._upstream_idling:
                self._upstream_idling = False
                await self.store.stop_idle()
        finally:
            self._idle_lock.release()

    def _cancel_idle_timers(self) -> None:
        for timer in (self._idle_timer, self._push_scheduled):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle_timer = None
        self._push_scheduled = None

    def _restart_idle(self) -> None:
        self._idle_timer = None
        Deferred.fromCoroutine(self._cycle_idle()).addErrback(self._background_failed)

    async def _cycle_idle(self) -> None:
        await self._leave_upstream_idle()
        if self.on_push is not None:
            await self._enter_upstream_idle()

    def _poll(self) -> None:
        self._idle_timer = None
        Deferred.fromCoroutine(self._poll_once()).addErrback(self._background_failed)

    async def _poll_once(self) -> None:
        await self.store.noop()
        await self._push_now()
        if self.on_push is not None and self._idle_timer is None:
            self._idle_timer = self.clock.callLater(self.idle_poll_seconds, self._poll)

    def _push(self) -> None:
        self._push_scheduled = None
        Deferred.fromCoroutine(self._push_now()).addErrback(self._background_failed)

    async def _push_now(self) -> None:
        if self.on_push is None:
            return
        if self.state.unknown_uids:
            # learning UIDs needs a command: leave upstream IDLE for it, then go back
            idling = self._upstream_idling
            if idling:
                await self._leave_upstream_idle()
            await self._learn_uids()
            if idling and self.on_push is not None:
                await self._enter_upstream_idle()
        updates = self.state.flush(allow_expunge=True)
        if updates and self.on_push is not None:
            self.on_push(updates)

    def _background_failed(self, failure: Any) -> None:
        if not failure.check(UpstreamUnavailable, MailStoreError):
            log.failure("IMAP proxy background update failed", failure)

    async def end_idle(self) -> None:
        """The client said DONE."""
        self.on_push = None
        await self._leave_upstream_idle()
        if self.state.phase is Phase.IDLING:
            self.state.end_idle()

    async def _leave_idle(self) -> None:
        if self.state.phase is Phase.IDLING:
            await self.end_idle()

    async def logout(self) -> None:
        """The client is gone: log out upstream (never fails)."""
        if self.closed:
            return
        self.closed = True
        self.on_push = None
        self._cancel_idle_timers()
        await self.store.logout()


def _follow(running: Deferred[RevealedMessage]) -> Deferred[RevealedMessage]:
    """A Deferred with ``running``'s result that does not take it away from others."""
    follower: Deferred[RevealedMessage] = Deferred()

    def relay(result: Any) -> Any:
        if isinstance(result, BaseException) or hasattr(result, "raiseException"):
            follower.errback(result)
        else:
            follower.callback(result)
        return result

    running.addBoth(relay)
    return follower


def _forget_in_flight(result: Any, table: dict[Any, Any], key: Any) -> Any:
    table.pop(key, None)
    return None if hasattr(result, "raiseException") else result


def _strip_uid(data: bytes) -> bytes:
    """A FETCH item list without the UID item Gatekeeper added (the client did not ask for it)."""
    if data.startswith(b"(UID "):
        end = data.find(b" ", 5)
        return b"(" + data[end + 1 :] if end > 0 else b"()"
    return _without_uid(data)


def _without_uid(data: bytes) -> bytes:
    """A FETCH item list without its UID item (the slow path: UID not first)."""
    items = [(n, v) for n, v in syntax.fetch_items(data) if n != b"UID"]
    return b"(" + b" ".join(n + b" " + v for n, v in items) + b")"


def _revealed_item(
    item: FetchItem, uid: int, view: MessageView, message: bytes | None, meta: dict[bytes, bytes]
) -> bytes | None:
    """The value of one FETCH item of a revealed message."""
    kind = item.kind
    if kind == "UID":
        return b"%d" % uid
    if kind in ("FLAGS", "INTERNALDATE"):
        return meta.get(kind.encode())
    if kind == "ENVELOPE":
        return view.envelope
    if kind == "RFC822.SIZE":
        return b"%d" % view.size
    if kind == "BODYSTRUCTURE":
        return view.bodystructure
    if kind == "BODY":
        return view.body
    if kind == "SECTION":
        section = item.section or Section()
        if message is None:
            # a top-level header section: answered from the header kept in the view
            data = imap_mime.header_section(view.header, section.specifier, section.fields)
        else:
            try:
                data = imap_mime.section(message, view, section.numbers, section.specifier, section.fields)
            except imap_mime.SectionError:
                data = b""
        if item.partial is not None:
            data = imap_mime.partial(data, item.partial[0], item.partial[1])
        return syntax.literal(data)
    assert message is not None
    if kind == "RFC822":
        return syntax.literal(message)
    if kind == "RFC822.HEADER":
        return syntax.literal(message[: view.root.body_start])
    if kind == "RFC822.TEXT":
        return syntax.literal(message[view.root.body_start :])
    return None


# -- SEARCH programs --------------------------------------------------------------------------

_NO_ARGS = frozenset(
    {"ALL", "ANSWERED", "DELETED", "DRAFT", "FLAGGED", "NEW", "OLD", "RECENT", "SEEN"}
    | {"UNANSWERED", "UNDELETED", "UNDRAFT", "UNFLAGGED", "UNSEEN"}
)
_STRING_ARG = frozenset(["BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"])
_DATE_ARG = frozenset(["BEFORE", "ON", "SENTBEFORE", "SENTON", "SENTSINCE", "SINCE"])
_NUMBER_ARG = frozenset({"LARGER", "SMALLER"})
_FLAG_ARG = frozenset({"KEYWORD", "UNKEYWORD"})

SearchNode = tuple[Any, ...]


class SearchProgram:
    """A client's SEARCH keys, checked, and written again for upstream.

    Nodes are tuples: ``("KEY",)``, ``("KEY", arg)``, ``("HEADER", field, text)``,
    ``("NOT", node)``, ``("OR", a, b)``, ``("AND", nodes...)``, ``("SEQ", ranges)`` and
    ``("UID", ranges)``; TEXT and BODY keys are numbered in the order they appear.
    """

    def __init__(self, root: SearchNode) -> None:
        self.root = root

    @classmethod
    def parse(cls, query: Sequence[Any]) -> SearchProgram:
        """Parse Twisted's nested-list form of the search keys."""
        tokens = list(query)
        nodes = []
        while tokens:
            nodes.append(cls._node(tokens))
        if not nodes:
            raise CommandError("empty search", bad=True)
        return cls(("AND", *nodes))

    @classmethod
    def _node(cls, tokens: list[Any]) -> SearchNode:
        token = tokens.pop(0)
        if isinstance(token, list):
            inner = list(token)
            nodes = []
            while inner:
                nodes.append(cls._node(inner))
            return ("AND", *nodes)
        if not isinstance(token, bytes):
            raise CommandError("bad search key", bad=True)
        word = token.decode("ascii", "replace").upper()

        def argument() -> bytes:
            if not tokens or not isinstance(tokens[0], bytes):
                raise CommandError(f"{word} needs an argument", bad=True)
            value: bytes = tokens.pop(0)
            return value

        if word[:1].isdigit() or word[:1] == "*":
            return ("SEQ", _ranges(token))
        if word in _NO_ARGS:
            return (word,)
        if word in _STRING_ARG:
            return (word, argument())
        if word in _DATE_ARG:
            value = argument()
            if not _DATE.match(value):
                raise CommandError(f"bad date for {word}", bad=True)
            return (word, value)
        if word in _NUMBER_ARG:
            value = argument()
            if not value.isdigit():
                raise CommandError(f"bad number for {word}", bad=True)
            return (word, value)
        if word in _FLAG_ARG:
            value = argument()
            if not _FLAG.match(value.decode("ascii", "replace")):
                raise CommandError(f"bad keyword for {word}", bad=True)
            return (word, value)
        if word == "HEADER":
            field = argument()
            return (word, field, argument())
        if word == "UID":
            return ("UID", _ranges(argument()))
        if word == "NOT":
            if not tokens:
                raise CommandError("NOT needs a key", bad=True)
            return ("NOT", cls._node(tokens))
        if word == "OR":
            if len(tokens) < 2:
                raise CommandError("OR needs two keys", bad=True)
            first = cls._node(tokens)
            if not tokens:
                raise CommandError("OR needs two keys", bad=True)
            return ("OR", first, cls._node(tokens))
        raise CommandError(f"unknown search key {word}", bad=True)

    def text_keys(self) -> list[tuple[str, bytes]]:
        """The TEXT and BODY keys, in order: (kind, needle)."""
        found: list[tuple[str, bytes]] = []

        def walk(node: SearchNode) -> None:
            if node[0] in ("TEXT", "BODY"):
                found.append((node[0], node[1]))
            elif node[0] in ("AND", "OR", "NOT"):
                for child in node[1:]:
                    walk(child)

        walk(self.root)
        return found

    def has_text(self) -> bool:
        """Whether the program has TEXT or BODY keys."""
        return bool(self.text_keys())

    def wire(
        self, state: SessionState, *, literal_plus: bool = False, text_matches: Sequence[set[int]] | None = None
    ) -> bytes:
        """The program as upstream search keys; with ``text_matches``, TEXT/BODY keys become UID sets."""
        counter = [0]

        def string(value: bytes) -> bytes:
            if value.isascii() and b"\r" not in value and b"\n" not in value:
                return syntax.quote(value)
            if literal_plus:
                return b"{%d+}\r\n" % len(value) + value
            raise CommandError("this search needs a literal the mail server cannot take", code="CANNOT")

        def uid_set(uids: Sequence[int]) -> bytes:
            return b"UID " + syntax.sequence_set(uids) if uids else b"NOT ALL"

        def write(node: SearchNode) -> bytes:
            word: str = node[0]
            if word == "AND":
                inner = b" ".join(write(child) for child in node[1:])
                return b"(" + inner + b")" if len(node) > 2 else inner
            if word == "NOT":
                return b"NOT " + write(node[1])
            if word == "OR":
                return b"OR " + write(node[1]) + b" " + write(node[2])
            if word == "SEQ":
                return uid_set(state.uids_for_sequence_set(node[1]))
            if word == "UID":
                return uid_set(state.uids_for_uid_set(node[1]))
            if word in ("TEXT", "BODY") and text_matches is not None:
                index = counter[0]
                counter[0] += 1
                return uid_set(sorted(text_matches[index]))
            if word in _STRING_ARG:
                return word.encode() + b" " + string(node[1])
            if word == "HEADER":
                return b"HEADER " + string(node[1]) + b" " + string(node[2])
            if len(node) == 2:
                return word.encode() + b" " + bytes(node[1])
            return word.encode()

        return write(self.root)


def _ranges(token: bytes) -> list[tuple[int | None, int | None]]:
    ranges: list[tuple[int | None, int | None]] = []
    for part in token.split(b","):
        low, colon, high = part.partition(b":")
        try:
            first = None if low == b"*" else int(low)
            last = first if not colon else (None if high == b"*" else int(high))
        except ValueError:
            raise CommandError("bad message set", bad=True) from None
        if (first is not None and first <= 0) or (last is not None and last <= 0):
            raise CommandError("bad message set", bad=True)
        ranges.append((first, last))
    return ranges


# -- worker jobs and stand-ins ---------------------------------------------------------------


def reveal_for_imap(wire: Any, message: bytes, trust: Any, options: Any) -> tuple[bytes, Any, MessageView]:
    """Worker job: :func:`gatekeeper.inbound.reveal_job`, then the IMAP view of the result.

    Both halves hold the GIL (MIME parsing), so both run in the worker.
    """
    from gatekeeper.inbound import reveal_job

    revealed, report = reveal_job(wire, message, trust, options)
    return revealed, report, imap_mime.describe(revealed)


def describe_job(message: bytes) -> MessageView:
    """Worker job: the IMAP view of a message shown as it is."""
    return imap_mime.describe(message)


def encrypt_to_self(certificates: Sequence[bytes], message: bytes) -> bytes:
    """Worker job: ``message`` encrypted to the user's own certificates (DER), for the encrypt folders."""
    from cryptography import x509

    from gatekeeper import smime

    recipients = [x509.load_der_x509_certificate(der) for der in certificates]
    return smime.encrypt(smime.canonicalize(message), recipients)


async def reveal_unavailable(message: bytes) -> RevealedMessage:
    """A reveal function for a store that has nothing to reveal: the message as it is."""
    return RevealedMessage(message, imap_mime.describe(message))


@implementer(IMailStoreSession)
class EmptyMailStore:
    """A mail store with no mailboxes (no store configured yet): LIST is empty, SELECT fails."""

    capabilities: frozenset[str] = frozenset({"IDLE", "UIDPLUS", "MOVE", "UNSELECT"})
    delimiter: str | None = "/"

    def set_listener(self, events: IMailStoreEvents) -> None:
        """Nothing ever happens here."""

    def _done(self, value: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        d.callback(value)
        return d

    def _no(self, what: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        d.errback(MailStoreError(f"there is no mail store to {what}", "NONEXISTENT"))
        return d

    def list_mailboxes(self, reference: str, pattern: str, subscribed: bool = False) -> Deferred[list[MailboxEntry]]:
        """No mailboxes."""
        return self._done([])

    def status(self, mailbox: str, items: Sequence[str]) -> Deferred[dict[str, int]]:
        """No such mailbox."""
        return self._no("ask")

    def select(self, mailbox: str, readonly: bool = False) -> Deferred[SelectInfo]:
        """No such mailbox."""
        return self._no("select from")

    def close(self) -> Deferred[Any]:
        """Nothing selected."""
        return self._done()

    unselect = close

    def create(self, mailbox: str) -> Deferred[Any]:
        """Refused."""
        return self._no("create mailboxes in")

    def delete(self, mailbox: str) -> Deferred[Any]:
        """Refused."""
        return self._no("delete from")

    def rename(self, old: str, new: str) -> Deferred[Any]:
        """Refused."""
        return self._no("rename in")

    def subscribe(self, mailbox: str) -> Deferred[Any]:
        """Refused."""
        return self._no("subscribe in")

    def unsubscribe(self, mailbox: str) -> Deferred[Any]:
        """Refused."""
        return self._no("unsubscribe in")

    def fetch(self, uids: bytes, items: bytes, sink: Callable[[FetchResponse], None]) -> Deferred[Any]:
        """Nothing to fetch."""
        return self._done()

    def search(self, criteria: bytes, charset: str | None = None) -> Deferred[list[int]]:
        """Nothing found."""
        return self._done([])

    def store(self, uids: bytes, operation: bytes, flags: Sequence[str]) -> Deferred[Any]:
        """Nothing to change."""
        return self._done()

    def copy(self, uids: bytes, mailbox: str) -> Deferred[CopiedUids | None]:
        """Nothing to copy."""
        return self._done(None)

    def move(self, uids: bytes, mailbox: str) -> Deferred[CopiedUids | None]:
        """Nothing to move."""
        return self._done(None)

    def expunge(self, uids: bytes | None = None) -> Deferred[Any]:
        """Nothing to expunge."""
        return self._done()

    def append(
        self, mailbox: str, message: bytes, flags: Sequence[str] = (), date: bytes | None = None
    ) -> Deferred[Appended]:
        """Refused: nowhere to keep it."""
        return self._no("append to")

    def noop(self) -> Deferred[Any]:
        """Nothing."""
        return self._done()

    idle = noop
    stop_idle = noop
    logout = noop


__all__ = [
    "CommandError",
    "EmptyMailStore",
    "FetchItem",
    "MailCaches",
    "ProxySession",
    "RevealedMessage",
    "SearchProgram",
    "Section",
    "UserMailCache",
    "classify_header",
]

"""The IMAP proxy's mail store over the embedded store: :class:`LocalImapSession`.

The IMAP proxy (:mod:`gatekeeper.imap_proxy`) talks to its store through
:class:`~gatekeeper.interfaces.IMailStoreSession`, in IMAP's own terms: UID sets and
FETCH items as IMAP syntax, FETCH answers as the bytes a server sends. Against Dovecot
those are Dovecot's; here this module answers as Dovecot does (item order, FLAGS
order, sections, ``n:*``), from the local store:

- **UIDs, UIDVALIDITY, flags, folders** are the store's (INBOX, Sent, Drafts, Trash
  and the user's own; ``/`` separates levels). UIDPLUS data comes from the store's
  :class:`~gatekeeper.localstore.types.Appended` and :class:`~gatekeeper.localstore.
  types.Copied`.
- **The session's message sequence** (what the proxy calls upstream's view) is kept
  here: an array of UIDs. Changes made by other sessions, and mail delivered by the
  SMTP side, reach it through the store's change feed: every committed change pushes a
  :class:`~gatekeeper.localstore.types.Notice`, and the session then asks
  :meth:`~gatekeeper.localstore.mailbox.Mailbox.changes` and reports ``EXPUNGE``,
  ``EXISTS``/``RECENT`` and ``FETCH (FLAGS)`` to the proxy's listener, at once (as an
  upstream IDLE would). The session's own changes are reported as a server reports
  them (``FETCH`` for a non-silent ``STORE``, ``EXPUNGE`` for ``EXPUNGE`` and
  ``MOVE``), never twice.
- **FETCH content** (ENVELOPE, BODYSTRUCTURE, ``BODY[...]``) is made by
  :mod:`gatekeeper.imap_mime`, which answers byte for byte as Dovecot does. Bytes are
  read in the store's thread pool (a header listing reads headers only); items that
  need the whole MIME structure are rendered in the worker processes when a ``render``
  runner is given (parsing holds the GIL).
- **SEARCH** is answered here over the stored bytes (headers as stored, bodies
  transfer-decoded); the proxy answers TEXT and BODY of revealed messages itself.

Commands run one at a time (a lock per session), in the order the proxy gives them.
"""

from __future__ import annotations

import collections
import datetime
import email.header
import email.utils
import itertools
import re
import weakref
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, BinaryIO, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from gatekeeper import imap_mime
from gatekeeper import imap_syntax as syntax
from gatekeeper.errors import GatekeeperError, UpstreamRefused, UpstreamUnavailable
from gatekeeper.interfaces import (
    Appended,
    CopiedUids,
    FetchResponse,
    IMailStoreEvents,
    IMailStoreSession,
    MailboxEntry,
    MailStoreError,
    SelectInfo,
    UpstreamLogin,
)
from gatekeeper.localstore.embedded import EmbeddedStore, translated
from gatekeeper.localstore.errors import (
    FolderNotAllowed,
    LocalStoreError,
    NoSuchFolder,
    NoSuchMessage,
    StoreUnavailable,
    UidValidityChanged,
)
from gatekeeper.localstore.facade import AsyncMailbox
from gatekeeper.localstore.mailbox import Mailbox
from gatekeeper.localstore.names import INBOX, SEPARATOR
from gatekeeper.localstore.types import (
    ANSWERED,
    DELETED,
    DRAFT,
    FLAGGED,
    HAS_CHILDREN,
    HAS_NO_CHILDREN,
    NOSELECT,
    SEEN,
    FolderInfo,
    MessageInfo,
    Notice,
)

log = Logger(namespace="gatekeeper.localstore")

T = TypeVar("T")
CAPABILITIES = frozenset({"IDLE", "UIDPLUS", "MOVE", "UNSELECT", "LITERAL+"})
META_CHUNK = 1000  # messages per metadata query
HEADER_CHUNK = 200  # messages per read of headers
FULL_CHUNK = 25  # messages per read of whole messages (bounds memory)
HEADER_READ = 16 * 1024
RECENT = "\\Recent"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {name.lower(): number for number, name in enumerate(_MONTHS, 1)}
_DATE_TIME = re.compile(rb'^"?\s?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)"?$')
_DATE = re.compile(rb"^(\d{1,2})-([A-Za-z]{3})-(\d{4})$")
_ITEM = re.compile(rb"BODY(?:\.PEEK)?\[[^\]]*\](?:<\d+\.\d+>)?|[A-Z0-9.]+", re.IGNORECASE)
_SECTION = re.compile(rb"^BODY(\.PEEK)?\[([\d.]*?)\.?((?:HEADER\.FIELDS(?:\.NOT)?|HEADER|TEXT|MIME)?)"
                      rb"(?: (\([^)]*\)))?\](?:<(\d+)\.(\d+)>)?$", re.IGNORECASE)  # fmt: skip
_MACROS = {
    b"ALL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE"),
    b"FAST": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"),
    b"FULL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY"),
}
_SYSTEM_ORDER = (ANSWERED, FLAGGED, DELETED, SEEN, DRAFT)  # Dovecot's order in FLAGS

# -- FETCH items ------------------------------------------------------------------------------

META, HEADER, FULL = 0, 1, 2  # what an item needs: metadata, the header, the whole message


@attrs.frozen
class FetchSpec:
    """One FETCH item as asked: what it is, what it needs, and its name in the answer.

    ``kind`` is ``UID``, ``FLAGS``, ``INTERNALDATE``, ``RFC822.SIZE``, ``ENVELOPE``,
    ``BODYSTRUCTURE``, ``BODY``, ``SECTION`` (``BODY[...]``), ``RFC822``,
    ``RFC822.HEADER`` or ``RFC822.TEXT``; ``level`` is :data:`META`, :data:`HEADER` or
    :data:`FULL`; ``structure`` says whether it needs the MIME structure parsed.
    """

    kind: str
    label: bytes
    level: int = META
    structure: bool = False
    sets_seen: bool = False
    numbers: tuple[int, ...] = ()
    specifier: str = ""
    fields: tuple[bytes, ...] = ()
    partial: tuple[int, int] | None = None


def parse_fetch_items(items: bytes) -> tuple[FetchSpec, ...]:
    """The items of a FETCH (``(UID FLAGS BODY.PEEK[HEADER])`` or one item); raises :class:`MailStoreError`."""
    text = items.strip()
    if text.startswith(b"(") and text.endswith(b")"):
        text = text[1:-1]
    specs: list[FetchSpec] = []
    for token in _ITEM.findall(text):
        upper = token.upper()
        for name in _MACROS.get(upper, (upper,)):
            specs.append(_spec(token if name == upper else name))
    if not specs:
        raise MailStoreError("FETCH needs at least one item")
    return tuple(specs)


_SIMPLE_ITEMS = {
    b"UID": FetchSpec("UID", b"UID"),
    b"FLAGS": FetchSpec("FLAGS", b"FLAGS"),
    b"INTERNALDATE": FetchSpec("INTERNALDATE", b"INTERNALDATE"),
    b"RFC822.SIZE": FetchSpec("RFC822.SIZE", b"RFC822.SIZE"),
    b"ENVELOPE": FetchSpec("ENVELOPE", b"ENVELOPE", HEADER),
    b"BODYSTRUCTURE": FetchSpec("BODYSTRUCTURE", b"BODYSTRUCTURE", FULL, structure=True),
    b"BODY": FetchSpec("BODY", b"BODY", FULL, structure=True),
    b"RFC822": FetchSpec("RFC822", b"RFC822", FULL, sets_seen=True),
    b"RFC822.HEADER": FetchSpec("RFC822.HEADER", b"RFC822.HEADER", HEADER),
    b"RFC822.TEXT": FetchSpec("RFC822.TEXT", b"RFC822.TEXT", FULL, sets_seen=True),
}


def _spec(token: bytes) -> FetchSpec:
    upper = token.upper()
    found = _SIMPLE_ITEMS.get(upper)
    if found is not None:
        return found
    match = _SECTION.match(token)
    if match is None:
        raise MailStoreError(f"unknown FETCH item {token[:40].decode('ascii', 'replace')}")
    peek, numbers_text, specifier_text, fields_text, start, length = match.groups()
    try:
        numbers = tuple(int(n) for n in numbers_text.split(b".") if n)
    except ValueError:
        raise MailStoreError("bad section part number") from None
    if any(n < 1 for n in numbers):
        raise MailStoreError("bad section part number")
    specifier = specifier_text.upper().decode("ascii")
    fields: tuple[bytes, ...] = ()
    if fields_text:
        parsed, _ = syntax.parse_value(fields_text)
        if not isinstance(parsed, list) or not all(isinstance(f, bytes) for f in parsed):
            raise MailStoreError("bad header field list")
        fields = tuple(f.upper() for f in parsed if isinstance(f, bytes))
    if bool(fields) != specifier.startswith("HEADER.FIELDS"):
        raise MailStoreError("bad header field list")
    wire = b".".join(b"%d" % n for n in numbers)
    if specifier:
        wire += (b"." if wire else b"") + specifier.encode("ascii")
    if fields:
        wire += b" (" + b" ".join(syntax.astring(f) for f in fields) + b")"
    label = b"BODY[" + wire + b"]" + (b"<" + start + b">" if start is not None else b"")
    header_only = not numbers and specifier.startswith("HEADER")
    return FetchSpec(
        "SECTION",
        label,
        HEADER if header_only else FULL,
        structure=bool(numbers),
        sets_seen=not peek,
        numbers=numbers,
        specifier=specifier,
        fields=fields,
        partial=(int(start), int(length)) if start is not None else None,
    )


def body_start(data: bytes) -> int:
    """Where the body starts: after the blank line that ends the header (the end if there is none)."""
    if data.startswith(b"\r\n"):
        return 2
    blank = data.find(b"\r\n\r\n")
    return len(data) if blank < 0 else blank + 4


def render_content(specs: Sequence[FetchSpec], data: bytes) -> list[bytes]:
    """The values of the content items (level above :data:`META`) of ``specs``, in order.

    ``data`` is the whole message, or only its header when no item needs more. A
    section the message does not have is an empty string, as Dovecot answers.
    """
    start = body_start(data)
    view: imap_mime.MessageView | None = None
    values: list[bytes] = []
    for spec in specs:
        if spec.level == META:
            continue
        kind = spec.kind
        if kind == "ENVELOPE":
            values.append(imap_mime.envelope(data, imap_mime.Entity(0, start, len(data), "text", "plain")))
            continue
        if spec.structure and view is None:
            view = imap_mime.describe(data)
        if kind == "BODYSTRUCTURE":
            assert view is not None
            values.append(view.bodystructure)
        elif kind == "BODY":
            assert view is not None
            values.append(view.body)
        elif kind == "RFC822":
            values.append(syntax.literal(data))
        elif kind == "RFC822.HEADER":
            values.append(syntax.literal(data[:start]))
        elif kind == "RFC822.TEXT":
            values.append(syntax.literal(data[start:]))
        else:
            values.append(syntax.literal(_section(spec, data, start, view)))
    return values


def _section(spec: FetchSpec, data: bytes, start: int, view: imap_mime.MessageView | None) -> bytes:
    try:
        if spec.numbers:
            assert view is not None
            piece = imap_mime.section(data, view, spec.numbers, spec.specifier, spec.fields)
        elif spec.specifier == "":
            piece = data
        elif spec.specifier == "TEXT":
            piece = data[start:]
        else:
            piece = imap_mime.header_section(data[:start], spec.specifier, spec.fields)
    except imap_mime.SectionError:
        piece = b""
    if spec.partial is not None:
        piece = imap_mime.partial(piece, *spec.partial)
    return piece


def render_messages(specs: Sequence[FetchSpec], messages: Sequence[bytes]) -> list[list[bytes]]:
    """Worker job: :func:`render_content` for several messages (MIME parsing holds the GIL)."""
    return [render_content(specs, data) for data in messages]


def read_header(handle: BinaryIO) -> bytes:
    """A message's header (with the blank line), read in pieces: a listing never reads bodies."""
    data = b""
    while True:
        piece = handle.read(HEADER_READ)
        if not piece:
            return data
        data += piece
        if data.startswith(b"\r\n"):
            return data[:2]
        blank = data.find(b"\r\n\r\n", max(0, len(data) - len(piece) - 3))
        if blank >= 0:
            return data[: blank + 4]


def read_messages(
    mailbox: Mailbox, folder: str, uidvalidity: int, uids: Iterable[int], level: int
) -> list[tuple[int, bytes]]:
    """Blocking: the bytes (whole, or the header) of these messages; ones gone meanwhile are left out."""
    found = []
    for uid in uids:
        try:
            with mailbox.open_message(folder, uid, uidvalidity=uidvalidity) as handle:
                found.append((uid, read_header(handle) if level == HEADER else handle.read()))
        except NoSuchMessage:
            continue
    return found


def read_and_render(
    mailbox: Mailbox, folder: str, uidvalidity: int, uids: Iterable[int], specs: Sequence[FetchSpec], level: int
) -> dict[int, list[bytes]]:
    """Blocking: read and render in one go (items that need no MIME structure)."""
    return {uid: render_content(specs, data) for uid, data in read_messages(mailbox, folder, uidvalidity, uids, level)}


def render_flags(flags: Iterable[str], recent: bool) -> bytes:
    """A FLAGS value as Dovecot orders it: system flags, ``\\Recent``, then keywords."""
    have = set(flags)
    ordered = [flag for flag in _SYSTEM_ORDER if flag in have]
    if recent:
        ordered.append(RECENT)
    ordered.extend(sorted(flag for flag in have if not flag.startswith("\\")))
    return b"(" + " ".join(ordered).encode("ascii", "replace") + b")"


def render_internal_date(value: datetime.datetime) -> bytes:
    """An INTERNALDATE value: ``"02-Jan-2023 10:00:00 +0000"`` (in the zone it was stored with)."""
    offset = value.utcoffset() or datetime.timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return (
        f'"{value.day:02d}-{_MONTHS[value.month - 1]}-{value.year:04d} '
        f'{value.hour:02d}:{value.minute:02d}:{value.second:02d} {sign}{minutes // 60:02d}{minutes % 60:02d}"'
    ).encode("ascii")


def parse_date_time(value: bytes) -> datetime.datetime:
    """APPEND's date-time (``02-Jan-2023 10:00:00 +0100``, quoted or not); raises :class:`MailStoreError`."""
    match = _DATE_TIME.match(value.strip())
    month = _MONTH_NUMBER.get(match.group(2).decode("ascii").lower()) if match else None
    if match is None or month is None:
        raise MailStoreError("bad APPEND date")
    day, _, year, hour, minute, second, sign, zone_hours, zone_minutes = match.groups()
    offset = datetime.timedelta(hours=int(zone_hours), minutes=int(zone_minutes)) * (-1 if sign == b"-" else 1)
    try:
        return datetime.datetime(int(year), month, int(day), int(hour), int(minute), int(second),
                                 tzinfo=datetime.timezone(offset))  # fmt: skip
    except ValueError:
        raise MailStoreError("bad APPEND date") from None


def _search_date(value: bytes) -> datetime.date:
    match = _DATE.match(value)
    month = _MONTH_NUMBER.get(match.group(2).decode("ascii").lower()) if match else None
    if match is None or month is None:
        raise MailStoreError("bad search date")
    try:
        return datetime.date(int(match.group(3)), month, int(match.group(1)))
    except ValueError:
        raise MailStoreError("bad search date") from None


# -- message sets -------------------------------------------------------------------------


def pick(spec: bytes, uids: Sequence[int]) -> list[int]:
    """The UIDs of ``uids`` (ascending) a UID set names; ``*`` is the highest, and ``n:*`` always names it."""
    if not uids:
        return []
    highest = uids[-1]
    chosen: set[int] = set()
    try:
        for part in spec.split(b","):
            low, colon, high = part.partition(b":")
            first = highest if low == b"*" else int(low)
            last = first if not colon else (highest if high == b"*" else int(high))
            if first > last:
                first, last = last, first
            chosen.update(uids[bisect_left(uids, first) : bisect_right(uids, last)])
    except ValueError:
        raise MailStoreError("bad message set") from None
    return sorted(chosen)


# -- SEARCH -----------------------------------------------------------------------------------

_FLAG_KEYS = {
    "ANSWERED": (ANSWERED, True),
    "DELETED": (DELETED, True),
    "DRAFT": (DRAFT, True),
    "FLAGGED": (FLAGGED, True),
    "SEEN": (SEEN, True),
    "UNANSWERED": (ANSWERED, False),
    "UNDELETED": (DELETED, False),
    "UNDRAFT": (DRAFT, False),
    "UNFLAGGED": (FLAGGED, False),
    "UNSEEN": (SEEN, False),
}
_STRING_KEYS = frozenset({"BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"})
_DATE_KEYS = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"})

SearchNode = tuple[Any, ...]


def parse_search(criteria: bytes) -> SearchNode:
    """SEARCH keys (as IMAP syntax) as a tree of tuples; raises :class:`MailStoreError`."""
    try:
        tokens: list[Any] = syntax.parse_line(criteria)
    except syntax.ImapSyntaxError:
        raise MailStoreError("bad search criteria") from None
    nodes = []
    while tokens:
        nodes.append(_search_node(tokens))
    if not nodes:
        raise MailStoreError("empty search")
    return ("AND", *nodes)


def _search_node(tokens: list[Any]) -> SearchNode:
    token = tokens.pop(0)
    if isinstance(token, list):
        inner = list(token)
        nodes = []
        while inner:
            nodes.append(_search_node(inner))
        return ("AND", *nodes)
    word = (token or b"NIL").decode("ascii", "replace").upper()

    def argument() -> bytes:
        if not tokens or isinstance(tokens[0], list):
            raise MailStoreError(f"{word} needs an argument")
        value = tokens.pop(0)
        return b"NIL" if value is None else bytes(value)

    if word[:1].isdigit() or word[:1] == "*":
        return ("SEQ", token)
    if word in ("ALL", "RECENT", "NEW", "OLD"):
        return (word,)
    if word in _FLAG_KEYS:
        flag, wanted = _FLAG_KEYS[word]
        return ("FLAG", flag, wanted)
    if word in ("KEYWORD", "UNKEYWORD"):
        return ("KEYWORD", argument().decode("utf-8", "replace").casefold(), word == "KEYWORD")
    if word in _STRING_KEYS:
        return (word, argument().decode("utf-8", "replace").casefold())
    if word == "HEADER":
        field = argument().decode("ascii", "replace").lower()
        return ("HEADER", field, argument().decode("utf-8", "replace").casefold())
    if word in _DATE_KEYS:
        return (word, _search_date(argument()))
    if word in ("LARGER", "SMALLER"):
        value = argument()
        if not value.isdigit():
            raise MailStoreError(f"bad number for {word}")
        return (word, int(value))
    if word == "UID":
        return ("UID", argument())
    if word == "NOT":
        if not tokens:
            raise MailStoreError("NOT needs a key")
        return ("NOT", _search_node(tokens))
    if word == "OR":
        if len(tokens) < 2:
            raise MailStoreError("OR needs two keys")
        first = _search_node(tokens)
        if not tokens:
            raise MailStoreError("OR needs two keys")
        return ("OR", first, _search_node(tokens))
    raise MailStoreError(f"unknown search key {word[:30]}")


def _needs(node: SearchNode) -> int:
    word = node[0]
    if word in ("AND", "OR"):
        return max((_needs(child) for child in node[1:]), default=META)
    if word == "NOT":
        return _needs(node[1])
    if word in ("BODY", "TEXT"):
        return FULL
    if word in ("BCC", "CC", "FROM", "SUBJECT", "TO", "HEADER", "SENTBEFORE", "SENTON", "SENTSINCE"):
        return HEADER
    return META


def _decoded(value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


class _Candidate:
    """One message as SEARCH looks at it; its bytes are read only if a key needs them."""

    def __init__(self, info: MessageInfo, seq: int, recent: bool, read: Callable[[int, int], bytes | None]) -> None:
        self.info = info
        self.seq = seq
        self.recent = recent
        self._read = read
        self._data: bytes | None = None
        self._level = META
        self._fields: list[tuple[bytes, bytes]] | None = None
        self._body: str | None = None

    def data(self, level: int) -> bytes:
        if self._level < level:
            self._data = self._read(self.info.uid, level) or b""
            self._level = level
        return self._data or b""

    def fields(self) -> list[tuple[bytes, bytes]]:
        if self._fields is None:
            data = self.data(HEADER)
            self._fields = imap_mime.header_fields(data[: body_start(data)])
        return self._fields

    def field_texts(self, name: str) -> list[str]:
        key = name.encode("ascii", "replace")
        return [_decoded(value).casefold() for field, value in self.fields() if field == key]

    def body(self) -> str:
        if self._body is None:
            data = self.data(FULL)
            entity = imap_mime.parse(data)
            self._body = imap_mime.searchable_text(data, entity).casefold()
        return self._body

    def sent_date(self) -> datetime.date:
        values = self.field_texts("date")
        if values:
            try:
                return email.utils.parsedate_to_datetime(values[0]).date()
            except (TypeError, ValueError, IndexError):
                pass
        return self.info.internal_date.date()


def _matches(node: SearchNode, message: _Candidate) -> bool:
    word = node[0]
    info = message.info
    if word == "AND":
        return all(_matches(child, message) for child in node[1:])
    if word == "OR":
        return _matches(node[1], message) or _matches(node[2], message)
    if word == "NOT":
        return not _matches(node[1], message)
    if word == "ALL":
        return True
    if word == "FLAG":
        return bool((node[1] in info.flags) == node[2])
    if word == "RECENT":
        return message.recent
    if word == "NEW":
        return message.recent and SEEN not in info.flags
    if word == "OLD":
        return not message.recent
    if word == "KEYWORD":
        have = {flag.casefold() for flag in info.flags if not flag.startswith("\\")}
        return bool((node[1] in have) == node[2])
    if word == "LARGER":
        return bool(info.size > node[1])
    if word == "SMALLER":
        return bool(info.size < node[1])
    if word in ("BEFORE", "ON", "SINCE"):
        return _compare(word, info.internal_date.date(), node[1])
    if word in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        return _compare(word[4:], message.sent_date(), node[1])
    if word in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
        return any(node[1] in text for text in message.field_texts(word.lower()))
    if word == "HEADER":
        texts = message.field_texts(node[1])
        return bool(texts) and any(node[2] in text for text in texts)
    if word == "BODY":
        return node[1] in message.body()
    if word == "TEXT":
        header = message.data(FULL)
        return node[1] in _decoded(header[: body_start(header)]).casefold() or node[1] in message.body()
    if word == "UIDS":
        return info.uid in node[1]
    if word == "SEQS":
        return message.seq in node[1]
    raise MailStoreError(f"unknown search key {word}")


def _resolved(node: SearchNode, uids: Sequence[int]) -> SearchNode:
    """The tree with its UID and sequence sets turned into sets of numbers (once, not per message)."""
    word = node[0]
    if word in ("AND", "OR", "NOT"):
        return (word, *(_resolved(child, uids) for child in node[1:]))
    if word == "UID":
        return ("UIDS", frozenset(pick(node[1], uids)))
    if word == "SEQ":
        return ("SEQS", frozenset(pick(node[1], range(1, len(uids) + 1))))
    return node


def _compare(word: str, day: datetime.date, wanted: datetime.date) -> bool:
    if word == "BEFORE":
        return day < wanted
    if word == "ON":
        return day == wanted
    return day >= wanted


def search_job(
    mailbox: Mailbox, folder: str, uidvalidity: int, uids: Sequence[int], recent: frozenset[int], tree: SearchNode
) -> list[int]:
    """Blocking: the UIDs among ``uids`` (the session's messages) that match ``tree``."""
    level = _needs(tree)
    tree = _resolved(tree, uids)

    def read(uid: int, wanted: int) -> bytes | None:
        found = read_messages(mailbox, folder, uidvalidity, [uid], wanted)
        return found[0][1] if found else None

    infos = mailbox.messages(folder, uids, uidvalidity=uidvalidity)
    result = []
    for info in infos:
        seq = bisect_left(uids, info.uid) + 1
        candidate = _Candidate(info, seq, info.uid in recent, read)
        if _matches(tree, candidate):
            result.append(info.uid)
        if level:
            candidate._data = None  # one message's bytes at a time
    return result


# -- the view cache --------------------------------------------------------------------------

CACHED_KINDS = frozenset({"ENVELOPE", "BODYSTRUCTURE", "BODY"})
VIEW_CACHE_BYTES = 32 * 1024 * 1024


class ViewCache:
    """ENVELOPE, BODYSTRUCTURE and BODY of messages already described, least recently used out first.

    A stored message never changes, so what it looked like once it looks like for good
    (Dovecot keeps the same in its cache file): a second listing reads no file and
    parses nothing. Keys are (mailbox token, UIDVALIDITY, UID); each open
    :class:`~gatekeeper.localstore.mailbox.Mailbox` gets its own token, so a mailbox
    removed and made again never meets the old one's entries. Reactor thread only.
    """

    def __init__(self, limit_bytes: int = VIEW_CACHE_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self.size = 0
        self._entries: collections.OrderedDict[tuple[int, int, int], dict[str, bytes]] = collections.OrderedDict()
        self._tokens: weakref.WeakKeyDictionary[Mailbox, int] = weakref.WeakKeyDictionary()
        self._counter = itertools.count(1)

    def token(self, mailbox: Mailbox) -> int:
        """The token of an open mailbox."""
        token = self._tokens.get(mailbox)
        if token is None:
            token = self._tokens[mailbox] = next(self._counter)
        return token

    def get(self, key: tuple[int, int, int], specs: Sequence[FetchSpec]) -> list[bytes] | None:
        """The values of ``specs`` for a message, if all are known."""
        entry = self._entries.get(key)
        if entry is None or not all(spec.kind in entry for spec in specs):
            return None
        self._entries.move_to_end(key)
        return [entry[spec.kind] for spec in specs]

    def put(self, key: tuple[int, int, int], specs: Sequence[FetchSpec], values: Sequence[bytes]) -> None:
        """Remember the values of ``specs`` for a message."""
        entry = self._entries.pop(key, None) or {}
        self.size -= sum(map(len, entry.values()))
        entry.update(zip((spec.kind for spec in specs), values, strict=True))
        self.size += sum(map(len, entry.values()))
        self._entries[key] = entry
        while self.size > self.limit_bytes and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self.size -= sum(map(len, evicted.values()))

    def __len__(self) -> int:
        return len(self._entries)


# -- the session ------------------------------------------------------------------------------


@attrs.define
class _Selected:
    folder: str
    uidvalidity: int
    readonly: bool
    uids: array[int]
    modseq: int
    recent: set[int]

    def index(self, uid: int) -> int | None:
        at = bisect_left(self.uids, uid)
        return at if at < len(self.uids) and self.uids[at] == uid else None


Runner = Callable[..., Awaitable[Any]]


@implementer(IMailStoreSession)
class LocalImapSession:
    """One logged-in IMAP session with a user's mailbox in the embedded store.

    ``run`` runs blocking functions in the store's thread pool; ``render``, if given,
    runs :func:`render_messages` in the worker processes. ``clock`` schedules the
    reports of other sessions' changes; ``views`` keeps ENVELOPE and BODYSTRUCTURE of
    messages already described (shared by the sessions of a gateway).
    """

    capabilities: frozenset[str] = CAPABILITIES
    delimiter: str | None = SEPARATOR

    def __init__(
        self,
        mailbox: AsyncMailbox,
        *,
        run: Runner,
        clock: IReactorTime,
        render: Runner | None = None,
        alive: Callable[[], bool] = lambda: True,
        views: ViewCache | None = None,
    ) -> None:
        self.mailbox = mailbox
        self._alive = alive
        self._views = views
        self._run = run
        self._render = render
        self._clock = clock
        self._events: IMailStoreEvents | None = None
        self._lock = DeferredLock()
        self._selected: _Selected | None = None
        self._dirty = False
        self._own: dict[int, int] = {}  # UID -> modseq of this session's own flag changes not yet synced
        self._scheduled: IDelayedCall | None = None
        self.closed = False
        self._token = object()  # the origin of this session's changes in the store's notices
        self._cancel_watch = mailbox.watch(self._noticed)

    # -- plumbing ------------------------------------------------------------------------

    def set_listener(self, events: IMailStoreEvents) -> None:
        """Unsolicited responses go to ``events`` from now on."""
        self._events = events

    def _command(self, work: Callable[..., Awaitable[T]], *args: Any, target: bool = False) -> Deferred[T]:
        return Deferred.fromCoroutine(self._serialised(work, args, target))

    async def _serialised(self, work: Callable[..., Awaitable[T]], args: tuple[Any, ...], target: bool) -> T:
        if not self.closed and not self._alive():
            self._lose("the mail store was closed")
        if self.closed:
            raise UpstreamUnavailable("the mail store session is closed")
        await self._lock.acquire()
        try:
            try:
                result = await work(*args)
                if self._dirty:
                    await self._sync()
            except LocalStoreError as error:
                raise translated(error, target=target) from None
            return result
        finally:
            self._lock.release()

    def _need_selected(self) -> _Selected:
        if self._selected is None:
            raise MailStoreError("no mailbox is selected")
        return self._selected

    def _writable(self) -> _Selected:
        selected = self._need_selected()
        if selected.readonly:
            raise MailStoreError("the mailbox is read-only", "READ-ONLY")
        return selected

    # -- the change feed --------------------------------------------------------------------

    def _noticed(self, notice: Notice) -> None:
        """A committed change in this user's mailbox (on the reactor thread)."""
        selected = self._selected
        if selected is None or self.closed:
            return
        if notice.kind == "renamed":
            if notice.old_name == selected.folder and notice.uidvalidity == selected.uidvalidity:
                selected.folder = notice.folder
            return
        if notice.folder != selected.folder or notice.uidvalidity != selected.uidvalidity:
            return
        if notice.kind == "deleted":
            if notice.origin is self._token:
                self._selected = None
            else:
                self._lose("the selected mailbox was deleted by another session")
            return
        self._dirty = True
        if self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self._background)

    def _background(self) -> None:
        self._scheduled = None
        Deferred.fromCoroutine(self._background_sync()).addErrback(
            lambda failure: log.failure("Reporting mailbox changes failed", failure)
        )

    async def _background_sync(self) -> None:
        if self.closed or not self._dirty:
            return
        await self._lock.acquire()
        try:
            if self._dirty and not self.closed:
                await self._sync()
        except (LocalStoreError, GatekeeperError):
            pass  # the next command meets the same problem and reports it
        finally:
            self._lock.release()

    async def _sync(self) -> None:
        """Report what changed in the selected folder since the session last looked (holding the lock)."""
        self._dirty = False
        selected = self._selected
        if selected is None:
            return
        try:
            changes = await self.mailbox.changes(
                selected.folder, selected.modseq, claim_recent=not selected.readonly, uidvalidity=selected.uidvalidity
            )
        except (UidValidityChanged, NoSuchFolder, FolderNotAllowed):
            self._lose("the selected mailbox was deleted by another session")
            return
        top = selected.uids[-1] if selected.uids else 0
        gone = [uid for uid in changes.expunged if selected.index(uid) is not None]
        if not changes.complete:
            present = set(await self.mailbox.uids(selected.folder, uidvalidity=selected.uidvalidity))
            gone = [uid for uid in selected.uids if uid not in present]
        events = self._events
        for uid in sorted(gone, reverse=True):
            index = selected.index(uid)
            if index is None:
                continue
            del selected.uids[index]
            selected.recent.discard(uid)
            if events is not None:
                events.expunged(index + 1)
        new = sorted(m.uid for m in changes.new if m.uid > top)
        if new:
            selected.uids.extend(new)
            selected.recent.update(changes.recent)
            if events is not None:
                events.exists(len(selected.uids))
                events.recent(len(selected.recent))
        for info in changes.changed:
            if self._own.get(info.uid) == info.modseq:
                continue  # this session's own change, reported (or silenced) when it was made
            index = selected.index(info.uid)
            if index is not None and events is not None:
                flags = render_flags(info.flags, info.uid in selected.recent)
                events.fetched(FetchResponse(index + 1, info.uid, b"(UID %d FLAGS %s)" % (info.uid, flags)))
        self._own.clear()
        selected.modseq = changes.highest_modseq

    def _lose(self, reason: str) -> None:
        self._selected = None
        self._close()
        if self._events is not None:
            self._events.session_lost(reason)

    def _close(self) -> None:
        self.closed = True
        self._cancel_watch()
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None

    # -- mailboxes ----------------------------------------------------------------------------

    def list_mailboxes(self, reference: str, pattern: str, subscribed: bool = False) -> Deferred[list[MailboxEntry]]:
        """LIST or LSUB: folders matching ``reference`` + ``pattern`` (``*`` and ``%`` wildcards)."""
        return self._command(self._list, reference, pattern, subscribed)

    async def _list(self, reference: str, pattern: str, subscribed: bool) -> list[MailboxEntry]:
        if not pattern and not subscribed:
            return [MailboxEntry("", SEPARATOR, (NOSELECT,))]  # the hierarchy delimiter and root
        matches = _pattern(reference + pattern)
        folders = {folder.name: folder for folder in await self.mailbox.folders()}
        if subscribed:
            names = await self.mailbox.subscriptions()
            return [
                MailboxEntry(name, SEPARATOR, _attributes(folders[name]) if name in folders else (NOSELECT,))
                for name in names
                if matches(name)
            ]
        return [MailboxEntry(name, SEPARATOR, _attributes(folder)) for name, folder in folders.items() if matches(name)]

    def status(self, mailbox: str, items: Sequence[str]) -> Deferred[dict[str, int]]:
        """STATUS of a folder."""
        return self._command(self._status, mailbox, items)

    async def _status(self, mailbox: str, items: Sequence[str]) -> dict[str, int]:
        status = await self.mailbox.status(mailbox)
        values = {
            "MESSAGES": status.messages,
            "RECENT": status.recent,
            "UIDNEXT": status.uidnext,
            "UIDVALIDITY": status.uidvalidity,
            "UNSEEN": status.unseen,
        }
        unknown = [item for item in items if item.upper() not in values]
        if unknown:
            raise MailStoreError(f"unknown STATUS item {unknown[0][:30]}")
        return {item.upper(): values[item.upper()] for item in items}

    def select(self, mailbox: str, readonly: bool = False) -> Deferred[SelectInfo]:
        """SELECT (claims the folder's \\Recent messages) or EXAMINE."""
        return self._command(self._select, mailbox, readonly)

    async def _select(self, mailbox: str, readonly: bool) -> SelectInfo:
        self._selected = None  # a failed SELECT leaves nothing selected
        self._own.clear()
        self._dirty = False
        selection = await self.mailbox.select(mailbox, readonly=readonly)
        status = selection.status
        uids = array("I", (message.uid for message in selection.messages))
        keywords = sorted({f for m in selection.messages for f in m.flags if not f.startswith("\\")})
        flags = (*_SYSTEM_ORDER, *keywords)
        unseen = None
        if selection.first_unseen is not None:
            unseen = bisect_left(uids, selection.first_unseen) + 1
        self._selected = _Selected(status.name, status.uidvalidity, readonly, uids, status.highest_modseq,
                                   set(selection.recent))  # fmt: skip
        return SelectInfo(
            name=status.name,
            uidvalidity=status.uidvalidity,
            uidnext=status.uidnext,
            uids=list(uids),
            flags=flags,
            permanent_flags=() if readonly else (*flags, "\\*"),
            recent=len(selection.recent),
            exists=len(uids),
            unseen=unseen,
            readonly=readonly,
        )

    def close(self) -> Deferred[Any]:
        """CLOSE: expunge \\Deleted messages silently (read-write only) and unselect."""
        return self._command(self._close_mailbox)

    async def _close_mailbox(self) -> None:
        selected = self._selected
        self._selected = None
        if selected is not None and not selected.readonly:
            await self.mailbox.expunge(selected.folder, uidvalidity=selected.uidvalidity, origin=self._token)

    def unselect(self) -> Deferred[Any]:
        """UNSELECT: leave the folder, removing nothing."""
        return self._command(self._unselect)

    async def _unselect(self) -> None:
        self._selected = None

    def create(self, mailbox: str) -> Deferred[Any]:
        """CREATE (a trailing ``/`` is ignored: every level is a folder here)."""
        return self._command(self.mailbox.create_folder, mailbox.rstrip(SEPARATOR) or mailbox)

    def delete(self, mailbox: str) -> Deferred[Any]:
        """DELETE."""
        return self._command(self._delete, mailbox)

    async def _delete(self, mailbox: str) -> None:
        await self.mailbox.delete_folder(mailbox, origin=self._token)

    def rename(self, old: str, new: str) -> Deferred[Any]:
        """RENAME."""
        return self._command(self._rename, old, new)

    async def _rename(self, old: str, new: str) -> None:
        await self.mailbox.rename_folder(old, new, origin=self._token)

    def subscribe(self, mailbox: str) -> Deferred[Any]:
        """SUBSCRIBE."""
        return self._command(self.mailbox.subscribe, mailbox)

    def unsubscribe(self, mailbox: str) -> Deferred[Any]:
        """UNSUBSCRIBE."""
        return self._command(self.mailbox.unsubscribe, mailbox)

    # -- messages ------------------------------------------------------------------------------

    def fetch(self, uids: bytes, items: bytes, sink: Callable[[FetchResponse], None]) -> Deferred[Any]:
        """UID FETCH: one answer per message, as Dovecot words it."""
        return self._command(self._fetch, uids, items, sink)

    async def _fetch(self, uid_set: bytes, items: bytes, sink: Callable[[FetchResponse], None]) -> None:
        selected = self._need_selected()
        specs = parse_fetch_items(items)
        chosen = pick(uid_set, selected.uids)
        level = max(spec.level for spec in specs)
        sets_seen = not selected.readonly and any(spec.sets_seen for spec in specs)
        chunk_size = (META_CHUNK, HEADER_CHUNK, FULL_CHUNK)[level]
        for chunk in syntax.chunks(chosen, chunk_size):
            infos = await self.mailbox.messages(selected.folder, chunk, uidvalidity=selected.uidvalidity)
            marked: set[int] = set()
            if sets_seen:
                infos, marked = await self._mark_seen(selected, infos)
            contents: dict[int, list[bytes]] = {}
            if level > META:
                contents = await self._contents(selected, [info.uid for info in infos], specs, level)
            for info in infos:
                values = contents.get(info.uid)
                index = selected.index(info.uid)
                if index is None or (level > META and values is None):
                    continue  # expunged meanwhile
                sink(FetchResponse(index + 1, info.uid, self._answer(selected, info, specs, values, marked)))

    async def _mark_seen(self, selected: _Selected, infos: list[MessageInfo]) -> tuple[list[MessageInfo], set[int]]:
        """Set \\Seen on the messages a FETCH reads; returns their metadata after, and which changed."""
        unseen = [info.uid for info in infos if SEEN not in info.flags]
        if not unseen:
            return infos, set()
        changed = await self.mailbox.add_flags(
            selected.folder, unseen, [SEEN], uidvalidity=selected.uidvalidity, origin=self._token
        )
        updated = {info.uid: info for info in changed}
        for info in changed:
            self._own[info.uid] = info.modseq
        return [updated.get(info.uid, info) for info in infos], set(updated)

    async def _contents(
        self, selected: _Selected, uids: list[int], specs: Sequence[FetchSpec], level: int
    ) -> dict[int, list[bytes]]:
        """The content items' values of these messages (from the view cache where it has them all)."""
        cache = self._views
        content = [spec for spec in specs if spec.level > META]
        if cache is None or not all(spec.kind in CACHED_KINDS for spec in content):
            return await self._render_contents(selected, uids, specs, level)
        token = cache.token(self.mailbox.mailbox)
        found: dict[int, list[bytes]] = {}
        missing = []
        for uid in uids:
            values = cache.get((token, selected.uidvalidity, uid), content)
            if values is None:
                missing.append(uid)
            else:
                found[uid] = values
        if missing:
            rendered = await self._render_contents(selected, missing, specs, level)
            for uid, values in rendered.items():
                cache.put((token, selected.uidvalidity, uid), content, values)
            found.update(rendered)
        return found

    async def _render_contents(
        self, selected: _Selected, uids: list[int], specs: Sequence[FetchSpec], level: int
    ) -> dict[int, list[bytes]]:
        inner = self.mailbox.mailbox
        if self._render is not None and any(spec.structure for spec in specs):
            found = await self._run(read_messages, inner, selected.folder, selected.uidvalidity, uids, level)
            rendered = await self._render(render_messages, specs, [data for _, data in found])
            return {uid: values for (uid, _), values in zip(found, rendered, strict=True)}
        result: dict[int, list[bytes]] = await self._run(
            read_and_render, inner, selected.folder, selected.uidvalidity, uids, specs, level
        )
        return result

    def _answer(
        self, selected: _Selected, info: MessageInfo, specs: Sequence[FetchSpec], values: list[bytes] | None,
        marked: set[int],
    ) -> bytes:  # fmt: skip
        """One FETCH answer in Dovecot's order: UID, the items without literals as asked, then those with."""
        # Dovecot writes "buffered" items (no literal) before the others, each group in the order
        # asked, and adds FLAGS after the first group when this FETCH set \Seen.
        flags = b"FLAGS " + render_flags(info.flags, info.uid in selected.recent)
        parts = [b"UID %d" % info.uid]
        literals = []
        content = iter(values or ())
        for spec in specs:
            kind = spec.kind
            if kind == "UID":
                continue
            if kind == "FLAGS":
                parts.append(flags)
            elif kind == "INTERNALDATE":
                parts.append(b"INTERNALDATE " + render_internal_date(info.internal_date))
            elif kind == "RFC822.SIZE":
                parts.append(b"RFC822.SIZE %d" % info.size)
            elif kind in ("ENVELOPE", "BODYSTRUCTURE", "BODY"):
                parts.append(spec.label + b" " + next(content))
            else:
                literals.append(spec.label + b" " + next(content))
        if info.uid in marked and not any(spec.kind == "FLAGS" for spec in specs):
            parts.append(flags)
        return b"(" + b" ".join(parts + literals) + b")"

    def search(self, criteria: bytes, charset: str | None = None) -> Deferred[list[int]]:
        """UID SEARCH over the stored messages (headers as stored, bodies transfer-decoded)."""
        return self._command(self._search, criteria, charset)

    async def _search(self, criteria: bytes, charset: str | None) -> list[int]:
        selected = self._need_selected()
        if charset is not None and charset.upper() not in ("UTF-8", "US-ASCII"):
            raise MailStoreError(f"unsupported charset {charset[:30]}", "BADCHARSET")
        tree = parse_search(criteria)
        if not selected.uids:
            return []
        found: list[int] = await self._run(
            search_job, self.mailbox.mailbox, selected.folder, selected.uidvalidity, array("I", selected.uids),
            frozenset(selected.recent), tree,
        )  # fmt: skip
        return found

    def store(self, uids: bytes, operation: bytes, flags: Sequence[str]) -> Deferred[Any]:
        """UID STORE; the new flags of changed messages go to the listener unless ``.SILENT``."""
        return self._command(self._store, uids, operation, flags)

    async def _store(self, uid_set: bytes, operation: bytes, flags: Sequence[str]) -> None:
        selected = self._writable()
        upper = operation.upper()
        silent = upper.endswith(b".SILENT")
        method = {
            b"+FLAGS": self.mailbox.add_flags,
            b"-FLAGS": self.mailbox.remove_flags,
            b"FLAGS": self.mailbox.set_flags,
        }.get(upper.removesuffix(b".SILENT"))
        if method is None:
            raise MailStoreError("unknown STORE operation")
        chosen = pick(uid_set, selected.uids)
        if not chosen:
            return
        wanted = [flag for flag in flags if flag.casefold() != RECENT.casefold()]  # \Recent is the server's
        listed = await self.mailbox.messages(selected.folder, chosen, uidvalidity=selected.uidvalidity)
        before = {info.uid: info.flags for info in listed}
        after = await method(selected.folder, chosen, wanted, uidvalidity=selected.uidvalidity, origin=self._token)
        events = self._events
        for info in after:
            if info.flags == before.get(info.uid):
                continue
            self._own[info.uid] = info.modseq
            index = selected.index(info.uid)
            if not silent and index is not None and events is not None:
                value = render_flags(info.flags, info.uid in selected.recent)
                events.fetched(FetchResponse(index + 1, info.uid, b"(UID %d FLAGS %s)" % (info.uid, value)))

    def copy(self, uids: bytes, mailbox: str) -> Deferred[CopiedUids | None]:
        """UID COPY (flags and dates kept; the bytes are linked, not copied)."""
        return self._command(self._copy, uids, mailbox, target=True)

    async def _copy(self, uid_set: bytes, mailbox: str) -> CopiedUids | None:
        selected = self._need_selected()
        chosen = pick(uid_set, selected.uids)
        if not chosen:
            return None
        copied = await self.mailbox.copy(
            selected.folder, chosen, mailbox, uidvalidity=selected.uidvalidity, origin=self._token
        )
        return CopiedUids(copied.uidvalidity, copied.source, copied.destination) if copied.source else None

    def move(self, uids: bytes, mailbox: str) -> Deferred[CopiedUids | None]:
        """UID MOVE (RFC 6851); the expunges go to the listener."""
        return self._command(self._move, uids, mailbox, target=True)

    async def _move(self, uid_set: bytes, mailbox: str) -> CopiedUids | None:
        selected = self._writable()
        chosen = pick(uid_set, selected.uids)
        if not chosen:
            return None
        moved = await self.mailbox.move(
            selected.folder, chosen, mailbox, uidvalidity=selected.uidvalidity, origin=self._token
        )
        self._expunged(selected, moved.source)
        return CopiedUids(moved.uidvalidity, moved.source, moved.destination) if moved.source else None

    def expunge(self, uids: bytes | None = None) -> Deferred[Any]:
        """EXPUNGE, or UID EXPUNGE (RFC 4315) of \\Deleted messages among ``uids``."""
        return self._command(self._expunge, uids)

    async def _expunge(self, uid_set: bytes | None) -> None:
        selected = self._writable()
        chosen = pick(uid_set, selected.uids) if uid_set is not None else None
        if chosen is not None and not chosen:
            return
        removed = await self.mailbox.expunge(
            selected.folder, chosen, uidvalidity=selected.uidvalidity, origin=self._token
        )
        self._expunged(selected, removed)

    def _expunged(self, selected: _Selected, uids: Iterable[int]) -> None:
        events = self._events
        for uid in sorted(uids, reverse=True):  # each number valid when it is told
            index = selected.index(uid)
            if index is None:
                continue
            del selected.uids[index]
            selected.recent.discard(uid)
            if events is not None:
                events.expunged(index + 1)

    def append(
        self, mailbox: str, message: bytes, flags: Sequence[str] = (), date: bytes | None = None
    ) -> Deferred[Appended]:
        """APPEND; fires with UIDPLUS's APPENDUID."""
        return self._command(self._append, mailbox, message, flags, date, target=True)

    async def _append(self, mailbox: str, message: bytes, flags: Sequence[str], date: bytes | None) -> Appended:
        internal_date = parse_date_time(date) if date else None
        wanted = [flag for flag in flags if flag.casefold() != RECENT.casefold()]
        appended = await self.mailbox.append(
            mailbox, message, flags=wanted, internal_date=internal_date, origin=self._token
        )
        return Appended(appended.uidvalidity, appended.uid)

    # -- the rest ------------------------------------------------------------------------------

    def noop(self) -> Deferred[Any]:
        """NOOP: report what changed."""
        return self._command(self._noop)

    async def _noop(self) -> None:
        await self._sync()

    def idle(self) -> Deferred[Any]:
        """IDLE: changes are reported as they are committed, idle or not."""
        if self.closed:
            return Deferred.fromCoroutine(self._closed_now())
        return succeed(None)

    async def _closed_now(self) -> None:
        raise UpstreamUnavailable("the mail store session is closed")

    def stop_idle(self) -> Deferred[Any]:
        """End IDLE."""
        return succeed(None)

    def logout(self) -> Deferred[Any]:
        """End the session (never fails)."""
        self._selected = None
        if not self.closed:
            self._close()
        return succeed(None)


def _attributes(folder: FolderInfo) -> tuple[str, ...]:
    order = {NOSELECT: 0, HAS_CHILDREN: 1, HAS_NO_CHILDREN: 1}
    return tuple(sorted(folder.attributes, key=lambda name: (order.get(name, 2), name)))


def _pattern(pattern: str) -> Callable[[str], bool]:
    """A LIST pattern as a test of names: ``*`` matches anything, ``%`` anything but the separator."""
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "%":
            parts.append(f"[^{re.escape(SEPARATOR)}]*")
        else:
            parts.append(re.escape(char))
    exact = re.compile("".join(parts), re.DOTALL)
    folded = re.compile("".join(parts), re.DOTALL | re.IGNORECASE)

    def matches(name: str) -> bool:
        # INBOX is case-insensitive: "inbox" and "Inbox/%" must find it.
        if name == INBOX or name.startswith(INBOX + SEPARATOR):
            return folded.fullmatch(name) is not None
        return exact.fullmatch(name) is not None

    return matches


class LocalImapStore:
    """Opens :class:`LocalImapSession` for gateway users (``ImapBackend.open_store``)."""

    def __init__(
        self, store: EmbeddedStore, clock: IReactorTime, *, render: Runner | None = None, views: ViewCache | None = None
    ) -> None:
        self.store = store
        self.clock = clock
        self.render = render
        self.views = views if views is not None else ViewCache()

    async def open(self, login: UpstreamLogin) -> IMailStoreSession:
        """The session of ``login.address`` (the gateway login is the only login here)."""
        opened = self.store.opened
        try:
            mailbox = await opened.mailbox(login.address)
        except StoreUnavailable as error:
            raise UpstreamUnavailable(str(error)) from None
        except LocalStoreError as error:
            raise UpstreamRefused(str(error), code="SYS/PERM") from None
        return LocalImapSession(
            mailbox,
            run=self.store.run,
            clock=self.clock,
            render=self.render,
            alive=lambda: self.store.store is opened,  # a session ends with the store it was opened on
            views=self.views,
        )


__all__ = [
    "CAPABILITIES",
    "FetchSpec",
    "LocalImapSession",
    "LocalImapStore",
    "ViewCache",
    "parse_date_time",
    "parse_fetch_items",
    "parse_search",
    "pick",
    "render_content",
    "render_flags",
    "render_internal_date",
    "render_messages",
]

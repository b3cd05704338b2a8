"""The plain values the local store hands out: frozen, picklable, no file handles."""

from __future__ import annotations

import datetime
from collections.abc import Collection

import attrs

SEEN = "\\Seen"
ANSWERED = "\\Answered"
FLAGGED = "\\Flagged"
DELETED = "\\Deleted"
DRAFT = "\\Draft"
SYSTEM_FLAGS = (SEEN, ANSWERED, FLAGGED, DELETED, DRAFT)
"""The IMAP system flags a message can carry, in their canonical spelling."""

NOSELECT = "\\Noselect"
HAS_CHILDREN = "\\HasChildren"
HAS_NO_CHILDREN = "\\HasNoChildren"


@attrs.frozen
class MessageInfo:
    """One message's metadata: everything but its bytes.

    ``flags`` holds system flags in canonical spelling (``\\Seen``) and keywords as first
    stored; ``modseq`` is the folder's modification sequence of the last change to this
    message (its arrival or a flag change).
    """

    uid: int
    size: int
    internal_date: datetime.datetime
    flags: frozenset[str]
    modseq: int

    @property
    def seen(self) -> bool:
        """True when the message has ``\\Seen``."""
        return SEEN in self.flags

    @property
    def deleted(self) -> bool:
        """True when the message has ``\\Deleted``."""
        return DELETED in self.flags


@attrs.frozen
class FolderInfo:
    """One folder as LIST shows it.

    ``attributes`` are IMAP name attributes: ``\\Noselect``, ``\\HasChildren`` or
    ``\\HasNoChildren``, and the special use (``\\Sent``, ``\\Drafts``, ``\\Trash``).
    """

    name: str
    attributes: frozenset[str]
    subscribed: bool
    special_use: str | None = None

    @property
    def selectable(self) -> bool:
        """False for a ``\\Noselect`` name kept only because it has children."""
        return NOSELECT not in self.attributes


@attrs.frozen
class FolderStatus:
    """STATUS counts of one folder.

    ``recent`` counts messages no session has claimed yet (see ``Mailbox.select``);
    ``size`` is the sum of the message sizes.
    """

    name: str
    messages: int
    recent: int
    unseen: int
    uidnext: int
    uidvalidity: int
    highest_modseq: int
    size: int


@attrs.frozen
class Selection:
    """What SELECT/EXAMINE needs: the status, every message in UID order, and this session's recent UIDs.

    ``first_unseen`` is the UID of the first message without ``\\Seen`` (None if all
    are seen); the session's sequence numbers are positions in ``messages`` plus one.
    """

    status: FolderStatus
    messages: tuple[MessageInfo, ...]
    recent: frozenset[int]
    first_unseen: int | None
    readonly: bool

    @property
    def uids(self) -> tuple[int, ...]:
        """The UIDs in order: sequence number ``n`` is ``uids[n - 1]``."""
        return tuple(message.uid for message in self.messages)


@attrs.frozen
class Changes:
    """What changed in a folder after a modification sequence (for NOOP, IDLE, POP3 snapshots).

    ``new`` are messages that arrived after ``since``; ``changed`` are older messages
    whose flags changed; ``expunged`` are UIDs removed after ``since`` (including ones
    that arrived and left in between: ignore UIDs you never saw). ``complete`` is False
    when ``since`` is older than the expunge history kept: compare your UIDs with
    ``Mailbox.uids()`` to learn what left. ``recent`` are the new UIDs this caller
    claimed as ``\\Recent`` (only with ``claim_recent=True``). Pass ``highest_modseq``
    as ``since`` next time.
    """

    folder: str
    uidvalidity: int
    since: int
    highest_modseq: int
    new: tuple[MessageInfo, ...]
    changed: tuple[MessageInfo, ...]
    expunged: tuple[int, ...]
    complete: bool = True
    recent: frozenset[int] = frozenset()

    @property
    def empty(self) -> bool:
        """True when nothing changed."""
        return not (self.new or self.changed or self.expunged) and self.complete


@attrs.frozen
class Notice:
    """A folder changed (pushed to watchers after the change was committed).

    ``kind`` is ``"messages"`` (arrivals, flags, expunges: ask ``changes``),
    ``"deleted"`` (the folder is gone) or ``"renamed"`` (``folder`` is the new name,
    ``old_name`` the old one). ``origin`` is the token the changing caller passed, so a
    session can tell its own changes from others'.
    """

    folder: str
    uidvalidity: int
    highest_modseq: int
    kind: str = "messages"
    old_name: str | None = None
    origin: object = None


@attrs.frozen
class Appended:
    """Where an appended or delivered message went (UIDPLUS APPENDUID)."""

    folder: str
    uidvalidity: int
    uid: int


@attrs.frozen
class Copied:
    """Where copied or moved messages went (UIDPLUS COPYUID): ``source[i]`` became ``destination[i]``."""

    uidvalidity: int
    source: tuple[int, ...]
    destination: tuple[int, ...]


@attrs.frozen
class Usage:
    """A user's storage use and limits (0 means no limit)."""

    bytes: int
    messages: int
    limit_bytes: int
    limit_messages: int


@attrs.frozen
class Delivered:
    """One recipient's copy was stored and committed: it is safe to acknowledge."""

    address: str
    uidvalidity: int
    uid: int


@attrs.frozen
class Refused:
    """One recipient's copy was not stored; ``temporary`` says whether a retry may work.

    ``reason`` is safe to show (no message content); ``enhanced_status`` is RFC 3463.
    """

    address: str
    reason: str
    temporary: bool
    enhanced_status: str


@attrs.frozen
class DeliveryReport:
    """The outcome of one delivery to several recipients, each on its own."""

    delivered: tuple[Delivered, ...]
    refused: tuple[Refused, ...]

    @property
    def all_delivered(self) -> bool:
        """True when every recipient got the message."""
        return not self.refused


@attrs.frozen
class SearchQuery:
    """Search criteria over metadata (IMAP SEARCH keys that need no message content).

    All given criteria must hold (AND); combine the UID lists of several queries for OR
    and NOT. ``uids`` limits to those UIDs (a ``range`` is efficient for large sets);
    ``flags`` must all be set and ``not_flags`` all unset (system flags or keywords);
    ``larger``/``smaller`` compare the size in bytes (strictly); ``before``/``on``/
    ``since`` compare the internal date's calendar day in its own time zone, as
    IMAP does; ``modseq`` keeps messages changed at or after that modification sequence.
    Header and body searches are the adapter's: the store keeps ciphertext.
    """

    uids: Collection[int] | None = None
    flags: frozenset[str] = frozenset()
    not_flags: frozenset[str] = frozenset()
    larger: int | None = None
    smaller: int | None = None
    before: datetime.date | None = None
    on: datetime.date | None = None
    since: datetime.date | None = None
    modseq: int | None = None

"""The state of one IMAP proxy session, as an explicit state machine (no I/O, no Twisted).

A proxy session has two views of the selected mailbox that drift apart:

- **upstream's view**: the message sequence upstream is using right now. Upstream's
  untagged ``EXISTS``, ``EXPUNGE`` and ``FETCH`` responses name messages by *its*
  sequence numbers, and change them at once;
- **the client's view**: the sequence numbers the client has been told about. IMAP
  forbids telling a client about expunges while it runs FETCH, STORE or SEARCH (RFC
  3501 section 7.4.1), and a client must never see a message number shift under it.

Gatekeeper always talks to upstream by UID, and translates the client's sequence
numbers through the client's view. Upstream changes wait in the *pending* sets
(expunged UIDs, new UIDs, changed flags) until the proxy reaches a point where the
client may be told (:meth:`SessionState.flush`), and are then applied to the client's
view in one step, producing the untagged responses to send.

Phases and the transitions allowed between them::

    AUTHENTICATED --begin_select--> SELECTING --selected--> SELECTED --begin_idle--> IDLING
         ^   ^                          |                   |  |  ^                    |
         |   +------select_failed-------+                   |  |  +-----end_idle-------+
         |                                                  |  +--begin_select--> SELECTING
         +----------------------closed----------------------+
    any phase --lost--> LOST (final)

A transition that is not in the table raises :class:`InvalidTransition`: a bug in the
proxy, never something a client or upstream can cause. Upstream's responses that make
no sense (an ``EXPUNGE`` of a message that does not exist) are counted in
:attr:`SessionState.anomalies` and otherwise ignored: a confused server must not crash
a session.

Memory: UIDs are kept in ``array('I')`` (4 bytes each), and the client's view shares
upstream's array until the two differ, so an idle session with a 10,000-message mailbox
selected costs about 40 KB here.
"""

from __future__ import annotations

import enum
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence

import attrs

from gatekeeper.interfaces import SelectInfo


class Phase(enum.Enum):
    """Where a proxy session is."""

    AUTHENTICATED = "authenticated"
    SELECTING = "selecting"
    SELECTED = "selected"
    IDLING = "idling"
    LOST = "lost"


class InvalidTransition(Exception):
    """The proxy asked for a transition the state machine does not allow (a bug)."""


class UidValidityChanged(Exception):
    """Upstream changed UIDVALIDITY of the selected mailbox: the client's view is void."""


@attrs.frozen
class Updates:
    """What the client must be told, in this order: expunges, then EXISTS/RECENT, then flags.

    ``expunged`` are client sequence numbers in the order to send them (each one valid at
    the moment it is sent: descending). ``flags`` maps client sequence numbers to their
    new flags, with the UID of each message in ``flag_uids``.
    """

    expunged: tuple[int, ...] = ()
    exists: int | None = None
    recent: int | None = None
    flags: tuple[tuple[int, int, tuple[str, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.expunged or self.exists is not None or self.recent is not None or self.flags)


_ALLOWED: dict[str, frozenset[Phase]] = {
    "begin_select": frozenset({Phase.AUTHENTICATED, Phase.SELECTED}),
    "selected": frozenset({Phase.SELECTING}),
    "select_failed": frozenset({Phase.SELECTING}),
    "closed": frozenset({Phase.SELECTED}),
    "begin_idle": frozenset({Phase.SELECTED, Phase.AUTHENTICATED}),
    "end_idle": frozenset({Phase.IDLING}),
}


class SessionState:
    """The phase of a proxy session and both views of its selected mailbox."""

    def __init__(self) -> None:
        self.phase = Phase.AUTHENTICATED
        self._idle_from = Phase.AUTHENTICATED
        self.mailbox: str | None = None
        self.readonly = False
        self.uidvalidity = 0
        self.uidnext = 0
        self.flags: tuple[str, ...] = ()
        self.permanent_flags: tuple[str, ...] | None = None
        self.anomalies = 0
        self._reset_views()

    def _reset_views(self) -> None:
        self._upstream: array[int] = array("I")
        self._client: array[int] = self._upstream
        self._unknown = 0  # messages upstream announced (EXISTS) whose UIDs are not known yet
        self._recent = 0
        self._recent_told: int | None = None
        self._expunged: set[int] = set()
        self._changed_flags: dict[int, tuple[str, ...]] = {}

    # -- transitions ---------------------------------------------------------------------

    def _transition(self, name: str, to: Phase) -> None:
        if self.phase not in _ALLOWED[name]:
            raise InvalidTransition(f"{name} in phase {self.phase.value}")
        self.phase = to

    def begin_select(self, name: str) -> None:
        """SELECT/EXAMINE sent upstream: the previous mailbox (if any) is gone for good."""
        self._transition("begin_select", Phase.SELECTING)
        self.mailbox = name
        self._reset_views()

    def selected(self, info: SelectInfo) -> None:
        """Upstream answered SELECT with ``info``: both views start equal."""
        self._transition("selected", Phase.SELECTED)
        self.mailbox = info.name
        self.readonly = info.readonly
        self.uidvalidity = info.uidvalidity
        self.uidnext = info.uidnext
        self.flags = info.flags
        self.permanent_flags = info.permanent_flags
        self._upstream = array("I", sorted(info.uids))
        self._client = self._upstream
        self._unknown = max(0, info.exists - len(self._upstream))
        self._recent = info.recent
        self._recent_told = info.recent

    def select_failed(self) -> None:
        """Upstream refused SELECT: nothing is selected (as after a failed SELECT upstream)."""
        self._transition("select_failed", Phase.AUTHENTICATED)
        self.mailbox = None
        self._reset_views()

    def closed(self) -> None:
        """CLOSE (or UNSELECT) completed upstream."""
        self._transition("closed", Phase.AUTHENTICATED)
        self.mailbox = None
        self._reset_views()

    def begin_idle(self) -> None:
        """The client started IDLE."""
        origin = self.phase
        self._transition("begin_idle", Phase.IDLING)
        self._idle_from = origin

    def end_idle(self) -> None:
        """The client ended IDLE (DONE)."""
        self._transition("end_idle", self._idle_from)

    def lost(self) -> None:
        """The upstream session is gone: every later command must fail."""
        self.phase = Phase.LOST

    @property
    def is_selected(self) -> bool:
        """Whether a mailbox is selected (also while the client idles in it)."""
        return self.phase is Phase.SELECTED or (self.phase is Phase.IDLING and self._idle_from is Phase.SELECTED)

    # -- upstream's untagged responses ---------------------------------------------------

    def _own_upstream(self) -> None:
        """Copy-on-write: give upstream's view its own array before changing it."""
        if self._upstream is self._client:
            self._upstream = array("I", self._upstream)

    def upstream_exists(self, count: int) -> None:
        """``* N EXISTS``: upstream now has ``count`` messages."""
        if not self.is_selected:
            return
        known = len(self._upstream)
        if count < known + self._unknown:
            # EXISTS may not shrink the mailbox (only EXPUNGE does): a confused server
            self.anomalies += 1
            return
        self._unknown = count - known

    def upstream_recent(self, count: int) -> None:
        """``* N RECENT``."""
        if self.is_selected:
            self._recent = count

    def upstream_expunge(self, seq: int) -> None:
        """``* N EXPUNGE``: upstream's message ``seq`` is gone; later ones move down."""
        if not self.is_selected:
            return
        known = len(self._upstream)
        if 1 <= seq <= known:
            self._own_upstream()
            uid = self._upstream.pop(seq - 1)
            self._changed_flags.pop(uid, None)
            if self._client_index(uid) is not None:
                self._expunged.add(uid)
        elif known < seq <= known + self._unknown:
            self._unknown -= 1
        else:
            self.anomalies += 1

    def upstream_fetch(self, seq: int, uid: int | None, flags: tuple[str, ...] | None) -> int | None:
        """``* N FETCH (...)``: learn a UID and/or remember changed flags; returns the UID if known."""
        if not self.is_selected:
            return uid
        known = len(self._upstream)
        if 1 <= seq <= known:
            have = self._upstream[seq - 1]
            if uid is not None and uid != have:
                self.anomalies += 1
                return None
            uid = have
        elif known < seq <= known + self._unknown:
            if uid is None:
                return None
            if seq == known + 1 and (not known or uid > self._upstream[-1]):
                # the first unknown message: learn it in place
                self._own_upstream()
                self._upstream.append(uid)
                self._unknown -= 1
            else:
                return uid  # learned later, in order, through learn_uids
        else:
            self.anomalies += 1
            return None
        if flags is not None and self._client_index(uid) is not None and uid not in self._expunged:
            self._changed_flags[uid] = flags
        return uid

    def upstream_uidvalidity(self, value: int) -> None:
        """``* OK [UIDVALIDITY n]`` outside SELECT: a change voids every UID the client has."""
        if self.is_selected and value != self.uidvalidity:
            raise UidValidityChanged(f"UIDVALIDITY of {self.mailbox} changed")

    @property
    def unknown_uids(self) -> int:
        """How many new upstream messages still need their UIDs fetched."""
        return self._unknown

    @property
    def highest_known_uid(self) -> int:
        """The highest UID in upstream's view (0 when empty)."""
        return self._upstream[-1] if self._upstream else 0

    def learn_uids(self, uids: Iterable[int]) -> None:
        """UIDs of the newest messages (``UID FETCH n:* (UID)``), in any order; known ones are ignored."""
        if not self.is_selected:
            return
        top = self.highest_known_uid
        fresh = sorted({u for u in uids if u > top})
        if len(fresh) > self._unknown:
            # more new messages than announced: more EXISTS will follow; take them now
            self._unknown = len(fresh)
        if fresh:
            self._own_upstream()
            self._upstream.extend(fresh)
            self._unknown -= len(fresh)
            self.uidnext = max(self.uidnext, fresh[-1] + 1)

    # -- the client's view ---------------------------------------------------------------

    def _client_index(self, uid: int) -> int | None:
        client = self._client
        index = bisect_left(client, uid)
        if index < len(client) and client[index] == uid:
            return index
        return None

    @property
    def exists(self) -> int:
        """The number of messages the client has been told about."""
        return len(self._client)

    @property
    def client_uids(self) -> Sequence[int]:
        """The client's view: UIDs by sequence number - 1 (read only)."""
        return self._client

    def uid_of(self, seq: int) -> int | None:
        """The UID of the client's message ``seq`` (None when out of range)."""
        if 1 <= seq <= len(self._client):
            return self._client[seq - 1]
        return None

    def seq_of(self, uid: int) -> int | None:
        """The client's sequence number of ``uid`` (None when the client does not know it)."""
        index = self._client_index(uid)
        return None if index is None else index + 1

    def is_expunged(self, uid: int) -> bool:
        """Whether ``uid`` is gone upstream but the client has not been told yet."""
        return uid in self._expunged

    def uids_for_sequence_set(self, ranges: Iterable[tuple[int | None, int | None]]) -> list[int]:
        """UIDs (ascending, no duplicates) of the client's messages in ``ranges`` of sequence numbers.

        A range is ``(low, high)``, 1-based and inclusive; None means ``*`` (the last).
        Numbers past the end are ignored (RFC 3501 lets a server do so for ``*``).
        """
        client = self._client
        count = len(client)
        chosen: set[int] = set()
        for given_low, high in ranges:
            low = count if given_low is None else given_low
            top = count if high is None else high
            if low > top:
                low, top = top, low
            low, top = max(low, 1), min(top, count)
            if low <= top:
                chosen.update(client[low - 1 : top])
        return sorted(chosen)

    def uids_for_uid_set(self, ranges: Iterable[tuple[int | None, int | None]]) -> list[int]:
        """UIDs (ascending) of the client's messages within ``ranges`` of UIDs (None: ``*``, the highest)."""
        client = self._client
        if not client:
            return []
        chosen: set[int] = set()
        highest = client[-1]
        for given_low, high in ranges:
            low = highest if given_low is None else given_low
            top = highest if high is None else high
            if low > top:
                low, top = top, low
            start = bisect_left(client, low)
            stop = bisect_left(client, top + 1)
            chosen.update(client[start:stop])
        return sorted(chosen)

    def flush(self, *, allow_expunge: bool = True) -> Updates:
        """Apply pending upstream changes to the client's view; return what to tell the client.

        ``allow_expunge`` is False while answering FETCH, STORE or SEARCH (RFC 3501
        7.4.1): expunges then stay pending, new messages and flag changes are told.
        """
        if not self.is_selected:
            return Updates()
        expunged: list[int] = []
        if allow_expunge and self._expunged:
            indexes = sorted((i for i in map(self._client_index, self._expunged) if i is not None), reverse=True)
            expunged = [i + 1 for i in indexes]
            self._expunged.clear()
            gone = {self._client[i] for i in indexes}
            self._client = array("I", (u for u in self._client if u not in gone))
        # new messages: what upstream knows beyond the client's highest UID
        top = self._client[-1] if self._client else 0
        start = bisect_left(self._upstream, top + 1)
        new = self._upstream[start:]
        exists: int | None = None
        if new:  # never while the views share one array: then nothing is new
            client = array("I", self._client)
            client.extend(new)
            self._client = client
            exists = len(client)
        if self._client is not self._upstream and not self._expunged and self._client == self._upstream:
            self._client = self._upstream  # the views agree again: share one array
        recent: int | None = None
        if exists is not None and self._recent != self._recent_told:
            recent = self._recent
            self._recent_told = self._recent
        changes = []
        for uid, flags in sorted(self._changed_flags.items()):
            seq = self.seq_of(uid)
            if seq is not None and uid not in self._expunged:
                changes.append((seq, uid, flags))
        self._changed_flags.clear()
        return Updates(tuple(expunged), exists, recent, tuple(changes))

    def forget_flag_changes(self, uids: Iterable[int]) -> None:
        """Drop pending flag changes for ``uids`` (the client was just sent their flags)."""
        for uid in uids:
            self._changed_flags.pop(uid, None)

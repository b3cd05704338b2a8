"""A recorder fake of the IMAP proxy's mail store, for tests without sockets.

:class:`RecordingStore` implements :class:`~gatekeeper.interfaces.IMailStoreSession`
over mailboxes in memory. It records every call (``calls``: method name and
arguments), answers FETCH items the way Dovecot does (content items through
:mod:`gatekeeper.imap_mime`, which matches Dovecot byte for byte), and lets a test
make the store report things on its own through ``events`` (EXISTS, EXPUNGE, FETCH).
``fail`` makes the next call of a method fail with the given exception.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from gatekeeper import imap_mime
from gatekeeper import imap_syntax as syntax
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

_ITEM = re.compile(rb"BODY(?:\.PEEK)?\[[^\]]*\](?:<\d+\.\d+>)?|[A-Z0-9.]+", re.IGNORECASE)
_SECTION = re.compile(rb"^BODY(\.PEEK)?\[([\d.]*?)\.?((?:HEADER\.FIELDS(?:\.NOT)?|HEADER|TEXT|MIME)?)"
                      rb"(?: \(([^)]*)\))?\](?:<(\d+)\.(\d+)>)?$", re.IGNORECASE)  # fmt: skip


@attrs.define
class StoredMessage:
    uid: int
    data: bytes
    flags: list[str] = attrs.Factory(list)
    internaldate: bytes = b"02-Jan-2023 10:00:00 +0000"


@attrs.define
class StoredMailbox:
    uidvalidity: int
    messages: list[StoredMessage] = attrs.Factory(list)
    uidnext: int = 1
    subscribed: bool = False

    def add(self, data: bytes, flags: Sequence[str] = ()) -> StoredMessage:
        message = StoredMessage(self.uidnext, data, list(flags))
        self.uidnext += 1
        self.messages.append(message)
        return message


def _sequence(uids: bytes, messages: list[StoredMessage]) -> list[StoredMessage]:
    top = messages[-1].uid if messages else 0
    wanted: set[int] = set()
    for part in uids.split(b","):
        low, colon, high = part.partition(b":")
        a = top if low == b"*" else int(low)
        b = a if not colon else (top if high == b"*" else int(high))
        wanted.update(range(min(a, b), max(a, b) + 1))
    chosen = [m for m in messages if m.uid in wanted]
    if not chosen and messages and b"*" in uids:
        chosen = [messages[-1]]  # "n:*" always names the last message
    return chosen


@implementer(IMailStoreSession)
class RecordingStore:
    """An in-memory mail store that records what the proxy asked of it."""

    def __init__(self, capabilities: Sequence[str] = ("IDLE", "UIDPLUS", "MOVE", "UNSELECT", "LITERAL+")) -> None:
        self.capabilities = frozenset(capabilities)
        self.delimiter = "."
        self.mailboxes: dict[str, StoredMailbox] = {"INBOX": StoredMailbox(1000)}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.events: IMailStoreEvents | None = None
        self.selected: str | None = None
        self.fail: dict[str, Exception] = {}
        self.idling = False
        self.logged_out = False
        self.search_result: Callable[[bytes], list[int]] | None = None

    # -- test helpers

    def add(self, mailbox: str, data: bytes, flags: Sequence[str] = ()) -> int:
        box = self.mailboxes.setdefault(mailbox, StoredMailbox(1000 + len(self.mailboxes)))
        return box.add(data, flags).uid

    def called(self, name: str) -> list[tuple[Any, ...]]:
        return [args for method, args in self.calls if method == name]

    def _record(self, name: str, *args: Any) -> Exception | None:
        self.calls.append((name, args))
        return self.fail.pop(name, None)

    def _box(self) -> StoredMailbox:
        assert self.selected is not None
        return self.mailboxes[self.selected]

    # -- IMailStoreSession

    def set_listener(self, events: IMailStoreEvents) -> None:
        self.events = events

    def list_mailboxes(self, reference: str, pattern: str, subscribed: bool = False) -> Deferred[list[MailboxEntry]]:
        error = self._record("list_mailboxes", reference, pattern, subscribed)
        if error:
            return fail(error)
        names = [n for n, box in self.mailboxes.items() if not subscribed or box.subscribed]
        return succeed([MailboxEntry(n, ".", ("\\HasNoChildren",)) for n in names])

    def status(self, mailbox: str, items: Sequence[str]) -> Deferred[dict[str, int]]:
        error = self._record("status", mailbox, tuple(items))
        if error or mailbox not in self.mailboxes:
            return fail(error or MailStoreError("no such mailbox", "NONEXISTENT"))
        box = self.mailboxes[mailbox]
        values = {"MESSAGES": len(box.messages), "UIDNEXT": box.uidnext, "UIDVALIDITY": box.uidvalidity}
        return succeed({k: values.get(k, 0) for k in items})

    def select(self, mailbox: str, readonly: bool = False) -> Deferred[SelectInfo]:
        error = self._record("select", mailbox, readonly)
        if error or mailbox not in self.mailboxes:
            self.selected = None
            return fail(error or MailStoreError("the upstream server refused SELECT", "NONEXISTENT"))
        self.selected = mailbox
        box = self.mailboxes[mailbox]
        uids = [m.uid for m in box.messages]
        return succeed(SelectInfo(mailbox, box.uidvalidity, box.uidnext, uids, ("\\Seen", "\\Deleted"),
                                  ("\\Seen", "\\Deleted", "\\*"), 0, len(uids), None, readonly))  # fmt: skip

    def close(self) -> Deferred[Any]:
        self._record("close")
        box = self._box()
        box.messages = [m for m in box.messages if "\\Deleted" not in m.flags]
        self.selected = None
        return succeed(b"")

    def unselect(self) -> Deferred[Any]:
        self._record("unselect")
        self.selected = None
        return succeed(b"")

    def _simple(self, name: str, *args: str) -> Deferred[Any]:
        error = self._record(name, *args)
        return fail(error) if error else succeed(b"")

    def create(self, mailbox: str) -> Deferred[Any]:
        self.mailboxes.setdefault(mailbox, StoredMailbox(2000 + len(self.mailboxes)))
        return self._simple("create", mailbox)

    def delete(self, mailbox: str) -> Deferred[Any]:
        return self._simple("delete", mailbox)

    def rename(self, old: str, new: str) -> Deferred[Any]:
        return self._simple("rename", old, new)

    def subscribe(self, mailbox: str) -> Deferred[Any]:
        return self._simple("subscribe", mailbox)

    def unsubscribe(self, mailbox: str) -> Deferred[Any]:
        return self._simple("unsubscribe", mailbox)

    def fetch(self, uids: bytes, items: bytes, sink: Callable[[FetchResponse], None]) -> Deferred[Any]:
        error = self._record("fetch", uids, items)
        if error:
            return fail(error)
        box = self._box()
        names = _ITEM.findall(items.strip()[1:-1] if items.startswith(b"(") else items)
        for message in _sequence(uids, box.messages):
            parts = []
            view = imap_mime.describe(message.data)
            for name in names:
                upper = name.upper()
                if upper == b"UID":
                    parts.append(b"UID %d" % message.uid)
                elif upper == b"FLAGS":
                    parts.append(b"FLAGS (" + " ".join(message.flags).encode() + b")")
                elif upper == b"INTERNALDATE":
                    parts.append(b'INTERNALDATE "' + message.internaldate + b'"')
                elif upper == b"RFC822.SIZE":
                    parts.append(b"RFC822.SIZE %d" % view.size)
                elif upper == b"ENVELOPE":
                    parts.append(b"ENVELOPE " + view.envelope)
                elif upper == b"BODYSTRUCTURE":
                    parts.append(b"BODYSTRUCTURE " + view.bodystructure)
                elif upper == b"BODY":
                    parts.append(b"BODY " + view.body)
                else:
                    match = _SECTION.match(name)
                    assert match, name
                    peek, numbers, specifier, fields, start, length = match.groups()
                    nums = tuple(int(n) for n in numbers.split(b".") if n)
                    wanted = tuple((fields or b"").split())
                    data = imap_mime.section(message.data, view, nums, specifier.upper().decode(), wanted)
                    if start is not None:
                        data = imap_mime.partial(data, int(start), int(length))
                    if not peek and "\\Seen" not in message.flags:
                        message.flags.append("\\Seen")
                    label = name.replace(b".PEEK", b"").replace(b".peek", b"")
                    if start is not None:
                        label = label[: label.rindex(b"<")] + b"<%s>" % start
                    parts.append(label + b" " + syntax.literal(data))
            seq = box.messages.index(message) + 1
            sink(FetchResponse(seq, message.uid, b"(" + b" ".join(parts) + b")"))
        return succeed(b"")

    def search(self, criteria: bytes, charset: str | None = None) -> Deferred[list[int]]:
        error = self._record("search", criteria, charset)
        if error:
            return fail(error)
        box = self._box()
        if self.search_result is not None:
            return succeed(self.search_result(criteria))
        return succeed([m.uid for m in box.messages])

    def store(self, uids: bytes, operation: bytes, flags: Sequence[str]) -> Deferred[Any]:
        error = self._record("store", uids, operation, tuple(flags))
        if error:
            return fail(error)
        box = self._box()
        for message in _sequence(uids, box.messages):
            if operation.startswith(b"+"):
                message.flags += [f for f in flags if f not in message.flags]
            elif operation.startswith(b"-"):
                message.flags = [f for f in message.flags if f not in flags]
            else:
                message.flags = list(flags)
            if not operation.endswith(b".SILENT") and self.events is not None:
                seq = box.messages.index(message) + 1
                flag_text = " ".join(message.flags).encode()
                self.events.fetched(FetchResponse(seq, message.uid, b"(UID %d FLAGS (%s))" % (message.uid, flag_text)))
        return succeed(b"")

    def _copy(self, name: str, uids: bytes, mailbox: str) -> tuple[Exception | None, CopiedUids | None]:
        error = self._record(name, uids, mailbox)
        if error or mailbox not in self.mailboxes:
            return error or MailStoreError("the upstream server refused COPY", "TRYCREATE"), None
        target = self.mailboxes[mailbox]
        source = _sequence(uids, self._box().messages)
        added = [target.add(m.data, m.flags) for m in source]
        return None, CopiedUids(target.uidvalidity, tuple(m.uid for m in source), tuple(m.uid for m in added))

    def copy(self, uids: bytes, mailbox: str) -> Deferred[CopiedUids | None]:
        error, copied = self._copy("copy", uids, mailbox)
        return fail(error) if error else succeed(copied)

    def move(self, uids: bytes, mailbox: str) -> Deferred[CopiedUids | None]:
        error, copied = self._copy("move", uids, mailbox)
        if error:
            return fail(error)
        assert copied is not None
        self._expunge_uids(set(copied.source))
        return succeed(copied)

    def _expunge_uids(self, uids: set[int]) -> None:
        box = self._box()
        for index in range(len(box.messages) - 1, -1, -1):
            if box.messages[index].uid in uids:
                del box.messages[index]
                if self.events is not None:
                    self.events.expunged(index + 1)

    def expunge(self, uids: bytes | None = None) -> Deferred[Any]:
        error = self._record("expunge", uids)
        if error:
            return fail(error)
        box = self._box()
        chosen = {m.uid for m in (_sequence(uids, box.messages) if uids else box.messages)}
        self._expunge_uids({m.uid for m in box.messages if m.uid in chosen and "\\Deleted" in m.flags})
        return succeed(b"")

    def append(
        self, mailbox: str, message: bytes, flags: Sequence[str] = (), date: bytes | None = None
    ) -> Deferred[Appended]:
        error = self._record("append", mailbox, message, tuple(flags), date)
        if error or mailbox not in self.mailboxes:
            return fail(error or MailStoreError("no such mailbox", "TRYCREATE"))
        box = self.mailboxes[mailbox]
        stored = box.add(message, flags)
        if mailbox == self.selected and self.events is not None:
            self.events.exists(len(box.messages))
        return succeed(Appended(box.uidvalidity, stored.uid))

    def noop(self) -> Deferred[Any]:
        return self._simple("noop")

    def idle(self) -> Deferred[Any]:
        self.idling = True
        return self._simple("idle")

    def stop_idle(self) -> Deferred[Any]:
        self.idling = False
        return self._simple("stop_idle")

    def logout(self) -> Deferred[Any]:
        self.logged_out = True
        return self._simple("logout")

"""Test helpers for the embedded store behind a running gateway: the store itself, and IMAP straight to it.

:func:`local_store` gives the :class:`~gatekeeper.localstore.LocalStore` of a
:class:`~gatekeeper.testing.gateway.GatewayHarness`: the running gateway's own (the
store is locked by one owner), or one opened for the moment while the gateway is
stopped. :class:`DirectImap` answers a few ``imaplib`` calls straight from a
:class:`~gatekeeper.localstore.imap.LocalImapSession`, not through the proxy: what
"asking the mail server directly" means when the mail server is the embedded store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from twisted.internet.threads import blockingCallFromThread

from gatekeeper import imap_syntax
from gatekeeper.interfaces import FetchResponse, SelectInfo
from gatekeeper.localstore import INBOX, LocalStore
from gatekeeper.localstore.embedded import EmbeddedStore
from gatekeeper.localstore.imap import LocalImapSession
from gatekeeper.testing.gateway import GatewayHarness


def embedded(harness: GatewayHarness) -> EmbeddedStore | None:
    """The running gateway's embedded store (None when the gateway is stopped)."""
    if harness.service is None:
        return None
    store: EmbeddedStore | None = harness.service.parts.mail_store  # type: ignore[attr-defined]
    return store


@contextlib.contextmanager
def local_store(harness: GatewayHarness) -> Iterator[LocalStore]:
    """The harness's mail store, open (the gateway's own while it runs)."""
    running = embedded(harness)
    if running is not None and running.store is not None:
        yield running.store.store
        return
    store = LocalStore.from_config(harness.config)
    try:
        yield store
    finally:
        store.close()


def remove_all(harness: GatewayHarness, addresses: Any) -> None:
    """Delete these users' mailboxes (a fresh INBOX, Sent, Drafts and Trash come back on first use)."""
    with local_store(harness) as store:
        for address in addresses:
            store.remove_mailbox(address)


def uidls(harness: GatewayHarness, address: str) -> list[bytes]:
    """The UIDL the embedded store gives each INBOX message: ``<uidvalidity>.<uid>``."""
    with local_store(harness) as store:
        status = store.mailbox(address).status(INBOX)
        return [b"%d.%d" % (status.uidvalidity, uid) for uid in store.mailbox(address).uids(INBOX)]


class DirectImap:
    """``select``, ``fetch`` and ``uid("FETCH", ...)`` answered as imaplib would, from a store session (in a thread)."""

    def __init__(self, reactor: Any, session: LocalImapSession) -> None:
        self.reactor = reactor
        self.session = session
        self.info: SelectInfo | None = None

    def _call(self, method: Any, *args: Any) -> Any:
        return blockingCallFromThread(self.reactor, method, *args)

    def select(self, mailbox: str = "INBOX", readonly: bool = False) -> tuple[str, list[bytes]]:
        self.info = self._call(self.session.select, mailbox, readonly)
        return "OK", [b"%d" % self.info.exists]

    def _fetch(self, uids: list[int], query: str, with_uid: bool) -> tuple[str, list[bytes]]:
        assert self.info is not None
        answers: list[FetchResponse] = []
        self._call(self.session.fetch, imap_syntax.sequence_set(uids), query.encode(), answers.append)
        lines = []
        for answer in answers:
            data = answer.data
            if not with_uid:
                assert data.startswith(b"(UID %d" % answer.uid)  # the store always answers UID first
                data = b"(" + data[len(b"(UID %d" % answer.uid) :].lstrip(b" ")
            lines.append(b"%d %s" % (answer.seq, data))
        return "OK", lines

    def fetch(self, messages: str, query: str) -> tuple[str, list[bytes]]:
        assert self.info is not None and messages == "1:*"
        return self._fetch(list(self.info.uids), query, "UID" in query.upper())

    def uid(self, command: str, messages: str, query: str) -> tuple[str, list[bytes]]:
        assert self.info is not None and command.upper() == "FETCH" and messages == "1:*"
        return self._fetch(list(self.info.uids), query, True)

    def close(self) -> None:
        self._call(self.session.logout)

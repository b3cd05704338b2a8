"""The POP3 proxy's maildrop over the embedded store: each user's INBOX.

:class:`LocalPop3Upstream` opens a :class:`LocalMaildrop` per session: the INBOX as it
is when the session opens (POP3's numbering), each message named by UIDL
``<uidvalidity>.<uid>``, stable across sessions and restarts. Messages are read as
stored (what left the SMTP proxy: ciphertext for encrypted mail; the proxy reveals
them). Deletions happen only at :meth:`LocalMaildrop.commit`, in one transaction of
the store, and only of the messages named: a message another session (IMAP) deleted
meanwhile is simply gone, never an error that loses the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from zope.interface import implementer

from gatekeeper.errors import UpstreamRefused, UpstreamUnavailable
from gatekeeper.interfaces import IPop3Maildrop, IPop3Upstream, MaildropEntry, UpstreamLogin
from gatekeeper.localstore.embedded import EmbeddedStore
from gatekeeper.localstore.errors import LocalStoreError, NoSuchMessage, StoreUnavailable
from gatekeeper.localstore.facade import AsyncMailbox
from gatekeeper.localstore.names import INBOX


def _translated(error: LocalStoreError) -> Exception:
    if isinstance(error, StoreUnavailable):
        return UpstreamUnavailable(str(error))
    return UpstreamRefused(str(error), code="SYS/PERM")


@implementer(IPop3Upstream)
class LocalPop3Upstream:
    """Opens users' INBOX in the embedded store (the gateway login is the only login)."""

    def __init__(self, store: EmbeddedStore) -> None:
        self.store = store

    async def open(self, login: UpstreamLogin) -> LocalMaildrop:
        """The maildrop of ``login.address`` as it is now."""
        opened = self.store.opened
        try:
            mailbox = await opened.mailbox(login.address)
            selection = await mailbox.select(INBOX, readonly=True)  # claims no \Recent: POP3 has none
        except LocalStoreError as error:
            raise _translated(error) from None
        maildrop = LocalMaildrop(mailbox, selection.status.uidvalidity, [(m.uid, m.size) for m in selection.messages])
        maildrop.alive = lambda: self.store.store is opened  # a session ends with the store it was opened on
        return maildrop


@implementer(IPop3Maildrop)
class LocalMaildrop:
    """One POP3 session over a user's INBOX (the message list fixed at the start)."""

    def __init__(self, mailbox: AsyncMailbox, uidvalidity: int, messages: Sequence[tuple[int, int]]) -> None:
        self.mailbox = mailbox
        self.uidvalidity = uidvalidity
        self.uids = [uid for uid, _ in messages]
        self.entries = tuple(MaildropEntry(b"%d.%d" % (uidvalidity, uid), size) for uid, size in messages)
        self.closed = False
        self.alive: Callable[[], bool] = lambda: True

    def _check(self) -> None:
        if not self.alive():
            self.closed = True
        if self.closed:
            raise UpstreamUnavailable("the POP3 session is closed")

    async def _read(self, index: int) -> bytes:
        self._check()
        try:
            return await self.mailbox.read_message(INBOX, self.uids[index], uidvalidity=self.uidvalidity)
        except NoSuchMessage:
            raise UpstreamRefused("the message was deleted by another session", code="SYS/PERM") from None
        except LocalStoreError as error:
            raise _translated(error) from None

    async def retrieve(self, index: int) -> bytes:
        """The whole message as stored."""
        return await self._read(index)

    async def top(self, index: int, lines: int) -> bytes:
        """The header and the first ``lines`` lines of the body, as stored."""
        data = await self._read(index)
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return data
        position = end + 4
        for _ in range(lines):
            found = data.find(b"\r\n", position)
            if found < 0:
                return data
            position = found + 2
        return data[:position]

    async def commit(self, deleted: Sequence[int]) -> None:
        """Delete exactly these messages (committed when this returns) and end the session."""
        self._check()
        uids = [self.uids[index] for index in deleted]
        try:
            if uids:
                await self.mailbox.delete_messages(INBOX, uids, uidvalidity=self.uidvalidity)
        except LocalStoreError as error:
            raise _translated(error) from None
        finally:
            self.closed = True

    def close(self) -> None:
        """End the session, deleting nothing."""
        self.closed = True


__all__ = ["LocalMaildrop", "LocalPop3Upstream"]

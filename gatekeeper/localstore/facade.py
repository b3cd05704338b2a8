"""The local store for the reactor thread: every blocking call runs in an injected thread pool.

:class:`AsyncLocalStore` and :class:`AsyncMailbox` mirror
:class:`~gatekeeper.localstore.store.LocalStore` and
:class:`~gatekeeper.localstore.mailbox.Mailbox` method for method, as coroutines
(bridge with ``Deferred.fromCoroutine`` where Twisted wants a Deferred). Errors are the
same :mod:`gatekeeper.localstore.errors`. Watchers are called on the reactor thread.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from typing import Any, BinaryIO, TypeVar

from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from gatekeeper.localstore.files import CHUNK, MessageSource
from gatekeeper.localstore.mailbox import Mailbox
from gatekeeper.localstore.names import INBOX
from gatekeeper.localstore.store import LocalStore
from gatekeeper.localstore.types import (
    Appended,
    Changes,
    Copied,
    DeliveryReport,
    FolderInfo,
    FolderStatus,
    MessageInfo,
    Notice,
    SearchQuery,
    Selection,
    Usage,
)

T = TypeVar("T")


class _Runner:
    def __init__(self, reactor: IReactorFromThreads, threadpool: ThreadPool) -> None:
        self.reactor = reactor
        self.threadpool = threadpool

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        result: T = await deferToThreadPool(self.reactor, self.threadpool, function, *args, **kwargs)
        return result


class AsyncLocalStore:
    """:class:`LocalStore` with coroutines; ``threadpool`` runs the blocking work (start and stop it yourself)."""

    def __init__(self, store: LocalStore, *, reactor: IReactorFromThreads, threadpool: ThreadPool) -> None:
        self.store = store
        self._runner = _Runner(reactor, threadpool)

    def is_local_domain(self, address: str) -> bool:
        """True when the address's domain is a local one (no I/O)."""
        return self.store.is_local_domain(address)

    async def check_recipient(self, address: str, size: int | None = None) -> str:
        """See :meth:`LocalStore.check_recipient`."""
        return await self._runner.run(self.store.check_recipient, address, size)

    async def deliver(
        self, recipients: Iterable[str], message: MessageSource, *, folder: str = INBOX
    ) -> DeliveryReport:
        """See :meth:`LocalStore.deliver`."""
        return await self._runner.run(self.store.deliver, list(recipients), message, folder=folder)

    async def mailbox(self, address: str) -> AsyncMailbox:
        """See :meth:`LocalStore.mailbox` (opening may run the recovery: it is not instant)."""
        mailbox = await self._runner.run(self.store.mailbox, address)
        return AsyncMailbox(mailbox, self._runner)

    async def remove_mailbox(self, address: str) -> bool:
        """See :meth:`LocalStore.remove_mailbox`."""
        return await self._runner.run(self.store.remove_mailbox, address)

    async def close(self) -> None:
        """Close the store in the pool (waits for operations under way)."""
        await self._runner.run(self.store.close)


class AsyncMailbox:
    """:class:`Mailbox` with coroutines (see its methods for the semantics)."""

    def __init__(self, mailbox: Mailbox, runner: _Runner) -> None:
        self.mailbox = mailbox
        self.address = mailbox.address
        self._runner = runner

    def watch(self, callback: Callable[[Notice], None]) -> Callable[[], None]:
        """Call ``callback(notice)`` on the reactor thread after each committed change; returns the cancel function."""
        reactor = self._runner.reactor
        return self.mailbox.watch(lambda notice: reactor.callFromThread(callback, notice))

    async def folders(self) -> list[FolderInfo]:
        """See :meth:`Mailbox.folders`."""
        return await self._runner.run(self.mailbox.folders)

    async def create_folder(self, name: str, *, special_use: str | None = None) -> str:
        """See :meth:`Mailbox.create_folder`."""
        return await self._runner.run(self.mailbox.create_folder, name, special_use=special_use)

    async def delete_folder(self, name: str, *, origin: object = None) -> None:
        """See :meth:`Mailbox.delete_folder`."""
        await self._runner.run(self.mailbox.delete_folder, name, origin=origin)

    async def rename_folder(self, old: str, new: str, *, origin: object = None) -> str:
        """See :meth:`Mailbox.rename_folder`."""
        return await self._runner.run(self.mailbox.rename_folder, old, new, origin=origin)

    async def subscribe(self, name: str) -> None:
        """See :meth:`Mailbox.subscribe`."""
        await self._runner.run(self.mailbox.subscribe, name)

    async def unsubscribe(self, name: str) -> None:
        """See :meth:`Mailbox.unsubscribe`."""
        await self._runner.run(self.mailbox.unsubscribe, name)

    async def subscriptions(self) -> list[str]:
        """See :meth:`Mailbox.subscriptions`."""
        return await self._runner.run(self.mailbox.subscriptions)

    async def status(self, name: str) -> FolderStatus:
        """See :meth:`Mailbox.status`."""
        return await self._runner.run(self.mailbox.status, name)

    async def select(self, name: str, *, readonly: bool = False) -> Selection:
        """See :meth:`Mailbox.select`."""
        return await self._runner.run(self.mailbox.select, name, readonly=readonly)

    async def messages(
        self, name: str, uids: Collection[int] | None = None, *, uidvalidity: int | None = None
    ) -> list[MessageInfo]:
        """See :meth:`Mailbox.messages`."""
        return await self._runner.run(self.mailbox.messages, name, uids, uidvalidity=uidvalidity)

    async def message(self, name: str, uid: int, *, uidvalidity: int | None = None) -> MessageInfo:
        """See :meth:`Mailbox.message`."""
        return await self._runner.run(self.mailbox.message, name, uid, uidvalidity=uidvalidity)

    async def uids(self, name: str, *, uidvalidity: int | None = None) -> list[int]:
        """See :meth:`Mailbox.uids`."""
        return await self._runner.run(self.mailbox.uids, name, uidvalidity=uidvalidity)

    async def open_message(self, name: str, uid: int, *, uidvalidity: int | None = None) -> BinaryIO:
        """See :meth:`Mailbox.open_message` (opened in the pool; reading a page-cached file is quick)."""
        return await self._runner.run(self.mailbox.open_message, name, uid, uidvalidity=uidvalidity)

    async def read_message(self, name: str, uid: int, *, uidvalidity: int | None = None) -> bytes:
        """See :meth:`Mailbox.read_message`."""
        return await self._runner.run(self.mailbox.read_message, name, uid, uidvalidity=uidvalidity)

    async def chunks(
        self, name: str, uid: int, *, uidvalidity: int | None = None, size: int = CHUNK
    ) -> AsyncIterator[bytes]:
        """A message's bytes in chunks of at most ``size``, each read in the pool (for large messages)."""
        handle = await self.open_message(name, uid, uidvalidity=uidvalidity)
        try:
            while chunk := await self._runner.run(handle.read, size):
                yield chunk
        finally:
            handle.close()

    async def check_quota(self, size: int, count: int = 1) -> None:
        """See :meth:`Mailbox.check_quota`."""
        await self._runner.run(self.mailbox.check_quota, size, count)

    async def usage(self) -> Usage:
        """See :meth:`Mailbox.usage`."""
        return await self._runner.run(self.mailbox.usage)

    async def append(
        self,
        name: str,
        message: MessageSource,
        *,
        flags: Iterable[str] = (),
        internal_date: datetime.datetime | None = None,
        origin: object = None,
    ) -> Appended:
        """See :meth:`Mailbox.append`."""
        return await self._runner.run(
            self.mailbox.append, name, message, flags=list(flags), internal_date=internal_date, origin=origin
        )

    async def set_flags(
        self,
        name: str,
        uids: Collection[int],
        flags: Iterable[str],
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> list[MessageInfo]:
        """See :meth:`Mailbox.set_flags`."""
        return await self._runner.run(
            self.mailbox.set_flags, name, uids, list(flags), uidvalidity=uidvalidity, origin=origin
        )

    async def add_flags(
        self,
        name: str,
        uids: Collection[int],
        flags: Iterable[str],
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> list[MessageInfo]:
        """See :meth:`Mailbox.add_flags`."""
        return await self._runner.run(
            self.mailbox.add_flags, name, uids, list(flags), uidvalidity=uidvalidity, origin=origin
        )

    async def remove_flags(
        self,
        name: str,
        uids: Collection[int],
        flags: Iterable[str],
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> list[MessageInfo]:
        """See :meth:`Mailbox.remove_flags`."""
        return await self._runner.run(
            self.mailbox.remove_flags, name, uids, list(flags), uidvalidity=uidvalidity, origin=origin
        )

    async def expunge(
        self,
        name: str,
        uids: Collection[int] | None = None,
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> list[int]:
        """See :meth:`Mailbox.expunge`."""
        return await self._runner.run(self.mailbox.expunge, name, uids, uidvalidity=uidvalidity, origin=origin)

    async def delete_messages(
        self,
        name: str,
        uids: Collection[int],
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> list[int]:
        """See :meth:`Mailbox.delete_messages`."""
        return await self._runner.run(self.mailbox.delete_messages, name, uids, uidvalidity=uidvalidity, origin=origin)

    async def copy(
        self,
        name: str,
        uids: Collection[int],
        target: str,
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> Copied:
        """See :meth:`Mailbox.copy`."""
        return await self._runner.run(self.mailbox.copy, name, uids, target, uidvalidity=uidvalidity, origin=origin)

    async def move(
        self,
        name: str,
        uids: Collection[int],
        target: str,
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> Copied:
        """See :meth:`Mailbox.move`."""
        return await self._runner.run(self.mailbox.move, name, uids, target, uidvalidity=uidvalidity, origin=origin)

    async def search(self, name: str, query: SearchQuery, *, uidvalidity: int | None = None) -> list[int]:
        """See :meth:`Mailbox.search`."""
        return await self._runner.run(self.mailbox.search, name, query, uidvalidity=uidvalidity)

    async def changes(
        self, name: str, since: int, *, claim_recent: bool = False, uidvalidity: int | None = None
    ) -> Changes:
        """See :meth:`Mailbox.changes`."""
        return await self._runner.run(
            self.mailbox.changes, name, since, claim_recent=claim_recent, uidvalidity=uidvalidity
        )

"""The embedded store as the gateway runs it: opened when the gateway starts, closed when it stops.

:class:`EmbeddedStore` is the one object the SMTP, POP3 and IMAP sides of the embedded
default share (:mod:`gatekeeper.localstore.relay`, :mod:`gatekeeper.localstore.pop3`,
:mod:`gatekeeper.localstore.imap`). It is a Twisted service: :meth:`startService`
opens the :class:`~gatekeeper.localstore.store.LocalStore` (taking its lock file) and a
thread pool for its blocking work, :meth:`stopService` closes both. While it is closed
(before the start, after the stop, or when the store could not be opened) every
operation fails with :class:`~gatekeeper.errors.UpstreamUnavailable`, which the
protocols answer as a temporary failure: nothing is lost, clients retry.

:func:`translated` turns the store's errors into the vocabulary of the proxies'
upstream interfaces, once, at this edge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from gatekeeper.config import Config
from gatekeeper.errors import UpstreamUnavailable
from gatekeeper.interfaces import MailStoreError
from gatekeeper.localstore.errors import LocalStoreError, NoSuchFolder, StoreUnavailable
from gatekeeper.localstore.facade import AsyncLocalStore
from gatekeeper.localstore.mailbox import NO_QUOTA, Quota
from gatekeeper.localstore.store import LocalStore

log = Logger(namespace="gatekeeper.localstore")

T = TypeVar("T")

POOL_THREADS = 8  # each mailbox serialises its own work; more threads serve more users at once


class EmbeddedStore(Service):
    """The local store and its thread pool, opened and closed with the gateway.

    ``settings`` are what :class:`LocalStore` takes (``data_dir``, ``domains``,
    ``users``, ``quota``). ``stop_reactor`` is called when the store cannot be opened
    at start (another process holds it, the disk refuses): the gateway must not run
    without its mail.
    """

    def __init__(
        self,
        reactor: Any,
        data_dir: Any,
        *,
        domains: tuple[str, ...] = (),
        users: Callable[[str], bool] | None = None,
        quota: Quota = NO_QUOTA,
        stop_reactor: Callable[[], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.data_dir = data_dir
        self.domains = domains
        self.users = users
        self.quota = quota
        self.stop_reactor = stop_reactor
        self.pool: ThreadPool | None = None
        self.store: AsyncLocalStore | None = None

    @classmethod
    def from_config(cls, config: Config, reactor: Any, *, users: Callable[[str], bool] | None = None) -> EmbeddedStore:
        """The store ``[upstream.store]`` describes, for the ``[server] domains``."""
        settings = config.upstream.store
        return cls(
            reactor,
            settings.data_dir,
            domains=config.server.domains,
            users=users,
            quota=Quota(bytes=settings.quota_bytes, messages=settings.quota_messages),
            stop_reactor=lambda: reactor.callWhenRunning(reactor.stop),
        )

    # -- life cycle ---------------------------------------------------------------------

    def open(self) -> AsyncLocalStore:
        """Open the store now (``startService`` does); raises the store's errors."""
        if self.store is not None:
            return self.store
        local = LocalStore(self.data_dir, domains=self.domains, users=self.users, quota=self.quota)
        pool = ThreadPool(minthreads=1, maxthreads=POOL_THREADS, name="gatekeeper-localstore")
        pool.start()
        self.pool = pool
        self.store = AsyncLocalStore(local, reactor=self.reactor, threadpool=pool)
        return self.store

    def close(self) -> Deferred[None]:
        """Close the store (waiting for work under way) and stop the pool; fires when done."""
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        store, self.store = self.store, None
        pool, self.pool = self.pool, None
        try:
            if store is not None:
                await store.close()
        finally:
            if pool is not None:
                pool.stop()

    def startService(self) -> None:
        """Open the store; if it cannot be opened, say why and stop the gateway."""
        super().startService()
        try:
            self.open()
        except (LocalStoreError, OSError) as error:
            log.critical("cannot open the mail store in {data_dir}: {reason}; stopping", data_dir=str(self.data_dir),
                         reason=str(error))  # fmt: skip
            if self.stop_reactor is not None:
                self.stop_reactor()

    def stopService(self) -> Deferred[None]:
        """Close the store."""
        super().stopService()
        return self.close()

    # -- for the adapters -----------------------------------------------------------------

    @property
    def opened(self) -> AsyncLocalStore:
        """The open store, or :class:`UpstreamUnavailable` when it is closed."""
        store = self.store
        if store is None:
            raise UpstreamUnavailable("the mail store is not open")
        return store

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Run a blocking function in the store's pool (its errors are the caller's to translate)."""
        pool = self.pool
        if pool is None or self.store is None:
            raise UpstreamUnavailable("the mail store is not open")
        result: T = await deferToThreadPool(self.reactor, pool, function, *args)
        return result


def translated(error: LocalStoreError, *, target: bool = False) -> Exception:
    """The store's error as the proxies' interfaces say it.

    :class:`StoreUnavailable` becomes :class:`UpstreamUnavailable` (temporary: the
    client retries); anything else a :class:`~gatekeeper.interfaces.MailStoreError`
    with the error's IMAP response code (``TRYCREATE`` for a missing ``target`` folder
    of COPY, MOVE or APPEND). The store's messages name folders and addresses, never
    message content, so they are safe to show.
    """
    if isinstance(error, StoreUnavailable):
        return UpstreamUnavailable(str(error))
    code = "TRYCREATE" if target and isinstance(error, NoSuchFolder) else error.imap_code
    return MailStoreError(str(error), code)


__all__ = ["EmbeddedStore", "translated"]

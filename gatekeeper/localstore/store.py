"""The local mail store: every user's :class:`~gatekeeper.localstore.mailbox.Mailbox` under one data directory.

Layout (directories 0700, files 0600)::

    <data_dir>/.lock                       held (flock) by the one process using the store
    <data_dir>/mailboxes/<safe name>/      one user's mailbox (see gatekeeper.localstore.mailbox)

The safe name is the key store's (:func:`gatekeeper.keys.store.safe_name`): built from
the case-folded address, so ``Bob@`` and ``bob@`` share a mailbox and no address reaches
outside ``mailboxes/``.

Delivery (:meth:`LocalStore.deliver`) is for the local domains (``[server] domains``):
an address elsewhere raises :class:`NotLocalDomain` (the SMTP adapter relays it or
refuses it), an unknown local user :class:`UnknownMailbox` (permanent). The bytes are
written and fsync-ed once, into the first recipient's ``INBOX/tmp``, then hard-linked
into every other recipient's ``new/`` and renamed into the first one's: each copy is
committed on its own, and :class:`~gatekeeper.localstore.types.Delivered` means that
copy survives a crash.
"""

from __future__ import annotations

import fcntl
import functools
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from twisted.logger import Logger

from gatekeeper.address import address_key, domain_of, normalize_address
from gatekeeper.config import Config
from gatekeeper.errors import InvalidAddress
from gatekeeper.events import emit
from gatekeeper.keys.store import safe_name
from gatekeeper.localstore import files
from gatekeeper.localstore.errors import (
    LocalStoreError,
    NotLocalDomain,
    StoreUnavailable,
    UnknownMailbox,
)
from gatekeeper.localstore.files import MessageSource
from gatekeeper.localstore.mailbox import NO_QUOTA, Mailbox, Quota
from gatekeeper.localstore.names import INBOX
from gatekeeper.localstore.types import Delivered, DeliveryReport, Refused

log = Logger(namespace="gatekeeper.localstore")

LOCK_FILE = ".lock"
MAILBOXES = "mailboxes"


@functools.lru_cache(maxsize=4096)
def _normalized(address: str) -> str:
    # IDNA checks cost ~50 us per address; deliveries and logins repeat the same few.
    return normalize_address(address)


class LocalStore:
    """Every user's mailbox under ``data_dir``; synchronous and thread-safe.

    ``domains`` are the local domains (``[server] domains``; with none, an address is
    local exactly when ``users`` knows it). ``users(address) -> bool`` tells whether a
    user exists (the key store: ``lambda a: key_store.get_user(a) is not None``); it is
    asked before a mailbox is created, never for one that exists. None means every
    address in a local domain may have a mailbox. ``quota`` applies to each user.

    Opening takes an exclusive lock on ``<data_dir>/.lock``: a second process (or a
    second store in this one) gets :class:`StoreUnavailable` until :meth:`close`.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        domains: Iterable[str] = (),
        users: Callable[[str], bool] | None = None,
        quota: Quota = NO_QUOTA,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = files.private_dir(Path(data_dir))
        self.domains = frozenset(domain.lower().rstrip(".") for domain in domains)
        self.users = users
        self.quota = quota
        self.clock = clock
        self._lock = threading.Lock()
        self._mailboxes: dict[str, Mailbox] = {}
        self._lock_fd = self._take_lock()
        try:
            self._root = files.private_dir(self.data_dir / MAILBOXES)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._closed = False

    @classmethod
    def from_config(cls, config: Config, *, users: Callable[[str], bool] | None = None) -> LocalStore:
        """The store ``[upstream.store]`` describes, for the ``[server] domains``."""
        settings = config.upstream.store
        return cls(
            settings.data_dir,
            domains=config.server.domains,
            users=users,
            quota=Quota(bytes=settings.quota_bytes, messages=settings.quota_messages),
        )

    def _take_lock(self) -> int:
        path = self.data_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise files.unavailable(f"cannot open {path}", error) from None
        try:
            os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreUnavailable(f"the mail store {self.data_dir} is in use by another process") from None
        return fd

    def close(self) -> None:
        """Close every mailbox and release the lock. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            mailboxes, self._mailboxes = list(self._mailboxes.values()), {}
        for mailbox in mailboxes:
            mailbox.close()
        os.close(self._lock_fd)

    # -- addresses and users --------------------------------------------------------------

    def is_local_domain(self, address: str) -> bool:
        """True when the address's domain is one of ``domains`` (no I/O; False for a bad address)."""
        try:
            return domain_of(_normalized(address)) in self.domains
        except InvalidAddress:
            return False

    def check_recipient(self, address: str, size: int | None = None) -> str:
        """Tell whether mail for ``address`` can be delivered here; returns the normalised address.

        Raises :class:`~gatekeeper.errors.InvalidAddress`, :class:`NotLocalDomain` (not
        ours: relay or refuse it), :class:`UnknownMailbox` (permanent) and, given the
        ``size``, :class:`MailboxFull` / :class:`MessageTooLarge`. Use at ``RCPT TO``.
        """
        normalised = _normalized(address)
        mailbox = self._mailbox_for_delivery(normalised)
        if size is not None:
            mailbox.check_quota(size)
        return normalised

    def _mailbox_for_delivery(self, address: str) -> Mailbox:
        if self.domains and domain_of(address) not in self.domains:
            raise NotLocalDomain(f"{address} is not in a local domain")
        try:
            return self.mailbox(address)
        except UnknownMailbox:
            if not self.domains:
                raise NotLocalDomain(f"{address} is not a local user") from None
            raise

    def mailbox_exists(self, address: str) -> bool:
        """True when ``address`` already has a mailbox here."""
        return (self._root / safe_name(address)).is_dir()

    def mailbox(self, address: str) -> Mailbox:
        """The mailbox of ``address`` (opened once per store, created if the user exists).

        Raises :class:`UnknownMailbox` when it does not exist and ``users`` does not
        know the address.
        """
        normalised = _normalized(address)
        key = address_key(normalised)
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the mail store is closed")
            mailbox = self._mailboxes.get(key)
            if mailbox is not None:
                return mailbox
            root = self._root / safe_name(normalised)
            if not root.is_dir() and self.users is not None and not self.users(normalised):
                raise UnknownMailbox(f"no mailbox here for {normalised}")
            mailbox = Mailbox(normalised, root, quota=self.quota, clock=self.clock)
            self._mailboxes[key] = mailbox
            return mailbox

    def remove_mailbox(self, address: str) -> bool:
        """Delete a user's mailbox and all its mail (when the user is deleted); True if there was one."""
        normalised = _normalized(address)
        with self._lock:
            mailbox = self._mailboxes.pop(address_key(normalised), None)
        if mailbox is not None:
            mailbox.close()
        root = self._root / safe_name(normalised)
        if not root.is_dir():
            return False
        aside = root.with_name(f".removed-{root.name}")
        os.rename(root, aside)
        files.remove_tree(aside)
        return True

    # -- delivery ---------------------------------------------------------------------------

    def deliver(self, recipients: Iterable[str], message: MessageSource, *, folder: str = INBOX) -> DeliveryReport:
        """Deliver one message to local recipients, each copy committed on its own (see the module docstring).

        Each recipient is delivered or refused on its own: the report says which (in
        the order of ``recipients``), with a reason safe to show and whether a retry
        may work. Recipients that name the
        same mailbox get one copy. :class:`StoreUnavailable` is raised (nothing
        delivered) only when the message cannot even be written.
        """
        targets: list[tuple[str, Mailbox]] = []
        temporary: Path | None = None
        refused: list[Refused] = []
        seen: set[str] = set()
        size = files.known_size(message)
        for recipient in recipients:
            try:
                address = _normalized(recipient)
                if address_key(address) in seen:
                    continue
                seen.add(address_key(address))
                mailbox = self._mailbox_for_delivery(address)
                if size is not None:
                    mailbox.check_quota(size)
                path = mailbox.temporary_path(folder)  # also checks that the folder exists
                temporary = temporary or path
                targets.append((address, mailbox))
            except (LocalStoreError, InvalidAddress) as error:
                refused.append(_refusal(recipient, error))
        delivered: list[Delivered] = []
        written = 0
        if targets:
            assert temporary is not None
            written = files.write_file(temporary, message)
            try:
                # Linked into all but the first recipient, renamed into the first last.
                for index, (address, mailbox) in enumerate(targets[1:] + targets[:1]):
                    last = index == len(targets) - 1
                    try:
                        appended = mailbox.deliver_file(temporary, written, folder=folder, keep_source=not last)
                    except LocalStoreError as error:
                        refused.append(_refusal(address, error))
                        continue
                    delivered.append(Delivered(address, appended.uidvalidity, appended.uid))
            finally:
                files.unlink_quietly(temporary)  # gone if renamed; else a failed or linked-only copy
            order = {address: index for index, (address, _) in enumerate(targets)}
            delivered.sort(key=lambda item: order[item.address])
        for item in delivered:
            emit(
                log,
                "store",
                "Delivered a message of {size} bytes to {user} (UID {uid})",
                action="deliver",
                user=item.address,
                uid=item.uid,
                size=written,
            )
        for refusal in refused:
            emit(
                log,
                "store",
                "Refused delivery to {user}: {detail}",
                action="refuse",
                user=refusal.address,
                detail=refusal.reason,
                temporary=refusal.temporary,
            )
        return DeliveryReport(tuple(delivered), tuple(refused))


def _refusal(address: str, error: Exception) -> Refused:
    if isinstance(error, LocalStoreError):
        return Refused(address, str(error), error.temporary, error.enhanced_status)
    return Refused(address, str(error), False, "5.1.3")

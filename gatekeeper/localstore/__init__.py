"""The embedded mail store: Gatekeeper as its own mail system when no ``[upstream]`` is configured.

Per user, folders (INBOX, Sent, Drafts, Trash and the user's own) as Maildirs, with
IMAP's state (UIDVALIDITY, UIDs, flags, internal dates, modification sequences) in a
SQLite index, crash-safe delivery and a change feed for concurrent sessions. The
engine (:class:`LocalStore`, :class:`Mailbox`) is synchronous plain Python; the facade
(:class:`AsyncLocalStore`, :class:`AsyncMailbox`) runs it in a thread pool for the
reactor. The SMTP, POP3 and IMAP adapters translate their upstream interfaces to it.
"""

from __future__ import annotations

from gatekeeper.localstore.errors import (
    FolderExists,
    FolderNotAllowed,
    InvalidArgument,
    InvalidFlag,
    InvalidFolderName,
    LocalStoreError,
    MailboxFull,
    MessageTooLarge,
    NoSuchFolder,
    NoSuchMessage,
    NotLocalDomain,
    StoreDamaged,
    StoreUnavailable,
    UidValidityChanged,
    UnknownMailbox,
)
from gatekeeper.localstore.facade import AsyncLocalStore, AsyncMailbox
from gatekeeper.localstore.files import MessageSource
from gatekeeper.localstore.mailbox import NO_QUOTA, Mailbox, Quota
from gatekeeper.localstore.names import INBOX, SEPARATOR, folder_name
from gatekeeper.localstore.store import LocalStore
from gatekeeper.localstore.types import (
    ANSWERED,
    DELETED,
    DRAFT,
    FLAGGED,
    SEEN,
    SYSTEM_FLAGS,
    Appended,
    Changes,
    Copied,
    Delivered,
    DeliveryReport,
    FolderInfo,
    FolderStatus,
    MessageInfo,
    Notice,
    Refused,
    SearchQuery,
    Selection,
    Usage,
)

__all__ = [
    "ANSWERED",
    "DELETED",
    "DRAFT",
    "FLAGGED",
    "INBOX",
    "NO_QUOTA",
    "SEEN",
    "SEPARATOR",
    "SYSTEM_FLAGS",
    "Appended",
    "AsyncLocalStore",
    "AsyncMailbox",
    "Changes",
    "Copied",
    "Delivered",
    "DeliveryReport",
    "FolderExists",
    "FolderInfo",
    "FolderNotAllowed",
    "FolderStatus",
    "InvalidArgument",
    "InvalidFlag",
    "InvalidFolderName",
    "LocalStore",
    "LocalStoreError",
    "Mailbox",
    "MailboxFull",
    "MessageInfo",
    "MessageSource",
    "MessageTooLarge",
    "NoSuchFolder",
    "NoSuchMessage",
    "NotLocalDomain",
    "Notice",
    "Quota",
    "Refused",
    "SearchQuery",
    "Selection",
    "StoreDamaged",
    "StoreUnavailable",
    "UidValidityChanged",
    "UnknownMailbox",
    "Usage",
    "folder_name",
]

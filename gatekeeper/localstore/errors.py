"""What the local mail store refuses, in the project's permanent/temporary vocabulary.

Every error carries what the adapters need to answer a client without guessing: an
RFC 3463 enhanced status code for SMTP (``enhanced_status``) and an RFC 5530 response
code for IMAP (``imap_code``). Messages name folders and addresses, never message
content, so they are safe to echo to clients and to log.
"""

from __future__ import annotations

from gatekeeper.errors import GatekeeperError, PermanentError, TemporaryError


class LocalStoreError(GatekeeperError):
    """Base of every error the local store raises on purpose."""

    enhanced_status: str = "5.3.0"
    imap_code: str | None = None


class StoreUnavailable(LocalStoreError, TemporaryError):
    """The store cannot work right now: a disk error, or another process holds it."""

    enhanced_status = "4.3.0"
    imap_code = "UNAVAILABLE"


class StoreDamaged(LocalStoreError, PermanentError):
    """The store's files are not what the store wrote (a foreign file where a directory belongs)."""

    enhanced_status = "5.3.0"
    imap_code = "SERVERBUG"


class NotLocalDomain(LocalStoreError, PermanentError):
    """The address is not in one of the local domains: delivering it is not this store's job."""

    enhanced_status = "5.7.1"


class UnknownMailbox(LocalStoreError, PermanentError):
    """The address is in a local domain but no such user exists."""

    enhanced_status = "5.1.1"
    imap_code = "NONEXISTENT"


class InvalidFolderName(LocalStoreError, PermanentError):
    """A folder name the store does not accept (empty part, wildcard, control character...)."""

    enhanced_status = "5.2.0"
    imap_code = "CANNOT"


class NoSuchFolder(LocalStoreError, PermanentError):
    """The named folder does not exist (IMAP: ``NO [TRYCREATE]`` for a COPY/APPEND target)."""

    enhanced_status = "5.2.0"
    imap_code = "NONEXISTENT"


class FolderExists(LocalStoreError, PermanentError):
    """A folder with that name already exists."""

    enhanced_status = "5.2.0"
    imap_code = "ALREADYEXISTS"


class FolderNotAllowed(LocalStoreError, PermanentError):
    """The operation is not allowed on this folder (deleting INBOX, selecting a \\Noselect name)."""

    enhanced_status = "5.2.0"
    imap_code = "CANNOT"


class UidValidityChanged(LocalStoreError, PermanentError):
    """The folder was deleted and created again since the caller looked: its UIDs mean other messages."""

    enhanced_status = "5.2.0"
    imap_code = "NONEXISTENT"


class InvalidFlag(LocalStoreError, PermanentError):
    """A flag or keyword the store does not accept (``\\Recent``, an unknown ``\\Flag``, a bad atom)."""

    enhanced_status = "5.2.0"
    imap_code = "CANNOT"


class InvalidArgument(LocalStoreError, PermanentError):
    """Another argument the store cannot use (a naive date, a negative size, an empty message)."""

    enhanced_status = "5.2.0"
    imap_code = "CANNOT"


class NoSuchMessage(LocalStoreError, PermanentError):
    """No message with that UID (it was expunged, perhaps by another session)."""

    enhanced_status = "5.2.0"
    imap_code = "NONEXISTENT"


class MailboxFull(LocalStoreError, TemporaryError):
    """The user's quota would be exceeded; it may fit once they delete mail (SMTP 452 4.2.2)."""

    enhanced_status = "4.2.2"
    imap_code = "OVERQUOTA"


class MessageTooLarge(LocalStoreError, PermanentError):
    """The message alone is larger than the user's whole quota: it can never fit (SMTP 552 5.2.3)."""

    enhanced_status = "5.2.3"
    imap_code = "OVERQUOTA"

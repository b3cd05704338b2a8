"""One user's mail: folders as Maildirs, and a SQLite index holding IMAP's state.

Layout under the user's directory (directories 0700, files 0600)::

    index.sqlite (+ -wal, -shm)        folders, UIDs, flags, dates, sizes, expunge history
    folders/<random>/                  one Maildir per folder: tmp/ new/ cur/
    folders/<random>/gatekeeper-folder.json    the folder's name, to rebuild a lost index
    folders/.deleted-<random>/         a folder being deleted (finished at the next open)

The index is the authority on UIDs, flags and folder names; the Maildir holds the
bytes. A message file never changes once published and never moves: flags live in the
index, so a flag change is one small transaction. Files are named like any Maildir's
(``new/`` for delivered mail, ``cur/NAME:2,FLAGS`` for appended and copied mail, with
the flags it arrived with) so Maildir tools can read a folder, and a Maildir copied in
is imported with its flags at the next open. A published name also carries its UID
(``NAME,U=<uid>``), given under the lock just before publishing.

**Commit order.** A new message is written to ``tmp/`` and fsync-ed, published into
``new/``/``cur/`` by a rename or link (the directory fsync-ed), then indexed in one
transaction; only then is it acknowledged. Removal goes the other way: files are
unlinked first, then the index rows. So after a crash at any point, :meth:`Mailbox.
recover` (run at every open) finds only whole files: a published file the index lacks
gets the UID in its name (it may have been delivered, never lost), an index row whose
file is gone is dropped (an expunge that was under way), and ``tmp/`` is emptied (never
acknowledged). SQLite runs in WAL mode with ``synchronous=NORMAL``: a commit survives
the process being killed at once, and a power failure may undo only the last
transactions. That loses no message: a published file and its directory entry are
fsync-ed before the message is acknowledged, and the UID in its name lets the recovery
give it back the UID clients may have seen. Only flag and folder changes of the last
moments before a power failure can be undone.

**Concurrency.** One process owns the store (:class:`~gatekeeper.localstore.store.
LocalStore` holds a lock file); inside it, a mailbox is shared by every session of its
user and is thread-safe: writes are serialised by a lock, message bytes are written and
read outside it. Sessions learn of each other's changes through :meth:`Mailbox.changes`
(a per-folder modification sequence, persisted, so it survives restarts) and
:meth:`Mailbox.watch` (a push after each commit).
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
import json
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import attrs
from twisted.logger import Logger

from gatekeeper.events import emit
from gatekeeper.localstore import files
from gatekeeper.localstore.errors import (
    FolderExists,
    FolderNotAllowed,
    InvalidArgument,
    InvalidFolderName,
    MailboxFull,
    MessageTooLarge,
    NoSuchFolder,
    NoSuchMessage,
    StoreDamaged,
    StoreUnavailable,
    UidValidityChanged,
)
from gatekeeper.localstore.files import MessageSource
from gatekeeper.localstore.names import (
    INBOX,
    SEPARATOR,
    flag_set,
    flags_from_info,
    folder_name,
    info_suffix,
    is_inside,
    join_keywords,
    merge_keywords,
    parent_names,
    parse_flags,
    system_flag_bit,
    uid_from_name,
    unique_name,
)
from gatekeeper.localstore.types import (
    DELETED,
    HAS_CHILDREN,
    HAS_NO_CHILDREN,
    NOSELECT,
    SEEN,
    Appended,
    Changes,
    Copied,
    FolderInfo,
    FolderStatus,
    MessageInfo,
    Notice,
    SearchQuery,
    Selection,
    Usage,
)

log = Logger(namespace="gatekeeper.localstore")

INDEX_FILE = "index.sqlite"
FOLDERS = "folders"
FOLDER_FILE = "gatekeeper-folder.json"
DELETED_PREFIX = ".deleted-"
SCHEMA_VERSION = 1
EXPUNGE_HISTORY_SECONDS = 7 * 24 * 3600
DEFAULT_FOLDERS: tuple[tuple[str, str | None], ...] = (
    (INBOX, None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
)
MAX_UID = 2**32 - 1
_SEEN_BIT = system_flag_bit(SEEN) or 0
_DELETED_BIT = system_flag_bit(DELETED) or 0
_IN_LIMIT = 500  # UIDs passed in one IN (...) list; larger sets are filtered in Python

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS folders (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    dir TEXT NOT NULL UNIQUE,
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL DEFAULT 1,
    highest_modseq INTEGER NOT NULL DEFAULT 1,
    selectable INTEGER NOT NULL DEFAULT 1,
    special_use TEXT,
    expunge_floor INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    folder_id INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    uid INTEGER NOT NULL,
    file TEXT NOT NULL,
    size INTEGER NOT NULL,
    internal_date INTEGER NOT NULL,
    tz_minutes INTEGER NOT NULL DEFAULT 0,
    flags INTEGER NOT NULL DEFAULT 0,
    keywords TEXT NOT NULL DEFAULT '',
    recent INTEGER NOT NULL DEFAULT 0,
    modseq INTEGER NOT NULL,
    added_modseq INTEGER NOT NULL,
    PRIMARY KEY (folder_id, uid)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_file ON messages (folder_id, file);
CREATE INDEX IF NOT EXISTS messages_modseq ON messages (folder_id, modseq);
CREATE TABLE IF NOT EXISTS expunged (
    folder_id INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (folder_id, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (name TEXT PRIMARY KEY) WITHOUT ROWID;
"""

_MESSAGE_COLUMNS = "uid, size, internal_date, tz_minutes, flags, keywords, modseq"


@attrs.frozen
class Quota:
    """A user's limits: total bytes and number of messages over all folders (0: no limit)."""

    bytes: int = 0
    messages: int = 0


NO_QUOTA = Quota()


@attrs.frozen
class _Folder:
    id: int
    name: str
    dir: str
    uidvalidity: int
    uidnext: int
    highest_modseq: int
    selectable: bool
    special_use: str | None
    expunge_floor: int


@attrs.frozen
class _NewMessage:
    file: str
    size: int
    internal_date: int
    tz_minutes: int
    flags: int
    keywords: str
    recent: int


def _folder_from_row(row: tuple[Any, ...]) -> _Folder:
    folder_id, name, directory, validity, uidnext, modseq, selectable, special, floor = row
    return _Folder(folder_id, name, directory, validity, uidnext, modseq, bool(selectable), special, floor)


def _message_info(row: tuple[Any, ...]) -> MessageInfo:
    uid, size, epoch, tz_minutes, bits, keywords, modseq = row
    zone = datetime.timezone(datetime.timedelta(minutes=tz_minutes))
    return MessageInfo(
        uid=uid,
        size=size,
        internal_date=datetime.datetime.fromtimestamp(epoch, tz=zone),
        flags=flag_set(bits, keywords),
        modseq=modseq,
    )


class Mailbox:
    """One user's folders and messages (see the module docstring for the layout and guarantees).

    Opened by :class:`~gatekeeper.localstore.store.LocalStore`; opening creates the
    mailbox with INBOX, Sent, Drafts and Trash if it is new and runs :meth:`recover`.
    Every method is synchronous and may block on disk I/O (use the async facade on the
    reactor thread). Folder arguments are names (any case of ``INBOX``); methods that
    take UIDs accept ``uidvalidity=``, and raise :class:`UidValidityChanged` when the
    folder was recreated since the caller learned its UIDs. ``origin`` on changing
    methods is passed back in the :class:`Notice` watchers receive.
    """

    def __init__(
        self,
        address: str,
        root: Path,
        *,
        quota: Quota = NO_QUOTA,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.address = address
        self.root = files.private_dir(root)
        self.quota = quota
        self.clock = clock
        self._folders_dir = files.private_dir(self.root / FOLDERS)
        self._folders_text = str(self._folders_dir)
        self._lock = threading.RLock()
        self._watch_lock = threading.Lock()
        self._watchers: list[Callable[[Notice], None]] = []
        self._pending: list[Notice] = []
        self._closed = False
        self._db = self._connect()
        self.recover()

    # -- opening, closing, recovery ----------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        path = self.root / INDEX_FILE
        try:
            return self._open_index(path)
        except sqlite3.OperationalError as error:
            raise StoreUnavailable(f"cannot open the mail index of {self.address}: {error}") from None
        except sqlite3.DatabaseError as error:
            # A damaged index is set aside, not deleted, and rebuilt from the Maildirs.
            aside = path.with_name(f"{INDEX_FILE}.damaged-{int(self.clock())}")
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(f"{path}{suffix}", f"{aside}{suffix}")
            emit(
                log,
                "store",
                "Mail index of {user} was damaged ({detail}); rebuilding it from the Maildirs",
                level="warn",
                action="rebuild",
                user=self.address,
                detail=str(error),
            )
            try:
                return self._open_index(path)
            except sqlite3.Error as second:
                raise StoreUnavailable(f"cannot open the mail index of {self.address}: {second}") from None
        except OSError as error:
            raise files.unavailable(f"cannot open the mail index of {self.address}", error) from None

    def _open_index(self, path: Path) -> sqlite3.Connection:
        # Created 0600 before SQLite sees it: SQLite gives -wal and -shm the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        os.chmod(path, 0o600)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # Durable against a killed process; the message files carry what a power failure could lose.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)
            version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            stored = db.execute("SELECT value FROM meta WHERE key = 'address'").fetchone()
            if stored is not None:
                self.address = stored[0]  # the spelling the mailbox was created with
            if version is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?), ('address', ?)", (SCHEMA_VERSION, self.address))
            elif version[0] != SCHEMA_VERSION:
                raise StoreDamaged(f"the mail index of {self.address} has an unknown format {version[0]!r}")
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        """Close the index; later calls raise :class:`StoreUnavailable`. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
        with self._watch_lock:
            self._watchers.clear()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def recover(self) -> dict[str, int]:
        """Reconcile the index with the Maildirs; run at every open. Returns what it did, counted.

        Finishes folder deletions that were under way, adopts folder directories the
        index lacks (a lost index), empties every ``tmp/``, gives UIDs to files in
        ``new/``/``cur/`` the index lacks (oldest first, flags from a ``:2,`` suffix),
        drops index rows whose file is gone, recounts the quota usage, forgets expunge
        history older than a week and creates INBOX (and, for a new mailbox, Sent,
        Drafts and Trash).
        """
        counts = {"stale_tmp": 0, "imported": 0, "vanished": 0, "adopted_folders": 0, "deleted_folders": 0}
        with self._lock:
            self._finish_deletions(counts)
            self._adopt_folders(counts)
            with self._write() as db:
                for folder in self._all_folders(db):
                    self._reconcile(db, folder, counts)
                self._recount(db)
                self._forget_history(db)
                self._ensure_defaults(db)
        if any(counts.values()):
            emit(
                log,
                "store",
                "Recovered the mailbox of {user}: {detail}",
                action="recover",
                user=self.address,
                detail=", ".join(f"{key}={value}" for key, value in counts.items() if value),
            )
        return counts

    def _finish_deletions(self, counts: dict[str, int]) -> None:
        for entry in sorted(os.listdir(self._folders_dir)):
            if not entry.startswith(DELETED_PREFIX):
                continue
            with self._write() as db:
                row = db.execute("SELECT id FROM folders WHERE dir = ?", (entry[len(DELETED_PREFIX) :],)).fetchone()
                if row is not None:
                    db.execute("DELETE FROM folders WHERE id = ?", (row[0],))
            files.remove_tree(self._folders_dir / entry)
            counts["deleted_folders"] += 1

    def _adopt_folders(self, counts: dict[str, int]) -> None:
        with self._write() as db:
            known = {row[0] for row in db.execute("SELECT dir FROM folders")}
            for entry in sorted(os.listdir(self._folders_dir)):
                path = self._folders_dir / entry
                if entry in known or entry.startswith(".") or path.is_symlink() or not path.is_dir():
                    continue
                try:
                    record = json.loads((path / FOLDER_FILE).read_text(encoding="utf-8"))
                    name = folder_name(record["name"])
                    old_validity = int(record.get("uidvalidity", 0))
                except (OSError, ValueError, KeyError, TypeError, InvalidFolderName):
                    log.warn("Ignoring {dir} in the mailbox of {user}: not a folder", dir=entry, user=self.address)
                    continue
                base, number = name, 1
                while db.execute("SELECT 1 FROM folders WHERE name = ?", (name,)).fetchone():
                    number += 1
                    name = f"{base} (recovered {number})"
                # Its UIDs are given anew, so its UIDVALIDITY must change.
                validity = self._next_uidvalidity(db, at_least=old_validity + 1)
                special = record.get("special_use") if isinstance(record.get("special_use"), str) else None
                db.execute(
                    "INSERT INTO folders (name, dir, uidvalidity, special_use) VALUES (?, ?, ?, ?)",
                    (name, entry, validity, special),
                )
                self._write_folder_file(entry, name, validity, special)
                counts["adopted_folders"] += 1

    def _reconcile(self, db: sqlite3.Connection, folder: _Folder, counts: dict[str, int]) -> None:
        path = files.private_dir(self._folders_dir / folder.dir)
        for sub in ("tmp", "new", "cur"):
            files.private_dir(path / sub)
        for stale in os.listdir(path / "tmp"):
            if files.unlink_quietly(path / "tmp" / stale):
                counts["stale_tmp"] += 1
        on_disk: dict[str, os.stat_result] = {}
        for sub in ("new", "cur"):
            with os.scandir(path / sub) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode):
                        on_disk[f"{sub}/{entry.name}"] = info
        indexed = dict(db.execute("SELECT file, uid FROM messages WHERE folder_id = ?", (folder.id,)).fetchall())
        vanished = sorted(uid for name, uid in indexed.items() if name not in on_disk)
        if vanished:
            self._remove_rows(db, folder.id, vanished)
            counts["vanished"] += len(vanished)
        extra = sorted((name for name in on_disk if name not in indexed), key=lambda n: (on_disk[n].st_mtime, n))
        if extra:
            (uidnext,) = db.execute("SELECT uidnext FROM folders WHERE id = ?", (folder.id,)).fetchone()
            # A UID at or above UIDNEXT was given when the file was published and its index row
            # lost (power failure): keep it. Anything else (a copied-in Maildir) gets a new one.
            kept: dict[str, int] = {}
            for name in extra:
                uid = uid_from_name(name)
                if uid is not None and uidnext <= uid <= MAX_UID and uid not in kept.values():
                    kept[name] = uid
            extra = sorted(extra, key=lambda n: (n not in kept, kept.get(n, 0)))
            new = []
            for name in extra:
                info = on_disk[name]
                os.chmod(path / name, 0o600)
                new.append(
                    _NewMessage(
                        file=name,
                        size=info.st_size,
                        internal_date=int(info.st_mtime),
                        tz_minutes=0,
                        flags=flags_from_info(name) if name.startswith("cur/") else 0,
                        keywords="",
                        recent=int(name.startswith("new/")),
                    )
                )
            self._add_rows(db, folder.id, new, uids=[kept[name] for name in extra if name in kept])
            counts["imported"] += len(new)

    def _recount(self, db: sqlite3.Connection) -> None:
        count, total = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
        db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('usage_messages', ?), ('usage_bytes', ?)",
            (count, total),
        )

    def _forget_history(self, db: sqlite3.Connection) -> None:
        cutoff = self.clock() - EXPUNGE_HISTORY_SECONDS
        rows = db.execute("SELECT folder_id, MAX(modseq) FROM expunged WHERE at < ? GROUP BY folder_id", (cutoff,))
        for folder_id, modseq in rows.fetchall():
            db.execute("UPDATE folders SET expunge_floor = MAX(expunge_floor, ?) WHERE id = ?", (modseq, folder_id))
        db.execute("DELETE FROM expunged WHERE at < ?", (cutoff,))

    def _ensure_defaults(self, db: sqlite3.Connection) -> None:
        fresh = db.execute("SELECT value FROM meta WHERE key = 'initialized'").fetchone() is None
        for name, special in DEFAULT_FOLDERS if fresh else DEFAULT_FOLDERS[:1]:
            row = db.execute("SELECT selectable FROM folders WHERE name = ?", (name,)).fetchone()
            if row is None:
                self._make_folder(db, name, special)
            elif not row[0]:
                self._make_selectable(db, name)
            if fresh:
                db.execute("INSERT OR IGNORE INTO subscriptions VALUES (?)", (name,))
        if fresh:
            db.execute("INSERT INTO meta VALUES ('initialized', ?)", (int(self.clock()),))

    # -- transactions and notices ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"the mailbox of {self.address} is closed")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._check_open()
            try:
                yield self._db
            except sqlite3.Error as error:
                raise StoreUnavailable(f"cannot read the mail index of {self.address}: {error}") from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._check_open()
            db = self._db
            if db.in_transaction:  # nested: part of the caller's transaction
                yield db
                return
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise StoreUnavailable(f"cannot write the mail index of {self.address}: {error}") from None
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as error:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                self._pending.clear()
                if isinstance(error, sqlite3.Error):
                    raise StoreUnavailable(f"cannot write the mail index of {self.address}: {error}") from None
                raise
            notices, self._pending = self._pending, []
        self._dispatch(notices)

    def _notify(self, notice: Notice) -> None:
        self._pending.append(notice)

    def _dispatch(self, notices: list[Notice]) -> None:
        if not notices:
            return
        with self._watch_lock:
            watchers = list(self._watchers)
        for notice in notices:
            for watcher in watchers:
                try:
                    watcher(notice)
                except Exception:
                    log.failure("A mailbox watcher of {user} failed", user=self.address)

    def watch(self, callback: Callable[[Notice], None]) -> Callable[[], None]:
        """Call ``callback(notice)`` after every committed change to any folder; returns the cancel function.

        The callback runs in the thread that made the change, after the mailbox lock is
        released; it must be quick and must not raise (errors are logged). Use the
        async facade's ``watch`` to be called on the reactor thread instead.
        """
        with self._watch_lock:
            self._watchers.append(callback)

        def cancel() -> None:
            with self._watch_lock, contextlib.suppress(ValueError):
                self._watchers.remove(callback)

        return cancel

    # -- folder rows ------------------------------------------------------------------

    def _all_folders(self, db: sqlite3.Connection) -> list[_Folder]:
        return [_folder_from_row(row) for row in db.execute(f"SELECT {_FOLDER_COLUMNS} FROM folders")]  # noqa: S608

    def _find(self, db: sqlite3.Connection, name: str) -> _Folder | None:
        row = db.execute(f"SELECT {_FOLDER_COLUMNS} FROM folders WHERE name = ?", (name,)).fetchone()  # noqa: S608
        return None if row is None else _folder_from_row(row)

    def _folder(
        self,
        db: sqlite3.Connection,
        name: str,
        uidvalidity: int | None = None,
        *,
        selectable: bool = True,
        target: bool = False,
    ) -> _Folder:
        folder = self._find(db, name)
        if folder is None:
            error = NoSuchFolder(f"no folder named {name!r}")
            if target:
                error.imap_code = "TRYCREATE"  # RFC 3501: COPY/APPEND to a missing folder
            raise error
        if uidvalidity is not None and folder.uidvalidity != uidvalidity:
            raise UidValidityChanged(f"folder {name!r} was recreated: its UIDVALIDITY changed")
        if selectable and not folder.selectable:
            raise FolderNotAllowed(f"{name!r} is only a level of the hierarchy (\\Noselect), not a folder")
        return folder

    def _next_uidvalidity(self, db: sqlite3.Connection, at_least: int = 1) -> int:
        # Strictly increasing per user, so a folder deleted and created again never
        # repeats a UIDVALIDITY a client may have cached.
        row = db.execute("SELECT value FROM meta WHERE key = 'last_uidvalidity'").fetchone()
        value = max(int(self.clock()), (row[0] if row else 0) + 1, at_least)
        if value > MAX_UID:
            raise StoreUnavailable("UIDVALIDITY values are exhausted")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('last_uidvalidity', ?)", (value,))
        return value

    def _make_folder(self, db: sqlite3.Connection, name: str, special: str | None = None) -> _Folder:
        directory = "m" + secrets.token_hex(8)
        path = files.private_dir(self._folders_dir / directory)
        for sub in ("tmp", "new", "cur"):
            files.private_dir(path / sub)
        validity = self._next_uidvalidity(db)
        self._write_folder_file(directory, name, validity, special)
        files.fsync_dir(self._folders_dir)
        db.execute(
            "INSERT INTO folders (name, dir, uidvalidity, special_use) VALUES (?, ?, ?, ?)",
            (name, directory, validity, special),
        )
        folder = self._find(db, name)
        assert folder is not None
        return folder

    def _make_selectable(self, db: sqlite3.Connection, name: str) -> None:
        validity = self._next_uidvalidity(db)
        db.execute("UPDATE folders SET selectable = 1, uidvalidity = ? WHERE name = ?", (validity, name))
        folder = self._find(db, name)
        assert folder is not None
        self._write_folder_file(folder.dir, name, validity, folder.special_use)

    def _write_folder_file(self, directory: str, name: str, validity: int, special: str | None) -> None:
        record = {"name": name, "uidvalidity": validity, "special_use": special}
        path = self._folders_dir / directory / FOLDER_FILE
        temporary = path.with_name(f".{FOLDER_FILE}.{secrets.token_hex(4)}")
        try:
            files.write_file(temporary, json.dumps(record, ensure_ascii=False).encode("utf-8"))
            os.replace(temporary, path)
        except OSError as error:
            files.unlink_quietly(temporary)
            raise files.unavailable("cannot write a folder's name file", error) from None

    def _path(self, folder: _Folder, file: str) -> Path:
        return self._folders_dir / folder.dir / file

    # -- message rows --------------------------------------------------------------------

    def _add_rows(
        self,
        db: sqlite3.Connection,
        folder_id: int,
        new: list[_NewMessage],
        origin: object = None,
        uids: list[int] | None = None,
    ) -> list[int]:
        """Index new messages: the first ``len(uids)`` get those UIDs (all >= UIDNEXT), the rest the next ones."""
        uidnext, modseq, name, validity = db.execute(
            "SELECT uidnext, highest_modseq, name, uidvalidity FROM folders WHERE id = ?", (folder_id,)
        ).fetchone()
        given = list(uids or [])
        start = max([uidnext, *(uid + 1 for uid in given)])
        if start + len(new) - len(given) - 1 > MAX_UID:
            raise StoreUnavailable(f"folder {name!r} has used up its UIDs; create a new folder")
        modseq += 1
        uids = given + list(range(start, start + len(new) - len(given)))
        uidnext = max(uidnext, *(uid + 1 for uid in uids)) if uids else uidnext
        both = (modseq, modseq)  # modseq and added_modseq
        db.executemany(
            "INSERT INTO messages (folder_id, uid, file, size, internal_date, tz_minutes, flags, keywords, recent,"
            " modseq, added_modseq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (folder_id, uid, m.file, m.size, m.internal_date, m.tz_minutes, m.flags, m.keywords, m.recent, *both)
                for uid, m in zip(uids, new, strict=True)
            ],
        )
        db.execute("UPDATE folders SET uidnext = ?, highest_modseq = ? WHERE id = ?", (uidnext, modseq, folder_id))
        self._adjust_usage(db, sum(m.size for m in new), len(new))
        self._notify(Notice(name, validity, modseq, origin=origin))
        return uids

    def _remove_rows(self, db: sqlite3.Connection, folder_id: int, uids: list[int], origin: object = None) -> None:
        modseq, name, validity = db.execute(
            "SELECT highest_modseq, name, uidvalidity FROM folders WHERE id = ?", (folder_id,)
        ).fetchone()
        modseq += 1
        removed_bytes = 0
        for chunk in _chunks(uids, _IN_LIMIT):
            marks = ",".join("?" * len(chunk))
            (size,) = db.execute(
                f"SELECT COALESCE(SUM(size), 0) FROM messages WHERE folder_id = ? AND uid IN ({marks})",  # noqa: S608
                (folder_id, *chunk),
            ).fetchone()
            removed_bytes += size
            db.execute(f"DELETE FROM messages WHERE folder_id = ? AND uid IN ({marks})", (folder_id, *chunk))  # noqa: S608
        now = self.clock()
        db.executemany(
            "INSERT OR REPLACE INTO expunged VALUES (?, ?, ?, ?)", [(folder_id, uid, modseq, now) for uid in uids]
        )
        db.execute("UPDATE folders SET highest_modseq = ? WHERE id = ?", (modseq, folder_id))
        self._adjust_usage(db, -removed_bytes, -len(uids))
        self._notify(Notice(name, validity, modseq, origin=origin))

    def _adjust_usage(self, db: sqlite3.Connection, size: int, count: int) -> None:
        db.execute("UPDATE meta SET value = value + ? WHERE key = 'usage_bytes'", (size,))
        db.execute("UPDATE meta SET value = value + ? WHERE key = 'usage_messages'", (count,))

    def _usage(self, db: sqlite3.Connection) -> tuple[int, int]:
        values = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('usage_bytes', 'usage_messages')"))
        return int(values.get("usage_bytes", 0)), int(values.get("usage_messages", 0))

    def _check_quota(self, db: sqlite3.Connection, size: int, count: int) -> None:
        limit_bytes, limit_messages = self.quota.bytes, self.quota.messages
        if not (limit_bytes or limit_messages):
            return
        used_bytes, used_messages = self._usage(db)
        if limit_bytes and count == 1 and size > limit_bytes:
            raise MessageTooLarge(f"the message is larger than the whole mailbox quota of {self.address}")
        if limit_bytes and used_bytes + size > limit_bytes:
            raise MailboxFull(f"the mailbox of {self.address} is full (storage quota)")
        if limit_messages and used_messages + count > limit_messages:
            raise MailboxFull(f"the mailbox of {self.address} is full (message count quota)")

    def _rows(
        self,
        db: sqlite3.Connection,
        folder: _Folder,
        uids: Collection[int] | None,
        columns: str = _MESSAGE_COLUMNS,
        where: str = "",
        params: tuple[Any, ...] = (),
    ) -> list[tuple[Any, ...]]:
        """Rows of ``folder`` (UID order) whose UID is in ``uids`` (all if None); ``uid`` must be the first column."""
        clause, extra, keep = _uid_clause(uids)
        rows = db.execute(
            f"SELECT {columns} FROM messages WHERE folder_id = ?{clause}{where} ORDER BY uid",  # noqa: S608
            (folder.id, *extra, *params),
        ).fetchall()
        return rows if keep is None else [row for row in rows if row[0] in keep]

    def _internal_date(self, value: datetime.datetime | None) -> tuple[int, int]:
        if value is None:
            return int(self.clock()), 0
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidArgument("an internal date needs a time zone")
        offset = value.utcoffset()
        assert offset is not None
        return int(value.timestamp()), int(offset.total_seconds() // 60)

    # -- folders ------------------------------------------------------------------------

    def folders(self) -> list[FolderInfo]:
        """Every folder and hierarchy level, sorted by name, with LIST attributes and subscription."""
        with self._read() as db:
            rows = db.execute("SELECT name, selectable, special_use FROM folders ORDER BY name").fetchall()
            subscribed = {row[0] for row in db.execute("SELECT name FROM subscriptions")}
        names = [row[0] for row in rows]
        result = []
        for name, selectable, special in rows:
            at = bisect.bisect_left(names, name + SEPARATOR)
            children = at < len(names) and names[at].startswith(name + SEPARATOR)
            attributes = {HAS_CHILDREN if children else HAS_NO_CHILDREN}
            if not selectable:
                attributes.add(NOSELECT)
            if special:
                attributes.add(special)
            result.append(FolderInfo(name, frozenset(attributes), name in subscribed, special))
        return result

    def create_folder(self, name: str, *, special_use: str | None = None) -> str:
        """Create a folder (and any missing levels above it); returns its canonical name.

        Raises :class:`FolderExists` if it exists; a ``\\Noselect`` level becomes a
        folder (with a new UIDVALIDITY).
        """
        canonical = folder_name(name)
        if special_use is not None and special_use not in ("\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive"):
            raise InvalidArgument(f"unknown special use {special_use!r}")
        with self._write() as db:
            existing = self._find(db, canonical)
            if existing is not None:
                if existing.selectable:
                    raise FolderExists(f"folder {canonical!r} already exists")
                self._make_selectable(db, canonical)
                return canonical
            for parent in parent_names(canonical):
                if self._find(db, parent) is None:
                    self._make_folder(db, parent)
            self._make_folder(db, canonical, special_use)
        return canonical

    def delete_folder(self, name: str, *, origin: object = None) -> None:
        """Delete a folder and its messages (RFC 3501 DELETE).

        A folder with sub-folders loses its messages and becomes a ``\\Noselect``
        level; deleting INBOX, or a ``\\Noselect`` level that still has sub-folders, is
        refused with :class:`FolderNotAllowed`. Subscriptions are kept, as IMAP wants.
        """
        canonical = folder_name(name)
        if canonical == INBOX:
            raise FolderNotAllowed("INBOX cannot be deleted")
        with self._write() as db:
            folder = self._folder(db, canonical, selectable=False)
            has_children = (
                db.execute(
                    "SELECT 1 FROM folders WHERE substr(name, 1, ?) = ? LIMIT 1",
                    (len(canonical) + 1, canonical + SEPARATOR),
                ).fetchone()
                is not None
            )
            if has_children:
                if not folder.selectable:
                    raise FolderNotAllowed(f"{canonical!r} has sub-folders: delete them first")
                rows = self._rows(db, folder, None, "uid, file")
                self._unlink_files(folder, [row[1] for row in rows])
                if rows:
                    self._remove_rows(db, folder.id, [row[0] for row in rows], origin)
                db.execute("UPDATE folders SET selectable = 0 WHERE id = ?", (folder.id,))
                self._notify(Notice(canonical, folder.uidvalidity, folder.highest_modseq, "deleted", origin=origin))
                return
            # Renamed aside first: a crash before the commit is finished by the next open.
            aside = self._folders_dir / (DELETED_PREFIX + folder.dir)
            try:
                os.rename(self._folders_dir / folder.dir, aside)
                files.fsync_dir(self._folders_dir)
            except OSError as error:
                raise files.unavailable(f"cannot delete folder {canonical!r}", error) from None
            try:
                count, size = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE folder_id = ?", (folder.id,)
                ).fetchone()
                db.execute("DELETE FROM folders WHERE id = ?", (folder.id,))
                self._adjust_usage(db, -size, -count)
                self._notify(Notice(canonical, folder.uidvalidity, folder.highest_modseq, "deleted", origin=origin))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rename(aside, self._folders_dir / folder.dir)
                raise
        files.remove_tree(aside)

    def rename_folder(self, old: str, new: str, *, origin: object = None) -> str:
        """Rename a folder and everything below it (RFC 3501 RENAME); returns the new canonical name.

        Renaming INBOX moves its messages to a new folder and leaves INBOX empty, as
        IMAP requires. Missing levels above the new name are created; subscriptions
        follow the rename.
        """
        source, target = folder_name(old), folder_name(new)
        if source == target or (source != INBOX and is_inside(target, source)):
            raise FolderNotAllowed(f"cannot rename {source!r} to {target!r} (itself or inside itself)")
        if source == INBOX:
            with self._write() as db:
                self._folder(db, INBOX)
                if self._find(db, target) is not None:
                    raise FolderExists(f"folder {target!r} already exists")
                for parent in parent_names(target):
                    if self._find(db, parent) is None:
                        self._make_folder(db, parent)
                self._make_folder(db, target)
                uids = [row[0] for row in self._rows(db, self._folder(db, INBOX), None, "uid")]
                if uids:
                    self._move_locked(db, INBOX, uids, target, None, origin, check_quota=False)
            return target
        renamed: list[tuple[_Folder, str]] = []
        with self._write() as db:
            folder = self._folder(db, source, selectable=False)
            if target == INBOX or self._find(db, target) is not None:
                raise FolderExists(f"folder {target!r} already exists")
            below = db.execute(
                f"SELECT {_FOLDER_COLUMNS} FROM folders WHERE substr(name, 1, ?) = ?",  # noqa: S608
                (len(source) + 1, source + SEPARATOR),
            ).fetchall()
            moving = [folder] + [_folder_from_row(row) for row in below]
            for parent in parent_names(target):
                if self._find(db, parent) is None:
                    self._make_folder(db, parent)
            for item in moving:
                new_name = target + item.name[len(source) :]
                if len(new_name) > 255 or new_name.count(SEPARATOR) >= 16:
                    raise InvalidFolderName(f"renaming {source!r} would make {new_name!r}: too long or too deep")
                renamed.append((item, new_name))
            # Two steps, so that no intermediate name collides with the UNIQUE constraint.
            for item, _ in renamed:
                db.execute("UPDATE folders SET name = ? WHERE id = ?", (f"\x00renaming {item.id}", item.id))
            for item, new_name in renamed:
                db.execute("UPDATE folders SET name = ? WHERE id = ?", (new_name, item.id))
                if db.execute("DELETE FROM subscriptions WHERE name = ?", (item.name,)).rowcount:
                    db.execute("INSERT OR IGNORE INTO subscriptions VALUES (?)", (new_name,))
                self._notify(
                    Notice(
                        new_name, item.uidvalidity, item.highest_modseq, "renamed", old_name=item.name, origin=origin
                    )
                )
        for item, new_name in renamed:
            self._write_folder_file(item.dir, new_name, item.uidvalidity, item.special_use)
        return target

    def subscribe(self, name: str) -> None:
        """Add a name to the subscriptions (it need not exist, as IMAP allows)."""
        canonical = folder_name(name)
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO subscriptions VALUES (?)", (canonical,))

    def unsubscribe(self, name: str) -> None:
        """Remove a name from the subscriptions (no error if it was not there)."""
        canonical = folder_name(name)
        with self._write() as db:
            db.execute("DELETE FROM subscriptions WHERE name = ?", (canonical,))

    def subscriptions(self) -> list[str]:
        """The subscribed names, sorted (including names of folders that no longer exist)."""
        with self._read() as db:
            return [row[0] for row in db.execute("SELECT name FROM subscriptions ORDER BY name")]

    def status(self, name: str) -> FolderStatus:
        """STATUS counts; ``recent`` counts messages no session has claimed yet."""
        canonical = folder_name(name)
        with self._read() as db:
            folder = self._folder(db, canonical)
            return self._status(db, folder)

    def _status(self, db: sqlite3.Connection, folder: _Folder, recent: int | None = None) -> FolderStatus:
        count, unclaimed, unseen, size = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(recent), 0), COALESCE(SUM((flags & ?) = 0), 0), COALESCE(SUM(size), 0)"
            " FROM messages WHERE folder_id = ?",
            (_SEEN_BIT, folder.id),
        ).fetchone()
        return FolderStatus(
            name=folder.name,
            messages=count,
            recent=unclaimed if recent is None else recent,
            unseen=unseen,
            uidnext=folder.uidnext,
            uidvalidity=folder.uidvalidity,
            highest_modseq=folder.highest_modseq,
            size=size,
        )

    def select(self, name: str, *, readonly: bool = False) -> Selection:
        """SELECT (or EXAMINE with ``readonly``): the folder's status and every message in UID order.

        A read-write select claims the folder's ``\\Recent`` messages for this caller
        (``Selection.recent``): no later session sees them as recent. A read-only one
        claims nothing and reports the unclaimed ones.
        """
        canonical = folder_name(name)
        with self._read() if readonly else self._write() as db:
            folder = self._folder(db, canonical)
            rows = self._rows(db, folder, None, _MESSAGE_COLUMNS + ", recent")
            recent = frozenset(row[0] for row in rows if row[7])
            if recent and not readonly:
                db.execute("UPDATE messages SET recent = 0 WHERE folder_id = ? AND recent = 1", (folder.id,))
            status = self._status(db, folder, recent=len(recent))
        messages = tuple(_message_info(row[:7]) for row in rows)
        first_unseen = next((m.uid for m in messages if not m.seen), None)
        return Selection(status, messages, recent, first_unseen, readonly)

    # -- messages -----------------------------------------------------------------------

    def messages(
        self, name: str, uids: Collection[int] | None = None, *, uidvalidity: int | None = None
    ) -> list[MessageInfo]:
        """Metadata of the messages with these UIDs (all if None), in UID order; unknown UIDs are skipped."""
        canonical = folder_name(name)
        with self._read() as db:
            folder = self._folder(db, canonical, uidvalidity)
            return [_message_info(row) for row in self._rows(db, folder, uids)]

    def message(self, name: str, uid: int, *, uidvalidity: int | None = None) -> MessageInfo:
        """Metadata of one message; :class:`NoSuchMessage` if there is none with that UID."""
        found = self.messages(name, [uid], uidvalidity=uidvalidity)
        if not found:
            raise NoSuchMessage(f"no message with UID {uid} in {folder_name(name)!r}")
        return found[0]

    def uids(self, name: str, *, uidvalidity: int | None = None) -> list[int]:
        """Every UID of the folder, ascending."""
        canonical = folder_name(name)
        with self._read() as db:
            folder = self._folder(db, canonical, uidvalidity)
            return [row[0] for row in self._rows(db, folder, None, "uid")]

    def open_message(self, name: str, uid: int, *, uidvalidity: int | None = None) -> BinaryIO:
        """Open a message's bytes for reading (the caller closes it): large messages are streamed, not loaded.

        The file stays readable even if another session expunges the message meanwhile.
        """
        canonical = folder_name(name)
        with self._read() as db:
            # One query for the folder and the message: fetching is the hot path of POP3 and IMAP.
            row = db.execute(
                "SELECT f.dir, f.uidvalidity, f.selectable, m.file FROM folders f"
                " LEFT JOIN messages m ON m.folder_id = f.id AND m.uid = ? WHERE f.name = ?",
                (uid, canonical),
            ).fetchone()
            if row is None or not row[2] or (uidvalidity is not None and row[1] != uidvalidity):
                self._folder(db, canonical, uidvalidity)  # raises the precise error
            if row[3] is None:
                raise NoSuchMessage(f"no message with UID {uid} in {canonical!r}")
            try:
                fd = os.open(f"{self._folders_text}/{row[0]}/{row[3]}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NoSuchMessage(f"the message with UID {uid} in {canonical!r} is gone") from None
            except OSError as error:
                raise files.unavailable("cannot open a message file", error) from None
        return os.fdopen(fd, "rb")

    def read_message(self, name: str, uid: int, *, uidvalidity: int | None = None) -> bytes:
        """A message's bytes, whole (use :meth:`open_message` for large ones)."""
        with self.open_message(name, uid, uidvalidity=uidvalidity) as handle:
            return handle.read()

    def check_quota(self, size: int, count: int = 1) -> None:
        """Raise :class:`MessageTooLarge` or :class:`MailboxFull` unless ``count`` messages of ``size`` bytes fit."""
        if size < 0 or count < 0:
            raise InvalidArgument("sizes and counts cannot be negative")
        with self._read() as db:
            self._check_quota(db, size, count)

    def usage(self) -> Usage:
        """The bytes and messages stored in all folders, and the limits."""
        with self._read() as db:
            used_bytes, used_messages = self._usage(db)
        return Usage(used_bytes, used_messages, self.quota.bytes, self.quota.messages)

    def append(
        self,
        name: str,
        message: MessageSource,
        *,
        flags: Iterable[str] = (),
        internal_date: datetime.datetime | None = None,
        origin: object = None,
    ) -> Appended:
        """Store a message in a folder (IMAP APPEND): written, fsync-ed, published to ``cur/``, then indexed.

        ``flags`` are system flags and keywords; ``internal_date`` (aware) defaults to
        now. The message is ``\\Recent``. Raises :class:`NoSuchFolder` (code
        ``TRYCREATE``), :class:`MailboxFull` or :class:`MessageTooLarge`.
        """
        canonical = folder_name(name)
        bits, keywords = parse_flags(flags)
        epoch, tz_minutes = self._internal_date(internal_date)
        size = files.known_size(message)
        with self._read() as db:
            folder = self._folder(db, canonical, target=True)
            if size is not None:
                self._check_quota(db, size, 1)  # refuse before writing anything
        unique = unique_name()
        temporary = self._path(folder, f"tmp/{unique}")
        size = files.write_file(temporary, message)
        new = _NewMessage(f"cur/{unique}", size, epoch, tz_minutes, bits, join_keywords(keywords), 1)
        return self._publish_new(canonical, folder.dir, temporary, new, origin)

    def _publish_new(
        self,
        name: str,
        directory: str | None,
        temporary: Path,
        new: _NewMessage,
        origin: object,
        *,
        keep_source: bool = False,
    ) -> Appended:
        """Publish a written ``tmp/`` file into the folder and index it; cleans up on any failure.

        ``new.file`` is ``new/NAME`` or ``cur/NAME``; the published name adds the UID
        (and, in ``cur/``, the flags).
        """
        published: Path | None = None
        try:
            with self._write() as db:
                folder = self._folder(db, name, target=True)
                if directory is not None and folder.dir != directory:
                    # The folder was deleted and made again while the bytes were written.
                    raise NoSuchFolder(f"folder {name!r} was deleted meanwhile")
                self._check_quota(db, new.size, 1)
                uid = folder.uidnext
                file = f"{new.file},U={uid}"
                if file.startswith("cur/"):
                    file += info_suffix(new.flags)
                target = self._path(folder, file)
                files.publish(temporary, target, keep_source=keep_source)
                published = target
                files.fsync_dir(target.parent)
                self._add_rows(db, folder.id, [attrs.evolve(new, file=file)], origin, uids=[uid])
        except OSError as error:
            self._unpublish(published, temporary, keep_source)
            raise files.unavailable("cannot store the message", error) from None
        except BaseException:
            self._unpublish(published, temporary, keep_source)
            raise
        return Appended(name, folder.uidvalidity, uid)

    @staticmethod
    def _unpublish(published: Path | None, temporary: Path, keep_source: bool) -> None:
        # Not indexed, so not acknowledged: the file must not be imported by a recovery.
        if published is not None:
            files.unlink_quietly(published)
        if not keep_source:
            files.unlink_quietly(temporary)

    def deliver_file(self, temporary: Path, size: int, *, folder: str = INBOX, keep_source: bool = False) -> Appended:
        """Publish a fully written, fsync-ed file into a folder's ``new/`` and index it (SMTP delivery).

        Used by :meth:`LocalStore.deliver`: ``temporary`` is renamed (or, with
        ``keep_source``, hard-linked, for the next recipient) into ``new/``. The
        message is ``\\Recent`` and unseen, dated now.
        """
        new = _NewMessage(f"new/{unique_name()}", size, int(self.clock()), 0, 0, "", 1)
        return self._publish_new(folder_name(folder), None, temporary, new, None, keep_source=keep_source)

    def temporary_path(self, folder: str = INBOX) -> Path:
        """A fresh path in a folder's ``tmp/`` to write a message to before :meth:`deliver_file`."""
        canonical = folder_name(folder)
        with self._read() as db:
            return self._path(self._folder(db, canonical, target=True), f"tmp/{unique_name()}")

    def set_flags(
        self,
        name: str,
        uids: Collection[int],
        flags: Iterable[str],
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> list[MessageInfo]:
        """Replace the flags of these messages (STORE FLAGS); returns their metadata afterwards."""
        return self._store(name, uids, flags, "set", uidvalidity, origin)

    def add_flags(
        self,
        name: str,
        uids: Collection[int],
        flags: Iterable[str],
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> list[MessageInfo]:
        """Add flags to these messages (STORE +FLAGS); returns their metadata afterwards."""
        return self._store(name, uids, flags, "add", uidvalidity, origin)

    def remove_flags(
        self,
        name: str,
        uids: Collection[int],
        flags: Iterable[str],
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> list[MessageInfo]:
        """Remove flags from these messages (STORE -FLAGS); returns their metadata afterwards."""
        return self._store(name, uids, flags, "remove", uidvalidity, origin)

    def _store(
        self,
        name: str,
        uids: Collection[int],
        flags: Iterable[str],
        mode: str,
        uidvalidity: int | None,
        origin: object,
    ) -> list[MessageInfo]:
        canonical = folder_name(name)
        bits, keywords = parse_flags(flags)
        with self._write() as db:
            folder = self._folder(db, canonical, uidvalidity)
            rows = self._rows(db, folder, uids)
            updates = []
            for row in rows:
                uid, old_bits, old_keywords = row[0], row[4], row[5]
                if mode == "set":
                    new_bits, new_keywords = bits, merge_keywords("", keywords)
                elif mode == "add":
                    new_bits, new_keywords = old_bits | bits, merge_keywords(old_keywords, add=keywords)
                else:
                    new_bits, new_keywords = old_bits & ~bits, merge_keywords(old_keywords, remove=keywords)
                if new_bits != old_bits or new_keywords != old_keywords:
                    updates.append((uid, new_bits, new_keywords))
            if updates:
                modseq = folder.highest_modseq + 1
                db.executemany(
                    "UPDATE messages SET flags = ?, keywords = ?, modseq = ? WHERE folder_id = ? AND uid = ?",
                    [(b, k, modseq, folder.id, uid) for uid, b, k in updates],
                )
                db.execute("UPDATE folders SET highest_modseq = ? WHERE id = ?", (modseq, folder.id))
                self._notify(Notice(canonical, folder.uidvalidity, modseq, origin=origin))
                rows = self._rows(db, folder, [row[0] for row in rows])
        return [_message_info(row) for row in rows]

    def expunge(
        self,
        name: str,
        uids: Collection[int] | None = None,
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> list[int]:
        """Remove the messages flagged ``\\Deleted`` (among ``uids`` if given: UID EXPUNGE); returns their UIDs."""
        return self._expunge(name, uids, uidvalidity, origin, only_deleted=True)

    def delete_messages(
        self,
        name: str,
        uids: Collection[int],
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> list[int]:
        """Remove these messages whatever their flags (POP3 DELE at QUIT); returns the UIDs removed."""
        return self._expunge(name, uids, uidvalidity, origin, only_deleted=False)

    def _expunge(
        self,
        name: str,
        uids: Collection[int] | None,
        uidvalidity: int | None,
        origin: object,
        *,
        only_deleted: bool,
    ) -> list[int]:
        canonical = folder_name(name)
        with self._write() as db:
            folder = self._folder(db, canonical, uidvalidity)
            where, params = (" AND (flags & ?) != 0", (_DELETED_BIT,)) if only_deleted else ("", ())
            rows = self._rows(db, folder, uids, "uid, file", where, params)
            if not rows:
                return []
            # Files first, then the rows: a crash in between is finished by the recovery.
            self._unlink_files(folder, [row[1] for row in rows])
            removed = [row[0] for row in rows]
            self._remove_rows(db, folder.id, removed, origin)
        return removed

    def _unlink_files(self, folder: _Folder, names: list[str]) -> None:
        touched = set()
        for name in names:
            files.unlink_quietly(self._path(folder, name))
            touched.add(name.partition("/")[0])
        for sub in sorted(touched):
            files.fsync_dir(self._folders_dir / folder.dir / sub)

    def copy(
        self,
        name: str,
        uids: Collection[int],
        target: str,
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> Copied:
        """Copy messages to another folder with their flags and dates (UID COPY); returns UIDPLUS's COPYUID.

        UIDs that do not exist are skipped. The bytes are hard-linked, not copied.
        Raises :class:`NoSuchFolder` (code ``TRYCREATE``) for a missing target and
        :class:`MailboxFull` when the copies do not fit.
        """
        source, destination = folder_name(name), folder_name(target)
        with self._write() as db:
            return self._copy_locked(db, source, uids, destination, uidvalidity, origin, check_quota=True)[0]

    def move(
        self,
        name: str,
        uids: Collection[int],
        target: str,
        *,
        uidvalidity: int | None = None,
        origin: object = None,
    ) -> Copied:
        """Move messages to another folder (RFC 6851 MOVE): copied, then expunged from the source in one commit."""
        source, destination = folder_name(name), folder_name(target)
        with self._write() as db:
            return self._move_locked(db, source, uids, destination, uidvalidity, origin, check_quota=False)

    def _move_locked(
        self,
        db: sqlite3.Connection,
        source: str,
        uids: Collection[int],
        destination: str,
        uidvalidity: int | None,
        origin: object,
        *,
        check_quota: bool,
    ) -> Copied:
        copied, folder, files_moved = self._copy_locked(
            db, source, uids, destination, uidvalidity, origin, check_quota=check_quota
        )
        if copied.source:
            # The copies are published; the originals' files go before their rows.
            self._unlink_files(folder, files_moved)
            self._remove_rows(db, folder.id, list(copied.source), origin)
        return copied

    def _copy_locked(
        self,
        db: sqlite3.Connection,
        source: str,
        uids: Collection[int],
        destination: str,
        uidvalidity: int | None,
        origin: object,
        *,
        check_quota: bool,
    ) -> tuple[Copied, _Folder, list[str]]:
        folder = self._folder(db, source, uidvalidity)
        into = self._folder(db, destination, target=True)
        rows = self._rows(db, folder, uids, "uid, file, size, internal_date, tz_minutes, flags, keywords")
        if not rows:
            return Copied(into.uidvalidity, (), ()), folder, []
        if check_quota:
            self._check_quota(db, sum(row[2] for row in rows), len(rows))
        made: list[Path] = []
        new = []
        try:
            for offset, (_uid, file, size, epoch, tz_minutes, bits, keywords) in enumerate(rows):
                name = f"cur/{unique_name()},U={into.uidnext + offset}{info_suffix(bits)}"
                target_path = self._path(into, name)
                files.publish(self._path(folder, file), target_path, keep_source=True)
                made.append(target_path)
                new.append(_NewMessage(name, size, epoch, tz_minutes, bits, keywords, 1))
            files.fsync_dir(self._folders_dir / into.dir / "cur")
            new_uids = self._add_rows(db, into.id, new, origin, uids=list(range(into.uidnext, into.uidnext + len(new))))
        except FileNotFoundError:
            for path in made:
                files.unlink_quietly(path)
            raise NoSuchMessage(f"a message file in {source!r} is gone; select the folder again") from None
        except OSError as error:
            for path in made:
                files.unlink_quietly(path)
            raise files.unavailable("cannot copy messages", error) from None
        except BaseException:
            for path in made:
                files.unlink_quietly(path)
            raise
        copied = Copied(into.uidvalidity, tuple(row[0] for row in rows), tuple(new_uids))
        return copied, folder, [row[1] for row in rows]

    def search(self, name: str, query: SearchQuery, *, uidvalidity: int | None = None) -> list[int]:
        """UIDs (ascending) of the messages matching every criterion of ``query`` (see :class:`SearchQuery`)."""
        canonical = folder_name(name)
        set_bits, set_keywords = parse_flags(query.flags)
        unset_bits, unset_keywords = parse_flags(query.not_flags)
        where, params = "", []
        if set_bits:
            where += " AND (flags & ?) = ?"
            params += [set_bits, set_bits]
        if unset_bits:
            where += " AND (flags & ?) = 0"
            params.append(unset_bits)
        if query.larger is not None:
            where += " AND size > ?"
            params.append(query.larger)
        if query.smaller is not None:
            where += " AND size < ?"
            params.append(query.smaller)
        if query.modseq is not None:
            where += " AND modseq >= ?"
            params.append(query.modseq)
        with self._read() as db:
            folder = self._folder(db, canonical, uidvalidity)
            rows = self._rows(db, folder, query.uids, _MESSAGE_COLUMNS, where, tuple(params))
        wanted = {word.casefold() for word in set_keywords}
        unwanted = {word.casefold() for word in unset_keywords}
        result = []
        for row in rows:
            if wanted or unwanted:
                have = {word.casefold() for word in row[5].split(" ")} if row[5] else set()
                if not wanted <= have or unwanted & have:
                    continue
            if query.before or query.on or query.since:
                day = _local_day(row[2], row[3])
                if query.before and not day < query.before:
                    continue
                if query.on and day != query.on:
                    continue
                if query.since and not day >= query.since:
                    continue
            result.append(row[0])
        return result

    def changes(
        self,
        name: str,
        since: int,
        *,
        claim_recent: bool = False,
        uidvalidity: int | None = None,
    ) -> Changes:
        """What changed in a folder after modification sequence ``since`` (see :class:`Changes`).

        ``since`` is a ``highest_modseq`` from :meth:`select`, :meth:`status` or an
        earlier :class:`Changes`. With ``claim_recent``, new messages not yet claimed
        become this caller's ``\\Recent`` ones.
        """
        canonical = folder_name(name)
        with self._write() if claim_recent else self._read() as db:
            folder = self._folder(db, canonical, uidvalidity)
            rows = db.execute(
                f"SELECT {_MESSAGE_COLUMNS}, added_modseq, recent FROM messages"  # noqa: S608
                " WHERE folder_id = ? AND modseq > ? ORDER BY uid",
                (folder.id, since),
            ).fetchall()
            expunged = tuple(
                row[0]
                for row in db.execute(
                    "SELECT uid FROM expunged WHERE folder_id = ? AND modseq > ? ORDER BY uid", (folder.id, since)
                )
            )
            new = [row for row in rows if row[7] > since]
            recent: frozenset[int] = frozenset()
            if claim_recent:
                recent = frozenset(row[0] for row in new if row[8])
                if recent:
                    db.executemany(
                        "UPDATE messages SET recent = 0 WHERE folder_id = ? AND uid = ?",
                        [(folder.id, uid) for uid in recent],
                    )
        return Changes(
            folder=canonical,
            uidvalidity=folder.uidvalidity,
            since=since,
            highest_modseq=folder.highest_modseq,
            new=tuple(_message_info(row[:7]) for row in new),
            changed=tuple(_message_info(row[:7]) for row in rows if row[7] <= since),
            expunged=expunged,
            complete=since >= folder.expunge_floor,
            recent=recent,
        )


_FOLDER_COLUMNS = "id, name, dir, uidvalidity, uidnext, highest_modseq, selectable, special_use, expunge_floor"


def _uid_clause(uids: Collection[int] | None) -> tuple[str, tuple[int, ...], set[int] | None]:
    """SQL narrowing to ``uids``: BETWEEN for a range, IN for a few, a Python filter for many."""
    if uids is None:
        return "", (), None
    if isinstance(uids, range) and uids.step == 1:
        if not uids:
            return " AND 0", (), None
        return " AND uid BETWEEN ? AND ?", (uids.start, uids.stop - 1), None
    wanted = {int(uid) for uid in uids}
    if not wanted:
        return " AND 0", (), None
    if len(wanted) > _IN_LIMIT:
        return " AND uid BETWEEN ? AND ?", (min(wanted), max(wanted)), wanted
    return f" AND uid IN ({','.join('?' * len(wanted))})", tuple(sorted(wanted)), None


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _local_day(epoch: int, tz_minutes: int) -> datetime.date:
    zone = datetime.timezone(datetime.timedelta(minutes=tz_minutes))
    return datetime.datetime.fromtimestamp(epoch, tz=zone).date()


__all__ = ["NO_QUOTA", "Mailbox", "Quota"]

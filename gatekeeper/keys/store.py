"""The embedded key store: users' key pairs as sealed PKCS#12 files in a private directory.

Layout under the store's root (directories 0700, files 0600, whatever the umask)::

    .lock                          fcntl lock shared by the CLI, the console and the server
    users/<safe name>/user.json    the record: address, certificates, key list, last login
    users/<safe name>/<key id>.<digest>.p12       a key sealed under the user's password
    users/<safe name>/<key id>.<digest>.pending   a key made by a passwordless rotation

The safe name is built from the case-folded address (a readable, sanitised prefix and a
hash of the whole), so no address can reach outside ``users/`` and ``Alice@`` and
``alice@`` are the same user.

Every file is written atomically (a temporary file in the same directory, fsync, rename,
fsync of the directory). Key files are named after their content, so a change never
overwrites a file the current record refers to: new files are written first, the rename
of ``user.json`` is the commit point, and files no record refers to are removed
afterwards. A failure anywhere before the commit leaves the old record and its files as
they were.

The store never decrypts anything and never sees a password (see
:mod:`gatekeeper.keys.accounts` for that).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from zope.interface import implementer

from gatekeeper.address import address_key, normalize_address
from gatekeeper.errors import InvalidAddress, KeyStoreError, UnknownUser
from gatekeeper.interfaces import IKeyStore, PendingKey, StoredKey, StoredUser

__all__ = ["FileKeyStore", "FileLock", "atomic_write", "private_directory", "safe_name"]

USER_RECORD = "user.json"
RECORD_FORMAT = "gatekeeper-user/1"
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_KEY_FILE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\.[0-9a-f]{16}\.(p12|pending)$")
_MAX_RECORD = 4 * 1024 * 1024
_MAX_KEY_FILE = 1024 * 1024


# -- files and directories ----------------------------------------------------------


def private_directory(path: Path) -> Path:
    """Create ``path`` (and missing parents) if needed and make it mode 0700."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.is_dir() or path.is_symlink():
            raise KeyStoreError(f"not a directory: {path}")
        # mkdir's mode is filtered by the umask, and the directory may be older than us.
        os.chmod(path, 0o700)
    except OSError as error:
        raise KeyStoreError(f"cannot create the directory {path}: {error.strerror}") from None
    return path


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically: readers see the old file or the new one.

    The data goes to a temporary file in the same directory (created 0600 with
    ``O_EXCL``, chmod-ed to ``mode`` whatever the umask), is fsync-ed, renamed over
    ``path``, and the directory is fsync-ed so the rename survives a crash. Raises
    :class:`KeyStoreError` when anything fails (and removes the temporary file).
    """
    directory = path.parent
    temporary = directory / f".tmp-{secrets.token_hex(8)}"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        _fsync_directory(directory)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise KeyStoreError(f"cannot write {path}: {error.strerror}") from None


def _read_file(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise KeyStoreError(f"{path.name} is larger than {limit} bytes")
    return data


# -- locking ------------------------------------------------------------------------

_held = threading.local()


class FileLock:
    """An ``fcntl.flock`` lock on a file, so separate processes (CLI, server) do not race.

    Re-entrant within a thread: a thread that already holds the lock (for any
    :class:`FileLock` of the same path) passes straight through, so a read-modify-write
    can call methods that lock on their own. Other threads and processes wait.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key = str(path.absolute())

    @contextlib.contextmanager
    def hold(self, *, exclusive: bool = True) -> Iterator[None]:
        """Hold the lock (exclusive for writers, shared for readers) for the ``with`` block."""
        held: dict[str, bool] = getattr(_held, "locks", None) or {}
        _held.locks = held
        current = held.get(self._key)
        if current is not None:
            if exclusive and not current:
                raise RuntimeError("cannot upgrade a shared key store lock to an exclusive one")
            yield
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise KeyStoreError(f"cannot open the lock file {self.path}: {error.strerror}") from None
        try:
            os.fchmod(fd, 0o600)  # the umask may have taken the owner's write bit
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            held[self._key] = exclusive
            try:
                yield
            finally:
                del held[self._key]
        finally:
            os.close(fd)  # closing the descriptor releases the flock


# -- names --------------------------------------------------------------------------


def safe_name(address: str) -> str:
    """Return the directory name of ``address``'s record: readable, bounded and traversal-free.

    The case-folded address, with everything outside ``[a-z0-9._@+-]`` replaced by ``_``
    and cut to 48 characters, then ``~`` and 16 hex digits of its SHA-256: two
    addresses that sanitise alike still get different names.
    """
    key = address_key(normalize_address(address))
    readable = re.sub(r"[^a-z0-9._@+-]", "_", key)[:48]
    if readable.startswith("."):
        readable = "_" + readable[1:]  # dot-names are the store's own temporary files
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return f"{readable}~{digest}"


def _key_file_name(key_id: str, data: bytes, suffix: str) -> str:
    return f"{key_id}.{hashlib.sha256(data).hexdigest()[:16]}.{suffix}"


# -- the store ----------------------------------------------------------------------


@implementer(IKeyStore)
class FileKeyStore:
    """:class:`~gatekeeper.interfaces.IKeyStore` on a local directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = private_directory(Path(root))
        self.users_root = private_directory(self.root / "users")
        self.lock = FileLock(self.root / ".lock")

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the store's exclusive lock, e.g. around a read-modify-write of a user."""
        return self.lock.hold(exclusive=True)

    def user_directory(self, address: str) -> Path:
        """Return the directory that holds (or would hold) ``address``'s record."""
        return self.users_root / safe_name(address)

    # IKeyStore

    def list_users(self) -> list[str]:
        """Return the normalised addresses of all users, sorted case-insensitively."""
        addresses = []
        with self.lock.hold(exclusive=False):
            for entry in sorted(os.listdir(self.users_root)):
                if entry.startswith("."):
                    continue
                record = self._read_record(self.users_root / entry)
                if record is not None:
                    addresses.append(_record_address(record, entry))
        return sorted(addresses, key=address_key)

    def get_user(self, address: str) -> StoredUser | None:
        """Return the user with this address (matched case-insensitively), or None.

        Raises :class:`InvalidAddress` for something that is not an address and
        :class:`KeyStoreError` when the record or one of its files is damaged.
        """
        wanted = address_key(normalize_address(address))
        with self.lock.hold(exclusive=False):
            directory = self.user_directory(address)
            record = self._read_record(directory)
            if record is None:
                return None
            user = _parse_record(record, directory, directory.name)
        if address_key(user.address) != wanted:
            raise KeyStoreError(f"the record in {directory.name} is for another address")
        return user

    def put_user(self, user: StoredUser) -> None:
        """Create or replace ``user``'s record and key files atomically.

        New key files are written first, then ``user.json`` is renamed into place (the
        commit point), then files no longer referenced are removed.
        """
        try:
            address = normalize_address(user.address)
        except InvalidAddress:
            raise KeyStoreError("a stored user needs a valid address") from None
        if address != user.address:
            raise KeyStoreError("a stored user's address must be normalised")
        if not user.keys:
            raise KeyStoreError("a stored user needs at least one key")
        key_ids = [key.key_id for key in user.keys] + [key.key_id for key in user.pending]
        for key_id in key_ids:
            if not _KEY_ID_RE.match(key_id):
                raise KeyStoreError("a key id must be 1 to 64 letters, digits, '-' or '_'")
        if len(set(key_ids)) != len(key_ids):
            raise KeyStoreError("a stored user's key ids must be unique")

        with self.lock.hold(exclusive=True):
            directory = private_directory(self.user_directory(address))
            keys_json = []
            referenced = {USER_RECORD}
            for key in user.keys:
                name = self._write_key_file(directory, key.key_id, key.sealed, "p12")
                referenced.add(name)
                keys_json.append(
                    {
                        "key_id": key.key_id,
                        "file": name,
                        "certificate": _pem(key.certificate),
                        "created": _time_text(key.created),
                        "retired": key.retired,
                    }
                )
            pending_json = []
            for pending in user.pending:
                name = self._write_key_file(directory, pending.key_id, pending.wrapped, "pending")
                referenced.add(name)
                pending_json.append(
                    {
                        "key_id": pending.key_id,
                        "file": name,
                        "certificate": _pem(pending.certificate),
                        "sealed_to": pending.sealed_to,
                        "created": _time_text(pending.created),
                    }
                )
            record = {
                "format": RECORD_FORMAT,
                "address": address,
                "created": _time_text(user.created),
                "last_login": None if user.last_login is None else _time_text(user.last_login),
                "keys": keys_json,
                "pending": pending_json,
            }
            atomic_write(directory / USER_RECORD, _dump(record))
            self._remove_unreferenced(directory, referenced)

    def delete_user(self, address: str) -> None:
        """Remove the user and every key file; raises :class:`UnknownUser` if absent."""
        normalized = normalize_address(address)
        with self.lock.hold(exclusive=True):
            directory = self.user_directory(normalized)
            if self._read_record(directory) is None:
                raise UnknownUser(f"no such user: {normalized}")
            # One rename makes the user disappear at once; the files go afterwards.
            graveyard = self.users_root / f".deleted-{secrets.token_hex(8)}"
            try:
                os.rename(directory, graveyard)
                _fsync_directory(self.users_root)
            except OSError as error:
                raise KeyStoreError(f"cannot delete {normalized}: {error.strerror}") from None
            shutil.rmtree(graveyard, ignore_errors=True)

    # beyond the interface

    def record_login(self, address: str, when: datetime.datetime | None = None) -> None:
        """Set the user's last login time (default: now), rewriting only ``user.json``.

        No key file is touched. Raises :class:`UnknownUser` if there is no such user.
        """
        if when is None:
            when = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        normalized = normalize_address(address)
        with self.lock.hold(exclusive=True):
            directory = self.user_directory(normalized)
            record = self._read_record(directory)
            if record is None:
                raise UnknownUser(f"no such user: {normalized}")
            record["last_login"] = _time_text(when)
            atomic_write(directory / USER_RECORD, _dump(record))

    def put_user_if_unchanged(self, expected: StoredUser, user: StoredUser) -> bool:
        """Write ``user`` only if the stored record still equals ``expected`` (ignoring last login).

        For a login completing a pending rotation: if an administrator changed the user
        meanwhile, the login's result is stale and is dropped (returns False); the next
        login completes whatever is pending then.
        """
        with self.lock.hold(exclusive=True):
            current = self.get_user(expected.address)
            if current is None or _without_login(current) != _without_login(expected):
                return False
            self.put_user(user)
            return True

    # internals

    def _read_record(self, directory: Path) -> dict[str, Any] | None:
        try:
            data = _read_file(directory / USER_RECORD, _MAX_RECORD)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno == errno.ENOTDIR:
                return None
            raise KeyStoreError(f"cannot read the record in {directory.name}: {error.strerror}") from None
        try:
            record = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise KeyStoreError(f"the record in {directory.name} is not valid JSON") from None
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            raise KeyStoreError(f"the record in {directory.name} is not a {RECORD_FORMAT} record")
        return record

    def _write_key_file(self, directory: Path, key_id: str, data: bytes, suffix: str) -> str:
        name = _key_file_name(key_id, data, suffix)
        path = directory / name
        try:
            if _read_file(path, _MAX_KEY_FILE) == data:
                return name  # content-named: the same bytes are already there
        except (FileNotFoundError, KeyStoreError):
            pass
        except OSError as error:
            raise KeyStoreError(f"cannot read {path}: {error.strerror}") from None
        atomic_write(path, data)
        return name

    def _remove_unreferenced(self, directory: Path, referenced: set[str]) -> None:
        for entry in os.listdir(directory):
            if entry not in referenced:
                # Leftovers of an interrupted write, or keys the new record dropped.
                with contextlib.suppress(OSError):
                    os.unlink(directory / entry)


# -- the record format --------------------------------------------------------------


def _without_login(user: StoredUser) -> StoredUser:
    return StoredUser(user.address, user.keys, user.created, user.pending, None)


def _dump(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _time_text(when: datetime.datetime) -> str:
    if when.tzinfo is None:
        raise KeyStoreError("times in the key store must carry a time zone")
    return when.astimezone(datetime.UTC).isoformat()


def _record_address(record: dict[str, Any], name: str) -> str:
    address = record.get("address")
    if not isinstance(address, str):
        raise KeyStoreError(f"the record in {name} has no address")
    try:
        return normalize_address(address)
    except InvalidAddress:
        raise KeyStoreError(f"the record in {name} has an invalid address") from None


def _parse_record(record: dict[str, Any], directory: Path, name: str) -> StoredUser:
    def damaged(what: str) -> KeyStoreError:
        return KeyStoreError(f"the record in {name} is damaged: {what}")

    def when(value: object, field: str) -> datetime.datetime:
        if not isinstance(value, str):
            raise damaged(f"{field} is not a time")
        try:
            parsed = datetime.datetime.fromisoformat(value)
        except ValueError:
            raise damaged(f"{field} is not a time") from None
        if parsed.tzinfo is None:
            raise damaged(f"{field} has no time zone")
        return parsed

    def certificate(value: object) -> x509.Certificate:
        if not isinstance(value, str):
            raise damaged("a certificate is missing")
        try:
            return x509.load_pem_x509_certificate(value.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise damaged("a certificate does not parse") from None

    def key_file(entry: dict[str, Any]) -> tuple[str, bytes]:
        key_id, file_name = entry.get("key_id"), entry.get("file")
        if not isinstance(key_id, str) or not _KEY_ID_RE.match(key_id):
            raise damaged("a key id is invalid")
        # The file name comes from disk: never let it name anything outside this directory.
        if not isinstance(file_name, str) or not _KEY_FILE_RE.match(file_name):
            raise damaged("a key file name is invalid")
        try:
            data = _read_file(directory / file_name, _MAX_KEY_FILE)
        except FileNotFoundError:
            raise damaged(f"the key file {file_name} is missing") from None
        except OSError as error:
            raise KeyStoreError(f"cannot read {file_name} in {name}: {error.strerror}") from None
        if not file_name.startswith(f"{key_id}.{hashlib.sha256(data).hexdigest()[:16]}."):
            raise damaged(f"the key file {file_name} does not match its digest")
        return key_id, data

    address = _record_address(record, name)
    entries = record.get("keys")
    pending_entries = record.get("pending", [])
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise damaged("no keys")
    if not isinstance(pending_entries, list) or not all(isinstance(e, dict) for e in pending_entries):
        raise damaged("pending keys are not a list")
    keys = []
    for entry in entries:
        key_id, sealed = key_file(entry)
        retired = entry.get("retired", False)
        if not isinstance(retired, bool):
            raise damaged("'retired' is not true or false")
        keys.append(
            StoredKey(
                key_id, certificate(entry.get("certificate")), sealed, when(entry.get("created"), "created"), retired
            )
        )
    pending = []
    for entry in pending_entries:
        key_id, wrapped = key_file(entry)
        sealed_to = entry.get("sealed_to")
        if not isinstance(sealed_to, str) or not _KEY_ID_RE.match(sealed_to):
            raise damaged("a pending key names no sealing key")
        pending.append(
            PendingKey(
                key_id, certificate(entry.get("certificate")), wrapped, sealed_to, when(entry.get("created"), "created")
            )
        )
    last_login = record.get("last_login")
    return StoredUser(
        address=address,
        keys=tuple(keys),
        created=when(record.get("created"), "created"),
        pending=tuple(pending),
        last_login=None if last_login is None else when(last_login, "last_login"),
    )

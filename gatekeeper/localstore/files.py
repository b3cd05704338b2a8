"""File-system steps of the local store: private directories, fsync-ed writes, the publishing rename.

Everything here is synchronous and small. Files are created 0600 and directories 0700
whatever the umask; symbolic links are never followed into or out of the store.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from gatekeeper.localstore.errors import StoreDamaged, StoreUnavailable

CHUNK = 1024 * 1024
MessageSource = bytes | bytearray | memoryview | BinaryIO
"""A message to store: its bytes, or a binary file object read from its current position to its end."""

_NO_LINK = (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) if needed and make it a mode-0700 directory."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.is_symlink() or not path.is_dir():
            raise StoreDamaged(f"not a directory: {path}")
        # mkdir's mode is filtered by the umask, and the directory may be older than us.
        os.chmod(path, 0o700)
    except OSError as error:
        raise unavailable(f"cannot create the directory {path}", error) from None
    return path


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename, a link, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def known_size(source: MessageSource) -> int | None:
    """The size of a message given as bytes; None for a file object (learned when written)."""
    if isinstance(source, bytes | bytearray):
        return len(source)
    if isinstance(source, memoryview):
        return source.nbytes
    return None


def write_file(path: Path, source: MessageSource) -> int:
    """Write ``source`` to the new file ``path`` (0600, ``O_EXCL``), fsync it, return its size.

    On any failure the partial file is removed and :class:`StoreUnavailable` raised.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise unavailable("cannot create a message file", error) from None
    size = 0
    try:
        try:
            os.fchmod(fd, 0o600)
            if isinstance(source, bytes | bytearray | memoryview):
                size = _write_all(fd, memoryview(source).cast("B"))
            else:
                while chunk := source.read(CHUNK):
                    size += _write_all(fd, memoryview(chunk))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise unavailable("cannot write a message file", error) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return size


def _write_all(fd: int, view: memoryview) -> int:
    total = len(view)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    return total


def publish(source: Path, target: Path, *, keep_source: bool) -> None:
    """Make a fully written, fsync-ed file visible under its final name: the commit point on disk.

    ``rename`` when the source is not needed any more, else a hard link (a copy where
    the file system has no hard links). Both are atomic: a reader, or the recovery
    after a crash, sees the whole file under ``target`` or nothing. The caller fsyncs
    the target directory.
    """
    if not keep_source:
        os.rename(source, target)
        return
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as error:
        if error.errno not in _NO_LINK:
            raise
        temporary = target.parent.parent / "tmp" / (target.name.partition(":")[0] + ".copy")
        with open(source, "rb") as handle:
            write_file(temporary, handle)
        os.rename(temporary, target)


def remove_tree(path: Path) -> None:
    """Remove a directory tree of the store (never following links out of it)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def unlink_quietly(path: Path) -> bool:
    """Remove a file; True if it was there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def unavailable(what: str, error: OSError) -> StoreUnavailable:
    """A :class:`StoreUnavailable` naming the failed step and the system's reason (no content)."""
    if error.errno == errno.ENOSPC:
        return StoreUnavailable(f"{what}: the mail store's disk is full")
    if error.errno == errno.EDQUOT:
        return StoreUnavailable(f"{what}: the mail store's disk quota is exhausted")
    return StoreUnavailable(f"{what}: {error.strerror or error}")

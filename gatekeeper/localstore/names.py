"""Names the local store accepts: folder names, flags and keywords, Maildir file names.

Folder names are Unicode (NFC), with ``/`` separating the hierarchy; ``INBOX`` is
matched case-insensitively, as IMAP requires, and everything else is case-sensitive.
IMAP's modified UTF-7 is the adapter's business. Folder names never become paths:
each folder's directory has a random name, so no folder name can reach outside the
store, whatever it contains.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import secrets
import socket
import threading
import time
import unicodedata
from collections.abc import Iterable

from gatekeeper.localstore.errors import InvalidFlag, InvalidFolderName
from gatekeeper.localstore.types import ANSWERED, DELETED, DRAFT, FLAGGED, SEEN, SYSTEM_FLAGS

SEPARATOR = "/"
INBOX = "INBOX"
MAX_FOLDER_NAME = 255
MAX_FOLDER_DEPTH = 16
MAX_KEYWORD = 64
MAX_KEYWORDS_PER_MESSAGE = 64

# Wildcards of LIST, and characters no sane folder name needs (controls, line ends).
_FORBIDDEN_IN_NAME = re.compile(r"[*%\x00-\x1f\x7f-\x9f\u2028\u2029]")
# An IMAP atom without the characters that are special in flags (RFC 3501 flag-keyword).
_KEYWORD_RE = re.compile(r"^[!#$&'+,\-./0-9:;<=>?@A-Z^_`a-z|~]+$")

_SYSTEM_BITS = {SEEN: 1, ANSWERED: 2, FLAGGED: 4, DELETED: 8, DRAFT: 16}
_BY_FOLDED = {flag.casefold(): flag for flag in SYSTEM_FLAGS}


@functools.lru_cache(maxsize=1024)
def folder_name(name: str) -> str:
    """Return the canonical form of a folder name, or raise :class:`InvalidFolderName`.

    NFC-normalised; ``INBOX`` in any case (alone or as the first level) becomes
    ``INBOX``. Refused: empty names or levels (leading, trailing or doubled ``/``),
    levels that are ``.`` or ``..`` or start or end with a space, the LIST wildcards
    ``*`` and ``%``, control characters, and names longer than 255 characters or
    deeper than 16 levels.
    """
    if not isinstance(name, str) or not name:
        raise InvalidFolderName("a folder name cannot be empty")
    text = unicodedata.normalize("NFC", name)
    shown = _shown(text)
    if len(text) > MAX_FOLDER_NAME:
        raise InvalidFolderName(f"folder name too long (at most {MAX_FOLDER_NAME} characters): {shown}")
    if _FORBIDDEN_IN_NAME.search(text):
        raise InvalidFolderName(f"folder names cannot contain *, % or control characters: {shown}")
    levels = text.split(SEPARATOR)
    if len(levels) > MAX_FOLDER_DEPTH:
        raise InvalidFolderName(f"folder hierarchy too deep (at most {MAX_FOLDER_DEPTH} levels): {shown}")
    for level in levels:
        if not level:
            raise InvalidFolderName(f"empty level in folder name (leading, trailing or doubled {SEPARATOR}): {shown}")
        if level in (".", ".."):
            raise InvalidFolderName(f"folder levels cannot be . or ..: {shown}")
        if level != level.strip():
            raise InvalidFolderName(f"folder levels cannot start or end with a space: {shown}")
    if levels[0].casefold() == "inbox":
        levels[0] = INBOX
    return SEPARATOR.join(levels)


def parent_names(name: str) -> list[str]:
    """The names above a canonical folder name, outermost first (``a/b/c`` -> ``a``, ``a/b``)."""
    levels = name.split(SEPARATOR)
    return [SEPARATOR.join(levels[:i]) for i in range(1, len(levels))]


def is_inside(name: str, ancestor: str) -> bool:
    """True when ``name`` is strictly below ``ancestor`` in the hierarchy."""
    return name.startswith(ancestor + SEPARATOR)


def _shown(text: str) -> str:
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[:80])
    return repr(cleaned + ("..." if len(text) > 80 else ""))


# -- flags ----------------------------------------------------------------------------


def parse_flags(flags: Iterable[str]) -> tuple[int, tuple[str, ...]]:
    """Split flags into the system-flag bit mask and the keywords (deduplicated, case-insensitively).

    System flags are matched case-insensitively; ``\\Recent`` and unknown ``\\`` flags,
    and keywords that are not IMAP atoms, raise :class:`InvalidFlag`.
    """
    bits = 0
    keywords: dict[str, str] = {}
    if isinstance(flags, str):
        raise InvalidFlag("flags must be given as a collection of strings, not one string")
    for flag in flags:
        if not isinstance(flag, str) or not flag:
            raise InvalidFlag("a flag cannot be empty")
        if flag.startswith("\\"):
            canonical = _BY_FOLDED.get(flag.casefold())
            if canonical is None:
                if flag.casefold() == "\\recent":
                    raise InvalidFlag("\\Recent is set by the server and cannot be stored")
                raise InvalidFlag(f"unknown system flag: {_shown(flag)}")
            bits |= _SYSTEM_BITS[canonical]
            continue
        if len(flag) > MAX_KEYWORD or not _KEYWORD_RE.match(flag):
            raise InvalidFlag(f"not a valid keyword: {_shown(flag)}")
        keywords.setdefault(flag.casefold(), flag)
    if len(keywords) > MAX_KEYWORDS_PER_MESSAGE:
        raise InvalidFlag(f"at most {MAX_KEYWORDS_PER_MESSAGE} keywords per message")
    return bits, tuple(keywords.values())


def system_flag_bit(flag: str) -> int | None:
    """The bit of a system flag (matched case-insensitively), or None for a keyword."""
    canonical = _BY_FOLDED.get(flag.casefold())
    return None if canonical is None else _SYSTEM_BITS[canonical]


def flag_set(bits: int, keywords: str) -> frozenset[str]:
    """The flags of a stored message: its bit mask and its space-separated keywords."""
    flags = [flag for flag, bit in _SYSTEM_BITS.items() if bits & bit]
    if keywords:
        flags.extend(keywords.split(" "))
    return frozenset(flags)


def join_keywords(keywords: Iterable[str]) -> str:
    """Keywords as stored: space-separated, in the order given."""
    return " ".join(keywords)


def merge_keywords(current: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> str:
    """Add and remove keywords (case-insensitively), keeping the stored spelling of those kept."""
    kept: dict[str, str] = {}
    for word in current.split(" ") if current else ():
        kept.setdefault(word.casefold(), word)
    for word in remove:
        kept.pop(word.casefold(), None)
    for word in add:
        kept.setdefault(word.casefold(), word)
    if len(kept) > MAX_KEYWORDS_PER_MESSAGE:
        raise InvalidFlag(f"at most {MAX_KEYWORDS_PER_MESSAGE} keywords per message")
    return " ".join(kept.values())


# -- Maildir file names -----------------------------------------------------------------

# The Maildir "info" letters (cr.yp.to/proto/maildir.html), for files imported at recovery
# and for the name given to an appended message: the index, not the name, is authoritative.
_INFO_LETTERS = {"D": DRAFT, "F": FLAGGED, "R": ANSWERED, "S": SEEN, "T": DELETED}
_LETTER_OF = {flag: letter for letter, flag in _INFO_LETTERS.items()}
_counter = itertools.count(1)
_counter_lock = threading.Lock()
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


def unique_name() -> str:
    """A Maildir file name unique across processes and time: ``SECONDS.M<usec>P<pid>Q<n>R<random>.HOST``."""
    now = time.time()
    with _counter_lock:
        number = next(_counter)
    micro = int((now - int(now)) * 1_000_000)
    return f"{int(now)}.M{micro:06d}P{os.getpid()}Q{number}R{secrets.token_hex(4)}.{_HOST}"


def info_suffix(bits: int) -> str:
    """The ``:2,FLAGS`` suffix for a message with these system flags (letters in ASCII order)."""
    letters = sorted(_LETTER_OF[flag] for flag, bit in _SYSTEM_BITS.items() if bits & bit)
    return ":2," + "".join(letters)


_UID_IN_NAME = re.compile(r",U=([1-9][0-9]{0,9})(?=[,:]|$)")


def uid_from_name(file_name: str) -> int | None:
    """The UID a file name carries in a ``,U=<uid>`` field (given when it was published), or None."""
    match = _UID_IN_NAME.search(file_name.partition(":2,")[0])
    return int(match.group(1)) if match else None


def flags_from_info(file_name: str) -> int:
    """The system-flag bits a Maildir file name's ``:2,`` info carries (unknown letters ignored)."""
    _, sep, info = file_name.rpartition(":2,")
    if not sep:
        return 0
    bits = 0
    for letter in info:
        flag = _INFO_LETTERS.get(letter)
        if flag is not None:
            bits |= _SYSTEM_BITS[flag]
    return bits

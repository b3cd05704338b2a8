"""IMAP4rev1 wire syntax (RFC 3501 section 9), bytes in and bytes out, without Twisted.

Two kinds of helpers:

- a small reader for the values in server responses (:func:`parse_value`): atoms,
  numbers, quoted strings, literals (inline, as the upstream client assembles them:
  ``{5}\\r\\nhello``), NIL and parenthesised lists;
- a *slicer* for FETCH responses (:func:`fetch_items`) that finds where each item's
  value starts and ends without building it, so the proxy can pass upstream's bytes to
  the client unchanged (the ENVELOPE of a plain message is never decoded and re-encoded).

And the writers: :func:`astring`, :func:`nstring`, :func:`literal`, :func:`quote`,
:func:`sequence_set`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TypeAlias

Value: TypeAlias = "bytes | list[Value] | None"

_SPECIAL = re.compile(rb'[()"{\[\]]')
_QUOTED = re.compile(rb'"(?:[^"\\\r\n]|\\.)*"')
_LITERAL = re.compile(rb"[~]?\{(\d+)\+?\}\r\n")
_ATOM = re.compile(rb'[^\s()"{\[\]]+')
_ATOM_WITH_SECTION = re.compile(rb'[^\s()"{]+')
_UNESCAPE = re.compile(rb"\\(.)")
_SAFE_ATOM = re.compile(rb'^[^\x00-\x20\x7f-\xff(){%*"\\\]]+$')  # ATOM-CHAR


class ImapSyntaxError(ValueError):
    """A server response that does not follow IMAP syntax."""


def skip_value(data: bytes, pos: int) -> int:
    """Return the position just after the value starting at ``data[pos]``."""
    if pos >= len(data):
        raise ImapSyntaxError("value expected")
    first = data[pos : pos + 1]
    if first == b"(":
        depth = 0
        search = _SPECIAL.search
        while True:
            match = search(data, pos)
            if match is None:
                raise ImapSyntaxError("unbalanced parentheses")
            pos = match.start()
            char = data[pos]
            if char == 0x28:  # (
                depth += 1
                pos += 1
            elif char == 0x29:  # )
                depth -= 1
                pos += 1
                if depth == 0:
                    return pos
            elif char == 0x22:  # "
                quoted = _QUOTED.match(data, pos)
                if quoted is None:
                    raise ImapSyntaxError("bad quoted string")
                pos = quoted.end()
            elif char == 0x7B:  # {
                literal_match = _LITERAL.match(data, pos)
                if literal_match is None:
                    pos += 1  # a brace inside an atom
                else:
                    pos = literal_match.end() + int(literal_match.group(1))
            else:  # [ or ] inside atoms
                pos += 1
    if first == b'"':
        quoted = _QUOTED.match(data, pos)
        if quoted is None:
            raise ImapSyntaxError("bad quoted string")
        return quoted.end()
    if first in (b"{", b"~"):
        literal_match = _LITERAL.match(data, pos)
        if literal_match is None:
            raise ImapSyntaxError("bad literal")
        end = literal_match.end() + int(literal_match.group(1))
        if end > len(data):
            raise ImapSyntaxError("literal longer than the response")
        return end
    atom = _ATOM_WITH_SECTION.match(data, pos)
    if atom is None:
        raise ImapSyntaxError("value expected")
    return atom.end()


def parse_value(data: bytes, pos: int = 0) -> tuple[Value, int]:
    """Parse one value at ``pos``: bytes (atom, number, string or literal), None (NIL) or a list."""
    while pos < len(data) and data[pos] == 0x20:
        pos += 1
    if pos >= len(data):
        raise ImapSyntaxError("value expected")
    first = data[pos]
    if first == 0x28:  # (
        items: list[Value] = []
        pos += 1
        while True:
            while pos < len(data) and data[pos] == 0x20:
                pos += 1
            if pos >= len(data):
                raise ImapSyntaxError("unbalanced parentheses")
            if data[pos] == 0x29:
                return items, pos + 1
            item, pos = parse_value(data, pos)
            items.append(item)
    if first == 0x22:  # "
        quoted = _QUOTED.match(data, pos)
        if quoted is None:
            raise ImapSyntaxError("bad quoted string")
        return _UNESCAPE.sub(rb"\1", data[pos + 1 : quoted.end() - 1]), quoted.end()
    if first in (0x7B, 0x7E):  # { ~
        literal_match = _LITERAL.match(data, pos)
        if literal_match is None:
            raise ImapSyntaxError("bad literal")
        start = literal_match.end()
        end = start + int(literal_match.group(1))
        if end > len(data):
            raise ImapSyntaxError("literal longer than the response")
        return data[start:end], end
    atom = _ATOM_WITH_SECTION.match(data, pos)
    if atom is None:
        raise ImapSyntaxError("value expected")
    word = atom.group(0)
    # a section with a list inside ("BODY[HEADER.FIELDS (A B)]") continues past spaces
    if b"[" in word and b"]" not in word:
        close = data.find(b"]", atom.end())
        if close < 0:
            raise ImapSyntaxError("unterminated section")
        end = close + 1
        tail = _ATOM.match(data, end)
        if tail is not None:
            end = tail.end()
        word = data[pos:end]
        return word, end
    if word.upper() == b"NIL":
        return None, atom.end()
    return word, atom.end()


def parse_line(data: bytes) -> list[Value]:
    """Parse a whole response line (after the tag) into its values."""
    values: list[Value] = []
    pos = 0
    while True:
        while pos < len(data) and data[pos] == 0x20:
            pos += 1
        if pos >= len(data):
            return values
        if data[pos] == 0x5B:  # [resp-text-code] stays one value
            close = data.find(b"]", pos)
            if close < 0:
                raise ImapSyntaxError("unterminated response code")
            values.append(data[pos : close + 1])
            pos = close + 1
            continue
        value, pos = parse_value(data, pos)
        values.append(value)


def _item_name_end(data: bytes, pos: int) -> int:
    """The end of a fetch item name: an atom, with ``[section]`` and ``<origin>`` attached."""
    atom = _ATOM.match(data, pos)
    if atom is None:
        raise ImapSyntaxError("fetch item name expected")
    end = atom.end()
    if end < len(data) and data[end] == 0x5B:  # [
        close = data.find(b"]", end)
        if close < 0:
            raise ImapSyntaxError("unterminated section")
        end = close + 1
        if end < len(data) and data[end] == 0x3C:  # <
            close = data.find(b">", end)
            if close < 0:
                raise ImapSyntaxError("unterminated origin")
            end = close + 1
    return end


def fetch_items(data: bytes, pos: int = 0) -> list[tuple[bytes, bytes]]:
    """Split ``(NAME value NAME value ...)`` at ``pos`` into (upper-case name, raw value bytes)."""
    length = len(data)
    while pos < length and data[pos] == 0x20:
        pos += 1
    if data[pos : pos + 1] != b"(":
        raise ImapSyntaxError("fetch list expected")
    pos += 1
    items: list[tuple[bytes, bytes]] = []
    while True:
        while pos < length and data[pos] == 0x20:
            pos += 1
        if pos >= length:
            raise ImapSyntaxError("unterminated fetch list")
        if data[pos] == 0x29:
            return items
        end = _item_name_end(data, pos)
        name = data[pos:end].upper()
        pos = end
        while pos < length and data[pos] == 0x20:
            pos += 1
        end = skip_value(data, pos)
        items.append((name, data[pos:end]))
        pos = end


def fetch_items_named(data: bytes, names: frozenset[bytes], pos: int = 0) -> dict[bytes, bytes]:
    """The items called ``names`` of a FETCH list; stops reading once it has them all.

    Servers put UID and FLAGS first, so a listing's ENVELOPE is never scanned for them.
    """
    found: dict[bytes, bytes] = {}
    if not names:
        return found
    length = len(data)
    while pos < length and data[pos] == 0x20:
        pos += 1
    if data[pos : pos + 1] != b"(":
        raise ImapSyntaxError("fetch list expected")
    pos += 1
    while len(found) < len(names):
        while pos < length and data[pos] == 0x20:
            pos += 1
        if pos >= length or data[pos] == 0x29:
            return found
        end = _item_name_end(data, pos)
        name = data[pos:end].upper()
        pos = end
        while pos < length and data[pos] == 0x20:
            pos += 1
        end = skip_value(data, pos)
        if name in names:
            found[name] = data[pos:end]
        pos = end
    return found


def flags_of(value: bytes) -> tuple[str, ...]:
    """The flags in a raw ``(\\Seen $Label)`` value."""
    inner = value.strip()
    if inner[:1] == b"(":
        inner = inner[1:-1]
    return tuple(word.decode("ascii", "replace") for word in inner.split())


def unliteral(value: bytes) -> bytes | None:
    """The content of a raw string value (quoted or literal), or None for NIL."""
    parsed, _ = parse_value(value)
    if parsed is None or isinstance(parsed, bytes):
        return parsed
    raise ImapSyntaxError("string expected")


# -- writing ------------------------------------------------------------------------------


def quote(value: bytes) -> bytes:
    """A quoted string (for values without CR, LF or NUL)."""
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def literal(value: bytes) -> bytes:
    """A synchronising-free literal as a server writes it: ``{n}\\r\\n`` and the bytes."""
    return b"{%d}\r\n" % len(value) + value


def nstring(value: bytes | None) -> bytes:
    """NIL, a quoted string, or a literal when the value needs one."""
    if value is None:
        return b"NIL"
    if len(value) > 1000 or any(c in value for c in (b"\r", b"\n", b"\0")) or not value.isascii():
        return literal(value)
    return quote(value)


def astring(value: bytes) -> bytes:
    """An atom when the value is one, else a quoted string or a literal."""
    if value and _SAFE_ATOM.match(value) and value.upper() != b"NIL":
        return value
    return nstring(value)


def sequence_set(numbers: Iterable[int]) -> bytes:
    """``1:3,7,9:10`` for sorted, distinct positive ``numbers`` (empty input: empty bytes)."""
    parts: list[bytes] = []
    start = previous = -1
    for number in numbers:
        if number == previous + 1:
            previous = number
            continue
        if start >= 0:
            parts.append(b"%d" % start if start == previous else b"%d:%d" % (start, previous))
        start = previous = number
    if start >= 0:
        parts.append(b"%d" % start if start == previous else b"%d:%d" % (start, previous))
    return b",".join(parts)


def chunks(numbers: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    """``numbers`` in consecutive pieces of at most ``size``."""
    for start in range(0, len(numbers), size):
        yield numbers[start : start + size]

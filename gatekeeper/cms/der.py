"""A small, bounded DER/BER reader and a DER writer for the outer layers of CMS.

pyasn1 decodes and encodes the small CMS structures well, but is slow for large OCTET
STRINGs (a 64 KB content costs more than the RSA operation). So the outer layers
(ContentInfo, SignedData, EnvelopedData and the encrypted content) are walked here as
plain tag-length-value elements over a ``memoryview`` (no copies), and built by hand
around pre-encoded small pieces.

The reader accepts BER as Outlook writes it (indefinite lengths, constructed OCTET
STRINGs in chunks) and is bounded: nesting depth, element counts and lengths are
checked, and every failure is a :class:`~gatekeeper.cms.errors.Malformed`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from pyasn1.error import PyAsn1Error

from gatekeeper.cms.errors import LimitExceeded, Malformed

MAX_DEPTH = 48
MAX_CHILDREN = 1_000_000
MAX_LENGTH_OCTETS = 4  # lengths up to 4 GiB; anything above is refused outright

# Identifier octets (class | constructed | number) of the tags CMS uses.
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
UTF8_STRING = 0x0C
SEQUENCE = 0x30
SET = 0x31
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
CONSTRUCTED_OCTET_STRING = 0x24


def context(number: int, *, constructed: bool = True) -> int:
    """The identifier octet of a context-specific tag ``[number]``."""
    return 0x80 | (0x20 if constructed else 0) | number


class Element:
    """One TLV element found in a buffer.

    ``tag`` is the identifier octet (for the rare high tag numbers, the first octet plus
    the number shifted left by 8, so that it never equals a low tag); ``start``/``end``
    delimit the contents, ``next`` is the offset just after the element (after the
    end-of-contents octets for an indefinite length).
    """

    __slots__ = ("depth", "end", "header_start", "indefinite", "next", "start", "tag")

    def __init__(
        self, tag: int, header_start: int, start: int, end: int, next_: int, depth: int, indefinite: bool
    ) -> None:
        self.tag = tag
        self.header_start = header_start
        self.start = start
        self.end = end
        self.next = next_
        self.depth = depth
        self.indefinite = indefinite

    @property
    def constructed(self) -> bool:
        """Whether the element holds other elements."""
        return bool(self.tag & 0x20)

    @property
    def length(self) -> int:
        """The number of content octets."""
        return self.end - self.start

    def __repr__(self) -> str:
        return f"<Element tag={self.tag:#x} {self.start}:{self.end}>"


def read_element(buf: memoryview, pos: int, limit: int, depth: int = 0) -> Element:
    """Read the element starting at ``buf[pos]``, which must end by ``limit``."""
    if depth > MAX_DEPTH:
        raise LimitExceeded("the structure is nested too deeply")
    header_start = pos
    if pos >= limit:
        raise Malformed("truncated structure: an element is missing")
    first = buf[pos]
    pos += 1
    tag = first
    if first & 0x1F == 0x1F:
        number = 0
        for _ in range(4):
            if pos >= limit:
                raise Malformed("truncated structure: incomplete tag")
            octet = buf[pos]
            pos += 1
            number = (number << 7) | (octet & 0x7F)
            if not octet & 0x80:
                break
        else:
            raise Malformed("unsupported tag number")
        tag = first | (number << 8)
    if pos >= limit:
        raise Malformed("truncated structure: missing length")
    length_octet = buf[pos]
    pos += 1
    if length_octet < 0x80:
        length = length_octet
    elif length_octet == 0x80:
        if not first & 0x20:
            raise Malformed("indefinite length on a primitive element")
        child = pos
        count = 0
        while True:
            if child + 1 < limit and buf[child] == 0 and buf[child + 1] == 0:
                return Element(tag, header_start, pos, child, child + 2, depth, True)
            child = read_element(buf, child, limit, depth + 1).next
            count += 1
            if count > MAX_CHILDREN:
                raise LimitExceeded("too many elements in one structure")
    else:
        count_octets = length_octet & 0x7F
        if count_octets > MAX_LENGTH_OCTETS:
            raise LimitExceeded("an element is too large")
        if pos + count_octets > limit:
            raise Malformed("truncated structure: incomplete length")
        length = int.from_bytes(buf[pos : pos + count_octets], "big")
        pos += count_octets
    if length > limit - pos:
        raise Malformed("truncated structure: an element is longer than what contains it")
    return Element(tag, header_start, pos, pos + length, pos + length, depth, False)


def parse(data: bytes | bytearray | memoryview, *, expect: int | None = None) -> tuple[memoryview, Element]:
    """Read the single top-level element of ``data``; trailing octets are refused.

    Trailing zero octets (some writers pad) are tolerated.
    """
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
    element = read_element(buf, 0, len(buf))
    if element.next != len(buf) and any(buf[element.next :]):
        raise Malformed("unexpected data after the structure")
    if expect is not None and element.tag != expect:
        raise Malformed("unexpected structure")
    return buf, element


def children(buf: memoryview, element: Element) -> list[Element]:
    """Return the elements inside a constructed element, in order."""
    if not element.constructed:
        raise Malformed("expected a constructed element")
    found = []
    pos = element.start
    while pos < element.end:
        child = read_element(buf, pos, element.end, element.depth + 1)
        if child.tag == 0 and child.length == 0:
            raise Malformed("unexpected end-of-contents marker")
        found.append(child)
        pos = child.next
        if len(found) > MAX_CHILDREN:
            raise LimitExceeded("too many elements in one structure")
    return found


def expect(element: Element, tag: int, what: str) -> Element:
    """Return ``element`` if it has ``tag``, else raise :class:`Malformed` naming ``what``."""
    if element.tag != tag:
        raise Malformed(f"malformed {what}")
    return element


def octets(buf: memoryview, element: Element) -> memoryview | bytes:
    """The value of an OCTET STRING (primitive, or constructed from chunks as BER allows).

    A primitive value is returned as a view into ``buf``, without copying.
    """
    if not element.constructed:
        return buf[element.start : element.end]
    chunks: list[memoryview] = []
    _collect_octets(buf, element, chunks)
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


def _collect_octets(buf: memoryview, element: Element, chunks: list[memoryview]) -> None:
    for child in children(buf, element):
        if child.tag == OCTET_STRING:
            chunks.append(buf[child.start : child.end])
        elif child.tag == CONSTRUCTED_OCTET_STRING:
            _collect_octets(buf, child, chunks)
        else:
            raise Malformed("malformed OCTET STRING chunk")


def raw(buf: memoryview, element: Element) -> bytes:
    """The whole encoding of ``element`` (identifier, length and contents) as bytes."""
    return bytes(buf[element.header_start : element.next])


def read_integer(buf: memoryview, element: Element) -> int:
    """The value of an INTEGER."""
    expect(element, INTEGER, "integer")
    if element.length == 0 or element.length > 64:
        raise Malformed("malformed integer")
    return int.from_bytes(buf[element.start : element.end], "big", signed=True)


def read_oid(buf: memoryview, element: Element) -> str:
    """The dotted form of an OBJECT IDENTIFIER."""
    expect(element, OID, "object identifier")
    value = bytes(buf[element.start : element.end])
    if not value or len(value) > 64 or value[-1] & 0x80:
        raise Malformed("malformed object identifier")
    return _decode_oid(value)


@functools.lru_cache(maxsize=512)
def _decode_oid(value: bytes) -> str:
    arcs: list[int] = []
    number = 0
    for octet in value:
        number = (number << 7) | (octet & 0x7F)
        if not octet & 0x80:
            arcs.append(number)
            number = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first, *arcs[1:]])


# -- the writer ----------------------------------------------------------------------


_SHORT_LENGTHS = tuple(bytes((n,)) for n in range(0x80))


def encode_length(length: int) -> bytes:
    """The DER length octets for ``length`` content octets."""
    if length < 0x80:
        return _SHORT_LENGTHS[length]
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def header(tag: int, length: int) -> bytes:
    """Identifier and length octets, for content that is written separately."""
    if length < 0x80:
        return bytes((tag, length))
    return bytes((tag,)) + encode_length(length)


def tlv(tag: int, *parts: bytes) -> bytes:
    """A complete DER element whose contents are ``parts`` joined."""
    content = parts[0] if len(parts) == 1 else b"".join(parts)
    return header(tag, len(content)) + content


def sequence(*parts: bytes) -> bytes:
    """A DER SEQUENCE of already encoded elements."""
    return tlv(SEQUENCE, *parts)


def der_set(parts: Iterable[bytes]) -> bytes:
    """A DER SET OF: the encoded elements sorted, as DER requires (and as verifiers re-encode)."""
    return tlv(SET, *sorted(parts))


def integer(value: int) -> bytes:
    """A DER INTEGER."""
    size = value.bit_length() // 8 + 1
    return tlv(INTEGER, value.to_bytes(size, "big", signed=True))


def octet_string(value: bytes) -> bytes:
    """A DER OCTET STRING."""
    return tlv(OCTET_STRING, value)


@functools.lru_cache(maxsize=256)
def oid(dotted: str) -> bytes:
    """A DER OBJECT IDENTIFIER from its dotted form."""
    arcs = [int(arc) for arc in dotted.split(".")]
    numbers = [arcs[0] * 40 + arcs[1], *arcs[2:]]
    body = bytearray()
    for number in numbers:
        chunk = [number & 0x7F]
        number >>= 7
        while number:
            chunk.append(0x80 | (number & 0x7F))
            number >>= 7
        body.extend(reversed(chunk))
    return tlv(OID, bytes(body))


def algorithm(dotted: str, parameters: bytes | None = None) -> bytes:
    """A DER AlgorithmIdentifier; ``parameters`` is already encoded (or absent)."""
    return sequence(oid(dotted), parameters or b"")


NULL_DER = b"\x05\x00"

# What pyasn1 raises on hostile input: its own error, and a few plain ones it lets through.
ASN1_ERRORS: tuple[type[Exception], ...] = (PyAsn1Error, ValueError, TypeError, IndexError, KeyError, AttributeError)

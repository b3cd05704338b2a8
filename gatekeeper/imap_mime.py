"""What IMAP says about a message it has in full: sizes, ENVELOPE, BODYSTRUCTURE, sections.

The IMAP proxy shows revealed (decrypted) messages that upstream has never seen in
clear, so it must answer for them itself, consistently with the bytes it serves:
RFC822.SIZE is the length of ``BODY[]``, BODYSTRUCTURE's part sizes are the lengths of
the ``BODY[n]`` sections, and so on. :func:`describe` parses a message once (in a
worker process: MIME parsing holds the GIL) into a :class:`MessageView` of byte
offsets and the ready-made ENVELOPE and BODYSTRUCTURE strings; :func:`section` then
serves any ``BODY[...]`` section by slicing, with no parsing.

The parser works on CRLF bytes and never re-serialises anything: header values are
shown as they are (encoded words stay encoded, as RFC 3501 wants), bodies are counted
as stored. A damaged structure (a boundary that never comes) makes the rest of the
entity one body: never an error, as a mail server would do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs

from gatekeeper.imap_syntax import nstring, quote

MAX_DEPTH = 32
MAX_PARTS = 5000

_FIELD = re.compile(rb"([^:\s]+)[ \t]*:")
_PARAM = re.compile(rb';\s*([A-Za-z0-9_.*!#$%&\'+^`|~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
_FOLD = re.compile(rb"\r\n([ \t])")
_UNESCAPE = re.compile(rb"\\(.)")


@attrs.frozen
class Entity:
    """One MIME entity: where its header and body are, and what it is.

    Offsets are into the whole message. ``children`` are the parts of a multipart;
    ``message`` is the encapsulated message of a ``message/rfc822`` entity.
    """

    header_start: int
    body_start: int
    body_end: int
    main: str
    sub: str
    children: tuple[Entity, ...] = ()
    message: Entity | None = None


@attrs.frozen
class MessageView:
    """What the IMAP proxy needs to answer for a message without parsing it again."""

    size: int
    envelope: bytes
    bodystructure: bytes
    body: bytes
    root: Entity
    header: bytes = b""


class SectionError(ValueError):
    """A section that does not exist in this message (``BODY[4]`` of a 2-part message)."""


# -- headers ------------------------------------------------------------------------------


def _header_end(data: bytes, start: int, end: int) -> int:
    """Where the body starts: after the blank line ending the header at ``start``."""
    if data.startswith(b"\r\n", start):
        return start + 2
    blank = data.find(b"\r\n\r\n", start, end)
    return end if blank < 0 else blank + 4


def header_fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case name, unfolded raw value) for each field of a header block."""
    fields = []
    for line in _FOLD.sub(rb"\1", block).split(b"\r\n"):
        match = _FIELD.match(line)
        if match:
            fields.append((match.group(1).lower(), line[match.end() :].strip()))
    return fields


def _field(fields: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in fields:
        if key == name:
            return value
    return None


def _content_type(value: bytes | None, default: tuple[str, str]) -> tuple[str, str, list[tuple[bytes, bytes]]]:
    if not value:
        return default[0], default[1], ([(b"charset", b"us-ascii")] if default == ("text", "plain") else [])
    head, _, _rest = value.partition(b";")
    main, slash, sub = head.strip().partition(b"/")
    if not slash or not main or not sub:
        return "text", "plain", [(b"charset", b"us-ascii")]
    return main.decode("ascii", "replace").lower(), sub.decode("ascii", "replace").lower(), _params(value)


def _params(value: bytes) -> list[tuple[bytes, bytes]]:
    found = []
    for match in _PARAM.finditer(value):
        raw = match.group(2)
        if raw.startswith(b'"') and raw.endswith(b'"') and len(raw) >= 2:
            raw = _UNESCAPE.sub(rb"\1", raw[1:-1])
        found.append((match.group(1).lower(), raw))
    return found


# -- parsing ------------------------------------------------------------------------------


def parse(data: bytes) -> Entity:
    """The entity tree of a whole message."""
    counter = [0]
    return _entity(data, 0, len(data), ("text", "plain"), 0, counter)


def _entity(data: bytes, start: int, end: int, default: tuple[str, str], depth: int, counter: list[int]) -> Entity:
    counter[0] += 1
    body_start = _header_end(data, start, end)
    fields = header_fields(data[start:body_start])
    main, sub, params = _content_type(_field(fields, b"content-type"), default)
    if depth >= MAX_DEPTH or counter[0] >= MAX_PARTS:
        return Entity(start, body_start, end, main, sub)
    if main == "multipart":
        boundary = dict(params).get(b"boundary")
        if boundary:
            ranges = _split(data, body_start, end, boundary)
            if ranges:
                child_default = ("message", "rfc822") if sub == "digest" else ("text", "plain")
                children = tuple(_entity(data, a, b, child_default, depth + 1, counter) for a, b in ranges)
                return Entity(start, body_start, end, main, sub, children=children)
        return Entity(start, body_start, end, "text", "plain")
    if main == "message" and sub in ("rfc822", "global"):
        inner = _entity(data, body_start, end, ("text", "plain"), depth + 1, counter)
        return Entity(start, body_start, end, main, sub, message=inner)
    return Entity(start, body_start, end, main, sub)


def _split(data: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """The (start, end) of each part between ``--boundary`` lines (RFC 2046 5.1.1).

    The CRLF before a delimiter line belongs to the delimiter, not to the part.
    """
    delimiter = b"--" + boundary
    lines: list[tuple[int, int, bool]] = []  # (delimiter start, end of its line, closing)
    pos = start
    while pos < end:
        found = data.find(delimiter, pos, end)
        if found < 0:
            break
        if found > start and data[found - 2 : found] != b"\r\n":
            pos = found + 1
            continue
        after = found + len(delimiter)
        closing = data.startswith(b"--", after)
        line_end = data.find(b"\r\n", after, end)
        line_end = end if line_end < 0 else line_end + 2
        lines.append((found, line_end, closing))
        if closing:
            break
        pos = line_end
    ranges = []
    for index, (_found, line_end, closing) in enumerate(lines):
        if closing:
            break
        if index + 1 < len(lines):
            following = lines[index + 1][0]
            ranges.append((line_end, max(line_end, following - 2)))
        else:
            ranges.append((line_end, end))  # no closing delimiter: the rest is the last part
    return ranges


# -- the IMAP strings ---------------------------------------------------------------------


def describe(data: bytes) -> MessageView:
    """Parse ``data`` (a whole message, CRLF) into a :class:`MessageView`."""
    root = parse(data)
    return MessageView(
        size=len(data),
        envelope=envelope(data, root),
        bodystructure=_structure(data, root, extended=True),
        body=_structure(data, root, extended=False),
        root=root,
        header=data[: root.body_start],
    )


def envelope(data: bytes, entity: Entity) -> bytes:
    """ENVELOPE (RFC 3501 7.4.2) of the message whose header starts ``entity``."""
    fields = header_fields(data[entity.header_start : entity.body_start])
    sender_from = _field(fields, b"from")

    def addresses(name: bytes) -> bytes:
        value = _field(fields, name)
        if value is None and name in (b"sender", b"reply-to"):
            value = sender_from
        return address_list(value)

    parts = [
        nstring(_field(fields, b"date")),
        nstring(_field(fields, b"subject")),
        addresses(b"from"),
        addresses(b"sender"),
        addresses(b"reply-to"),
        addresses(b"to"),
        addresses(b"cc"),
        addresses(b"bcc"),
        nstring(_field(fields, b"in-reply-to")),
        nstring(_field(fields, b"message-id")),
    ]
    return b"(" + b" ".join(parts) + b")"


def _structure(data: bytes, entity: Entity, *, extended: bool) -> bytes:
    fields = header_fields(data[entity.header_start : entity.body_start])
    if entity.children:
        inner = b"".join(_structure(data, child, extended=extended) for child in entity.children)
        text = b"(" + inner + b" " + quote(entity.sub.encode())
        if extended:
            _, _, params = _content_type(_field(fields, b"content-type"), ("text", "plain"))
            text += b" " + _param_list(params) + b" " + _extension(fields)
        return text + b")"
    _, _, params = _content_type(_field(fields, b"content-type"), (entity.main, entity.sub))
    if entity.main == "text" and not any(name == b"charset" for name, _ in params):
        params = [(b"charset", b"us-ascii"), *params]
    body = data[entity.body_start : entity.body_end]
    encoding = (_field(fields, b"content-transfer-encoding") or b"7bit").strip().lower()
    parts = [
        quote(entity.main.encode()),
        quote(entity.sub.encode()),
        _param_list(params),
        nstring(_field(fields, b"content-id")),
        nstring(_field(fields, b"content-description")),
        quote(encoding),
        b"%d" % len(body),
    ]
    if entity.message is not None:
        parts += [
            envelope(data, entity.message),
            _structure(data, entity.message, extended=extended),
            b"%d" % _lines(body),
        ]
    elif entity.main == "text":
        parts.append(b"%d" % _lines(body))
    if extended:
        parts += [nstring(_field(fields, b"content-md5")), _extension(fields)]
    return b"(" + b" ".join(parts) + b")"


def _lines(body: bytes) -> int:
    return body.count(b"\n")  # as Dovecot counts: line ends, not lines


def _param_list(params: Sequence[tuple[bytes, bytes]]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(quote(name) + b" " + nstring(value) for name, value in params) + b")"


def _extension(fields: Sequence[tuple[bytes, bytes]]) -> bytes:
    """body-fld-dsp body-fld-lang body-fld-loc."""
    disposition = _field(fields, b"content-disposition")
    if disposition:
        kind = disposition.partition(b";")[0].strip()
        dsp = b"(" + quote(kind.lower()) + b" " + _param_list(_params(disposition)) + b")"
    else:
        dsp = b"NIL"
    language = _field(fields, b"content-language")
    return dsp + b" " + nstring(language) + b" " + nstring(_field(fields, b"content-location"))


# -- addresses ----------------------------------------------------------------------------

_TOKEN = re.compile(rb'\s*(?:("(?:[^"\\]|\\.)*")|(\((?:[^()\\]|\\.)*\))|([<>,:;@.])|([^\s"(),:;<>@.]+))')


def _tokens(value: bytes) -> list[tuple[str, bytes]]:
    """(kind, text) tokens of an address header: quoted, special, atom (comments dropped)."""
    found: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(value):
        match = _TOKEN.match(value, pos)
        if match is None or match.end() == pos:
            pos += 1
            continue
        pos = match.end()
        if match.group(1) is not None:
            found.append(("quoted", _UNESCAPE.sub(rb"\1", match.group(1)[1:-1])))
        elif match.group(3) is not None:
            found.append(("special", match.group(3)))
        elif match.group(4) is not None:
            found.append(("atom", match.group(4)))
    return found


def _address(tokens: list[tuple[str, bytes]]) -> bytes | None:
    """One mailbox (``Name <user@host>`` or ``user@host``) as an IMAP address structure."""
    if not tokens:
        return None
    if any(t == ("special", b"<") for t in tokens):
        at = tokens.index(("special", b"<"))
        phrase = b" ".join(text for _, text in tokens[:at]) or None
        inside = []
        for token in tokens[at + 1 :]:
            if token == ("special", b">"):
                break
            inside.append(token)
        spec = inside
        route = None
        if b":" in [t for _, t in inside]:
            colon = [t for _, t in inside].index(b":")
            route = b"".join(t for _, t in inside[:colon]) or None
            spec = inside[colon + 1 :]
    else:
        phrase, route, spec = None, None, tokens
    texts = [text for _, text in spec]
    if b"@" in texts:
        at = len(texts) - 1 - texts[::-1].index(b"@")
        local, host = b"".join(texts[:at]), b"".join(texts[at + 1 :])
    else:
        local, host = b"".join(texts), None
    if not local and not host:
        return None
    return b"(" + b" ".join((nstring(phrase), nstring(route), nstring(local or None), nstring(host))) + b")"


def address_list(value: bytes | None) -> bytes:
    """An address header as IMAP's list of addresses (groups as RFC 3501 says), or NIL."""
    if value is None:
        return b"NIL"
    tokens = _tokens(value)
    out: list[bytes] = []
    current: list[tuple[str, bytes]] = []
    in_group = False
    angle = 0
    for token in tokens:
        if token == ("special", b"<"):
            angle += 1
        elif token == ("special", b">"):
            angle = max(0, angle - 1)
        if angle == 0 and token == ("special", b":") and not in_group:
            name = b" ".join(text for _, text in current)
            out.append(b"(NIL NIL " + nstring(name) + b" NIL)")
            current, in_group = [], True
            continue
        if angle == 0 and token == ("special", b";") and in_group:
            address = _address(current)
            if address:
                out.append(address)
            out.append(b"(NIL NIL NIL NIL)")
            current, in_group = [], False
            continue
        if angle == 0 and token == ("special", b","):
            address = _address(current)
            if address:
                out.append(address)
            current = []
            continue
        current.append(token)
    address = _address(current)
    if address:
        out.append(address)
    if in_group:
        out.append(b"(NIL NIL NIL NIL)")
    return b"(" + b"".join(out) + b")" if out else b"NIL"


# -- sections ----------------------------------------------------------------------------


def resolve(root: Entity, numbers: Sequence[int]) -> Entity:
    """The entity a section's part numbers (1-based) name."""
    entity = root
    for index, number in enumerate(numbers):
        if index > 0 and entity.message is not None:
            entity = entity.message
        if entity.children:
            if not 1 <= number <= len(entity.children):
                raise SectionError("no such part")
            entity = entity.children[number - 1]
        elif number != 1:
            raise SectionError("no such part")
    return entity


def section(
    data: bytes,
    view: MessageView,
    numbers: Sequence[int],
    specifier: str,
    fields: Sequence[bytes] = (),
) -> bytes:
    """The bytes of ``BODY[numbers.specifier (fields)]`` (``specifier`` upper case, may be empty)."""
    if not numbers:
        target = view.root
    else:
        target = resolve(view.root, numbers)
        if specifier in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT"):
            if target.message is None:
                raise SectionError("not a message part")
            target = target.message
    if specifier == "":
        if not numbers:
            return data
        return data[target.body_start : target.body_end]
    if specifier == "MIME":
        if not numbers:
            raise SectionError("MIME needs a part number")
        return data[target.header_start : target.body_start]
    if specifier == "TEXT":
        return data[target.body_start : target.body_end]
    return header_section(data[target.header_start : target.body_start], specifier, fields)


def header_section(header: bytes, specifier: str, fields: Sequence[bytes] = ()) -> bytes:
    """``HEADER``, ``HEADER.FIELDS (...)`` or ``HEADER.FIELDS.NOT (...)`` of a header block."""
    if specifier == "HEADER":
        return header
    if specifier not in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        raise SectionError("not a header section")
    wanted = {f.lower() for f in fields}
    negate = specifier == "HEADER.FIELDS.NOT"
    kept = []
    for raw in _raw_fields(header):
        name = raw.split(b":", 1)[0].strip().lower()
        if (name in wanted) != negate:
            kept.append(raw)
    return b"".join(kept) + b"\r\n"


def _raw_fields(header: bytes) -> list[bytes]:
    """Each field of a header block with its folded lines and CRLF, as stored."""
    lines = header.split(b"\r\n")
    fields: list[bytes] = []
    for line in lines:
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields


def partial(data: bytes, start: int | None, length: int | None) -> bytes:
    """``<start.length>`` of a section's bytes (RFC 3501 6.4.5)."""
    if start is None:
        return data
    piece = data[start:]
    return piece if length is None else piece[:length]


# -- searching ----------------------------------------------------------------------------

_ENCODED_WORD = re.compile(rb"=\?([^?]+)\?([bBqQ])\?([^?]*)\?=")


def _decode_body(raw: bytes, encoding: bytes, charset: str) -> str:
    import base64
    import binascii
    import quopri

    try:
        if encoding == b"base64":
            raw = base64.b64decode(raw, validate=False)
        elif encoding == b"quoted-printable":
            raw = quopri.decodestring(raw)
    except (binascii.Error, ValueError):
        pass
    try:
        return raw.decode(charset or "utf-8", "replace")
    except LookupError:
        return raw.decode("utf-8", "replace")


def searchable_text(data: bytes, entity: Entity) -> str:
    """The text a SEARCH BODY looks at: every text part of ``entity``, transfer-decoded."""
    pieces: list[str] = []
    stack = [entity]
    while stack:
        current = stack.pop()
        if current.children:
            stack.extend(reversed(current.children))
            continue
        if current.message is not None:
            inner = current.message
            pieces.append(data[inner.header_start : inner.body_start].decode("utf-8", "replace"))
            stack.append(inner)
            continue
        if current.main not in ("text", "message"):
            continue
        fields = header_fields(data[current.header_start : current.body_start])
        encoding = (_field(fields, b"content-transfer-encoding") or b"7bit").strip().lower()
        _, _, params = _content_type(_field(fields, b"content-type"), ("text", "plain"))
        charset = dict(params).get(b"charset", b"utf-8").decode("ascii", "replace")
        pieces.append(_decode_body(data[current.body_start : current.body_end], encoding, charset))
    return "\n".join(pieces)

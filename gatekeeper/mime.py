"""Reading MIME header fields as bytes, the way every pipeline needs them.

Messages are handled as canonical CRLF bytes and never re-serialised with ``email``
(it re-folds headers and breaks signatures), so the few header facts the pipelines
need (field names, unfolded values, the content type and its parameters, the transfer
encoding) are read here, from the raw header block.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PARAMETER = re.compile(r';\s*([A-Za-z0-9_.*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
"""A ``; name=value`` parameter of a structured field (the value possibly quoted)."""


def header_fields(block: bytes) -> list[tuple[str, bytes]]:
    """The fields of a header block as (lower-case name, whole field with its CRLF).

    Continuation lines stay with their field; ``block`` ends with CRLF after its last field.
    """
    fields: list[tuple[str, bytes]] = []
    for line in block.split(b"\r\n")[:-1] if block else []:
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line + b"\r\n")
        else:
            fields.append((line.split(b":", 1)[0].strip().decode("latin-1").lower(), line + b"\r\n"))
    return fields


def field_value(raw: bytes, encoding: str = "latin-1") -> str:
    """The unfolded value of a whole field (``Name: value\\r\\n``), decoded with ``encoding``."""
    text = raw.split(b":", 1)[1] if b":" in raw else b""
    return re.sub(r"\r\n[ \t]+", " ", text.decode(encoding, "replace")).strip()


def content_type(fields: Sequence[tuple[str, bytes]]) -> tuple[str, dict[str, str]]:
    """The media type (lower case, ``text/plain`` by default) and its parameters (names lower case)."""
    for name, raw in fields:
        if name == "content-type":
            value = field_value(raw)
            main = value.split(";", 1)[0].strip().lower() or "text/plain"
            params = {}
            for key, param in PARAMETER.findall(value):
                if param.startswith('"'):
                    param = re.sub(r"\\(.)", r"\1", param[1:-1])
                params[key.lower()] = param
            return main, params
    return "text/plain", {}


def transfer_encoding(fields: Sequence[tuple[str, bytes]]) -> str:
    """The Content-Transfer-Encoding, lower case (``7bit`` by default)."""
    for name, raw in fields:
        if name == "content-transfer-encoding":
            return field_value(raw).lower()
    return "7bit"

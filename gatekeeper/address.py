"""E-mail addresses as Gatekeeper compares them.

An address is normalised once, where it enters (CLI, login, SMTP envelope, certificate
SAN), to ``local@domain`` with the domain lower-cased and IDNA-encoded (A-labels). The
local part keeps its spelling for display, and :func:`address_key` gives the
case-insensitive form used for every lookup and comparison.
"""

from __future__ import annotations

import functools
import re

import idna

from gatekeeper.errors import InvalidAddress

_MAX_ADDRESS = 254
_MAX_LOCAL = 64
# RFC 5322 dot-atom local parts; quoted local parts are rare enough to refuse clearly.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_LOCAL_RE = re.compile(rf"^{_ATOM}(\.{_ATOM})*$")


@functools.lru_cache(maxsize=4096)  # IDNA encoding is slow; every message asks again
def normalize_address(text: str) -> str:
    """Return ``local@domain`` with the domain lower-cased and in IDNA A-label form.

    Raises :class:`InvalidAddress` with a message safe to show for anything that is not
    a plain ``local@domain`` address.
    """
    if not isinstance(text, str):
        raise InvalidAddress("an address must be text")
    candidate = text.strip()
    if candidate.startswith("<") and candidate.endswith(">"):
        candidate = candidate[1:-1].strip()
    if not candidate or len(candidate) > _MAX_ADDRESS:
        raise InvalidAddress(f"not an e-mail address: {_shown(text)}")
    local, at, domain = candidate.rpartition("@")
    if not at or not local or not domain:
        raise InvalidAddress(f"not an e-mail address (expected local@domain): {_shown(text)}")
    if len(local) > _MAX_LOCAL or not _LOCAL_RE.match(local):
        raise InvalidAddress(f"not an e-mail address (bad local part): {_shown(text)}")
    try:
        ascii_domain = idna.encode(domain.rstrip("."), uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError):
        raise InvalidAddress(f"not an e-mail address (bad domain): {_shown(text)}") from None
    if "." not in ascii_domain:
        raise InvalidAddress(f"not an e-mail address (domain needs a dot): {_shown(text)}")
    return f"{local}@{ascii_domain}"


def address_key(address: str) -> str:
    """Return the case-insensitive comparison key of a normalised address."""
    return address.casefold()


def domain_of(address: str) -> str:
    """Return the (normalised) domain of a normalised address."""
    return address.rpartition("@")[2]


def same_address(left: str, right: str) -> bool:
    """Tell whether two addresses name the same mailbox (normalising both)."""
    try:
        return address_key(normalize_address(left)) == address_key(normalize_address(right))
    except InvalidAddress:
        return False


def _shown(text: str) -> str:
    """Quote user input for an error message, bounded and without control characters."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in str(text)[:80])
    return repr(cleaned)

"""S/MIME 4.0 (RFC 8551) on whole messages: sign, encrypt, both, and open what arrives.

Producing (the message is an RFC 5322 message or a bare MIME entity, as bytes)::

    sign(message, signer, *, detached=True, digest="sha256", scheme="pkcs1v15",
         capabilities=DEFAULT_CAPABILITIES, signing_time=None) -> bytes
    encrypt(message, recipients, *, cipher="aes256-cbc", key_transport="rsa-pkcs1v15") -> bytes
    sign_and_encrypt(message, signer, recipients, *, <the options of both>) -> bytes

``signer`` is an :class:`~gatekeeper.keys.identity.UnlockedKey` (its chain is included);
``recipients`` are certificates, or :class:`Recipient` values to choose the key transport
(or subjectKeyIdentifier naming) per recipient. ``cipher`` is ``aes256-cbc`` (default:
every peer reads it), ``aes128-cbc``, ``aes256-gcm`` or ``aes128-gcm`` (AuthEnvelopedData);
``key_transport`` is ``rsa-pkcs1v15`` (default) or ``rsa-oaep`` (SHA-256); EC recipients
get ECDH (X9.63 KDF with SHA-256, AES key wrap). The header fields of the message that
are not ``Content-*`` (From, To, Subject...) stay outside; the MIME entity is protected.

Consuming::

    open_message(message, keys, validator, sender, *, at=None) -> Opened

peels every layer (enveloped / authEnveloped / signed, opaque or multipart/signed, also
``application/x-pkcs7-*``, BER from Outlook, triple wrapping) and returns an
:class:`Opened`: the revealed inner entity (``content``), the outer header fields
(``headers``; ``message`` is both together), the ``layers`` in the order found, a
:class:`Decryption` per encryption layer (which ``key_id`` decrypted it, the cipher and
key encryption) and a :class:`Signature` per signature (the signer's certificate, its
:class:`~gatekeeper.trust.TrustResult`, digest and signature algorithms, weak flags,
signing time and advertised SMIMECapabilities). A message that is not S/MIME is
returned with no layers. ``classify(message)`` tells whether a message is already
encrypted or signed without opening it.

Canonical bytes: the signed entity is built once as CRLF bytes and never re-serialised.
Line ends are made CRLF, 8-bit and binary parts are transfer-encoded (quoted-printable
for text, base64 otherwise) before signing; 7-bit content is never touched, so headers,
``From `` lines and trailing spaces survive byte for byte. Output is
``application/pkcs7-mime; smime-type=...; name=smime.p7m`` (or multipart/signed) with
base64 lines of 76 characters and CRLF line ends.

Errors: every failure is an :class:`SMIMEError` (:class:`NotForMe`, :class:`Tampered`,
:class:`Malformed` (and its :class:`LimitExceeded`), :class:`UnsupportedAlgorithm`),
with messages safe to show. A signature that does not match is *reported* (status
``BAD_SIGNATURE`` in its trust result), not raised.

Everything here is synchronous and pure; values in and out are picklable.
"""

from __future__ import annotations

import binascii
import datetime
import functools
import os
import struct
from collections.abc import Sequence

import attrs
from cryptography import x509

from gatekeeper import mime
from gatekeeper.cms import algorithms as alg
from gatekeeper.cms.enveloped import Recipient, decrypt_element, envelope_parts
from gatekeeper.cms.errors import LimitExceeded, Malformed, NotForMe, SMIMEError, Tampered, UnsupportedAlgorithm
from gatekeeper.cms.signed import Content, SignerResult, read_content_info, sign_parts, verify_signed_data
from gatekeeper.keys.identity import UnlockedKey
from gatekeeper.trust import TrustResult, TrustStatus, TrustValidator

__all__ = [
    "DEFAULT_CAPABILITIES",
    "Decryption",
    "LimitExceeded",
    "Malformed",
    "NotForMe",
    "Opened",
    "Recipient",
    "SMIMEError",
    "Signature",
    "Tampered",
    "UnsupportedAlgorithm",
    "canonicalize",
    "classify",
    "encrypt",
    "open_canonical",
    "open_message",
    "sign",
    "sign_and_encrypt",
]

DEFAULT_CAPABILITIES = alg.DEFAULT_CAPABILITIES
MAX_MESSAGE_SIZE = 256 * 1024 * 1024
MAX_LAYERS = 8
MAX_HEADER_BYTES = 1024 * 1024
MAX_MIME_DEPTH = 32
MAX_PARTS = 10_000
LINE = 76
_BLOCK = 57 * 16 * 1024  # input bytes per base64 call: whole lines, ~1 MB
_PKCS7_MIME = ("application/pkcs7-mime", "application/x-pkcs7-mime")
_PKCS7_SIGNATURE = ("application/pkcs7-signature", "application/x-pkcs7-signature")


# -- results ---------------------------------------------------------------------------


@attrs.frozen
class Decryption:
    """One encryption layer: which key opened it and how it was protected."""

    key_id: str
    layer: str  # "enveloped" or "auth-enveloped"
    cipher: str
    key_encryption: str
    recipient_count: int


@attrs.frozen
class Signature:
    """One signature: who signed, whether to believe it, and with what.

    ``trust`` combines the cryptographic check (``BAD_SIGNATURE`` when the content or
    the signature was altered) with the certificate's validation for the sender.
    ``capabilities`` are the algorithm names the signer advertised (None if absent).
    """

    certificate: x509.Certificate | None
    trust: TrustResult
    digest_algorithm: str
    signature_algorithm: str
    weak: tuple[str, ...]
    signing_time: datetime.datetime | None
    capabilities: tuple[str, ...] | None
    detached: bool


@attrs.frozen
class Opened:
    """What :func:`open_message` revealed.

    ``content`` is the innermost MIME entity (its ``Content-*`` headers and body,
    canonical CRLF); ``headers`` the outer message's other header fields (each ending in
    CRLF); ``layers`` names each protection in the order it was removed.
    """

    content: bytes
    headers: bytes
    layers: tuple[str, ...]
    decryptions: tuple[Decryption, ...]
    signatures: tuple[Signature, ...]

    @property
    def message(self) -> bytes:
        """The revealed message: the outer header fields followed by the inner entity."""
        return self.headers + self.content

    @property
    def encrypted(self) -> bool:
        """Whether at least one encryption layer was removed."""
        return bool(self.decryptions)

    @property
    def signed(self) -> bool:
        """Whether at least one signature was found."""
        return bool(self.signatures)


# -- canonical form and MIME helpers ---------------------------------------------------


_CANONICAL_CHUNK = 1024 * 1024


def canonicalize(message: bytes) -> bytes:
    """Return ``message`` with every line ending as CRLF (unchanged, not copied, if it already is).

    A bare CR or a bare LF counts as a line end, as in ``bytes.splitlines``.
    """
    if len(message) > MAX_MESSAGE_SIZE:
        raise LimitExceeded("the message is too large")
    if b"\r" not in message:
        return message.replace(b"\n", b"\r\n") if b"\n" in message else message
    start = 0
    while start < len(message):
        # Check a megabyte at a time, cut after a LF so that no CRLF is split: the check
        # then never holds more than a chunk's lines, whatever the size of the message.
        end = len(message)
        if end - start > _CANONICAL_CHUNK:
            cut = message.rfind(b"\n", start, start + _CANONICAL_CHUNK)
            end = cut + 1 if cut > start else start + _CANONICAL_CHUNK
            if message[end - 1 : end + 1] == b"\r\n":
                end += 1  # a line longer than a chunk: never cut between CR and LF
        if not _is_canonical(message[start:end] if start or end < len(message) else message):
            return _to_crlf(message)
        start = end
    return message


def _is_canonical(chunk: bytes) -> bool:
    # Rejoining the lines with CRLF is the fastest exact check in C (counting CR, LF and
    # CRLF separately costs twice as much on a 64 KB message).
    lines = chunk.splitlines()
    if chunk.endswith((b"\r", b"\n")):
        lines.append(b"")
    return b"\r\n".join(lines) == chunk


def _to_crlf(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _split(entity: Content) -> tuple[bytes, int]:
    """Split an entity into its header block (each field ending in CRLF) and the body offset."""
    if entity[:2] == b"\r\n":
        return b"", 2
    view = entity if isinstance(entity, bytes) else bytes(entity[: MAX_HEADER_BYTES + 4])
    end = view.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
    if end < 0:
        if len(entity) > MAX_HEADER_BYTES:
            raise LimitExceeded("the header is too large")
        block = bytes(entity)
        return (block if block.endswith(b"\r\n") else block + b"\r\n"), len(entity)
    return bytes(view[: end + 2]), end + 4


def _split_multipart(body: Content, boundary: str) -> tuple[list[tuple[int, int]], int] | None:
    """Locate the parts of a multipart body: [(start, end)] and the offset of the closing delimiter."""
    delimiter = b"--" + boundary.encode("latin-1")
    data = body if isinstance(body, bytes) else bytes(body)
    if data.startswith(delimiter):
        pos = 0
    else:
        pos = _find_delimiter(data, delimiter, 0)
        if pos < 0:
            return None
        pos += 2
    parts: list[tuple[int, int]] = []
    while True:
        if data.startswith(delimiter + b"--", pos):
            return parts, pos
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return None
        start = line_end + 2
        following = _find_delimiter(data, delimiter, start - 2)
        if following < 0:
            return None
        parts.append((start, following))
        if len(parts) > MAX_PARTS:
            raise LimitExceeded("too many MIME parts")
        pos = following + 2


def _find_delimiter(data: bytes, delimiter: bytes, start: int) -> int:
    """Offset of the CRLF before the next real delimiter line (not a longer boundary)."""
    needle = b"\r\n" + delimiter
    while True:
        found = data.find(needle, start)
        if found < 0:
            return -1
        after = data[found + len(needle) : found + len(needle) + 2]
        if after in (b"\r\n", b"--", b"") or after[:1] in (b" ", b"\t"):
            return found
        start = found + 1


# -- transfer encoding before signing --------------------------------------------------


def _seven_bit(entity: bytes, depth: int = 0) -> bytes:
    """Transfer-encode every 8-bit or binary leaf part; 7-bit parts are returned untouched."""
    if entity.isascii():
        return entity
    if depth > MAX_MIME_DEPTH:
        raise LimitExceeded("MIME parts are nested too deeply")
    block, offset = _split(entity)
    fields = mime.header_fields(block)
    body = entity[offset:]
    main, params = mime.content_type(fields)
    if main.startswith("multipart/") and "boundary" in params:
        found = _split_multipart(body, params["boundary"])
        if found is not None:
            parts, _ = found
            pieces, last = [], 0
            for start, end in parts:
                pieces.append(body[last:start])
                pieces.append(_seven_bit(body[start:end], depth + 1))
                last = end
            pieces.append(body[last:])
            return entity[:offset] + b"".join(pieces)
    if main == "message/rfc822":
        return entity[:offset] + _seven_bit(body, depth + 1)
    if body.isascii() and mime.transfer_encoding(fields) in ("7bit", "quoted-printable", "base64"):
        return entity  # only the header has 8-bit text (RFC 6532): leave it as written
    kept = b"".join(raw for name, raw in fields if name != "content-transfer-encoding")
    if main.startswith("text/"):
        encoded = canonicalize(binascii.b2a_qp(body, istext=True))
        return kept + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded
    return kept + b"Content-Transfer-Encoding: base64\r\n\r\n" + b"".join(_base64_blocks([body]))


def _base64_blocks(pieces: Sequence[Content]) -> list[bytes]:
    """Base64 of the concatenated pieces in lines of 76 with CRLF, without joining the input."""
    blocks: list[bytes] = []
    carry = b""
    for piece in pieces:
        view = memoryview(piece).cast("B") if not isinstance(piece, bytes) else memoryview(piece)
        if carry:
            take = 57 - len(carry)
            carry += bytes(view[:take])
            view = view[take:]
            if len(carry) < 57:
                continue
            blocks.append(_encode_lines(carry))
            carry = b""
        whole = len(view) - len(view) % 57
        for start in range(0, whole, _BLOCK):
            blocks.append(_encode_lines(view[start : min(start + _BLOCK, whole)]))
        carry = bytes(view[whole:])
    if carry:
        blocks.append(_encode_lines(carry))
    return blocks


@functools.lru_cache(maxsize=64)
def _line_splitter(count: int) -> struct.Struct:
    return struct.Struct(f"{count * LINE}s" if count == 1 else f"{LINE}s" * count)


def _encode_lines(data: Content) -> bytes:
    text = binascii.b2a_base64(data, newline=False)
    whole = len(text) // LINE
    if not whole:
        return text + b"\r\n" if text else b""
    # struct cuts the 76-character lines in C: three times faster than slicing in a loop.
    lines = _line_splitter(whole).unpack_from(text)
    rest = text[whole * LINE :]
    return b"\r\n".join(lines) + (b"\r\n" + rest + b"\r\n" if rest else b"\r\n")


def _decode_base64(data: Content) -> bytes:
    try:
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        raise Malformed("the message's base64 encoding is damaged or truncated") from None


# -- producing ----------------------------------------------------------------------------


def _entity(message: bytes) -> tuple[bytes, bytes, Content, bool]:
    """Split a message into (outer header fields, the entity's Content-* fields, body, all 7-bit?)."""
    data = canonicalize(message)
    ascii_only = data.isascii()
    block, offset = _split(data)
    fields = mime.header_fields(block)
    outer = b"".join(raw for name, raw in fields if not name.startswith("content-") and name != "mime-version")
    inner = b"".join(raw for name, raw in fields if name.startswith("content-"))
    body = memoryview(data)[offset:]
    if not inner:
        charset = "us-ascii" if ascii_only else _guess_charset(bytes(body))
        inner = f"Content-Type: text/plain; charset={charset}\r\n".encode("ascii")
    return outer, inner, body, ascii_only


def _guess_charset(body: bytes) -> str:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return "iso-8859-1"
    return "utf-8"


def _boundary(content: Sequence[Content]) -> str:
    """A random boundary that occurs in none of the pieces (views are searched in their bytes)."""
    while True:
        boundary = "----=_gk_" + os.urandom(12).hex()
        needle = ("--" + boundary).encode("ascii")
        if not any(_contains(piece, needle) for piece in content):
            return boundary


def _contains(piece: Content, needle: bytes) -> bool:
    if isinstance(piece, memoryview) and isinstance(piece.obj, bytes):
        # Search the whole underlying message in place rather than copying the view: at
        # worst a boundary found elsewhere in it is refused and another one drawn.
        return needle in piece.obj
    return needle in (piece if isinstance(piece, bytes | bytearray) else bytes(piece))


def _pkcs7_headers(smime_type: str) -> bytes:
    return (
        f'Content-Type: application/pkcs7-mime; smime-type={smime_type}; name="smime.p7m"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="smime.p7m"\r\n\r\n'
    ).encode("ascii")


def _signed_entity(
    inner: Sequence[Content],
    signer: UnlockedKey,
    *,
    detached: bool,
    digest: str,
    scheme: str,
    capabilities: Sequence[str] | None,
    signing_time: datetime.datetime | None,
) -> list[Content]:
    """The signed entity (its own headers first) as pieces, ready to send or to encrypt."""
    chosen = alg.digest_by_name(digest)
    options = {
        "chain": signer.chain,
        "digest": digest,
        "scheme": scheme,
        "capabilities": capabilities,
        "signing_time": signing_time,
    }
    if not detached:
        parts = sign_parts(inner, signer.certificate, signer.private_key, detached=False, **options)  # type: ignore[arg-type]
        return [_pkcs7_headers("signed-data"), *_base64_blocks(parts)]
    signature = sign_parts(inner, signer.certificate, signer.private_key, detached=True, **options)  # type: ignore[arg-type]
    boundary = _boundary(inner)
    head = (
        f'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg={chosen.micalg};\r\n'
        f' boundary="{boundary}"\r\n\r\n'
        "This is a cryptographically signed message in MIME format.\r\n\r\n"
        f"--{boundary}\r\n"
    ).encode("ascii")
    middle = (
        f"\r\n--{boundary}\r\n"
        'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n'
    ).encode("ascii")
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    return [head, *inner, middle, *_base64_blocks(signature), tail]


def _prepare_signed_content(inner_headers: bytes, body: Content, ascii_only: bool) -> list[Content]:
    if ascii_only:
        return [inner_headers + b"\r\n", body]  # nothing to encode: no copy at all
    return [_seven_bit(inner_headers + b"\r\n" + bytes(body))]


def sign(
    message: bytes,
    signer: UnlockedKey,
    *,
    detached: bool = True,
    digest: str = "sha256",
    scheme: str = "pkcs1v15",
    capabilities: Sequence[str] | None = DEFAULT_CAPABILITIES,
    signing_time: datetime.datetime | None = None,
) -> bytes:
    """Sign a message: multipart/signed (``detached``) or application/pkcs7-mime signed-data.

    ``digest`` is ``sha256``, ``sha384`` or ``sha512``; ``scheme`` is ``pkcs1v15`` or
    ``pss`` for RSA keys (EC keys sign with ECDSA). ``capabilities`` are the algorithm
    names advertised to correspondents (None: no SMIMECapabilities attribute).
    """
    outer, inner_headers, body, ascii_only = _entity(message)
    inner = _prepare_signed_content(inner_headers, body, ascii_only)
    entity = _signed_entity(
        inner,
        signer,
        detached=detached,
        digest=digest,
        scheme=scheme,
        capabilities=capabilities,
        signing_time=signing_time,
    )
    return b"".join([outer, b"MIME-Version: 1.0\r\n", *entity])


def _recipients(recipients: Sequence[x509.Certificate | Recipient], key_transport: str) -> list[Recipient]:
    if key_transport not in alg.KEY_TRANSPORTS:
        raise UnsupportedAlgorithm(f"unknown key transport {key_transport!r} (known: {', '.join(alg.KEY_TRANSPORTS)})")
    return [r if isinstance(r, Recipient) else Recipient(r, key_transport) for r in recipients]


def _enveloped_message(outer: bytes, content: Sequence[Content], recipients: list[Recipient], cipher: str) -> bytes:
    chosen = alg.cipher_by_name(cipher, producing=True)
    parts = envelope_parts(content, recipients, cipher=cipher)
    smime_type = "authEnveloped-data" if chosen.mode == "gcm" else "enveloped-data"
    blocks = _base64_blocks(parts)
    del parts  # the ciphertext buffer can go before the final join
    return b"".join([outer, b"MIME-Version: 1.0\r\n", _pkcs7_headers(smime_type), *blocks])


def encrypt(
    message: bytes,
    recipients: Sequence[x509.Certificate | Recipient],
    *,
    cipher: str = "aes256-cbc",
    key_transport: str = "rsa-pkcs1v15",
) -> bytes:
    """Encrypt a message to every recipient in one envelope (Content-* fields and body inside)."""
    outer, inner_headers, body, _ = _entity(message)
    return _enveloped_message(outer, [inner_headers + b"\r\n", body], _recipients(recipients, key_transport), cipher)


def sign_and_encrypt(
    message: bytes,
    signer: UnlockedKey,
    recipients: Sequence[x509.Certificate | Recipient],
    *,
    detached: bool = True,
    digest: str = "sha256",
    scheme: str = "pkcs1v15",
    capabilities: Sequence[str] | None = DEFAULT_CAPABILITIES,
    signing_time: datetime.datetime | None = None,
    cipher: str = "aes256-cbc",
    key_transport: str = "rsa-pkcs1v15",
) -> bytes:
    """Sign, then encrypt the signed entity, as one operation (options as :func:`sign`, :func:`encrypt`)."""
    outer, inner_headers, body, ascii_only = _entity(message)
    chosen_recipients = _recipients(recipients, key_transport)
    entity = _signed_entity(
        _prepare_signed_content(inner_headers, body, ascii_only),
        signer,
        detached=detached,
        digest=digest,
        scheme=scheme,
        capabilities=capabilities,
        signing_time=signing_time,
    )
    return _enveloped_message(outer, entity, chosen_recipients, cipher)


# -- consuming ----------------------------------------------------------------------------


def classify(message: bytes) -> str | None:
    """``"encrypted"``, ``"signed"`` or None, from the top-level Content-Type alone."""
    block, _ = _split(canonicalize(message[: MAX_HEADER_BYTES + 4]))
    main, params = mime.content_type(mime.header_fields(block))
    if main == "multipart/signed":
        return "signed"
    if _is_pkcs7_mime(main, params):
        smime_type = params.get("smime-type", "").lower()
        return "signed" if smime_type == "signed-data" else "encrypted"
    return None


def _is_pkcs7_mime(main: str, params: dict[str, str]) -> bool:
    if main in _PKCS7_MIME:
        return True
    name = (params.get("name") or "").lower()
    return main == "application/octet-stream" and name.endswith(".p7m")


def _body_octets(fields: Sequence[tuple[str, bytes]], body: Content) -> bytes:
    encoding = mime.transfer_encoding(fields)
    if encoding == "base64":
        return _decode_base64(body)
    if encoding in ("7bit", "8bit", "binary"):
        return bytes(body)
    raise Malformed(f"unexpected transfer encoding for S/MIME content: {encoding[:20]}")


def open_message(
    message: bytes,
    keys: Sequence[UnlockedKey],
    validator: TrustValidator,
    sender: str | None,
    *,
    at: datetime.datetime | None = None,
) -> Opened:
    """Remove every S/MIME layer of ``message`` and report what each one said.

    ``keys`` are the recipient's key pairs (retired ones too); ``sender`` is the address
    in the From header (None: the signer's address is not compared). ``at`` is the time
    certificates are validated at (default: now).
    """
    return open_canonical(canonicalize(message), keys, validator, sender, at=at)


def open_canonical(
    data: bytes,
    keys: Sequence[UnlockedKey],
    validator: TrustValidator,
    sender: str | None,
    *,
    at: datetime.datetime | None = None,
) -> Opened:
    """:func:`open_message` for a message already in canonical form (``canonicalize(data) is data``).

    For a caller that needed the canonical form itself: the check is not made twice.
    """
    block, offset = _split(data)
    outer_fields = mime.header_fields(block)
    outer = b"".join(raw for name, raw in outer_fields if not name.startswith("content-"))
    entity_headers = b"".join(raw for name, raw in outer_fields if name.startswith("content-"))
    current: Content = data
    current_fields, current_offset = outer_fields, offset
    layers: list[str] = []
    decryptions: list[Decryption] = []
    signatures: list[Signature] = []
    for _ in range(MAX_LAYERS + 1):
        main, params = mime.content_type(current_fields)
        body = memoryview(current)[current_offset:]
        if _is_pkcs7_mime(main, params):
            octets = _body_octets(current_fields, body)
            buf, content_type, element = read_content_info(octets)
            if content_type in (alg.ID_ENVELOPED_DATA, alg.ID_AUTH_ENVELOPED_DATA):
                view, info = decrypt_element(buf, content_type, element, keys)
                layers.append(info.layer)
                decryptions.append(
                    Decryption(
                        key_id=keys[info.key_index].key_id,
                        layer=info.layer,
                        cipher=info.cipher,
                        key_encryption=info.key_encryption,
                        recipient_count=info.recipient_count,
                    )
                )
                current = view
                del view
            elif content_type == alg.ID_SIGNED_DATA:
                result = verify_signed_data(buf, element)
                layers.append("signed")
                signatures.extend(_judge(result.signers, result.certificates, validator, sender, at, False))
                current = result.content or b""
            else:
                raise UnsupportedAlgorithm("the message holds an unsupported kind of CMS content")
            # Drop the decoded DER now: only the revealed content is kept from here on.
            del octets, buf, element
        elif main == "multipart/signed" and params.get("protocol", "").lower() in _PKCS7_SIGNATURE:
            current, found = _open_detached(body, params, validator, sender, at)
            layers.append("signed")
            signatures.extend(found)
        else:
            break
        if len(layers) > MAX_LAYERS:
            raise LimitExceeded("the message has too many layers of protection")
        if main != "multipart/signed":
            # New content (decrypted, or unwrapped from signed-data) may have bare line
            # feeds; a detached signature's content is a part of ``current``, which is
            # canonical already, so it is not checked again.
            current = canonicalize(bytes(current)) if _has_bare_lf(current) else current
        inner_block, current_offset = _split(current)
        current_fields = mime.header_fields(inner_block)
    else:
        raise LimitExceeded("the message has too many layers of protection")
    # Not S/MIME at all: the entity is the message's own Content-* fields and body.
    content = bytes(current) if layers else entity_headers + b"\r\n" + bytes(memoryview(data)[offset:])
    return Opened(
        content=content,
        headers=outer,
        layers=tuple(layers),
        decryptions=tuple(decryptions),
        signatures=tuple(signatures),
    )


def _has_bare_lf(content: Content) -> bool:
    """Whether some line does not end in CRLF (a view is checked a megabyte at a time)."""
    if isinstance(content, bytes):
        return canonicalize(content) is not content
    view = memoryview(content).cast("B")
    start = 0
    while start < len(view):
        end = min(start + _CANONICAL_CHUNK, len(view))
        chunk = bytes(view[start:end])
        if end < len(view) and chunk.endswith(b"\r"):
            chunk += bytes(view[end : end + 1])
            end += 1
        if not _is_canonical(chunk):
            return True
        start = end
    return False


def _open_detached(
    body: memoryview,
    params: dict[str, str],
    validator: TrustValidator,
    sender: str | None,
    at: datetime.datetime | None,
) -> tuple[Content, list[Signature]]:
    boundary = params.get("boundary")
    if not boundary:
        raise Malformed("a signed message without a MIME boundary")
    found = _split_multipart(body, boundary)
    if found is None or len(found[0]) != 2:
        raise Malformed("a signed message must have exactly two parts")
    (content_start, content_end), (sig_start, sig_end) = found[0]
    signature_entity = body[sig_start:sig_end]
    sig_block, sig_offset = _split(signature_entity)
    sig_fields = mime.header_fields(sig_block)
    sig_type, _ = mime.content_type(sig_fields)
    if sig_type not in _PKCS7_SIGNATURE and sig_type != "application/octet-stream":
        raise Malformed("the signature part of a signed message is missing")
    octets = _body_octets(sig_fields, signature_entity[sig_offset:])
    content = body[content_start:content_end]
    buf, content_type, element = read_content_info(octets)
    if content_type != alg.ID_SIGNED_DATA:
        raise Malformed("the signature part does not hold a CMS SignedData")
    result = verify_signed_data(buf, element, detached_content=[content])
    signers = result.signers
    if not all(s.verified for s in signers) and _has_bare_lf(content):
        # Some signers hash their text with CRLF line ends while sending bare LF.
        canonical = canonicalize(bytes(content))
        retry = verify_signed_data(buf, element, detached_content=[canonical])
        if all(s.verified for s in retry.signers):
            signers = retry.signers
    return content, _judge(signers, result.certificates, validator, sender, at, True)


def _judge(
    signers: Sequence[SignerResult],
    certificates: Sequence[x509.Certificate],
    validator: TrustValidator,
    sender: str | None,
    at: datetime.datetime | None,
    detached: bool,
) -> list[Signature]:
    judged = []
    for signer in signers:
        if signer.certificate is None:
            trust = TrustResult(TrustStatus.UNTRUSTED, (signer.problem or "the signer is unknown",), ())
        else:
            trust = validator.validate(
                signer.certificate, purpose="sign", address=sender, extra_intermediates=certificates, at=at
            )
            if not signer.verified:
                trust = trust.with_problem(TrustStatus.BAD_SIGNATURE, signer.problem or "the signature does not match")
        for reason in signer.weak:
            trust = trust.with_problem(TrustStatus.WEAK, reason)
        judged.append(
            Signature(
                certificate=signer.certificate,
                trust=trust,
                digest_algorithm=signer.digest_algorithm,
                signature_algorithm=signer.signature_algorithm,
                weak=signer.weak,
                signing_time=signer.signing_time,
                capabilities=signer.capabilities,
                detached=detached,
            )
        )
    if not judged:
        judged.append(
            Signature(
                certificate=None,
                trust=TrustResult(TrustStatus.BAD_SIGNATURE, ("the signed message has no signature in it",), ()),
                digest_algorithm="",
                signature_algorithm="",
                weak=(),
                signing_time=None,
                capabilities=None,
                detached=detached,
            )
        )
    return judged

"""The inbound pipeline: what a user's mail client is shown of a message fetched from upstream.

API (shared by the POP3 and IMAP proxies; no Twisted mail types here)::

    reveal(identity, message, *, validator, options=RevealOptions(), at=None) -> (bytes, Report)

Pure and synchronous (it runs in a worker process, see :class:`Revealer`). ``message``
is the message as upstream stores it; the result is the message to show and a
:class:`Report`. ``reveal`` never raises for what a message holds: whatever it cannot
open is shown unchanged, with a report that says why. In order, it

1. removes every ``X-Gatekeeper-Security`` header field and every Gatekeeper report
   part that came from outside (no forged verdicts), at any MIME depth;
2. peels every S/MIME layer (:func:`gatekeeper.smime.open_message`): decrypts with any
   of ``identity.keys`` (current or retired), verifies inner and outer signatures with
   ``validator``, checking the signer's certificate against the ``From`` address;
3. makes the result ``multipart/mixed`` of the revealed entity (byte for byte as it
   was inside, or as it arrived for plain mail) and a ``text/plain`` part named
   ``gatekeeper-report.txt`` that a person can read (which key decrypted it, who signed,
   chain status and reasons, algorithms, weak ones flagged; for plain mail from outside
   the "cannot be verified" warning of the seed's FIG 8), and puts the one-line summary
   (:attr:`Report.summary`, e.g. ``decrypted=yes; signature=valid; signer=alice@a.example``)
   in an ``X-Gatekeeper-Security`` header field at the top.

Plain mail whose ``From`` is in one of the local domains (``[server] domains``) gets
the warning too by default; ``[inbound] plain_from_local`` makes it a neutral note
(``note``) or the header alone with no report part (``none``).

The output is a function of the input alone (the MIME boundary is derived from the
content), so revealing the same message twice gives the same bytes: a POP3 ``LIST``
size computed from one reveal matches the ``RETR`` served from another.

In the reactor's process, :class:`Revealer` is what the protocol adapters call::

    revealer = Revealer(workers, trust, options, clock=reactor, keyring=..., capabilities=...)
    message, report = await revealer.reveal(identity, message, protocol="pop3", session=7)

It runs :func:`reveal_job` in the worker pool (keys cross as a
:class:`~gatekeeper.keys.unlocking.WireIdentity`, the trust anchors as a picklable
:class:`TrustSpec` whose validator each worker builds once), then, back on the reactor,
harvests the certificates of valid, trusted signers into the key ring and remembers
their S/MIME capabilities (:attr:`Report.harvest`), and emits the ``reveal`` and
``key_use`` events. Worker failures (:class:`~gatekeeper.workers.WorkersBusy`,
:class:`~gatekeeper.workers.WorkerCrashed`) are temporary errors and propagate. A caller
whose own worker job calls :func:`reveal_job` (to do more there with the result) calls
``revealer.record(identity, report, protocol=...)`` on the reactor afterwards instead.
"""

from __future__ import annotations

import binascii
import datetime
import email.utils
import functools
import hashlib
import re
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from twisted.logger import Logger

from gatekeeper import mime, smime
from gatekeeper.address import address_key, domain_of, normalize_address
from gatekeeper.capabilities import ICapabilityStore
from gatekeeper.cms import algorithms as alg
from gatekeeper.cms.signed import capabilities_attribute_value
from gatekeeper.errors import GatekeeperError, InvalidAddress
from gatekeeper.events import emit
from gatekeeper.keys.identity import Identity
from gatekeeper.keys.keyring import KeyRing, fingerprint
from gatekeeper.keys.unlocking import WireIdentity, identity_to_wire, worker_identities
from gatekeeper.smime import _split, _split_multipart
from gatekeeper.trust import (
    SEVERITY,
    TrustResult,
    TrustStatus,
    TrustValidator,
    certificate_addresses,
    load_anchors,
    load_crls,
)

if TYPE_CHECKING:
    from gatekeeper.config import TrustConfig

__all__ = [
    "PLAIN_FROM_LOCAL",
    "REPORT_FILENAME",
    "SECURITY_HEADER",
    "Harvest",
    "Report",
    "RevealOptions",
    "Revealer",
    "SignerReport",
    "TrustSpec",
    "is_plain_single_part",
    "reveal",
    "reveal_job",
]

log = Logger()

SECURITY_HEADER = "X-Gatekeeper-Security"
REPORT_HEADER = "X-Gatekeeper-Report"
REPORT_FILENAME = "gatekeeper-report.txt"
PLAIN_FROM_LOCAL = ("warn", "note", "none")
MAX_DEPTH = smime.MAX_MIME_DEPTH
_FORGED_FIELDS = frozenset({SECURITY_HEADER.lower(), REPORT_HEADER.lower()})
INLINE_PLAIN_BYTES = 128 * 1024
"""Plain single-part messages up to this size are revealed on the reactor (see :class:`Revealer`)."""
_INLINE_HEAD_BYTES = 16 * 1024
_WEAK_CIPHERS = frozenset({"des3-cbc"})
_STATUS_WORDS = {
    TrustStatus.VALID: "valid",
    TrustStatus.BAD_SIGNATURE: "invalid",
}
_FAILURES: tuple[tuple[type[smime.SMIMEError], str], ...] = (
    (smime.NotForMe, "not-for-me"),
    (smime.Tampered, "tampered"),
    (smime.UnsupportedAlgorithm, "unsupported"),
    (smime.LimitExceeded, "too-large"),
    (smime.Malformed, "damaged"),
)


# -- values -------------------------------------------------------------------------------


@attrs.frozen
class RevealOptions:
    """How plain mail is reported: ``local_domains`` (``[server] domains``) and what plain mail from them gets.

    ``plain_from_local`` is ``warn`` (the same warning as mail from outside), ``note``
    (a report that says it came unprotected from a local address, without the warning)
    or ``none`` (only the ``X-Gatekeeper-Security`` header, no report part).
    """

    local_domains: tuple[str, ...] = ()
    plain_from_local: str = "warn"

    def __attrs_post_init__(self) -> None:
        if self.plain_from_local not in PLAIN_FROM_LOCAL:
            raise ValueError(f"plain_from_local must be one of {', '.join(PLAIN_FROM_LOCAL)}")


@attrs.frozen
class SignerReport:
    """One signature as the report tells it (plain values, picklable)."""

    status: str
    reasons: tuple[str, ...]
    address: str | None
    subject: str
    issuer: str
    chain: tuple[str, ...]
    digest_algorithm: str
    signature_algorithm: str
    weak: tuple[str, ...]
    signing_time: datetime.datetime | None
    detached: bool


@attrs.frozen
class Harvest:
    """A valid, trusted signer to remember: its certificate and chain (DER) and capabilities."""

    address: str
    certificate: bytes
    chain: tuple[bytes, ...]
    capabilities: tuple[str, ...] | None
    signing_time: datetime.datetime | None


@attrs.frozen
class Report:
    """What :func:`reveal` found, for the header, the report part, events and harvesting.

    ``decrypted`` is ``yes``, ``no`` (there was no encryption) or ``failed``;
    ``signature`` is ``none`` or the worst verdict of all signatures (``valid``,
    ``invalid``, ``untrusted``, ``expired``, ``revoked``, ``mismatch``, ``weak``,
    ``unusable``); ``signer`` is the address of the innermost signer (the author);
    ``error`` says why the message could not be opened (``not-for-me``, ``tampered``,
    ``unsupported``, ``too-large``, ``damaged``, ``internal``), ``problem`` the same in
    words; ``warning`` is ``unverified`` for plain mail that got the FIG 8 warning.
    """

    decrypted: str
    signature: str
    signer: str | None
    error: str | None
    problem: str | None
    warning: str | None
    key_ids: tuple[str, ...]
    layers: tuple[str, ...]
    signers: tuple[SignerReport, ...]
    removed: tuple[str, ...]
    sender: str | None
    message_id: str | None
    harvest: tuple[Harvest, ...]
    text: str

    @property
    def plain(self) -> bool:
        """Whether the message had no S/MIME protection at all (and was opened without trouble)."""
        return self.decrypted == "no" and self.signature == "none" and self.error is None

    @property
    def summary(self) -> str:
        """The one-line, machine-readable verdict of the ``X-Gatekeeper-Security`` header."""
        items = [f"decrypted={self.decrypted}", f"signature={self.signature}"]
        if self.signer:
            items.append(f"signer={self.signer}")
        if self.error:
            items.append(f"error={self.error}")
        if self.warning:
            items.append(f"warning={self.warning}")
        return "; ".join(items)


# -- trust anchors for workers ----------------------------------------------------------


@attrs.frozen
class TrustSpec:
    """The trust validator's inputs as DER, so a worker can rebuild it (certificate objects do not pickle)."""

    anchors: tuple[bytes, ...]
    intermediates: tuple[bytes, ...] = ()
    crls: tuple[bytes, ...] = ()

    @classmethod
    def load(cls, config: TrustConfig, *, extra_anchors: Sequence[x509.Certificate] = ()) -> TrustSpec:
        """Read ``[trust]`` as :func:`gatekeeper.trust.validator_from_config` does (plus ``extra_anchors``)."""
        anchors = [*extra_anchors, *load_anchors(config.anchors, config.anchor_dirs, system=config.system_anchors)]
        crls = load_crls(config.crls)
        return cls(
            anchors=tuple(c.public_bytes(Encoding.DER) for c in anchors),
            crls=tuple(c.public_bytes(Encoding.DER) for c in crls),
        )

    @classmethod
    def of(
        cls,
        anchors: Sequence[x509.Certificate],
        *,
        intermediates: Sequence[x509.Certificate] = (),
        crls: Sequence[x509.CertificateRevocationList] = (),
    ) -> TrustSpec:
        """The spec of a validator built from these certificates and CRLs."""
        return cls(
            tuple(c.public_bytes(Encoding.DER) for c in anchors),
            tuple(c.public_bytes(Encoding.DER) for c in intermediates),
            tuple(c.public_bytes(Encoding.DER) for c in crls),
        )

    def validator(self) -> TrustValidator:
        """The validator, built once per process for each spec."""
        return _validator(self)


@functools.lru_cache(maxsize=8)
def _validator(spec: TrustSpec) -> TrustValidator:
    return TrustValidator(
        [x509.load_der_x509_certificate(der) for der in spec.anchors],
        intermediates=[x509.load_der_x509_certificate(der) for der in spec.intermediates],
        crls=[x509.load_der_x509_crl(der) for der in spec.crls],
    )


# -- the pipeline -------------------------------------------------------------------------


def reveal_job(
    wire: WireIdentity,
    message: bytes,
    trust: TrustSpec,
    options: RevealOptions,
    at: datetime.datetime | None = None,
) -> tuple[bytes, Report]:
    """:func:`reveal` shaped as a worker job: picklable arguments, the validator cached per process."""
    return reveal(worker_identities.get(wire), message, validator=trust.validator(), options=options, at=at)


def reveal(
    identity: Identity,
    message: bytes,
    *,
    validator: TrustValidator,
    options: RevealOptions = RevealOptions(),
    at: datetime.datetime | None = None,
) -> tuple[bytes, Report]:
    """Decrypt, verify and report on ``message`` for ``identity`` (see the module's docstring)."""
    # Made canonical once, here (open_canonical does not check again): on a plain 64 KB
    # message the check is a third of the whole reveal.
    data = smime.canonicalize(message)
    try:
        outer_fields = mime.header_fields(_split(data)[0])
    except smime.LimitExceeded:
        outer_fields = []  # a header of over a megabyte: shown as text, below
    sender, message_id = _sender(outer_fields), _message_id(outer_fields)
    removed = [f"a forged {SECURITY_HEADER} header field" for name, _ in outer_fields if name in _FORGED_FIELDS]
    opened: smime.Opened | None = None
    failure: tuple[str, str] | None = None
    try:
        opened = smime.open_canonical(data, identity.keys, validator, sender, at=at)
    except smime.SMIMEError as error:
        failure = (_failure_code(error), str(error))
    except Exception as error:  # a bug must not lose the message: show it as it arrived
        failure = ("internal", f"Gatekeeper could not check it ({type(error).__name__})")
    if opened is not None:
        headers = b"".join(raw for name, raw in mime.header_fields(opened.headers) if name not in _FORGED_FIELDS)
        entity = opened.content
    else:
        # Delivered as it arrived: the outer Content-* fields and the body are the entity.
        offset = _split(data)[1] if outer_fields else 0
        headers = b"".join(raw for name, raw in outer_fields if name not in _FORGED_FIELDS and not _is_content(name))
        entity = b"".join(raw for name, raw in outer_fields if _is_content(name)) + b"\r\n" + data[offset:]
    del data
    entity, stripped = _strip_forged(entity, 0)
    removed += stripped
    report = _report(identity, opened, failure, sender, message_id, removed, options)
    if report.plain and report.warning is None and options.plain_from_local == "none":
        # Only the header: the message keeps its own header fields, in their order.
        kept = b"".join(raw for name, raw in outer_fields if name not in _FORGED_FIELDS)
        return _security_line(report) + kept + entity[_split(entity)[1] - 2 :], report
    return _assemble(headers, entity, report), report


def _is_content(name: str) -> bool:
    return name.startswith("content-")


def _failure_code(error: smime.SMIMEError) -> str:
    for kind, code in _FAILURES:
        if isinstance(error, kind):
            return code
    return "damaged"


# -- header fields -------------------------------------------------------------------------


def _unfolded(raw: bytes) -> str:
    value = raw.split(b":", 1)[1] if b":" in raw else b""
    return re.sub(r"\r\n[ \t]+", " ", value.decode("utf-8", "replace")).strip()


def _sender(fields: Sequence[tuple[str, bytes]]) -> str | None:
    """The first address of the From field, normalised (None if missing or unusable)."""
    for name, raw in fields:
        if name == "from":
            for _, address in email.utils.getaddresses([_unfolded(raw)]):
                try:
                    return normalize_address(address)
                except InvalidAddress:
                    return None
            return None
    return None


def _message_id(fields: Sequence[tuple[str, bytes]]) -> str | None:
    for name, raw in fields:
        if name == "message-id":
            return _unfolded(raw)[:200] or None
    return None


def _filenames(fields: Sequence[tuple[str, bytes]]) -> list[str]:
    """The file names a part gives itself (Content-Disposition filename, Content-Type name; RFC 2231 too)."""
    names = []
    for name, raw in fields:
        if name not in ("content-disposition", "content-type"):
            continue
        params: dict[str, str] = {}
        for key, value in mime.PARAMETER.findall(_unfolded(raw)):
            params[key.lower()] = re.sub(r"\\(.)", r"\1", value[1:-1]) if value.startswith('"') else value
        for base in ("filename", "name"):
            if base in params:
                names.append(params[base])
            if base + "*" in params:
                names.append(urllib.parse.unquote(params[base + "*"].split("'", 2)[-1]))
            pieces = [params[f"{base}*{i}"] for i in range(32) if f"{base}*{i}" in params]
            pieces += [urllib.parse.unquote(params[f"{base}*{i}*"]) for i in range(32) if f"{base}*{i}*" in params]
            if pieces:
                names.append("".join(pieces).split("'", 2)[-1])
    return [n.strip().lower() for n in names]


def _is_report_part(fields: Sequence[tuple[str, bytes]]) -> bool:
    return any(name in _FORGED_FIELDS for name, _ in fields) or REPORT_FILENAME in _filenames(fields)


def _strip_forged(entity: bytes, depth: int) -> tuple[bytes, list[str]]:
    """Remove forged verdict header fields and report parts from an entity, at any depth.

    Returns the entity unchanged (the same object, no copy) when there was nothing to remove.
    """
    if depth > MAX_DEPTH:
        return entity, []
    block, offset = _split(entity)
    fields = mime.header_fields(block)
    removed = [f"a forged {SECURITY_HEADER} header field" for name, _ in fields if name in _FORGED_FIELDS]
    head = b"".join(raw for name, raw in fields if name not in _FORGED_FIELDS) if removed else None
    main, params = mime.content_type(fields)
    body = entity[offset:]
    new_body: bytes | None = None
    if main.startswith("multipart/") and params.get("boundary"):
        found = _split_multipart(body, params["boundary"])
        if found is not None and found[0]:
            parts, _ = found
            kept: list[bytes] = []
            changed = False
            for start, end in parts:
                part = body[start:end]
                part_block, _ = _split(part)
                if _is_report_part(mime.header_fields(part_block)):
                    removed.append("a forged Gatekeeper report part")
                    changed = True
                    continue
                cleaned, inner = _strip_forged(part, depth + 1)
                removed += inner
                changed = changed or cleaned is not part
                kept.append(cleaned)
            if changed:
                separator = b"\r\n--" + params["boundary"].encode("latin-1") + b"\r\n"
                lead, tail = body[: parts[0][0]], body[parts[-1][1] :]
                new_body = lead + separator.join(kept or [b"\r\n"]) + tail
    elif main == "message/rfc822":
        cleaned, inner = _strip_forged(body, depth + 1)
        if cleaned is not body:
            removed += inner
            new_body = cleaned
    if head is None and new_body is None:
        return entity, removed
    return (
        (head if head is not None else block)
        + entity[len(block) : offset]
        + (new_body if new_body is not None else body)
    ), removed


# -- the report ----------------------------------------------------------------------------


def _describe_name(name: x509.Name) -> str:
    common = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    text = str(common[0].value) if common else name.rfc4514_string()
    return text[:120]


def _certificate_address(certificate: x509.Certificate | None) -> str | None:
    if certificate is None:
        return None
    addresses = certificate_addresses(certificate)
    return addresses[0] if addresses else None


def _status_word(status: TrustStatus) -> str:
    return _STATUS_WORDS.get(status, status.value)


def _signer_report(signature: smime.Signature) -> SignerReport:
    certificate = signature.certificate
    return SignerReport(
        status=_status_word(signature.trust.status),
        reasons=signature.trust.reasons,
        address=_certificate_address(certificate),
        subject=_describe_name(certificate.subject) if certificate is not None else "unknown",
        issuer=_describe_name(certificate.issuer) if certificate is not None else "unknown",
        chain=tuple(_describe_name(c.subject) for c in signature.trust.chain),
        digest_algorithm=signature.digest_algorithm,
        signature_algorithm=signature.signature_algorithm,
        weak=signature.weak,
        signing_time=signature.signing_time,
        detached=signature.detached,
    )


def _harvest(signature: smime.Signature, sender: str | None) -> Harvest | None:
    trust: TrustResult = signature.trust
    if not trust.ok or signature.certificate is None or sender is None:
        return None
    return Harvest(
        address=sender,
        certificate=signature.certificate.public_bytes(Encoding.DER),
        chain=tuple(c.public_bytes(Encoding.DER) for c in trust.chain[1:]),
        capabilities=signature.capabilities,
        signing_time=signature.signing_time,
    )


def _is_local(sender: str | None, options: RevealOptions) -> bool:
    if sender is None:
        return False
    domain = domain_of(sender)
    return any(domain == local.lower() for local in options.local_domains)


def _report(
    identity: Identity,
    opened: smime.Opened | None,
    failure: tuple[str, str] | None,
    sender: str | None,
    message_id: str | None,
    removed: list[str],
    options: RevealOptions,
) -> Report:
    signatures = opened.signatures if opened is not None else ()
    decryptions = opened.decryptions if opened is not None else ()
    decrypted = "failed" if failure is not None else ("yes" if decryptions else "no")
    signature = "none"
    if signatures:
        worst = min((s.trust.status for s in signatures), key=SEVERITY.index)
        signature = _status_word(worst)
    signers = tuple(_signer_report(s) for s in signatures)
    signer = signers[-1].address if signers else None
    plain = failure is None and not decryptions and not signatures
    local = _is_local(sender, options)
    warning = "unverified" if plain and not (local and options.plain_from_local != "warn") else None
    harvest = tuple(h for h in (_harvest(s, sender) for s in signatures) if h is not None)
    current = identity.current.key_id if identity.keys else None
    values = dict(
        decrypted=decrypted,
        signature=signature,
        signer=signer,
        error=failure[0] if failure else None,
        problem=failure[1] if failure else None,
        warning=warning,
        key_ids=tuple(d.key_id for d in decryptions),
        layers=opened.layers if opened is not None else (),
        signers=signers,
        removed=tuple(removed),
        sender=sender,
        message_id=message_id,
        harvest=harvest,
    )
    text = _report_text(values, decryptions, current, plain, local, options)
    return Report(text=text, **values)  # type: ignore[arg-type]


_CIPHER_NAMES = {
    "aes256-gcm": "AES-256-GCM",
    "aes192-gcm": "AES-192-GCM",
    "aes128-gcm": "AES-128-GCM",
    "aes256-cbc": "AES-256-CBC",
    "aes192-cbc": "AES-192-CBC",
    "aes128-cbc": "AES-128-CBC",
    "des3-cbc": "Triple-DES-CBC",
}
_ALGORITHM_NAMES = {
    "sha1": "SHA-1",
    "sha224": "SHA-224",
    "sha256": "SHA-256",
    "sha384": "SHA-384",
    "sha512": "SHA-512",
    "rsa-pkcs1v15": "RSA PKCS#1 v1.5",
    "rsa-pss": "RSA-PSS",
    "rsa-oaep": "RSA-OAEP",
    "ecdsa": "ECDSA",
}
_VERDICTS = {
    "valid": "VALID: the content is exactly what the signer signed, and the signer's certificate is trusted.",
    "invalid": "INVALID: the content was changed after it was signed, or the signature is damaged.",
    "untrusted": "NOT TRUSTED: the signature matches, but the signer's certificate does not lead to a trusted "
    "certification authority.",
    "expired": "EXPIRED: a certificate of the signer's chain is out of its validity period.",
    "revoked": "REVOKED: a certificate of the signer's chain has been revoked.",
    "mismatch": "MISMATCH: the signer's certificate is not for the sender named in From.",
    "weak": "VALID BUT WEAK: the signature matches and is trusted, but uses weak algorithms or keys.",
    "unusable": "NOT USABLE: the signer's certificate is not meant for signing e-mail.",
}


def _report_text(
    values: dict[str, Any],
    decryptions: Sequence[smime.Decryption],
    current_key: str | None,
    plain: bool,
    local: bool,
    options: RevealOptions,
) -> str:
    lines = ["Gatekeeper security report", "==========================", ""]
    sender = values["sender"] or "(no usable From address)"
    lines.append(f"Summary: {_summary_sentence(values, plain)}")
    lines.append(f"From: {sender}")
    lines.append("")
    if values["problem"] is not None:
        lines += [
            "THIS MESSAGE COULD NOT BE OPENED.",
            f"Reason: {values['problem']}.",
            "It is shown exactly as it arrived; nothing in it was decrypted or verified.",
            "",
        ]
    if plain:
        if local and options.plain_from_local == "note":
            lines += [
                "This message arrived without S/MIME protection from an address of your own organisation.",
                "It was neither signed nor encrypted, so Gatekeeper cannot confirm who wrote it.",
                "",
            ]
        else:
            lines += [
                "WARNING: this message was neither signed nor encrypted.",
                "The sender's identity and the message's integrity cannot be verified: anyone could have",
                f"written it in the name of {sender}, and it may have been read or changed on the way.",
                "",
            ]
    for number, decryption in enumerate(decryptions, 1):
        whose = "your current key" if decryption.key_id == current_key else "one of your earlier keys"
        cipher = _CIPHER_NAMES.get(decryption.cipher, decryption.cipher)
        lines += [
            f"Encryption{f' (layer {number})' if len(decryptions) > 1 else ''}",
            f"  Decrypted with {whose} ({decryption.key_id}).",
            f"  Cipher: {cipher}{' (authenticated)' if decryption.layer == 'auth-enveloped' else ''}; "
            f"key encryption: {_ALGORITHM_NAMES.get(decryption.key_encryption, decryption.key_encryption)}; "
            f"{decryption.recipient_count} recipient(s).",
        ]
        if decryption.cipher in _WEAK_CIPHERS:
            lines.append(f"  WEAK: {cipher} is an outdated cipher.")
        lines.append("")
    signers: tuple[SignerReport, ...] = values["signers"]
    for number, signer in enumerate(signers, 1):
        where = "" if len(signers) == 1 else (" (outer)" if number == 1 else " (inner)")
        lines += [
            f"Signature {number} of {len(signers)}{where}",
            f"  {_VERDICTS.get(signer.status, signer.status.upper())}",
            f"  Signer: {signer.address or 'no e-mail address'} ({signer.subject!r})",
            f"  Issued by: {signer.issuer!r}",
        ]
        if signer.chain:
            lines.append(f"  Chain: {' <- '.join(repr(c) for c in signer.chain)}")
        digest = _ALGORITHM_NAMES.get(signer.digest_algorithm, signer.digest_algorithm or "?")
        scheme = _ALGORITHM_NAMES.get(signer.signature_algorithm, signer.signature_algorithm or "?")
        lines.append(f"  Algorithms: {digest} with {scheme}")
        if signer.signing_time is not None:
            lines.append(f"  Signing time (as claimed by the signer): {signer.signing_time:%Y-%m-%d %H:%M:%S} UTC")
        for reason in signer.reasons:
            lines.append(f"  - {reason}")
        for weakness in signer.weak:
            lines.append(f"  WEAK: {weakness}")
        lines.append("")
    if values["removed"]:
        lines.append("Removed (only Gatekeeper may give a verdict):")
        lines += [f"  - {item}" for item in values["removed"]]
        lines.append("")
    lines.append(f"{SECURITY_HEADER}: {_summary_line(values)}")
    return "\r\n".join(lines) + "\r\n"


def _summary_line(values: dict[str, Any]) -> str:
    report = Report(text="", **values)
    return report.summary


def _summary_sentence(values: dict[str, Any], plain: bool) -> str:
    if values["problem"] is not None:
        return "could not be opened; shown as it arrived."
    if plain:
        return "not signed, not encrypted."
    parts = []
    if values["decrypted"] == "yes":
        parts.append("encrypted to you and decrypted")
    else:
        parts.append("not encrypted")
    if values["signature"] != "none":
        parts.append(
            f"signature {values['signature']}" + (f", signed by {values['signer']}" if values["signer"] else "")
        )
    else:
        parts.append("not signed")
    return "; ".join(parts) + "."


# -- assembling the result ---------------------------------------------------------------


def _boundary(entity: bytes, report_text: str) -> bytes:
    """A boundary derived from the content (so the same input always gives the same output) not found in it."""
    seed = hashlib.sha256()
    seed.update(b"%d\0" % len(entity))
    seed.update(entity[:8192])
    seed.update(entity[-8192:])
    seed.update(report_text.encode("utf-8"))
    for counter in range(1000):
        candidate = b"=_gatekeeper_" + hashlib.sha256(seed.digest() + b"%d" % counter).hexdigest()[:32].encode()
        if b"--" + candidate not in entity:
            return candidate
    raise AssertionError("no free MIME boundary")  # pragma: no cover - 1000 hash collisions


def _report_part(text: str) -> bytes:
    data = text.encode("utf-8")
    if data.isascii():
        encoding, body = b"7bit", data
    else:
        encoding, body = b"quoted-printable", smime.canonicalize(binascii.b2a_qp(data, istext=True))
    return (
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: " + encoding + b"\r\n"
        b'Content-Disposition: inline; filename="' + REPORT_FILENAME.encode() + b'"\r\n'
        b"Content-Description: Gatekeeper security report\r\n"
        b"X-Gatekeeper-Report: 1\r\n"
        b"\r\n" + body
    )


def _security_line(report: Report) -> bytes:
    return f"{SECURITY_HEADER}: {report.summary}\r\n".encode()


def _assemble(headers: bytes, entity: bytes, report: Report) -> bytes:
    has_version = any(name == "mime-version" for name, _ in mime.header_fields(headers))
    version = b"" if has_version else b"MIME-Version: 1.0\r\n"
    boundary = _boundary(entity, report.text)
    return b"".join(
        (
            _security_line(report),
            headers,
            version,
            b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n',
            b"--" + boundary + b"\r\n",
            entity,
            b"\r\n--" + boundary + b"\r\n",
            _report_part(report.text),
            b"\r\n--" + boundary + b"--\r\n",
        )
    )


# -- the reactor's side ------------------------------------------------------------------

P = ParamSpec("P")
T = TypeVar("T")


class Workers(Protocol):
    """What :class:`Revealer` needs of a worker pool (:class:`~gatekeeper.workers.WorkerPool`)."""

    def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Awaitable[T]:
        """Run ``function`` in a worker."""


class Clock(Protocol):
    """Anything with ``seconds()`` (the reactor, a ``Clock``)."""

    def seconds(self) -> float:
        """The current time in seconds."""


def is_plain_single_part(message: bytes) -> bool:
    """Whether revealing ``message`` reads no more than its header: a single ``text/*`` part.

    Text is never S/MIME nor a container (``multipart/*`` and ``message/*`` could hide
    forged reports at depth); the whole header must be in the first 16 KB. Its reveal
    is then a header rewrite and copies of the body in C. Only the header is read here.
    """
    limit = min(len(message), _INLINE_HEAD_BYTES)
    crlf = message.find(b"\n\r\n", 0, limit)
    bare = message.find(b"\n\n", 0, crlf if crlf >= 0 else limit)
    end = bare if bare >= 0 else crlf
    if end < 0 and len(message) > limit:
        return False
    block = smime.canonicalize(message[: end + 1] if end >= 0 else message)
    main, _ = mime.content_type(mime.header_fields(block if block.endswith(b"\r\n") else block + b"\r\n"))
    return main.startswith("text/")


class Revealer:
    """Runs :func:`reveal` in the worker pool and does, on the reactor, what a worker must not.

    The exception is a plain text message of at most ``inline_bytes``
    (:func:`is_plain_single_part`): it is revealed on the reactor, which costs less
    there than sending it to a worker. Measured on a 64 KB text message: 0.2 ms to
    reveal it here, against 0.2 ms of the reactor's CPU for the pickles and pipes plus
    0.5 ms in the worker. At the 128 KB default the reactor holds the GIL for about
    0.4 ms, what a TLS handshake costs it; ``inline_bytes=0`` sends everything to workers.

    ``keyring`` and ``capabilities`` receive the valid, trusted signers (None: not
    harvested). A certificate already in the key ring with the same chain and
    capabilities is not written again, and capabilities already remembered are
    written again at most once per ``remember_interval`` seconds: harvesting is then
    almost never a disk write, however many messages a correspondent sends.
    """

    def __init__(
        self,
        workers: Workers,
        trust: TrustSpec,
        options: RevealOptions = RevealOptions(),
        *,
        clock: Clock,
        keyring: KeyRing | None = None,
        capabilities: ICapabilityStore | None = None,
        remember_interval: float = 3600.0,
        inline_bytes: int = INLINE_PLAIN_BYTES,
    ) -> None:
        self.workers = workers
        self.inline_bytes = inline_bytes
        self.trust = trust
        self.options = options
        self._clock = clock
        self._keyring = keyring
        self._capabilities = capabilities
        self._remember_interval = remember_interval
        self._remembered: dict[tuple[str, tuple[str, ...]], float] = {}
        self._harvested: dict[tuple[bytes, tuple[str, ...] | None], float] = {}
        self._wires: weakref.WeakKeyDictionary[Identity, WireIdentity] = weakref.WeakKeyDictionary()

    def _wire(self, identity: Identity) -> WireIdentity:
        wire = self._wires.get(identity)
        if wire is None:
            wire = self._wires[identity] = identity_to_wire(identity)
        return wire

    async def reveal(
        self,
        identity: Identity,
        message: bytes,
        *,
        protocol: str,
        session: int | None = None,
        peer: str | None = None,
    ) -> tuple[bytes, Report]:
        """Reveal ``message`` for ``identity`` (in a worker, unless plain and small); harvest and emit events here."""
        started = self._clock.seconds()
        if len(message) <= self.inline_bytes and is_plain_single_part(message):
            revealed, report = reveal(identity, message, validator=self.trust.validator(), options=self.options)
        else:
            revealed, report = await self.workers.run(
                reveal_job, self._wire(identity), message, self.trust, self.options
            )
        self.record(
            identity, report, protocol=protocol, session=session, peer=peer, seconds=self._clock.seconds() - started
        )
        return revealed, report

    def record(
        self,
        identity: Identity,
        report: Report,
        *,
        protocol: str,
        session: int | None = None,
        peer: str | None = None,
        seconds: float = 0.0,
    ) -> None:
        """What follows every reveal on the reactor: harvest trusted signers, emit ``reveal`` and ``key_use``.

        :meth:`reveal` calls it; a caller that runs :func:`reveal_job` inside a worker job
        of its own (the IMAP proxy, which builds its view of the message there too) calls
        it with the report that job returned.
        """
        self.harvest(report)
        emit(
            log,
            "reveal",
            "revealed for {user} ({protocol}): decrypted={decrypted} signature={signature} in {seconds:.3f} s",
            decrypted=report.decrypted,
            signature=report.signature,
            user=identity.address,
            protocol=protocol,
            seconds=seconds,
            session=session,
            message_id=report.message_id,
        )
        if report.key_ids:
            emit(
                log,
                "key_use",
                "key used to decrypt: {user} ({protocol})",
                operation="decrypt",
                user=identity.address,
                session=session,
                message_id=report.message_id,
                peer=peer,
                protocol=protocol,
                key_ids=report.key_ids,
            )

    def harvest(self, report: Report) -> None:
        """Remember the valid, trusted signers of a report (key ring and capabilities)."""
        now = self._clock.seconds()
        for item in report.harvest:
            try:
                self._harvest_one(item, now)
            except (GatekeeperError, ValueError) as error:
                # Harvesting is a convenience: a full disk must not stop mail from being read.
                log.warn("could not remember the certificate of {address}: {kind}", address=item.address, kind=error)

    def _harvest_one(self, item: Harvest, now: float) -> None:
        key = (item.certificate, item.capabilities)
        if self._keyring is not None and now - self._harvested.get(key, -1e18) >= self._remember_interval:
            certificate = x509.load_der_x509_certificate(item.certificate)
            chain = tuple(x509.load_der_x509_certificate(der) for der in item.chain)
            known = [n for n in item.capabilities or () if n in alg.CAPABILITY_OIDS]
            attribute = capabilities_attribute_value(known) if known else None
            entry = self._keyring.entry(fingerprint(certificate))
            if entry is None or entry.chain != chain or (attribute is not None and entry.capabilities != attribute):
                self._keyring.harvest(certificate, chain, attribute)
            self._harvested[key] = now
        if self._capabilities is not None and item.capabilities is not None:
            memo = (address_key(item.address), item.capabilities)
            if now - self._remembered.get(memo, -1e18) >= self._remember_interval:
                when = item.signing_time or datetime.datetime.now(datetime.UTC)
                known_record = self._capabilities.get(item.address)
                if known_record is None or tuple(known_record.algorithms) != item.capabilities:
                    self._capabilities.remember(item.address, item.capabilities, when)
                self._remembered[memo] = now

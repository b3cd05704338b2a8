"""The outbound pipeline: from a submitted message to the protected copies, relayed.

Two halves, neither of which knows about Twisted's mail types:

- :func:`protect` runs in a worker process (MIME and base64 work hold the GIL). It
  repairs what can be repaired (bare LF or CR line ends, missing ``Date``,
  ``Message-ID`` and ``From`` fields, 8-bit, NUL or over-long lines in bodies that it
  transfer-encodes, over-long header fields that it folds), refuses with a
  :class:`~gatekeeper.errors.MessageRejected` what cannot be, removes ``Bcc:``, and
  builds the deliveries:

  - one copy for all ``To``/``Cc`` recipients with the same treatment: encrypted (and
    signed first) to all of them *and to the sender*, so the Sent copy stays readable;
    signed only; or plain;
  - one copy per ``Bcc`` recipient (an envelope recipient in neither ``To`` nor
    ``Cc``), so that no RecipientInfo of another copy names them;
  - an already signed or encrypted message (S/MIME, PGP/MIME, inline PGP) is passed
    through unchanged, as one copy to everyone: it is never encrypted twice.

  Every copy gets the hop's ``Received:`` field (and, if configured,
  ``X-Gatekeeper-Outbound: encrypted=2``, counting that copy's recipients only: a count
  of the whole message would reveal Bcc recipients).

- :class:`OutboundPipeline` runs on the reactor: it checks each recipient when the
  client names it (key lookup, policy, the relay's own verdict), and at the end of the
  data runs :func:`protect` in the worker pool and hands the copies to the relay
  (:class:`~gatekeeper.interfaces.ISubmissionRelay`).

**The partial case.** Copies are relayed together and committed together (see
``ISubmissionRelay.relay``), so either every copy is accepted or nothing is kept and
the client gets a temporary error and retries. One case remains: the upstream server
refuses a copy at the very end of its data (a content filter, a full disk) after it
has accepted another. The accepted copy cannot be recalled, and a ``4xx`` would make
the client send it again. Gatekeeper then answers ``250`` and sends the sender a
notice from ``MAILER-DAEMON`` with the refused copy attached (it is encrypted to the
sender as well, or was only signed), naming the recipients that did not get it, as an
MTA's bounce would. Only if that notice cannot be delivered either does the client
get ``451`` (the accepted recipients may then receive the message twice: a duplicate
rather than a loss).
"""

from __future__ import annotations

import binascii
import contextlib
import datetime
import email.utils
import itertools
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gatekeeper import mime, smime
from gatekeeper.address import address_key, normalize_address
from gatekeeper.capabilities import Capabilities, ICapabilityStore, choose_algorithms
from gatekeeper.cms import certificate_from_der
from gatekeeper.config import PolicyConfig
from gatekeeper.errors import (
    InvalidAddress,
    MessageRejected,
    PolicyRejected,
    RelayRefused,
    SourceUnavailable,
    TemporaryError,
    UpstreamUnavailable,
)
from gatekeeper.events import emit
from gatekeeper.interfaces import IRelayTransaction, ISubmissionRelay, RelayCopy, RelayOutcome, RelayReply
from gatekeeper.keys.identity import Identity
from gatekeeper.keys.unlocking import WireIdentity, identity_to_wire, worker_identities
from gatekeeper.policy import Action, Decision, decide, sender_allowed

log = Logger()

MAX_LINE = 998  # RFC 5322 2.1.1, without the CRLF
MAX_HEADER_BYTES = 1024 * 1024
MAX_MIME_DEPTH = 32

KIND_ENCRYPTED = "encrypted"
KIND_SIGNED = "signed_only"
KIND_PLAIN = "plain"
KIND_PASSED = "passed_through"
_HEADER_NAMES = {
    KIND_ENCRYPTED: "encrypted",
    KIND_SIGNED: "signed-only",
    KIND_PLAIN: "plain",
    KIND_PASSED: "passed-through",
}


# -- what crosses into the worker and back ---------------------------------------------


@attrs.frozen
class RecipientPlan:
    """One accepted recipient as the worker needs it: the action and what to encrypt to."""

    address: str
    action: Action
    certificates: tuple[bytes, ...] = ()  # DER, best first; the first is used
    capabilities: tuple[str, ...] | None = None  # what their client advertised, if known


@attrs.frozen
class ProtectRequest:
    """Everything :func:`protect` needs: picklable values only.

    ``message`` is the message as received (bytes, or the path of a spool file);
    ``received`` the ``Received:`` field for this hop (CRLF-terminated). With ``spool``
    set, the copies are written to private files in ``spool_directory`` (default: the
    system's temporary directory) instead of being returned as bytes.
    """

    sender: str
    signer: WireIdentity
    recipients: tuple[RecipientPlan, ...]
    message: bytes | Path = attrs.field(repr=False)
    received: bytes
    hostname: str
    eight_bit_declared: bool = False
    outbound_header: bool = False
    spool: bool = False
    spool_directory: Path | None = None


@attrs.frozen
class Delivery:
    """One copy to relay: its recipients, what was done to it, and its bytes (or spool file)."""

    recipients: tuple[str, ...]
    kind: str
    message: bytes | Path = attrs.field(repr=False)
    signed: bool
    eight_bit: bool


@attrs.frozen
class ProtectResult:
    """The copies, the message's ``Message-ID`` and what was repaired (for the log)."""

    deliveries: tuple[Delivery, ...]
    message_id: str
    repairs: tuple[str, ...]
    subject: str = ""


# -- parsing and repairing (worker side) -----------------------------------------------------


_FIELD_RE = re.compile(rb"^[!-9;-~]+[ \t]*:")


def _canonical(data: bytes) -> bytes:
    """Every line end as CRLF (bare LF and bare CR count as line ends)."""
    return smime.canonicalize(data)


def _split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block with each field ending in CRLF, body); a message with no header has an empty block."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    first_line = data[: data.find(b"\r\n")] if b"\r\n" in data else data
    if not _FIELD_RE.match(first_line):
        return b"", data  # no header at all: everything is body
    end = data.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
    if end < 0:
        if len(data) > MAX_HEADER_BYTES:
            raise MessageRejected("the message header is too large", status="5.6.0")
        # The header runs up to the first line that is not a field (or to the end).
        lines = data.split(b"\r\n")
        index = 0
        while index < len(lines) and (_FIELD_RE.match(lines[index]) or lines[index][:1] in (b" ", b"\t")):
            index += 1
        head = b"".join(line + b"\r\n" for line in lines[:index])
        rest = b"\r\n".join(lines[index:])
        return head, rest
    return data[: end + 2], data[end + 4 :]


def _has_long_line(data: bytes) -> bool:
    if len(data) <= MAX_LINE:
        return False
    return max(map(len, data.split(b"\r\n"))) > MAX_LINE


def _clean(data: bytes) -> bool:
    """7-bit, no NUL, no line longer than 998: what any SMTP server carries unchanged."""
    return data.isascii() and b"\0" not in data and not _has_long_line(data)


def _fold(raw: bytes) -> bytes:
    """Fold a header field's lines longer than 998 at white space; refuse one that cannot be."""
    out = []
    for line in raw[:-2].split(b"\r\n"):
        while len(line) > MAX_LINE:
            cut = max(line.rfind(b" ", 1, MAX_LINE), line.rfind(b"\t", 1, MAX_LINE))
            if cut <= 0 or not line[:cut].strip():
                raise MessageRejected(
                    "a header line is longer than 998 characters and cannot be folded", status="5.6.0"
                )
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return b"\r\n".join(out) + b"\r\n"


def _delimiters(body: bytes, boundary: str) -> list[re.Match[bytes]]:
    pattern = rb"(?m)^--" + re.escape(boundary.encode("latin-1")) + rb"(--)?[ \t]*(?=\r\n|\Z)"
    return list(re.finditer(pattern, body))


def _repair_entity(entity: bytes, repairs: set[str], depth: int = 0) -> bytes:
    """Transfer-encode every leaf part that is not clean; clean parts are returned untouched."""
    if _clean(entity):
        return entity
    if depth > MAX_MIME_DEPTH:
        raise MessageRejected("MIME parts are nested too deeply", status="5.6.0")
    block, body = _split_message(entity)
    fields = mime.header_fields(block)
    if b"\0" in block:
        raise MessageRejected("a header field contains a NUL character", status="5.6.0")
    main, params = mime.content_type(fields)
    if main.startswith("multipart/") and params.get("boundary"):
        found = _delimiters(body, params["boundary"])
        if found:
            pieces, last = [], 0
            for index, here in enumerate(found):
                if here.group(1):  # the closing delimiter: only the epilogue follows
                    break
                start = min(here.end() + 2, len(body))
                # A missing closing delimiter: the last part runs to the end.
                end = max(found[index + 1].start() - 2 if index + 1 < len(found) else len(body), start)
                pieces.append(body[last:start])
                pieces.append(_repair_entity(body[start:end], repairs, depth + 1))
                last = end
            pieces.append(body[last:])
            return block + b"\r\n" + b"".join(pieces)
    if main == "message/rfc822":
        return block + b"\r\n" + _repair_entity(body, repairs, depth + 1)
    encoding = mime.transfer_encoding(fields)
    if _clean(body) and encoding in ("7bit", "quoted-printable", "base64"):
        return entity  # only the header is 8-bit (RFC 6532): leave it as written
    if encoding == "base64":
        octets = binascii.a2b_base64(body)  # lenient: a2b ignores what is not base64
        repairs.add("base64 lines rewrapped")
    elif encoding == "quoted-printable":
        octets = binascii.a2b_qp(body)
        repairs.add("quoted-printable lines rewrapped")
    else:
        octets = body
        if not body.isascii():
            repairs.add("8-bit content transfer-encoded")
        if b"\0" in body:
            repairs.add("NUL characters transfer-encoded")
        if _has_long_line(body):
            repairs.add("long lines transfer-encoded")
    kept = b"".join(raw for name, raw in fields if name != "content-transfer-encoding")
    if not any(name == "content-type" for name, _ in fields):
        kept += f"Content-Type: text/plain; charset={_guess_charset(octets)}\r\n".encode("ascii")
    if main.startswith("text/"):
        encoded = _canonical(binascii.b2a_qp(octets, istext=True))
        if encoded and not encoded.endswith(b"\r\n") and body.endswith(b"\r\n"):
            encoded += b"\r\n"
        return kept + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded
    encoded = b"".join(
        binascii.b2a_base64(octets[i : i + 57], newline=False) + b"\r\n" for i in range(0, len(octets), 57)
    )
    return kept + b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded


def _guess_charset(octets: bytes) -> str:
    if octets.isascii():
        return "us-ascii"
    try:
        octets.decode("utf-8")
    except UnicodeDecodeError:
        return "iso-8859-1"
    return "utf-8"


def _addresses(fields: Sequence[tuple[str, bytes]], names: Iterable[str]) -> set[str]:
    wanted = set(names)
    values = [mime.field_value(raw, "utf-8") for name, raw in fields if name in wanted]
    found = set()
    for _, address in email.utils.getaddresses(values):
        with contextlib.suppress(InvalidAddress):
            found.add(address_key(normalize_address(address)))
    return found


def _protection(fields: Sequence[tuple[str, bytes]], body: bytes) -> str | None:
    """Whether the message is already encrypted or signed: S/MIME, PGP/MIME or inline PGP."""
    main, params = mime.content_type(fields)
    protocol = params.get("protocol", "").lower()
    if main == "multipart/encrypted":
        return "encrypted"
    if main == "multipart/signed":
        return "signed"
    if main in ("application/pkcs7-mime", "application/x-pkcs7-mime") or (
        main == "application/octet-stream" and params.get("name", "").lower().endswith(".p7m")
    ):
        return "signed" if params.get("smime-type", "").lower() == "signed-data" else "encrypted"
    if main == "text/plain" and not protocol:
        head = body.lstrip()[:40]
        if head.startswith(b"-----BEGIN PGP MESSAGE-----"):
            return "encrypted"
        if head.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----"):
            return "signed"
    return None


def _read(message: bytes | Path) -> bytes:
    if isinstance(message, Path):
        return message.read_bytes()
    return message


_SPOOL_NAMES = itertools.count()


def spool_file(directory: Path | None, prefix: str = "gk-spool-") -> tuple[Any, Path]:
    """A new private (0600) spool file: an open binary file object and its path (named after the process)."""
    folder = directory if directory is not None else Path(tempfile.gettempdir())
    while True:
        path = folder / f"{prefix}{os.getpid()}-{next(_SPOOL_NAMES)}-{os.urandom(6).hex()}.eml"
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
        return os.fdopen(handle, "wb"), path


def handoff_directory(root: Path = Path("/dev/shm")) -> Path | None:  # noqa: S108 - a private 0700 subdirectory
    """A private (0700) directory in memory for handing messages to the workers, or None.

    Measured (``bench/smtp.py``): a 64 KB message and its protected copy pickled through
    the worker pool's pipes cost more than signing them, because both sides wait for
    the pipe and for the GIL; written to a file in a RAM-backed directory, only the
    name crosses. Files left by a gateway process that is gone are removed here.
    """
    if not root.is_dir() or not os.access(root, os.W_OK):
        return None
    directory = root / f"gatekeeper-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        if directory.is_symlink() or directory.stat().st_uid != os.getuid():
            return None
        os.chmod(directory, 0o700)
        for leftover in directory.glob("gk-*"):
            pid = leftover.name.split("-")[2] if leftover.name.count("-") >= 3 else ""
            if pid.isdigit() and not _alive(int(pid)):
                leftover.unlink(missing_ok=True)
    except OSError:
        return None
    return directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_spooled(items: Iterable[bytes | Path | None]) -> None:
    """Delete the spool files among ``items`` (bytes and None are ignored)."""
    for item in items:
        if isinstance(item, Path):
            with contextlib.suppress(OSError):
                item.unlink()


def protect(request: ProtectRequest) -> ProtectResult:
    """Build the copies of one submitted message (runs in a worker process).

    Raises :class:`~gatekeeper.errors.MessageRejected` for a message that cannot be
    repaired, with a reason safe to show to the client.
    """
    data = _read(request.message)
    repairs: set[str] = set()
    canonical = _canonical(data)
    if canonical is not data:
        repairs.add("line ends made CRLF")
    block, body = _split_message(canonical)
    if not block:
        repairs.add("header added to a message without one")
    if b"\0" in block:
        raise MessageRejected("a header field contains a NUL character", status="5.6.0")
    fields = mime.header_fields(block)
    if any(len(raw) > MAX_LINE + 2 and _has_long_line(raw[:-2]) for _, raw in fields):
        fields = [(name, _fold(raw)) for name, raw in fields]
        repairs.add("long header lines folded")
    names = {name for name, _ in fields}
    if "bcc" in names or "resent-bcc" in names:
        fields = [(name, raw) for name, raw in fields if name not in ("bcc", "resent-bcc")]
    added = []
    if "date" not in names:
        added.append(f"Date: {email.utils.formatdate(localtime=False)}\r\n".encode("ascii"))
        repairs.add("Date added")
    message_id = next((mime.field_value(raw, "utf-8") for name, raw in fields if name == "message-id"), "")
    if not message_id:
        message_id = email.utils.make_msgid(domain=request.hostname)
        added.append(f"Message-ID: {message_id}\r\n".encode("ascii"))
        repairs.add("Message-ID added")
    if "from" not in names and request.sender:
        added.append(f"From: <{request.sender}>\r\n".encode())
        repairs.add("From added")
    subject = next((mime.field_value(raw, "utf-8") for name, raw in fields if name == "subject"), "")[:200]
    visible = _addresses(fields, ("to", "cc", "resent-to", "resent-cc"))
    header = b"".join(added) + b"".join(raw for _, raw in fields)
    protection = _protection(fields, body)
    if protection is not None:
        if b"\0" in body:
            raise MessageRejected("the message contains NUL characters", status="5.6.0")
        if _has_long_line(body):
            raise MessageRejected(
                "the (already signed or encrypted) message has lines longer than 998 characters", status="5.6.0"
            )
        message = header + b"\r\n" + body
        deliveries = [_finish(request, [r.address for r in request.recipients], KIND_PASSED, message, False)]
        return ProtectResult(tuple(deliveries), message_id, tuple(sorted(repairs)), subject)

    entity_fields = [raw for name, raw in fields if name.startswith("content-")]
    entity = b"".join(entity_fields) + b"\r\n" + body
    repaired = _repair_entity(entity, repairs)
    if repaired is not entity and not request.eight_bit_declared and not entity.isascii():
        repairs.add("8-bit content without BODY=8BITMIME")
    outer = b"".join(raw for name, raw in fields if not name.startswith("content-"))
    if repaired is not entity and "mime-version" not in names:
        outer += b"MIME-Version: 1.0\r\n"
    base = b"".join(added) + outer + repaired
    deliveries = _copies(request, base, visible)
    return ProtectResult(tuple(deliveries), message_id, tuple(sorted(repairs)), subject)


_ORDER = (Action.ENCRYPT_AND_SIGN, Action.ENCRYPT, Action.SIGN, Action.PLAIN)


def _copies(request: ProtectRequest, base: bytes, visible: set[str]) -> list[Delivery]:
    plans: list[tuple[Action, list[RecipientPlan]]] = []
    for action in _ORDER:
        shared = [r for r in request.recipients if r.action is action and address_key(r.address) in visible]
        if shared:
            plans.append((action, shared))
    for recipient in request.recipients:
        if address_key(recipient.address) not in visible and recipient.action in _ORDER:
            plans.append((recipient.action, [recipient]))  # Bcc: a copy of its own
    identity = worker_identities.get(request.signer)
    signer = identity.current
    own = signer.certificate.public_bytes(Encoding.DER)
    # With several signed copies the message is signed once and that is encrypted per copy.
    sign_once = sum(1 for action, _ in plans if action.signs) > 1
    signed: list[bytes] = []

    def signed_message() -> bytes:
        if not signed:
            signed.append(smime.sign(base, signer))
        return signed[0]

    def build(action: Action, group: Sequence[RecipientPlan]) -> Delivery:
        addresses = [r.address for r in group]
        if action is Action.SIGN:
            return _finish(request, addresses, KIND_SIGNED, signed_message(), True)
        if action is Action.PLAIN:
            return _finish(request, addresses, KIND_PLAIN, base, False)
        certificates = [certificate_from_der(r.certificates[0]) for r in group if r.certificates]
        if all(c.public_bytes(Encoding.DER) != own for c in certificates):
            certificates.append(signer.certificate)  # encrypt to self: the Sent copy stays readable
        choice = choose_algorithms([_known(r) for r in group])
        cipher, transport = choice.cipher, choice.key_transport
        if action is Action.ENCRYPT:
            out = smime.encrypt(base, certificates, cipher=cipher, key_transport=transport)
            return _finish(request, addresses, KIND_ENCRYPTED, out, False)
        if sign_once:
            out = smime.encrypt(signed_message(), certificates, cipher=cipher, key_transport=transport)
        else:
            out = smime.sign_and_encrypt(base, signer, certificates, cipher=cipher, key_transport=transport)
        return _finish(request, addresses, KIND_ENCRYPTED, out, True)

    return [build(action, group) for action, group in plans]


def _known(plan: RecipientPlan) -> Capabilities | None:
    if plan.capabilities is None:
        return None
    return Capabilities(plan.address, plan.capabilities, _EPOCH)


def _finish(request: ProtectRequest, recipients: Sequence[str], kind: str, message: bytes, signed: bool) -> Delivery:
    prefix = request.received
    if request.outbound_header:
        prefix += f"X-Gatekeeper-Outbound: {_HEADER_NAMES[kind]}={len(recipients)}\r\n".encode("ascii")
    eight_bit = not message.isascii()
    if request.spool:
        stream, path = spool_file(request.spool_directory)
        with stream:
            stream.write(prefix)
            stream.write(message)
        return Delivery(tuple(recipients), kind, path, signed, eight_bit)
    return Delivery(tuple(recipients), kind, prefix + message, signed, eight_bit)


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


# -- the Received: field -------------------------------------------------------------------


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    transaction_id: str,
    when: float | None = None,
) -> bytes:
    """The ``Received:`` field for this hop (RFC 5321 4.4), without recipients (Bcc privacy)."""
    safe_helo = re.sub(r"[^A-Za-z0-9.:\[\]_-]", "?", helo)[:100] or "unknown"
    date = email.utils.formatdate(when, localtime=False)
    return (
        f"Received: from {safe_helo} ([{client_ip}])\r\n"
        f"\tby {hostname} (Gatekeeper) with {protocol} id {transaction_id};\r\n"
        f"\t{date}\r\n"
    ).encode("ascii", "replace")


# -- the reactor side ----------------------------------------------------------------------


class KeyLookup(Protocol):
    """The part of the key manager the pipeline uses."""

    def lookup(self, address: str) -> Any:
        """A Deferred firing with a :class:`~gatekeeper.keys.directory.LookupResult`."""


class Workers(Protocol):
    """The part of a :class:`~gatekeeper.workers.WorkerPool` the pipeline uses."""

    async def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``function`` in a worker."""


@attrs.frozen
class Submission:
    """One mail transaction as the adapter hands it over at the end of the data."""

    identity: Identity
    session: int | None
    client: str
    sender: str
    decisions: tuple[Decision, ...]
    message: bytes | Path = attrs.field(repr=False)
    received: bytes
    eight_bit_declared: bool = False
    transaction: IRelayTransaction | None = attrs.field(default=None, eq=False)


@attrs.frozen
class Submitted:
    """What became of a submission that the client may be told ``250`` for."""

    message_id: str
    deliveries: tuple[tuple[str, int], ...]  # (kind, recipients) per copy
    refused: tuple[str, ...] = ()  # recipients reported to the sender by a notice (the partial case)


class OutboundPipeline:
    """Checks recipients and relays protected copies; one per gateway, shared by all SMTP sessions."""

    def __init__(
        self,
        *,
        key_manager: KeyLookup,
        workers: Workers,
        relay: ISubmissionRelay | None,
        policy: PolicyConfig,
        hostname: str,
        capabilities: ICapabilityStore | None = None,
        verify_recipients: bool = True,
        spool_directory: Path | None = None,
        handoff_directory: Path | None = None,
        clock: Any = None,
    ) -> None:
        self.key_manager = key_manager
        self.workers = workers
        self.relay = relay
        self.policy = policy
        self.hostname = hostname
        self.capabilities = capabilities
        self.verify_recipients = verify_recipients
        self.spool_directory = spool_directory
        self.handoff_directory = handoff_directory
        # Serialising the keys costs more than the rest of the reactor's share of a message;
        # an identity lives as long as the user's login is cached, and so does this entry.
        self._wires: weakref.WeakKeyDictionary[Identity, WireIdentity] = weakref.WeakKeyDictionary()
        self.clock = clock

    def sender_allowed(self, identity: Identity, sender: str) -> bool:
        """Whether the logged-in user may use ``sender`` in ``MAIL FROM``."""
        return sender_allowed(identity.address, sender, self.policy)

    def begin(self, sender: str) -> IRelayTransaction | None:
        """Start a client transaction with the relay (None: no relay is configured)."""
        return self.relay.transaction(sender) if self.relay is not None else None

    async def check_recipient(
        self,
        identity: Identity,
        session: int | None,
        sender: str,
        recipient: str,
        transaction: IRelayTransaction | None = None,
    ) -> Decision:
        """Look the recipient up, apply the policy and ask the relay; return the decision.

        With ``transaction`` (from :meth:`begin`) the relay is asked within it, so the
        message can later go on that same upstream transaction.

        Raises :class:`PolicyRejected` (mandatory, no certificate),
        :class:`SourceUnavailable` (mandatory, a key source was down),
        :class:`RelayRefused` (the relay refused the recipient),
        :class:`UpstreamUnavailable` and :class:`InvalidAddress`.
        """
        address = normalize_address(recipient)
        if self.relay is None:
            raise UpstreamUnavailable("no mail server to relay to is configured")
        verdict: Deferred[Any] | None = None
        if self.verify_recipients:
            # Asked while the key lookup runs: the two round trips overlap.
            verdict = Deferred.fromCoroutine(self._ask(sender, address, transaction))
        try:
            lookup = await self.key_manager.lookup(address)
            decision = decide(address, lookup, self.policy)
            # The decision trace of an accepted recipient goes into the relay event at the
            # end (one log line per copy, not one more per recipient); a refusal's, now.
            if decision.action.rejects:
                emit(
                    log,
                    "relay",
                    "recipient refused by policy for {user} (session {session}): {trace}",
                    outcome="rejected",
                    recipients=1,
                    user=identity.address,
                    session=session,
                    message_id=None,
                    recipient=address,
                    action=decision.action.value,
                    trace=decision.trace(),
                )
                if decision.action is Action.REJECT_TEMPORARY:
                    raise SourceUnavailable(f"encryption to {address} is mandatory: {decision.reason}")
                raise PolicyRejected(f"encryption to {address} is mandatory: {decision.reason}")
        except BaseException:
            if verdict is not None:
                verdict.addErrback(lambda _: None)  # the first refusal is the one reported
            raise
        if verdict is not None:
            reply = await verdict
            if not reply.accepted:
                raise RelayRefused(f"{address}: {reply.text}", code=reply.code, status=reply.status, recipient=address)
        return decision

    async def _ask(self, sender: str, address: str, transaction: IRelayTransaction | None) -> RelayReply:
        if transaction is not None:
            return await transaction.add_recipient(address)
        assert self.relay is not None
        alone = self.relay.transaction(sender)
        try:
            return await alone.add_recipient(address)
        finally:
            alone.abort()

    def _wire(self, identity: Identity) -> WireIdentity:
        wire = self._wires.get(identity)
        if wire is None:
            wire = self._wires[identity] = identity_to_wire(identity)
        return wire

    def _plans(self, decisions: Sequence[Decision]) -> tuple[RecipientPlan, ...]:
        plans = []
        seen = set()
        for decision in decisions:
            key = address_key(decision.recipient)
            if key in seen:
                continue  # RCPT TO twice: one copy
            seen.add(key)
            known = None
            if self.capabilities is not None and decision.action.encrypts:
                known = self.capabilities.get(decision.recipient)
            plans.append(
                RecipientPlan(
                    address=decision.recipient,
                    action=decision.action,
                    certificates=tuple(c.public_bytes(Encoding.DER) for c in decision.certificates[:1]),
                    capabilities=known.algorithms if known is not None else None,
                )
            )
        return tuple(plans)

    async def submit(self, submission: Submission) -> Submitted:
        """Protect the message in a worker and relay every copy; return once all were accepted.

        Raises :class:`MessageRejected` (the message cannot be sent as it is),
        :class:`RelayRefused` and temporary errors (nothing was kept: the client should
        try again).
        """
        if self.relay is None:
            raise UpstreamUnavailable("no mail server to relay to is configured")
        started = time.monotonic()
        message, spool_directory, handoff = submission.message, self.spool_directory, None
        if isinstance(message, bytes) and self.handoff_directory is not None:
            stream, handoff = spool_file(self.handoff_directory, "gk-in-")
            with stream:
                stream.write(message)
            message, spool_directory = handoff, self.handoff_directory
        request = ProtectRequest(
            sender=submission.sender,
            signer=self._wire(submission.identity),
            recipients=self._plans(submission.decisions),
            message=message,
            received=submission.received,
            hostname=self.hostname,
            eight_bit_declared=submission.eight_bit_declared,
            outbound_header=self.policy.outbound_header,
            spool=isinstance(message, Path),
            spool_directory=spool_directory,
        )
        result: ProtectResult | None = None
        try:
            try:
                result = await self._protect(request)
            except (MessageRejected, TemporaryError):
                raise
            except smime.SMIMEError as error:
                raise MessageRejected(f"the message could not be protected: {error}", status="5.6.0") from None
            assert result is not None
            if result.repairs:
                log.info(
                    "message {message_id} from {user} repaired: {repairs}",
                    message_id=result.message_id,
                    user=submission.identity.address,
                    repairs=", ".join(result.repairs),
                )
            copies = [RelayCopy(submission.sender, d.recipients, d.message, d.eight_bit) for d in result.deliveries]
            try:
                if submission.transaction is not None:
                    outcomes = await submission.transaction.send(copies)
                else:
                    outcomes = await self.relay.relay(copies)
            except (RelayRefused, TemporaryError) as error:
                self._failed(submission, result, error)
                raise
            refused = await self._partial(submission, result, outcomes)
        finally:
            if submission.transaction is not None:
                submission.transaction.abort()  # after a send, nothing is left to abort
            remove_spooled([handoff, *(d.message for d in (result.deliveries if result else ()))])
        self._relayed(submission, result, outcomes, time.monotonic() - started)
        return Submitted(
            message_id=result.message_id,
            deliveries=tuple((d.kind, len(d.recipients)) for d in result.deliveries),
            refused=refused,
        )

    async def _protect(self, request: ProtectRequest) -> ProtectResult:
        """Run :func:`protect` in a worker; if the client goes away meanwhile, drop its files when it ends.

        Cancelling the wait does not stop the worker, which may still write the copies to
        spool files: nobody would delete them.
        """
        job: Deferred[ProtectResult] = Deferred.fromCoroutine(self.workers.run(protect, request))
        waiting: Deferred[ProtectResult] = Deferred()

        def finished(result: object) -> None:
            if not waiting.called:
                waiting.callback(result)  # type: ignore[arg-type]  # a Failure errbacks
            elif isinstance(result, ProtectResult):
                remove_spooled(d.message for d in result.deliveries)

        job.addBoth(finished)
        return await waiting

    async def _partial(
        self, submission: Submission, result: ProtectResult, outcomes: Sequence[RelayOutcome]
    ) -> tuple[str, ...]:
        """The partial case (see the module's docstring): tell the sender, or fail temporarily."""
        failed = [(d, o) for d, o in zip(result.deliveries, outcomes, strict=True) if not o.accepted]
        if not failed:
            return ()
        assert self.relay is not None
        refused = tuple(r for d, _ in failed for r in d.recipients)
        log.error(
            "message {message_id} from {user}: upstream accepted {accepted} copies and refused the copy for "
            "{refused} at the end of its data ({reply}); sending the sender a notice",
            message_id=result.message_id,
            user=submission.identity.address,
            accepted=len(outcomes) - len(failed),
            refused=", ".join(refused),
            reply=str(failed[0][1].reply),
        )
        notices = []
        try:
            for delivery, outcome in failed:
                notices.append(self._notice(submission, result, delivery, outcome))
            if submission.sender:
                notice_outcomes = await self.relay.relay(
                    [RelayCopy("", (submission.sender,), notice) for notice in notices]
                )
                if all(o.accepted for o in notice_outcomes):
                    return refused
        except (RelayRefused, TemporaryError):
            pass
        finally:
            remove_spooled(notices)
        log.error(
            "message {message_id}: the notice to {user} could not be delivered; answering 451 "
            "(recipients of the accepted copies may receive the message twice)",
            message_id=result.message_id,
            user=submission.identity.address,
        )
        raise UpstreamUnavailable("the upstream server refused part of the message; try again later")

    def _notice(
        self, submission: Submission, result: ProtectResult, delivery: Delivery, outcome: RelayOutcome
    ) -> bytes | Path:
        """A message to the sender: which recipients did not get the copy, with the copy attached."""
        boundary = "gk-notice-" + os.urandom(8).hex()
        reply = str(outcome.reply)[:500].encode("utf-8", "replace")
        text = (
            b"Gatekeeper relayed your message " + result.message_id.encode("ascii", "replace") + b", but the mail "
            b"server refused the copy for these recipients after accepting the others:\r\n\r\n"
            + b"".join(b"    " + r.encode("utf-8") + b"\r\n" for r in delivery.recipients)
            + b"\r\nThe server said: "
            + reply
            + b"\r\n\r\nThat copy is attached (encrypted copies are encrypted to you as well). "
            b"Please send the message to these recipients again.\r\n"
        )
        head = (
            f"From: Mail Delivery System <MAILER-DAEMON@{self.hostname}>\r\n"
            f"To: <{submission.sender}>\r\n"
            f"Subject: Undelivered copy of your message\r\n"
            f"Date: {email.utils.formatdate(localtime=False)}\r\n"
            f"Message-ID: {email.utils.make_msgid(domain=self.hostname)}\r\n"
            f"Auto-Submitted: auto-replied\r\n"
            f"MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: 8bit\r\n\r\n"
        ).encode() + text
        attach = (
            f"\r\n--{boundary}\r\nContent-Type: message/rfc822\r\n"
            f'Content-Disposition: attachment; filename="undelivered.eml"\r\n\r\n'
        ).encode("ascii")
        tail = f"\r\n--{boundary}--\r\n".encode("ascii")
        if isinstance(delivery.message, Path):
            stream, path = spool_file(self.spool_directory)
            with stream, delivery.message.open("rb") as copy:
                stream.write(head + attach)
                shutil.copyfileobj(copy, stream)
                stream.write(tail)
            return path
        return head + attach + delivery.message + tail

    def _failed(self, submission: Submission, result: ProtectResult, error: Exception) -> None:
        emit(
            log,
            "relay",
            "relay of {message_id} from {user} failed: {reason}",
            level="warn",
            outcome="temp_failed" if getattr(error, "temporary", False) else "rejected",
            recipients=len(submission.decisions),
            user=submission.identity.address,
            session=submission.session,
            message_id=result.message_id,
            reason=str(error),
        )

    def _relayed(
        self, submission: Submission, result: ProtectResult, outcomes: Sequence[RelayOutcome], seconds: float
    ) -> None:
        signed = 0
        traces = {address_key(d.recipient): d.trace() for d in submission.decisions}
        for delivery, outcome in zip(result.deliveries, outcomes, strict=True):
            if not outcome.accepted:
                continue
            signed += delivery.signed
            emit(
                log,
                "relay",
                "relayed {message_id} from {user}: {outcome} to {recipients} recipients [{trace}]",
                outcome=delivery.kind,
                recipients=len(delivery.recipients),
                user=submission.identity.address,
                session=submission.session,
                message_id=result.message_id,
                seconds=seconds,
                trace="; ".join(traces.get(address_key(r), r) for r in delivery.recipients),
            )
        if signed:
            emit(
                log,
                "key_use",
                "key of {user} signed {message_id} ({copies} copies)",
                operation="sign",
                user=submission.identity.address,
                session=submission.session,
                message_id=result.message_id,
                peer=submission.client,
                copies=signed,
            )

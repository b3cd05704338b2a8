"""The SMTP submission adapter: Twisted's ESMTP server, translating to and from the outbound pipeline.

Only translation lives here: SMTP commands and replies on one side,
:class:`~gatekeeper.outbound.OutboundPipeline` on the other. AUTH is offered as PLAIN and
LOGIN only (CRAM-MD5 carries a hash, which cannot decrypt a key), and only once the
connection is encrypted (or from loopback when ``[tls] allow_plaintext_on_loopback`` is
set). ``MAIL FROM`` must be the authenticated user or an alias ``[policy]
sender_aliases`` allows.

Extensions: SIZE, 8BITMIME, PIPELINING, ENHANCEDSTATUSCODES, STARTTLS, AUTH. Twisted's
server reads pipelined commands one after the other without waiting for the
(asynchronous) answer to the previous one, so this subclass takes over the input: a
command is only read once the previous one has been answered, which keeps replies in
order and ``DATA`` after its ``RCPT``. The data of a message is read as raw bytes (not
line by line: that costs 2-3 microseconds a line), dot-unstuffed and sized as it
arrives, and written to a private spool file once larger than ``[smtp]
spool_threshold``.

Replies: each ``RCPT TO`` is looked up and judged by the policy and the upstream
server at once (``550 5.7.1`` / ``450 4.7.1`` for a mandatory domain without a usable
certificate, the upstream server's own reply for a recipient it refuses, ``451 4.4.1``
when it cannot be asked). The ``250`` after the data comes only once the upstream
server has accepted every copy; otherwise ``451`` (nothing was kept: the client keeps
the message and retries) or ``554`` (the message cannot be sent as it is).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeeper.auth import AvatarFactory, LoginThrottledError, Session, connection_portal
from gatekeeper.config import PolicyConfig
from gatekeeper.connections import Connections
from gatekeeper.errors import (
    GatekeeperError,
    InvalidAddress,
    MessageRejected,
    PolicyRejected,
    RelayRefused,
    SourceUnavailable,
    TemporaryError,
    UpstreamUnavailable,
)
from gatekeeper.interfaces import IRelayTransaction
from gatekeeper.keys.identity import Identity
from gatekeeper.outbound import OutboundPipeline, Submission, Submitted, received_header, spool_file
from gatekeeper.policy import Decision, sender_allowed
from gatekeeper.tls import secrets_allowed, transport_is_secure
from gatekeeper.upstream import set_nodelay

log = Logger()

CHALLENGERS = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}
MAX_COMMAND_LINE = 12288  # RFC 4954 4: an AUTH response may be this long
_ENHANCED = re.compile(rb"^[245]\.\d{1,3}\.\d{1,3}( |$)")
_DEFAULT_STATUS = {
    2: b"2.0.0",
    4: b"4.0.0",
    5: b"5.0.0",
    235: b"2.7.0",
    421: b"4.3.0",
    451: b"4.3.0",
    454: b"4.7.0",
    500: b"5.5.2",
    501: b"5.5.4",
    502: b"5.5.1",
    503: b"5.5.1",
    504: b"5.5.4",
    530: b"5.7.0",
    535: b"5.7.8",
    552: b"5.3.4",
    553: b"5.1.3",
    555: b"5.5.4",
}


@attrs.frozen
class SubmissionLimits:
    """``[smtp]``'s limits as the adapter applies them."""

    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    spool_threshold: int = 1024 * 1024
    spool_directory: Path | None = None


def _ascii(text: str, limit: int = 400) -> bytes:
    """Reply text: one line of printable ASCII (a reply must never break the protocol)."""
    cleaned = "".join(ch if " " <= ch < "\x7f" else "?" for ch in " ".join(text.split()))
    return cleaned[:limit].encode("ascii")


# -- the data of a message ---------------------------------------------------------------


class DataReader:
    """Collects one message's data: finds the end marker, removes dot-stuffing, counts, spools.

    :meth:`feed` takes the bytes as they arrive and reports when the lone ``.`` line has
    been seen, with whatever followed it (pipelined commands). The data is kept in
    memory up to ``spool_threshold`` bytes, then in a private spool file; past
    ``max_size`` it is counted and dropped (:attr:`too_large`).
    """

    def __init__(self, *, max_size: int, spool_threshold: int, spool_directory: Path | None) -> None:
        self.max_size = max_size
        self.spool_threshold = spool_threshold
        self.spool_directory = spool_directory
        self.size = 0
        self.too_large = False
        self._carry = b"\r\n"  # the data starts at the start of a line
        self._started = False
        self._pieces: list[bytes] = []
        self._file: Any = None
        self.path: Path | None = None

    def feed(self, data: bytes) -> tuple[bool, bytes]:
        """Add received bytes; return (complete, the bytes after the end marker)."""
        buffer = self._carry + data
        end = buffer.find(b"\r\n.\r\n")
        if end >= 0:
            self._carry = b""
            self._emit(buffer[: end + 2])
            if self._file is not None:
                self._file.close()
            return True, buffer[end + 5 :]
        # Keep the last line start (a CRLF) for the next call: an end marker or a
        # stuffed dot may continue in the next bytes. A long line without CRLF is cut
        # anywhere but right after a CR.
        cut = buffer.rfind(b"\r\n")
        if cut < 0 or len(buffer) - cut > 1024:
            cut = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
        self._carry = buffer[cut:]
        if cut:
            self._emit(buffer[:cut])
        return False, b""

    def _emit(self, segment: bytes) -> None:
        segment = segment.replace(b"\r\n.", b"\r\n")
        if not self._started:
            segment = segment[2:]  # the CRLF that marked the first line's start
            self._started = True
        self.size += len(segment)
        if self.too_large:
            return
        if self.size > self.max_size:
            self.too_large = True
            self.discard()
            return
        if self._file is not None:
            self._file.write(segment)
        elif self.size > self.spool_threshold:
            self._file, self.path = spool_file(self.spool_directory)
            for piece in self._pieces:
                self._file.write(piece)
            self._pieces = []
            self._file.write(segment)
        else:
            self._pieces.append(segment)

    def result(self) -> bytes | Path:
        """The message: bytes, or the path of the spool file."""
        if self.path is not None:
            return self.path
        return b"".join(self._pieces)

    def discard(self) -> None:
        """Drop the data and delete the spool file (idempotent)."""
        self._pieces = []
        if self._file is not None:
            self._file.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None


# -- the protocol ------------------------------------------------------------------------


class SubmissionServer(smtp.ESMTP):
    """ESMTP for authenticated mail submission (ports 587 and 465)."""

    def __init__(
        self,
        context_factory: CertificateOptions | None,
        *,
        allow_plaintext_on_loopback: bool,
        limits: SubmissionLimits | None = None,
    ) -> None:
        super().__init__(chal=dict(CHALLENGERS), contextFactory=context_factory)
        self._allow_plaintext_on_loopback = allow_plaintext_on_loopback
        self.limits = limits or SubmissionLimits()
        self._inbuf = b""
        self._awaiting = False
        self._processing = False
        self._plain_reply = False
        self._eight_bit = False
        self._reader: DataReader | None = None
        self._submitting: Deferred[Submitted] | None = None
        self._transaction: tuple[str, list[AcceptedRecipient], bool] = ("", [], False)
        self._transactions = 0

    connections: Connections | None = None

    # -- input: one command at a time, the data as raw bytes --------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Feed the data reader during DATA, else queue the bytes and read the next command."""
        if self._reader is not None:
            self._feed(data)
            return
        self._inbuf += data
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while not self._awaiting and self._reader is None and self.transport is not None:
                if self.transport.disconnecting:  # type: ignore[attr-defined]
                    return
                end = self._inbuf.find(b"\r\n")
                if end < 0:
                    if len(self._inbuf) > MAX_COMMAND_LINE:
                        self._inbuf = b""
                        self.sendCode(500, b"5.5.2 Line too long")
                        self.transport.loseConnection()
                    return
                line, self._inbuf = self._inbuf[:end], self._inbuf[end + 2 :]
                if len(line) > MAX_COMMAND_LINE:
                    self.sendCode(500, b"5.5.2 Line too long")
                    continue
                self._awaiting = True
                self.lineReceived(line)
            if self._reader is not None and self._inbuf:
                rest, self._inbuf = self._inbuf, b""
                self._feed(rest)
        finally:
            self._processing = False

    def _feed(self, data: bytes) -> None:
        self.resetTimeout()
        assert self._reader is not None
        complete, rest = self._reader.feed(data)
        if complete:
            reader, self._reader = self._reader, None
            self._inbuf = rest + self._inbuf
            self._awaiting = True  # the reply to the data comes when the relay is done
            self._end_of_data(reader)

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """Send a reply (with an enhanced status code), then read the next pipelined command."""
        if not self._plain_reply and code not in (220, 334, 354) and not _ENHANCED.match(message):
            status = _DEFAULT_STATUS.get(code, _DEFAULT_STATUS[code // 100 if code // 100 in (2, 4, 5) else 4])
            message = status + (b" " + message if message else b"")
        super().sendCode(code, message)
        self._awaiting = False
        if not self._processing and self._inbuf and self._reader is None:
            self._process()

    # -- connection life cycle --------------------------------------------------------------

    def connectionMade(self) -> None:
        """Greet, with Nagle off: pipelined replies written one by one must not wait for ACKs."""
        set_nodelay(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Drop a message in progress (the client did not get its 250), clean up, unregister."""
        if self._reader is not None:
            self._reader.discard()
            self._reader = None
        if self._submitting is not None:
            submitting, self._submitting = self._submitting, None
            submitting.cancel()
        self._reset_delivery()
        super().connectionLost(reason)
        if self.connections is not None:
            self.connections.remove(self)

    # -- login --------------------------------------------------------------------------------

    def _secrets_allowed(self) -> bool:
        return secrets_allowed(self.transport, allow_plaintext_on_loopback=self._allow_plaintext_on_loopback)

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        """Advertise AUTH only where a password may be sent; the submission extensions always."""
        extensions: dict[bytes, list[bytes] | None] = super().extensions()
        if not self._secrets_allowed():
            extensions.pop(b"AUTH", None)
        extensions[b"SIZE"] = [str(self.limits.max_message_size).encode("ascii")]
        extensions[b"8BITMIME"] = None
        extensions[b"PIPELINING"] = None
        extensions[b"ENHANCEDSTATUSCODES"] = None
        return extensions

    def do_EHLO(self, rest: bytes) -> None:
        """EHLO (its reply carries no enhanced status code); a new EHLO ends any transaction."""
        self._reset_delivery()
        self._eight_bit = False
        self._plain_reply = True
        try:
            super().do_EHLO(rest)
        finally:
            self._plain_reply = False

    def do_HELO(self, rest: bytes) -> None:
        """HELO, as EHLO without extensions."""
        self._reset_delivery()
        self._eight_bit = False
        self._plain_reply = True
        try:
            super().do_HELO(rest)
        finally:
            self._plain_reply = False

    def do_NOOP(self, rest: bytes) -> None:
        """NOOP (RFC 5321 4.1.1.9)."""
        self.sendCode(250, b"2.0.0 OK")

    def do_VRFY(self, rest: bytes) -> None:
        """VRFY is answered without looking (RFC 5321 3.5.3)."""
        self.sendCode(252, b"2.5.0 Cannot VRFY user, but will accept the message and attempt delivery")

    def _reset_delivery(self) -> None:
        if isinstance(self.delivery, SubmissionDelivery):
            self.delivery.reset()

    def do_RSET(self, rest: bytes) -> None:
        """Forget the transaction."""
        self._reset_delivery()
        self._eight_bit = False
        self._from = None
        self._to = []
        self.sendCode(250, b"2.0.0 OK")

    def ext_AUTH(self, rest: bytes) -> None:
        """Refuse AUTH before TLS (RFC 4954's 538), otherwise let Twisted run the exchange."""
        if not self._secrets_allowed():
            self.sendCode(538, b"5.7.11 Encryption required for requested authentication mechanism")
            return
        super().ext_AUTH(rest)

    def _ebAuthenticated(self, reason: Failure) -> None:
        """Translate login failures: throttled and temporary ones are 454, wrong passwords 535."""
        self.challenge = None
        if reason.check(LoginThrottledError):
            self.sendCode(454, b"4.7.0 Too many failed logins, try again later")
        elif reason.check(UnauthorizedLogin):
            self.sendCode(535, b"5.7.8 Authentication credentials invalid")
        else:
            self.sendCode(454, b"4.7.0 Temporary authentication failure")

    # -- the transaction ----------------------------------------------------------------------

    def do_MAIL(self, rest: bytes) -> None:
        """``MAIL FROM`` after login, with SIZE and BODY checked."""
        if self.delivery is None:
            self.sendCode(530, b"5.7.0 Authentication required")
            return
        if self._from:
            self.sendCode(503, b"5.5.1 Only one sender per message, please")
            return
        match = self.mail_re.match(rest)
        if not match:
            self.sendCode(501, b"5.5.4 Syntax: MAIL FROM:<address>")
            return
        eight_bit = False
        for parameter in (match.group("opts") or b"").split():
            key, _, value = parameter.partition(b"=")
            key = key.upper()
            if key == b"SIZE":
                if not value.isdigit():
                    self.sendCode(501, b"5.5.4 Bad SIZE parameter")
                    return
                if int(value) > self.limits.max_message_size:
                    self.sendCode(552, b"5.3.4 Message size exceeds the fixed maximum message size")
                    return
            elif key == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    self.sendCode(501, b"5.5.4 Unsupported BODY type")
                    return
                eight_bit = value.upper() == b"8BITMIME"
            elif key != b"AUTH":  # RFC 4954 5: AUTH= is accepted and ignored
                self.sendCode(555, b"5.5.4 Unsupported MAIL FROM parameter " + _ascii(key.decode("latin-1"), 40))
                return
        self._eight_bit = eight_bit
        super().do_MAIL(rest)

    def _cbFromValidate(self, fromEmail: smtp.Address, code: int = 250, msg: bytes = b"2.1.0 Sender OK") -> None:
        super()._cbFromValidate(fromEmail, code, msg)

    def _ebFromValidate(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, smtp.SMTPBadSender):
            self.sendCode(error.code, _ascii(str(error.resp)))
        else:
            super()._ebFromValidate(failure)

    def do_RCPT(self, rest: bytes) -> None:
        """``RCPT TO``: no parameters, at most ``max_recipients``, then the delivery decides."""
        if not self._from:
            self.sendCode(503, b"5.5.1 Need MAIL before RCPT")
            return
        if len(self._to) >= self.limits.max_recipients:
            self.sendCode(452, b"4.5.3 Too many recipients")
            return
        match = self.rcpt_re.match(rest)
        if match and match.group("opts"):
            self.sendCode(555, b"5.5.4 RCPT TO parameters are not supported")
            return
        super().do_RCPT(rest)

    def _cbToValidate(
        self, to: Any, user: smtp.User | None = None, code: int = 250, msg: bytes = b"2.1.5 Recipient OK"
    ) -> None:
        super()._cbToValidate(to, user, code, msg)

    def _ebToValidate(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, smtp.SMTPServerError):
            self.sendCode(error.code, _ascii(str(error.resp)))
        else:
            log.failure("recipient check failed", failure)
            self.sendCode(451, b"4.3.0 Local error in processing, try again later")

    def do_DATA(self, rest: bytes) -> None:
        """Start reading the message's data (as raw bytes, see :class:`DataReader`)."""
        if self._from is None or not self._to:
            self.sendCode(503, b"5.5.1 Need MAIL and RCPT before DATA")
            return
        if rest.strip():
            self.sendCode(501, b"5.5.4 DATA takes no parameters")
            return
        delivery = self.delivery
        if not isinstance(delivery, SubmissionDelivery):
            self.sendCode(451, b"4.3.0 Local error in processing")
            return
        self._transaction = (str(self._from), [to() for _, to in self._to], self._eight_bit)
        self._from = None
        self._to = []
        self._eight_bit = False
        self._reader = DataReader(
            max_size=self.limits.max_message_size,
            spool_threshold=self.limits.spool_threshold,
            spool_directory=self.limits.spool_directory,
        )
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _end_of_data(self, reader: DataReader) -> None:
        sender, accepted, eight_bit = self._transaction
        if reader.too_large:
            reader.discard()
            self.sendCode(552, b"5.3.4 Message size exceeds the fixed maximum message size")
            return
        self._transactions += 1
        helo = (self._helo[0] or b"unknown") if self._helo else b"unknown"
        peer = getattr(self.transport.getPeer(), "host", "unknown") if self.transport else "unknown"
        protocol = "ESMTPSA" if transport_is_secure(self.transport) else "ESMTPA"
        received = received_header(
            helo=helo.decode("ascii", "replace") if isinstance(helo, bytes) else str(helo),
            client_ip=str(peer),
            hostname=self.host.decode("ascii"),
            protocol=protocol,
            transaction_id=os.urandom(6).hex(),
        )
        delivery: SubmissionDelivery = self.delivery  # type: ignore[assignment]
        submitting = delivery.submit(
            sender=sender,
            decisions=tuple(recipient.decision for recipient in accepted),
            message=reader.result(),
            received=received,
            eight_bit=eight_bit,
            client=str(peer),
        )
        self._submitting = submitting
        submitting.addBoth(self._submitted, reader)

    def _submitted(self, result: Submitted | Failure, reader: DataReader) -> None:
        reader.discard()
        if self._submitting is None:
            return  # the connection is gone
        self._submitting = None
        code, text = _data_reply(result)
        self.sendCode(code, text)


def _data_reply(result: Submitted | Failure) -> tuple[int, bytes]:
    """The reply to the end of the data."""
    if isinstance(result, Submitted):
        if result.refused:
            return 250, _ascii(
                f"2.0.0 Sent as {result.message_id}, but {len(result.refused)} recipient(s) did not get it: "
                "a notice with the details was sent to you"
            )
        return 250, _ascii(f"2.0.0 Sent as {result.message_id}")
    error = result.value
    if isinstance(error, MessageRejected):
        return 554, _ascii(f"{error.status} {error}")
    if isinstance(error, RelayRefused):
        if error.temporary:
            return (error.code if 400 <= error.code < 500 else 451), _ascii(f"{error.status} {error}")
        return (error.code if 500 <= error.code < 600 else 554), _ascii(f"{error.status} {error}")
    if isinstance(error, UpstreamUnavailable):
        return 451, _ascii(f"4.4.1 {error}; nothing was sent, try again later")
    if isinstance(error, TemporaryError):
        return 451, _ascii(f"4.3.0 {error}; nothing was sent, try again later")
    if isinstance(error, GatekeeperError):
        return 554, _ascii(f"5.0.0 {error}")
    log.failure("relaying a message failed unexpectedly", result)
    return 451, b"4.3.0 Local error in processing; nothing was sent, try again later"


def _recipient_error(error: BaseException, address: str) -> smtp.SMTPServerError:
    """The reply for a refused ``RCPT TO``."""
    if isinstance(error, InvalidAddress):
        return smtp.SMTPServerError(553, "5.1.3 Bad recipient address syntax")
    if isinstance(error, PolicyRejected):
        return smtp.SMTPServerError(550, f"5.7.1 {error}")
    if isinstance(error, SourceUnavailable):
        return smtp.SMTPServerError(450, f"4.7.1 {error}; try again later")
    if isinstance(error, RelayRefused):
        code = error.code if 400 <= error.code < 600 else 550
        return smtp.SMTPServerError(code, f"{error.status} {error}")
    if isinstance(error, UpstreamUnavailable):
        return smtp.SMTPServerError(451, f"4.4.1 {error}; try again later")
    if isinstance(error, TemporaryError):
        return smtp.SMTPServerError(451, f"4.3.0 {error}; try again later")
    log.error("checking recipient {address} failed: {kind}", address=address, kind=type(error).__name__)
    return smtp.SMTPServerError(451, "4.3.0 Local error in processing, try again later")


class SubmissionFactory(ServerFactory):
    """Builds one :class:`SubmissionServer` per connection, tagged with the client's address."""

    def __init__(
        self,
        portal: Portal,
        context_factory: CertificateOptions | None,
        *,
        hostname: str,
        allow_plaintext_on_loopback: bool = False,
        limits: SubmissionLimits | None = None,
        clock: Any = None,
    ) -> None:
        self.portal = portal
        self.context_factory = context_factory
        self.hostname = hostname.encode("ascii")
        self.connections = Connections()
        self.allow_plaintext_on_loopback = allow_plaintext_on_loopback
        self.limits = limits or SubmissionLimits()
        self.clock = clock

    def buildProtocol(self, addr: IAddress | None) -> SubmissionServer:
        """Give the new connection its own view of the portal."""
        protocol = SubmissionServer(
            self.context_factory, allow_plaintext_on_loopback=self.allow_plaintext_on_loopback, limits=self.limits
        )
        protocol.factory = self
        protocol.host = self.hostname
        if self.clock is not None:
            protocol.callLater = self.clock.callLater  # type: ignore[method-assign]  # idle time-out
        protocol.portal = connection_portal(self.portal, "smtp", protocol, addr)  # type: ignore[assignment]
        protocol.connections = self.connections
        self.connections.add(protocol)
        return protocol


@implementer(smtp.IMessage)
class AcceptedRecipient:
    """What ``validateTo`` hands to Twisted for an accepted recipient: the policy's decision.

    The data goes to the transaction as a whole, not to a message per recipient, so
    the ``IMessage`` methods have nothing to do.
    """

    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    def __call__(self) -> AcceptedRecipient:
        """Twisted asks for the message object at DATA: it is this one."""
        return self

    def lineReceived(self, line: bytes) -> None:
        """Not used: the adapter reads the data itself."""

    def eomReceived(self) -> Deferred[None]:
        """Not used."""
        return succeed(None)

    def connectionLost(self) -> None:
        """Not used."""


@implementer(smtp.IMessageDelivery)
class SubmissionDelivery:
    """What an authenticated submission session may do: send as itself, to recipients the pipeline accepts.

    Without a pipeline (no relay configured) recipients are refused with a temporary
    error, so clients keep their messages and retry.
    """

    def __init__(self, identity: Identity, session: Session, pipeline: OutboundPipeline | None = None) -> None:
        self.identity = identity
        self.session = session
        self.pipeline = pipeline
        self.transaction: IRelayTransaction | None = None
        self.sender = ""

    def reset(self) -> None:
        """The client's transaction ended without a message (RSET, a new MAIL, gone): end ours."""
        transaction, self.transaction = self.transaction, None
        if transaction is not None:
            transaction.abort()

    def receivedHeader(self, helo: tuple[bytes, bytes], origin: smtp.Address, recipients: list[smtp.User]) -> None:
        """Not used: the adapter adds the ``Received:`` field to each relayed copy."""
        return None

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        """``MAIL FROM`` must be the logged-in user, an allowed alias, or the null sender."""
        sender = str(origin)
        if self.pipeline is not None:
            allowed = self.pipeline.sender_allowed(self.identity, sender)
        else:
            allowed = sender_allowed(self.identity.address, sender, PolicyConfig())
        if not allowed:
            raise smtp.SMTPBadSender(origin, 553, "5.7.1 Sender address does not belong to the logged-in user")
        self.reset()
        self.sender = sender
        if self.pipeline is not None:
            self.transaction = self.pipeline.begin(sender)
        return origin

    def validateTo(self, user: smtp.User) -> Deferred[Callable[[], smtp.IMessage]]:
        """Look the recipient up and ask the policy and the relay (a Deferred)."""
        return Deferred.fromCoroutine(self._check(user))

    async def _check(self, user: smtp.User) -> Callable[[], smtp.IMessage]:
        address = str(user.dest)
        if self.pipeline is None:
            raise smtp.SMTPServerError(451, "4.3.2 Relaying is not available, try again later")
        try:
            decision = await self.pipeline.check_recipient(
                self.identity, self.session.session_id, str(user.orig), address, self.transaction
            )
        except Exception as error:
            raise _recipient_error(error, address) from None
        return AcceptedRecipient(decision)

    def submit(
        self,
        *,
        sender: str,
        decisions: tuple[Decision, ...],
        message: bytes | Path,
        received: bytes,
        eight_bit: bool,
        client: str,
    ) -> Deferred[Submitted]:
        """Hand the finished transaction to the pipeline."""
        transaction, self.transaction = self.transaction, None
        if self.pipeline is None:
            return Deferred.fromCoroutine(_unavailable())
        return Deferred.fromCoroutine(
            self.pipeline.submit(
                Submission(
                    identity=self.identity,
                    session=self.session.session_id,
                    client=client,
                    sender=sender,
                    decisions=decisions,
                    message=message,
                    received=received,
                    eight_bit_declared=eight_bit,
                    transaction=transaction,
                )
            )
        )


async def _unavailable() -> Submitted:
    raise UpstreamUnavailable("no mail server to relay to is configured")


def make_delivery_avatar(pipeline: OutboundPipeline | None = None) -> AvatarFactory:
    """Return the realm's avatar factory for SMTP sessions."""

    def make(identity: Identity, session: Session) -> tuple[Any, Callable[[], None]]:
        return SubmissionDelivery(identity, session, pipeline), lambda: None

    return make

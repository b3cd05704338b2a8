"""The seams between Gatekeeper's layers, as zope interfaces and the plain values they pass.

Everything here is small on purpose: an implementation (the file key store, an LDAP
directory, the network upstream) and its in-package fake must both be easy to write.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import attrs
from cryptography import x509
from twisted.internet.defer import Deferred
from zope.interface import Interface


@attrs.frozen
class StoredKey:
    """One of a user's key pairs as kept at rest.

    ``sealed`` is a PKCS#12 file whose private key only the user's password decrypts;
    ``certificate`` is the same certificate in the clear, so that listing users and
    publishing certificates never needs a password.
    """

    key_id: str
    certificate: x509.Certificate
    sealed: bytes
    created: datetime.datetime
    retired: bool = False


@attrs.frozen
class PendingKey:
    """A key pair made without the user's password (an administrator's rotation).

    ``wrapped`` is the new private key encrypted to the public key of the stored key
    ``sealed_to`` (see :mod:`gatekeeper.keys.accounts`); the next login, which knows
    the password, seals it like the others and makes it the current key.
    """

    key_id: str
    certificate: x509.Certificate
    wrapped: bytes
    sealed_to: str
    created: datetime.datetime


@attrs.frozen
class StoredUser:
    """A user of the gateway and all their key pairs, the current one first.

    ``pending`` holds rotations waiting for the next login (newest first); while there
    are any, the newest pending certificate is the one to publish and encrypt to.
    """

    address: str
    keys: tuple[StoredKey, ...]
    created: datetime.datetime
    pending: tuple[PendingKey, ...] = ()
    last_login: datetime.datetime | None = None

    @property
    def current(self) -> StoredKey:
        """The key pair used for signing and for new mail."""
        return self.keys[0]


class IKeyStore(Interface):
    """Where users' key pairs are kept, encrypted under their passwords.

    Implementations are synchronous and fast (small reads and atomic writes); they never
    decrypt anything and never see a password.
    """

    def list_users() -> list[str]:
        """Return the normalised addresses of all users, sorted."""

    def get_user(address: str) -> StoredUser | None:
        """Return the user with this address (matched case-insensitively), or None."""

    def put_user(user: StoredUser) -> None:
        """Create or replace a user record atomically (all keys at once)."""

    def delete_user(address: str) -> None:
        """Remove the user and every key file; raises UnknownUser if absent."""

    def put_user_if_unchanged(expected: StoredUser, user: StoredUser) -> bool:
        """Write ``user`` only if the stored record still equals ``expected``; report whether it did."""


class IKeySource(Interface):
    """One place certificates for recipients can be found (the key ring, LDAP, DNS)."""

    name: str

    def find(address: str) -> object:
        """Return a Deferred firing with a list of candidate certificates.

        "Not found" is an empty list; an outage or a timeout fails the Deferred with
        :class:`~gatekeeper.errors.SourceUnavailable`.
        """


class ICertificatePublisher(Interface):
    """Somewhere users' certificates are published for others to find (the PKI directory).

    Publishing is separate from lookups: a lookup never writes.
    """

    def publish(address: str, certificate: x509.Certificate) -> None:
        """Publish ``certificate`` as the current certificate of ``address`` (synchronous)."""

    def unpublish(address: str) -> None:
        """Remove every certificate published for ``address`` (synchronous)."""


# -- relaying submitted mail ------------------------------------------------------


@attrs.frozen
class RelayReply:
    """One reply of the server mail is relayed to: the code and its text (no code prefix).

    ``text`` starts with the enhanced status code (``5.1.1 ...``) where the server gave
    one; it is the server's wording, so it may be shown to the sender.
    """

    code: int
    text: str

    @property
    def accepted(self) -> bool:
        """2xx."""
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        """4xx (and the codes a connection failure is reported as)."""
        return 400 <= self.code < 500

    @property
    def status(self) -> str:
        """The enhanced status code: the server's, or a generic one for the code's class."""
        head = self.text.split(" ", 1)[0]
        parts = head.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and head[0] in "245":
            return head
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@attrs.frozen
class RelayCopy:
    """One copy of a submitted message: who it is from, to whom, and its bytes.

    ``message`` is the whole message with CRLF line ends, as bytes or as the path of a
    private spool file holding them. ``eight_bit`` marks content that is not 7-bit.
    """

    sender: str
    recipients: tuple[str, ...]
    message: bytes | Path = attrs.field(repr=False)
    eight_bit: bool = False


@attrs.frozen
class RelayOutcome:
    """What became of one copy: each recipient's reply, and the reply to the message itself."""

    recipients: tuple[tuple[str, RelayReply], ...]
    reply: RelayReply

    @property
    def accepted(self) -> bool:
        """Whether the server took responsibility for the copy."""
        return self.reply.accepted


class IRelayTransaction(Interface):
    """One client transaction: its recipients put to the relay one by one, then its copies."""

    async def add_recipient(recipient: str) -> RelayReply:
        """Would mail to ``recipient`` be accepted? Returns the reply for it.

        Raises :class:`~gatekeeper.errors.UpstreamUnavailable` when the relay cannot be asked.
        """

    async def send(copies: Sequence[RelayCopy]) -> tuple[RelayOutcome, ...]:
        """Deliver the finished copies, as :meth:`ISubmissionRelay.relay` does (they need not
        have exactly the recipients added: copies for several treatments, a recipient the
        policy refused)."""

    def abort() -> None:
        """Give up the transaction (RSET, a client that went away); nothing is delivered."""


class ISubmissionRelay(Interface):
    """Where authenticated submissions go once protected: the upstream server or the local store.

    A client transaction is a :meth:`transaction`: each recipient is put to the relay
    when the client names it, then the finished copies are handed on all together.
    """

    def transaction(sender: str) -> IRelayTransaction:
        """Begin a transaction for mail from ``sender`` (``""``: the null sender)."""

    async def relay(copies: Sequence[RelayCopy]) -> tuple[RelayOutcome, ...]:
        """Deliver every copy, or none: one outcome per copy, in order.

        Raises :class:`~gatekeeper.errors.RelayRefused` (nothing was kept) when a sender,
        a recipient or a copy was refused before any copy was committed, and
        :class:`~gatekeeper.errors.UpstreamUnavailable` when the relay failed before
        that. Copies are committed together at the end, so the only partial result is a
        copy refused at its very end after another was accepted: its outcome then is
        not ``accepted``.
        """


# -- the maildrop behind the POP3 proxy ---------------------------------------------------
#
# The POP3 proxy (gatekeeper/pop3.py) serves one IPop3Maildrop per session: the upstream
# POP3 server (gatekeeper/upstream/pop3.py) or, for the embedded default, a local store.


@attrs.frozen(repr=False)
class UpstreamLogin:
    """Who to log in as upstream for a gateway user: ``address`` (the gateway login) and the upstream name and password.

    The password is the user's own (pass-through) or their stored upstream password
    (:mod:`gatekeeper.upstream.credentials`); an embedded store only uses ``address``.
    """

    address: str
    user: str
    password: str

    def __repr__(self) -> str:
        return f"<UpstreamLogin {self.address} as {self.user}>"


@attrs.frozen
class MaildropEntry:
    """One message of a maildrop: its unique id (UIDL, stable across sessions) and its stored size in octets."""

    uid: bytes
    size: int


class IPop3Upstream(Interface):
    """Where the POP3 proxy opens users' maildrops."""

    async def open(login: UpstreamLogin) -> IPop3Maildrop:
        """Open ``login.address``'s maildrop and return the session.

        Raises :class:`~gatekeeper.errors.UpstreamUnavailable` (temporary: down, slow,
        TLS failure) or :class:`~gatekeeper.errors.UpstreamRefused` (what the server
        said, with its RFC 3206 code: ``AUTH`` for refused credentials, ``IN-USE``...).
        """


class IPop3Maildrop(Interface):
    """One open maildrop session (POP3's TRANSACTION state).

    The message list is fixed when the session opens (:attr:`entries`, POP3's
    numbering); methods name messages by their 0-based index in it. Deletion is kept by
    the caller (RSET may undo it) and happens only at :meth:`commit`: a session that
    ends any other way, or fails, deletes nothing. Coroutines fail with
    :class:`~gatekeeper.errors.UpstreamUnavailable` or
    :class:`~gatekeeper.errors.UpstreamRefused` as for :meth:`IPop3Upstream.open`.
    """

    entries: Sequence[MaildropEntry]

    async def retrieve(index: int) -> bytes:
        """The whole message, as stored (CRLF line ends)."""

    async def top(index: int, lines: int) -> bytes:
        """The message's header and the first ``lines`` lines of its body, as stored."""

    async def commit(deleted: Sequence[int]) -> None:
        """Delete exactly these messages and end the session (POP3's UPDATE state).

        Returns once the deletions are permanent; raises if that cannot be confirmed.
        """

    def close() -> None:
        """End the session at once, deleting nothing (the client went away)."""


# -- the mail store behind the IMAP proxy -------------------------------------------------
#
# The IMAP proxy (gatekeeper/imap_proxy.py) reads and changes mailboxes through one
# logged-in IMailStoreSession: the upstream IMAP server (gatekeeper/upstream/imap.py),
# or, for the embedded default, a local store. Messages are named by UID only, message
# sets and FETCH items are IMAP syntax (RFC 3501), and what the store reports on its own
# (new mail, expunges, flags changed by another client) goes to an IMailStoreEvents.


@attrs.frozen
class MailboxEntry:
    """One mailbox as LIST or LSUB reports it (``attributes`` like ``\\HasNoChildren``)."""

    name: str
    delimiter: str | None
    attributes: tuple[str, ...] = ()


@attrs.frozen
class SelectInfo:
    """What SELECT/EXAMINE told about a mailbox, and the UIDs of its messages in order.

    ``exists`` is the last EXISTS count seen; when it is larger than ``len(uids)``,
    messages arrived after the UIDs were listed (their UIDs are learned later).
    """

    name: str
    uidvalidity: int
    uidnext: int
    uids: Sequence[int]
    flags: tuple[str, ...] = ()
    permanent_flags: tuple[str, ...] | None = None
    recent: int = 0
    exists: int = 0
    unseen: int | None = None
    readonly: bool = False


class FetchResponse(NamedTuple):
    """One FETCH response: the store's message number and the item list as received.

    ``data`` is the parenthesised list exactly as the store sent it, literals inline
    (``(UID 7 FLAGS (\\Seen) BODY[] {5}\\r\\nhello)``); ``uid`` is its UID item when present.
    A named tuple, not an attrs class: a listing makes one per message, and this is
    the cheapest object Python has to make.
    """

    seq: int
    uid: int | None
    data: bytes


@attrs.frozen
class CopiedUids:
    """UIDPLUS's COPYUID: where copied or moved messages went."""

    uidvalidity: int
    source: tuple[int, ...]
    destination: tuple[int, ...]


@attrs.frozen
class Appended:
    """UIDPLUS's APPENDUID (both None when the store does not say)."""

    uidvalidity: int | None = None
    uid: int | None = None


class MailStoreError(Exception):
    """The store refused a command (``NO``/``BAD``): ``code`` is its response code, if any.

    The text is the proxy's own and safe to show; the store's words are never passed on.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class IMailStoreEvents(Interface):
    """What a mail store session reports without being asked (IMAP's unsolicited responses)."""

    def exists(count: int) -> None:
        """The selected mailbox now holds ``count`` messages."""

    def recent(count: int) -> None:
        """``count`` messages are \\Recent."""

    def expunged(seq: int) -> None:
        """Message ``seq`` (the store's numbering) is gone; later ones moved down."""

    def fetched(response: FetchResponse) -> None:
        """A FETCH response nobody asked for (flags changed by another session)."""

    def uidvalidity(value: int) -> None:
        """The selected mailbox's UIDVALIDITY is now ``value``."""

    def session_lost(reason: str) -> None:
        """The session is gone (connection lost, BYE, time-out); ``reason`` is safe to log."""


class IMailStoreSession(Interface):
    """One logged-in session with the mail store; every method returns a Deferred.

    Failures: :class:`MailStoreError` when the store says NO or BAD, and
    :class:`~gatekeeper.errors.UpstreamUnavailable` when it cannot be reached, is too
    slow, or the session is lost. Commands run one at a time in the order given.
    """

    capabilities: frozenset[str]
    delimiter: str | None

    def set_listener(events: IMailStoreEvents) -> None:
        """Send unsolicited responses to ``events`` from now on."""

    def list_mailboxes(reference: str, pattern: str, subscribed: bool = False) -> Deferred[list[MailboxEntry]]:
        """Fire with the matching :class:`MailboxEntry` list (LIST, or LSUB if ``subscribed``)."""

    def status(mailbox: str, items: Sequence[str]) -> Deferred[dict[str, int]]:
        """Fire with ``{item: number}`` for STATUS items like ``MESSAGES``, ``UIDNEXT``."""

    def select(mailbox: str, readonly: bool = False) -> Deferred[SelectInfo]:
        """SELECT (or EXAMINE); fire with a :class:`SelectInfo`."""

    def close() -> Deferred[Any]:
        """CLOSE: remove \\Deleted messages (read-write only) silently and unselect."""

    def unselect() -> Deferred[Any]:
        """Leave the selected mailbox without removing anything (UNSELECT, RFC 3691)."""

    def create(mailbox: str) -> Deferred[Any]:
        """CREATE."""

    def delete(mailbox: str) -> Deferred[Any]:
        """DELETE."""

    def rename(old: str, new: str) -> Deferred[Any]:
        """RENAME."""

    def subscribe(mailbox: str) -> Deferred[Any]:
        """SUBSCRIBE."""

    def unsubscribe(mailbox: str) -> Deferred[Any]:
        """UNSUBSCRIBE."""

    def fetch(uids: bytes, items: bytes, sink: Callable[[FetchResponse], None]) -> Deferred[Any]:
        """UID FETCH ``uids`` ``items``; call ``sink(FetchResponse)`` for each answer as it arrives."""

    def search(criteria: bytes, charset: str | None = None) -> Deferred[list[int]]:
        """UID SEARCH; fire with the matching UIDs."""

    def store(uids: bytes, operation: bytes, flags: Sequence[str]) -> Deferred[Any]:
        """UID STORE ``uids`` ``operation`` (``+FLAGS.SILENT``...) ``flags``; answers go to the listener."""

    def copy(uids: bytes, mailbox: str) -> Deferred[CopiedUids | None]:
        """UID COPY; fire with :class:`CopiedUids` or None."""

    def move(uids: bytes, mailbox: str) -> Deferred[CopiedUids | None]:
        """UID MOVE (RFC 6851); fire with :class:`CopiedUids` or None; expunges go to the listener."""

    def expunge(uids: bytes | None = None) -> Deferred[Any]:
        """EXPUNGE, or UID EXPUNGE ``uids`` (RFC 4315); expunges go to the listener."""

    def append(
        mailbox: str, message: bytes, flags: Sequence[str] = (), date: bytes | None = None
    ) -> Deferred[Appended]:
        """APPEND; fire with :class:`Appended`."""

    def noop() -> Deferred[Any]:
        """NOOP: let the store report changes."""

    def idle() -> Deferred[Any]:
        """Start IDLE (fires once the store accepted it); changes go to the listener meanwhile."""

    def stop_idle() -> Deferred[Any]:
        """End IDLE; fires when the store has finished it."""

    def logout() -> Deferred[Any]:
        """LOGOUT and close the connection; never fails."""

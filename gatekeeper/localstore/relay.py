"""Submitted mail into the embedded store: :class:`LocalRelay`, the SMTP proxy's relay with no mail server.

What the SMTP proxy hands on (each copy already signed and encrypted to the recipients
that have certificates) is delivered byte for byte into the local recipients' INBOX:
the store holds what left the proxy, ciphertext at rest. Recipients outside the local
domains go to the smarthost (``[upstream] smarthost``, relayed as to an upstream
server) or, with none configured, are refused with ``550 5.7.1``.

All or nothing, as :class:`~gatekeeper.interfaces.ISubmissionRelay` wants: every
recipient is checked first (an unknown user, a full mailbox: nothing is kept and the
client is told); the smarthost's copies go next, and only once it accepted them are
the local copies committed. What remains is the rare partial case: a local copy that
fails at its very commit (the disk, a quota race) after other copies were accepted;
its outcome is then not ``accepted`` and the outbound pipeline tells the sender.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from zope.interface import implementer

from gatekeeper.address import address_key
from gatekeeper.errors import InvalidAddress, RelayRefused, UpstreamUnavailable
from gatekeeper.interfaces import IRelayTransaction, ISubmissionRelay, RelayCopy, RelayOutcome, RelayReply
from gatekeeper.localstore.embedded import EmbeddedStore
from gatekeeper.localstore.errors import LocalStoreError, NotLocalDomain, StoreUnavailable
from gatekeeper.localstore.store import LocalStore
from gatekeeper.localstore.types import DeliveryReport, Refused

ACCEPTED = RelayReply(250, "2.1.5 OK")
DELIVERED = RelayReply(250, "2.0.0 delivered to the local mailbox")
_CODES = {"4.2.2": 452, "5.2.3": 552, "5.1.3": 553, "5.1.1": 550}


def no_relay() -> RelayReply:
    """The reply for an outside recipient when no smarthost is configured."""
    return RelayReply(550, "5.7.1 relaying denied: this gateway only delivers to its own domains")


def reply_for(error: Exception) -> RelayReply:
    """An SMTP reply for a recipient the store refused (the error's text names no message content)."""
    if isinstance(error, LocalStoreError):
        status = error.enhanced_status
        code = _CODES.get(status, 451 if status.startswith("4") else 550)
        return RelayReply(code, f"{status} {error}")  # the store's wording names the address
    return RelayReply(553, f"5.1.3 {error}")


def _refused(recipient: str, reply: RelayReply) -> RelayRefused:
    return RelayRefused(f"{recipient}: {reply}", code=reply.code, status=reply.status, recipient=recipient)


def _size(message: bytes | Path) -> int:
    return len(message) if isinstance(message, bytes) else message.stat().st_size


def _deliver(store: LocalStore, recipients: list[str], message: bytes | Path) -> DeliveryReport:
    """Runs in the store's pool: a spool file is read there, not on the reactor."""
    if isinstance(message, bytes):
        return store.deliver(recipients, message)
    with message.open("rb") as handle:
        return store.deliver(recipients, handle)


@implementer(ISubmissionRelay)
class LocalRelay:
    """Delivers into the embedded store; outside recipients to ``smarthost`` (or refused)."""

    def __init__(self, store: EmbeddedStore, smarthost: ISubmissionRelay | None = None) -> None:
        self.store = store
        self.smarthost = smarthost

    def transaction(self, sender: str) -> LocalTransaction:
        """A client transaction: recipients checked as the client names them."""
        return LocalTransaction(self, sender)

    async def relay(self, copies: Sequence[RelayCopy]) -> tuple[RelayOutcome, ...]:
        """See :meth:`ISubmissionRelay.relay`."""
        return await self._send(copies, None)

    async def check(self, recipient: str, size: int | None = None) -> bool:
        """True for a local recipient that can take the message; False for an outside one.

        Raises :class:`LocalStoreError` or :class:`InvalidAddress` for a local one that cannot.
        """
        try:
            await self.store.opened.check_recipient(recipient, size)
        except NotLocalDomain:
            return False
        return True

    async def _send(self, copies: Sequence[RelayCopy], remote: IRelayTransaction | None) -> tuple[RelayOutcome, ...]:
        # 1. every recipient checked: a refusal now keeps nothing
        plans: list[tuple[RelayCopy, list[str], list[str]]] = []
        refusals: list[RelayRefused] = []
        for copy in copies:
            local: list[str] = []
            outside: list[str] = []
            size = _size(copy.message)
            for recipient in copy.recipients:
                try:
                    (local if await self.check(recipient, size) else outside).append(recipient)
                except StoreUnavailable as error:
                    raise UpstreamUnavailable(str(error)) from None
                except (LocalStoreError, InvalidAddress) as error:
                    refusals.append(_refused(recipient, reply_for(error)))
            if outside and self.smarthost is None:
                refusals.extend(_refused(r, no_relay()) for r in outside)
            plans.append((copy, local, outside))
        if refusals:
            permanent = [r for r in refusals if not r.temporary]
            raise (permanent or refusals)[0]
        # 2. the smarthost's copies: if it refuses, nothing was kept here either
        remote_replies: dict[int, RelayOutcome] = {}
        away = [
            (index, RelayCopy(c.sender, tuple(o), c.message, c.eight_bit)) for index, (c, _, o) in enumerate(plans) if o
        ]
        if away:
            assert self.smarthost is not None
            sent = [copy for _, copy in away]
            outcomes = await (remote.send(sent) if remote is not None else self.smarthost.relay(sent))
            remote_replies = {index: outcome for (index, _), outcome in zip(away, outcomes, strict=True)}
        # 3. the local copies, each committed on its own
        results = []
        committed = any(outcome.accepted for outcome in remote_replies.values())
        for index, (copy, local, _) in enumerate(plans):
            replies: dict[str, RelayReply] = {}
            reply = DELIVERED
            if local:
                try:
                    report = await self.store.run(_deliver, self.store.opened.store, local, copy.message)
                except (LocalStoreError, UpstreamUnavailable) as error:
                    if not committed:  # nothing kept anywhere: the client retries
                        raise UpstreamUnavailable(f"the mail store cannot take the message: {error}") from None
                    report = None
                    reply = RelayReply(451, f"4.3.0 the mail store cannot take the message: {error}")
                if report is not None:
                    committed = committed or bool(report.delivered)
                    answers = {address_key(item.address): DELIVERED for item in report.delivered}
                    for refusal in report.refused:
                        answers[address_key(refusal.address)] = refused = _refusal_reply(refusal)
                        reply = refused if reply.accepted else reply
                    replies = {r: answers.get(address_key(r), reply) for r in local}
                else:
                    replies = dict.fromkeys(local, reply)
            outcome = remote_replies.get(index)
            if outcome is not None:
                replies.update(dict(outcome.recipients))
                if not outcome.accepted:
                    reply = outcome.reply
            results.append(RelayOutcome(tuple((r, replies.get(r, reply)) for r in copy.recipients), reply))
        if not any(outcome.accepted for outcome in results):
            first = results[0].reply
            raise RelayRefused(f"the mail store refused the message: {first}", code=first.code, status=first.status)
        return tuple(results)


def _refusal_reply(refusal: Refused) -> RelayReply:
    """An SMTP reply for a copy the store refused at its commit."""
    status = refusal.enhanced_status
    code = _CODES.get(status, 451 if refusal.temporary else 550)
    return RelayReply(code, f"{status} {refusal.reason}")


@implementer(IRelayTransaction)
class LocalTransaction:
    """One client transaction: local recipients checked in the store, outside ones on a held smarthost transaction."""

    def __init__(self, relay: LocalRelay, sender: str) -> None:
        self.relay = relay
        self.sender = sender
        self.remote: IRelayTransaction | None = None

    async def add_recipient(self, recipient: str) -> RelayReply:
        """250 for a local user who can take mail; the smarthost's reply for an outside one."""
        try:
            if await self.relay.check(recipient):
                return ACCEPTED
        except (LocalStoreError, InvalidAddress) as error:
            return reply_for(error)
        smarthost = self.relay.smarthost
        if smarthost is None:
            return no_relay()
        if self.remote is None:
            self.remote = smarthost.transaction(self.sender)
        return await self.remote.add_recipient(recipient)

    async def send(self, copies: Sequence[RelayCopy]) -> tuple[RelayOutcome, ...]:
        """Deliver the copies (outside recipients on the held smarthost transaction when they fit it)."""
        remote, self.remote = self.remote, None
        try:
            return await self.relay._send(copies, remote)
        finally:
            if remote is not None:
                remote.abort()  # after a send, nothing is left to abort

    def abort(self) -> None:
        """Forget the transaction (and the smarthost's, if one is held)."""
        remote, self.remote = self.remote, None
        if remote is not None:
            remote.abort()


__all__ = ["LocalRelay", "LocalTransaction", "no_relay", "reply_for"]

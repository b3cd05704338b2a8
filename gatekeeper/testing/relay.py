"""An in-memory :class:`~gatekeeper.interfaces.ISubmissionRelay` for tests of the SMTP side.

:class:`MemoryRelay` keeps every copy it is given (:attr:`MemoryRelay.delivered`),
answers recipients from a table of refusals, and can be told to be down, to refuse a
copy when it is committed (the partial case) or to hold calls until the test releases
them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs
from twisted.internet.defer import Deferred
from zope.interface import implementer

from gatekeeper.address import address_key
from gatekeeper.errors import RelayRefused, UpstreamUnavailable
from gatekeeper.interfaces import IRelayTransaction, ISubmissionRelay, RelayCopy, RelayOutcome, RelayReply

OK = RelayReply(250, "2.0.0 OK")


@attrs.frozen
class DeliveredCopy:
    """A copy the relay accepted: envelope and bytes (read at once if it was a spool file)."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    eight_bit: bool
    spooled: bool


@implementer(ISubmissionRelay)
class MemoryRelay:
    """Accepts everything unless told otherwise; counts calls.

    ``refuse`` maps recipient addresses to the reply a transaction and ``relay`` give them;
    ``down`` makes every call fail with :class:`UpstreamUnavailable`; ``refuse_copy``
    maps a recipient to the reply the copy holding it gets when committed (after the
    other copies were accepted); ``hold`` keeps ``relay`` calls waiting in ``held``.
    """

    def __init__(self) -> None:
        self.refuse: dict[str, RelayReply] = {}
        self.refuse_copy: dict[str, RelayReply] = {}
        self.down = False
        self.hold = False
        self.held: list[Deferred[None]] = []
        self.delivered: list[DeliveredCopy] = []
        self.verified: list[tuple[str, str]] = []
        self.relay_calls = 0
        self.transactions = 0
        self.aborted = 0

    def _refusal(self, recipient: str) -> RelayReply | None:
        return self.refuse.get(address_key(recipient))

    def transaction(self, sender: str) -> MemoryTransaction:
        """A transaction whose recipients are checked against ``refuse``."""
        self.transactions += 1
        return MemoryTransaction(self, sender)

    async def relay(self, copies: Sequence[RelayCopy]) -> tuple[RelayOutcome, ...]:
        """Keep the copies (all or none, as the interface says)."""
        self.relay_calls += 1
        if self.hold:
            waiting: Deferred[None] = Deferred()
            self.held.append(waiting)
            await waiting
        if self.down:
            raise UpstreamUnavailable("upstream SMTP: connection refused (fake)")
        for copy in copies:
            for recipient in copy.recipients:
                refusal = self._refusal(recipient)
                if refusal is not None:
                    raise RelayRefused(
                        f"{recipient}: {refusal}", code=refusal.code, status=refusal.status, recipient=recipient
                    )
        outcomes = []
        for copy in copies:
            refusal = next((self.refuse_copy[address_key(r)] for r in copy.recipients if address_key(r) in
                            self.refuse_copy), None)  # fmt: skip
            reply = refusal or OK
            outcomes.append(RelayOutcome(tuple((r, OK) for r in copy.recipients), reply))
        if not any(outcome.accepted for outcome in outcomes):
            first = outcomes[0].reply
            raise RelayRefused(f"refused: {first}", code=first.code, status=first.status)
        for copy, outcome in zip(copies, outcomes, strict=True):
            if outcome.accepted:
                data = copy.message.read_bytes() if isinstance(copy.message, Path) else copy.message
                self.delivered.append(
                    DeliveredCopy(copy.sender, copy.recipients, data, copy.eight_bit, isinstance(copy.message, Path))
                )
        return tuple(outcomes)

    def release(self) -> None:
        """Let every held ``relay`` call go on."""
        held, self.held = self.held, []
        for waiting in held:
            waiting.callback(None)


@implementer(IRelayTransaction)
class MemoryTransaction:
    """A transaction of :class:`MemoryRelay`: recipients checked one by one, copies relayed."""

    def __init__(self, relay: MemoryRelay, sender: str) -> None:
        self.relay = relay
        self.sender = sender
        self.recipients: list[str] = []

    async def add_recipient(self, recipient: str) -> RelayReply:
        """The configured refusal for ``recipient``, or 250."""
        if self.relay.down:
            raise UpstreamUnavailable("upstream SMTP: connection refused (fake)")
        self.relay.verified.append((self.sender, recipient))
        reply = self.relay._refusal(recipient) or RelayReply(250, "2.1.5 OK")
        if reply.accepted:
            self.recipients.append(recipient)
        return reply

    async def send(self, copies: Sequence[RelayCopy]) -> tuple[RelayOutcome, ...]:
        """Relay the copies."""
        return await self.relay.relay(copies)

    def abort(self) -> None:
        """Count the abort."""
        self.relay.aborted += 1

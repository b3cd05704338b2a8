"""Fakes for certificate discovery: a key source you control and a simple validator.

:class:`FakeKeySource` answers from a dictionary, or holds queries open until the test
fires them, or fails them as an outage; it counts every query. :class:`FakeValidator`
implements just enough of ``gatekeeper.trust.TrustValidator.validate`` for the
directory's logic: issuer trusted, dates, address, and a set of "weak" certificates.
"""

from __future__ import annotations

import datetime
import enum
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import attrs
from cryptography import x509
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from gatekeeper.address import address_key, normalize_address
from gatekeeper.errors import SourceUnavailable
from gatekeeper.interfaces import IKeySource
from gatekeeper.keys.directory import Candidate, SourceAnswer
from gatekeeper.keys.keyring import certificate_addresses


@implementer(IKeySource)
class FakeKeySource:
    """An in-memory key source.

    ``answers`` maps addresses (any case) to certificates. With ``hold = True`` each
    query returns a Deferred kept in ``held`` (address, Deferred) for the test to fire
    with :meth:`release`; with ``down = True`` queries fail with SourceUnavailable.
    ``dane_ee`` marks certificates reported as DNSSEC-authenticated (DANE-EE).
    """

    def __init__(
        self,
        name: str,
        answers: Mapping[str, Sequence[x509.Certificate]] | None = None,
        *,
        domains: Iterable[str] = (),
        dane_ee: Iterable[x509.Certificate] = (),
        note: str = "",
    ) -> None:
        self.name = name
        self.domains = tuple(domains)
        self.answers = {address_key(k): list(v) for k, v in (answers or {}).items()}
        self.dane_ee = set(dane_ee)
        self.note = note
        self.hold = False
        self.down = False
        self.error: Exception | None = None
        self.queries: Counter[str] = Counter()
        self.held: list[tuple[str, Deferred[SourceAnswer]]] = []

    @property
    def total_queries(self) -> int:
        """How many queries were made, all addresses together."""
        return sum(self.queries.values())

    def add(self, address: str, *certificates: x509.Certificate) -> None:
        """Let the source answer ``address`` with these certificates too."""
        self.answers.setdefault(address_key(address), []).extend(certificates)

    def answer_for(self, address: str) -> SourceAnswer:
        """What the source would answer now."""
        found = self.answers.get(address_key(normalize_address(address)), [])
        return SourceAnswer(tuple(Candidate(c, c in self.dane_ee) for c in found), self.note)

    def find_detailed(self, address: str) -> Deferred[SourceAnswer]:
        """Answer (now, later or with an outage) as configured."""
        self.queries[address_key(address)] += 1
        if self.error is not None:
            return fail(self.error)
        if self.down:
            return fail(SourceUnavailable(f"{self.name}: down (fake)"))
        if self.hold:
            pending: Deferred[SourceAnswer] = Deferred()
            self.held.append((address, pending))
            return pending
        return succeed(self.answer_for(address))

    def find(self, address: str) -> Deferred[list[x509.Certificate]]:
        """The plain IKeySource answer."""
        return self.find_detailed(address).addCallback(lambda answer: [c.certificate for c in answer.candidates])

    def release(self) -> int:
        """Fire every held query with the current answer; return how many."""
        held, self.held = self.held, []
        for address, pending in held:
            if not pending.called:
                pending.callback(self.answer_for(address))
        return len(held)


class FakeStatus(enum.Enum):
    """The statuses of ``gatekeeper.trust.TrustStatus`` the fake can give."""

    VALID = "valid"
    UNTRUSTED = "untrusted"
    EXPIRED = "expired"
    MISMATCH = "mismatch"
    WEAK = "weak"


@attrs.frozen
class FakeResult:
    """Shaped like ``gatekeeper.trust.TrustResult``."""

    status: FakeStatus
    reasons: tuple[str, ...]
    chain: tuple[x509.Certificate, ...]

    @property
    def ok(self) -> bool:
        """True for VALID."""
        return self.status is FakeStatus.VALID

    @property
    def trusted(self) -> bool:
        """True for VALID and WEAK."""
        return self.status in (FakeStatus.VALID, FakeStatus.WEAK)


class FakeValidator:
    """Trusts certificates issued by ``anchors`` (directly or via one given intermediate).

    Checks, in this order of severity: trusted issuer, validity dates, address; a
    certificate in ``weak`` is reported WEAK. Every call is recorded in ``calls``.
    """

    def __init__(self, anchors: Sequence[x509.Certificate], *, weak: Iterable[x509.Certificate] = ()) -> None:
        self.anchors = {a.subject: a for a in anchors}
        self.weak = set(weak)
        self.calls: list[tuple[x509.Certificate, str, str | None, tuple[x509.Certificate, ...]]] = []

    def validate(
        self,
        certificate: x509.Certificate,
        *,
        purpose: Literal["sign", "encrypt"],
        address: str | None = None,
        extra_intermediates: Sequence[x509.Certificate] = (),
        at: datetime.datetime | None = None,
    ) -> FakeResult:
        """Judge ``certificate`` by issuer, dates and address."""
        self.calls.append((certificate, purpose, address, tuple(extra_intermediates)))
        moment = at or datetime.datetime.now(datetime.UTC)
        chain: tuple[x509.Certificate, ...] | None = None
        if certificate.issuer in self.anchors:
            chain = (certificate, self.anchors[certificate.issuer])
        else:
            for intermediate in extra_intermediates:
                if intermediate.subject == certificate.issuer and intermediate.issuer in self.anchors:
                    chain = (certificate, intermediate, self.anchors[intermediate.issuer])
        if chain is None:
            return FakeResult(FakeStatus.UNTRUSTED, ("issuer not trusted",), (certificate,))
        if not certificate.not_valid_before_utc <= moment <= certificate.not_valid_after_utc:
            return FakeResult(FakeStatus.EXPIRED, ("outside the validity period",), chain)
        if address is not None and address_key(address) not in {
            address_key(a) for a in certificate_addresses(certificate)
        }:
            return FakeResult(FakeStatus.MISMATCH, (f"not issued for {address}",), chain)
        if certificate in self.weak:
            return FakeResult(FakeStatus.WEAK, ("weak key",), chain)
        return FakeResult(FakeStatus.VALID, (), chain)

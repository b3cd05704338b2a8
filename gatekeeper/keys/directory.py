"""Certificate discovery: ask the key sources in order, validate every candidate, keep a trace.

:class:`KeyDirectory` asks its sources one after the other (local key ring, the
organisation's LDAP directory, external directories, DNS SMIMEA) and stops at the first
that yields a *usable* certificate: one the trust validator calls valid for encryption
to this address. Every other candidate is recorded with the validator's reasons, and
every source with what happened when it was asked, so the policy can say why a message
was not encrypted and ``gatekeeper lookup`` can show the whole story.

A source that is down does not stop the lookup: it is recorded as unavailable, the
next source is asked, and the result is marked ``incomplete`` so that a
mandatory-encryption policy answers with a temporary error rather than a permanent
refusal. Caching, coalescing, time-outs and back-off are wrappers
(:mod:`gatekeeper.keys.cache`), not part of this class.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gatekeeper.address import address_key, domain_of, normalize_address
from gatekeeper.errors import SourceUnavailable
from gatekeeper.interfaces import IKeySource
from gatekeeper.keys.keyring import certificate_addresses, fingerprint, is_ca_certificate

log = Logger()


# -- what sources return ------------------------------------------------------------------


@attrs.frozen
class Candidate:
    """A certificate a source found, with what the source vouches for.

    ``dane_ee`` marks a certificate authenticated by DNSSEC as the recipient's own
    (SMIMEA certificate usage 3, DANE-EE): RFC 6698/8162 accept it without a PKIX path
    to a trust anchor, so a validator's only objection "untrusted" is overruled for it,
    while validity, key usage and address are still checked.
    """

    certificate: x509.Certificate
    dane_ee: bool = False


@attrs.frozen
class SourceAnswer:
    """A source's detailed answer: candidates plus a note for the trace (may be empty)."""

    candidates: tuple[Candidate, ...] = ()
    note: str = ""


class SourceBackedOff(SourceUnavailable):
    """The source failed recently and is skipped until ``retry_in`` seconds have passed."""

    def __init__(self, source: str, retry_in: float) -> None:
        super().__init__(f"{source}: failed recently; skipped for another {retry_in:.1f} s")
        self.retry_in = retry_in


# -- what the validator looks like (gatekeeper.trust.TrustValidator) -------------------------


class ValidationResult(Protocol):
    """The part of ``gatekeeper.trust.TrustResult`` the directory reads."""

    @property
    def status(self) -> enum.Enum:
        """VALID, UNTRUSTED, EXPIRED, REVOKED, MISMATCH, BAD_SIGNATURE, WEAK or UNUSABLE."""

    @property
    def reasons(self) -> tuple[str, ...]:
        """Why the certificate is not valid (empty when it is)."""

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The validated path above the certificate."""

    @property
    def ok(self) -> bool:
        """True for VALID."""


class Validator(Protocol):
    """The part of ``gatekeeper.trust.TrustValidator`` the directory calls."""

    def validate(
        self,
        certificate: x509.Certificate,
        *,
        purpose: Literal["sign", "encrypt"],
        address: str | None = None,
        extra_intermediates: Sequence[x509.Certificate] = (),
        at: datetime.datetime | None = None,
    ) -> ValidationResult:
        """Validate ``certificate`` for ``purpose`` (and ``address``)."""


# -- the result ---------------------------------------------------------------------------


class SourceState(enum.Enum):
    """What happened when the directory came to a source."""

    FOUND = "found"  # returned candidates, at least one usable
    REFUSED = "refused"  # returned candidates, none usable
    NOT_FOUND = "not found"  # returned nothing
    UNAVAILABLE = "unavailable"  # down, timed out, refused the bind...
    BACKED_OFF = "backed off"  # failed recently, not asked
    SKIPPED_DOMAIN = "skipped (domain)"  # restricted to other domains
    NOT_ASKED = "not asked"  # an earlier source answered


@attrs.frozen
class SourceOutcome:
    """One source's part in a lookup."""

    source: str
    state: SourceState
    candidates: int = 0
    usable: int = 0
    detail: str = ""
    seconds: float = 0.0

    @property
    def asked(self) -> bool:
        """True when the source was actually queried."""
        return self.state in (SourceState.FOUND, SourceState.REFUSED, SourceState.NOT_FOUND, SourceState.UNAVAILABLE)


@attrs.frozen
class RefusedCandidate:
    """A certificate a source offered that may not be used, and why."""

    source: str
    certificate: x509.Certificate
    status: str
    reasons: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        """SHA-256 fingerprint, lower-case hex."""
        return fingerprint(self.certificate)

    @property
    def subject(self) -> str:
        """The certificate's subject as an RFC 4514 string."""
        return self.certificate.subject.rfc4514_string()


@attrs.frozen
class LookupResult:
    """The answer for one address: the certificate(s) to use, or none, and the trace.

    ``certificates`` are the usable certificates of the source that answered, best
    first (newest, then strongest key); ``chain`` is the validated chain of the first.
    ``incomplete`` is true when a source could not be asked (down, timed out, backed
    off): then "no certificate" may be wrong, and a mandatory policy should defer
    (4xx) rather than refuse.
    """

    address: str
    certificates: tuple[x509.Certificate, ...]
    chain: tuple[x509.Certificate, ...]
    source: str | None
    outcomes: tuple[SourceOutcome, ...]
    refused: tuple[RefusedCandidate, ...]
    incomplete: bool
    cached: bool = False

    @property
    def certificate(self) -> x509.Certificate | None:
        """The chosen certificate, or None."""
        return self.certificates[0] if self.certificates else None

    @property
    def found(self) -> bool:
        """True when a usable certificate was found."""
        return bool(self.certificates)


# -- helpers ------------------------------------------------------------------------------


def key_strength(certificate: x509.Certificate) -> int:
    """Estimate the key's security level in bits (NIST SP 800-57), for breaking ties."""
    try:
        key = certificate.public_key()
    except ValueError:
        return 0
    if isinstance(key, rsa.RSAPublicKey | dsa.DSAPublicKey):
        size = key.key_size
        for bits, level in ((15360, 256), (7680, 192), (3072, 128), (2048, 112), (1024, 80)):
            if size >= bits:
                return level
        return 0
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.key_size // 2
    if isinstance(key, ed25519.Ed25519PublicKey | x25519.X25519PublicKey):
        return 128
    if isinstance(key, ed448.Ed448PublicKey | x448.X448PublicKey):
        return 224
    return 0


def _preference(certificate: x509.Certificate) -> tuple[datetime.datetime, int, str]:
    return (certificate.not_valid_before_utc, key_strength(certificate), fingerprint(certificate))


def in_domains(address: str, domains: Sequence[str]) -> bool:
    """Tell whether the address's domain is one of ``domains`` or a subdomain of one."""
    domain = domain_of(address).lower()
    return any(domain == d or domain.endswith("." + d) for d in domains)


def dane_ee_problems(certificate: x509.Certificate, address: str, at: datetime.datetime) -> list[str]:
    """The checks a DANE-EE certificate must still pass without a PKIX path.

    Returns the reasons it may not be used for encryption to ``address`` (empty: usable).
    """
    problems = []
    if not certificate.not_valid_before_utc <= at <= certificate.not_valid_after_utc:
        problems.append("outside its validity period")
    if address_key(address) not in {address_key(a) for a in certificate_addresses(certificate)}:
        problems.append(f"does not name {address}")
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        key = certificate.public_key()
        if isinstance(key, rsa.RSAPublicKey) and not usage.key_encipherment:
            problems.append("key usage does not allow keyEncipherment")
        if isinstance(key, ec.EllipticCurvePublicKey) and not usage.key_agreement:
            problems.append("key usage does not allow keyAgreement")
    except x509.ExtensionNotFound:
        pass
    except ValueError:
        problems.append("unreadable key usage or public key")
    try:
        eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.EMAIL_PROTECTION not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
            problems.append("extended key usage does not include emailProtection")
    except x509.ExtensionNotFound:
        pass
    except ValueError:
        problems.append("unreadable extended key usage")
    if is_ca_certificate(certificate):
        problems.append("is a CA certificate")
    return problems


async def ask_source(source: Any, address: str) -> SourceAnswer:
    """Ask one source, through ``find_detailed`` when it has one, else ``find``."""
    detailed = getattr(source, "find_detailed", None)
    if detailed is not None:
        answer: SourceAnswer = await detailed(address)
        return answer
    found: list[x509.Certificate] = await source.find(address)
    return SourceAnswer(tuple(Candidate(c) for c in found))


# -- the directory ------------------------------------------------------------------------


class KeyDirectory:
    """The ordered chain of key sources, with every candidate validated.

    ``sources`` provide :class:`~gatekeeper.interfaces.IKeySource`; one may also have
    ``find_detailed(address) -> Deferred[SourceAnswer]`` (used instead of ``find``) and
    a ``domains`` tuple restricting it to recipients in those domains. CA certificates
    a source returns are passed to the validator as intermediates, not used as
    recipients' certificates. Only VALID certificates are used; ``accept_weak`` also
    lets WEAK ones through (SHA-1 or short keys in the chain), ranked after valid ones.
    """

    def __init__(
        self,
        sources: Sequence[IKeySource],
        validator: Validator,
        *,
        clock: IReactorTime,
        accept_weak: bool = False,
    ) -> None:
        self.sources = tuple(sources)
        self.validator = validator
        self.clock = clock
        self.accept_weak = accept_weak

    def lookup(self, address: str) -> Deferred[LookupResult]:
        """Find the certificate to encrypt to ``address``; never fails for an outage.

        Fails only with :class:`~gatekeeper.errors.InvalidAddress` for a malformed address.
        """
        return Deferred.fromCoroutine(self.lookup_async(address))

    async def lookup_async(self, address: str) -> LookupResult:
        """The coroutine behind :meth:`lookup`."""
        address = normalize_address(address)
        outcomes: list[SourceOutcome] = []
        refused: list[RefusedCandidate] = []
        incomplete = False
        for index, source in enumerate(self.sources):
            name = str(source.name)
            domains = tuple(getattr(source, "domains", ()) or ())
            if domains and not in_domains(address, domains):
                outcomes.append(
                    SourceOutcome(name, SourceState.SKIPPED_DOMAIN, detail=f"only for {', '.join(domains)}")
                )
                continue
            started = self.clock.seconds()
            try:
                answer = await ask_source(source, address)
            except SourceBackedOff as error:
                incomplete = True
                outcomes.append(SourceOutcome(name, SourceState.BACKED_OFF, detail=str(error)))
                continue
            except SourceUnavailable as error:
                incomplete = True
                log.warn("key source {source} unavailable for a lookup: {reason}", source=name, reason=str(error))
                outcomes.append(
                    SourceOutcome(name, SourceState.UNAVAILABLE, detail=str(error), seconds=self._since(started))
                )
                continue
            except Exception:
                # A bug in a source must not take the others down; the failure is logged in full.
                incomplete = True
                log.failure("key source {source} failed unexpectedly", source=name)
                outcomes.append(
                    SourceOutcome(
                        name, SourceState.UNAVAILABLE, detail="internal error (see log)", seconds=self._since(started)
                    )
                )
                continue
            usable, chains, source_refused, count = self._judge(name, address, answer)
            refused.extend(source_refused)
            seconds = self._since(started)
            if usable:
                outcomes.append(SourceOutcome(name, SourceState.FOUND, count, len(usable), answer.note, seconds))
                for later in self.sources[index + 1 :]:
                    outcomes.append(SourceOutcome(str(later.name), SourceState.NOT_ASKED))
                return LookupResult(
                    address=address,
                    certificates=tuple(usable),
                    chain=chains[fingerprint(usable[0])],
                    source=name,
                    outcomes=tuple(outcomes),
                    refused=tuple(refused),
                    incomplete=incomplete,
                )
            state = SourceState.REFUSED if count else SourceState.NOT_FOUND
            outcomes.append(SourceOutcome(name, state, count, 0, answer.note, seconds))
        return LookupResult(address, (), (), None, tuple(outcomes), tuple(refused), incomplete)

    def _since(self, started: float) -> float:
        return max(0.0, self.clock.seconds() - started)

    def _judge(
        self, source: str, address: str, answer: SourceAnswer
    ) -> tuple[list[x509.Certificate], dict[str, tuple[x509.Certificate, ...]], list[RefusedCandidate], int]:
        """Validate an answer's candidates; return (usable best first, chains, refused, count)."""
        intermediates = [c.certificate for c in answer.candidates if is_ca_certificate(c.certificate)]
        seen: set[str] = set()
        usable: list[x509.Certificate] = []
        weak: list[x509.Certificate] = []
        chains: dict[str, tuple[x509.Certificate, ...]] = {}
        refused: list[RefusedCandidate] = []
        now = datetime.datetime.now(datetime.UTC)
        for candidate in answer.candidates:
            certificate = candidate.certificate
            digest = fingerprint(certificate)
            if digest in seen or is_ca_certificate(certificate):
                continue
            seen.add(digest)
            try:
                result = self.validator.validate(
                    certificate, purpose="encrypt", address=address, extra_intermediates=intermediates
                )
            except Exception:
                log.failure("certificate validation failed unexpectedly", source=source, fingerprint=digest)
                refused.append(RefusedCandidate(source, certificate, "error", ("validation failed (see log)",)))
                continue
            if result.ok:
                usable.append(certificate)
                chains[digest] = tuple(result.chain)
                continue
            if self.accept_weak and result.status.name == "WEAK":
                weak.append(certificate)
                chains[digest] = tuple(result.chain)
                continue
            status = result.status.name.lower()
            if candidate.dane_ee and result.status.name == "UNTRUSTED":
                problems = dane_ee_problems(certificate, address, now)
                if not problems:
                    usable.append(certificate)
                    chains[digest] = ()
                    continue
                refused.append(RefusedCandidate(source, certificate, status, (*result.reasons, *problems)))
                continue
            refused.append(RefusedCandidate(source, certificate, status, tuple(result.reasons)))
        usable.sort(key=_preference, reverse=True)
        weak.sort(key=_preference, reverse=True)
        return usable + weak, chains, refused, len(seen)

"""Certificate path validation for S/MIME: is this certificate good for this address and purpose?

:class:`TrustValidator` is built once (from ``[trust]``, see :func:`validator_from_config`)
and is immutable; :meth:`TrustValidator.validate` answers with a :class:`TrustResult`: a
status, human-readable reasons and the chain that was found, never only a boolean.

What is checked, from the certificate up to a configured trust anchor:

- a chain exists: issuer names match, authority/subject key identifiers agree where
  present, and each signature verifies (intermediates come from the configuration, the
  message or the key ring via ``extra_intermediates``);
- every certificate is within its validity period at the given time;
- issuers are CAs (basicConstraints, path length, keyUsage keyCertSign);
- no certificate carries a critical extension Gatekeeper does not understand (name
  constraints included: they are refused rather than half enforced);
- the certificate allows the purpose: keyUsage digitalSignature/nonRepudiation for
  ``sign``, keyEncipherment (RSA) or keyAgreement (EC) for ``encrypt``, and an
  extendedKeyUsage that is absent or includes emailProtection;
- the address matches a subjectAltName rfc822Name or a subject emailAddress;
- no local CRL (signed by the issuer) lists a certificate of the chain.

SHA-1 signatures and RSA keys under 2048 bits in the chain give :attr:`TrustStatus.WEAK`
(usable, flagged). The module is synchronous and pure; loading files is done by the
helpers at the end, once, at start-up.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import itertools
import ssl
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as CryptoUnsupported
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gatekeeper.address import address_key, normalize_address
from gatekeeper.errors import ConfigError, InvalidAddress

if TYPE_CHECKING:
    from gatekeeper.config import TrustConfig

MAX_CHAIN = 8
PATH_MEMO_SIZE = 1024
"""How many (certificate, pool) paths a validator remembers."""
_Path = tuple[x509.Certificate, ...]
MIN_RSA_BITS = 2048
SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
_ANY_EKU = x509.ObjectIdentifier("2.5.29.37.0")
# Extensions whose meaning the checks above cover (or that carry no constraint).
_UNDERSTOOD = {
    x509.BasicConstraints.oid,
    x509.KeyUsage.oid,
    x509.ExtendedKeyUsage.oid,
    x509.SubjectAlternativeName.oid,
    x509.SubjectKeyIdentifier.oid,
    x509.AuthorityKeyIdentifier.oid,
    x509.CertificatePolicies.oid,
    x509.CRLDistributionPoints.oid,
    x509.AuthorityInformationAccess.oid,
    x509.IssuerAlternativeName.oid,
}


class TrustStatus(enum.Enum):
    """The verdict on a certificate (or a signature), most severe problem first in :data:`SEVERITY`."""

    VALID = "valid"
    UNTRUSTED = "untrusted"
    EXPIRED = "expired"
    REVOKED = "revoked"
    MISMATCH = "mismatch"
    BAD_SIGNATURE = "bad-signature"
    WEAK = "weak"
    UNUSABLE = "unusable"  # keyUsage / extendedKeyUsage do not allow the purpose


SEVERITY = (
    TrustStatus.BAD_SIGNATURE,
    TrustStatus.REVOKED,
    TrustStatus.UNTRUSTED,
    TrustStatus.EXPIRED,
    TrustStatus.UNUSABLE,
    TrustStatus.MISMATCH,
    TrustStatus.WEAK,
    TrustStatus.VALID,
)


@attrs.frozen
class TrustResult:
    """A status, the reasons behind it (sentences safe to show) and the chain found, leaf first."""

    status: TrustStatus
    reasons: tuple[str, ...]
    chain: tuple[x509.Certificate, ...]

    @property
    def ok(self) -> bool:
        """True only for :attr:`TrustStatus.VALID`."""
        return self.status is TrustStatus.VALID

    @property
    def trusted(self) -> bool:
        """True for VALID and WEAK: the certificate may be used, WEAK with a warning."""
        return self.status in (TrustStatus.VALID, TrustStatus.WEAK)

    def with_problem(self, status: TrustStatus, reason: str) -> TrustResult:
        """This result with one more problem; the status becomes the more severe of the two."""
        worst = min(self.status, status, key=SEVERITY.index)
        return TrustResult(worst, (*self.reasons, reason), self.chain)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready summary (subjects and fingerprints of the chain, no key material)."""
        return {
            "status": self.status.value,
            "ok": self.ok,
            "reasons": list(self.reasons),
            "chain": [
                {
                    "subject": c.subject.rfc4514_string(),
                    "issuer": c.issuer.rfc4514_string(),
                    "serial": format(c.serial_number, "x"),
                    "sha256": c.fingerprint(hashes.SHA256()).hex(),
                }
                for c in self.chain
            ],
        }


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def certificate_addresses(certificate: x509.Certificate) -> list[str]:
    """The e-mail addresses a certificate is for: SAN rfc822Names, then DN emailAddress.

    Addresses are normalised (:func:`gatekeeper.address.normalize_address`); unusable
    ones are skipped, duplicates (compared case-insensitively) removed.
    """
    found: list[str] = []
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        found.extend(san.get_values_for_type(x509.RFC822Name))
    except x509.ExtensionNotFound:
        pass
    except ValueError:
        pass  # a malformed extension names nobody
    for attribute in certificate.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        if isinstance(attribute.value, str):
            found.append(attribute.value)
    result: list[str] = []
    seen: set[str] = set()
    for candidate in found:
        try:
            address = normalize_address(candidate)
        except InvalidAddress:
            continue
        if address_key(address) not in seen:
            seen.add(address_key(address))
            result.append(address)
    return result


def _describe(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    text = str(names[0].value) if names else certificate.subject.rfc4514_string()
    return repr(text[:80])


class TrustValidator:
    """Validates certificates against fixed trust anchors, intermediates and CRLs.

    Its configuration is immutable; it remembers the certification paths it has built
    (at most :data:`PATH_MEMO_SIZE`), since checking the signatures between certificates
    is most of the work and never gives another answer. Dates, revocation, usage and
    addresses are checked again on every call.
    """

    def __init__(
        self,
        anchors: Sequence[x509.Certificate],
        *,
        intermediates: Sequence[x509.Certificate] = (),
        crls: Sequence[x509.CertificateRevocationList] = (),
        now: Callable[[], datetime.datetime] = _utc_now,
    ) -> None:
        self._anchors = tuple(anchors)
        self._anchor_set = frozenset(self._anchors)
        self._intermediates = tuple(intermediates)
        self._crls = tuple(crls)
        self._now = now
        # Paths found (or not) per certificate and pool: a signature between two
        # certificates never changes, and checking them is most of a validation.
        self._paths: dict[tuple[x509.Certificate, tuple[x509.Certificate, ...]], _Path | None] = {}

    @property
    def anchors(self) -> tuple[x509.Certificate, ...]:
        """The trust anchors, in configuration order."""
        return self._anchors

    def validate(
        self,
        certificate: x509.Certificate,
        *,
        purpose: Literal["sign", "encrypt"],
        address: str | None = None,
        extra_intermediates: Sequence[x509.Certificate] = (),
        at: datetime.datetime | None = None,
    ) -> TrustResult:
        """Check ``certificate`` for ``purpose`` (and ``address``, when given) at time ``at``."""
        try:
            return self._validate(certificate, purpose, address, extra_intermediates, at)
        except (ValueError, CryptoUnsupported):
            # cryptography parses extensions and keys lazily: damage surfaces here.
            return TrustResult(TrustStatus.UNTRUSTED, ("a certificate of the chain is malformed",), (certificate,))

    def _validate(
        self,
        certificate: x509.Certificate,
        purpose: str,
        address: str | None,
        extra_intermediates: Sequence[x509.Certificate],
        at: datetime.datetime | None,
    ) -> TrustResult:
        if purpose not in ("sign", "encrypt"):
            raise TypeError(f"unknown purpose {purpose!r}")
        moment = at or self._now()
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        pool = (*self._intermediates, *extra_intermediates, *self._anchors)
        chain = self._build(certificate, pool)
        result = TrustResult(TrustStatus.VALID, (), chain or (certificate,))
        if chain is None:
            result = result.with_problem(
                TrustStatus.UNTRUSTED,
                f"no chain from {_describe(certificate)} to a trusted certification authority "
                f"(issuer {certificate.issuer.rfc4514_string()[:120]!r})",
            )
            chain = (certificate,)
        else:
            result = self._check_issuers(chain, result)
            result = self._check_revocation(chain, moment, result)
        result = self._check_dates(chain, moment, result)
        result = self._check_extensions(chain, result)
        result = self._check_purpose(certificate, purpose, result)
        if address is not None:
            result = self._check_address(certificate, address, result)
        return self._check_strength(chain, result)

    # -- path building ----------------------------------------------------------------

    def _build(
        self, certificate: x509.Certificate, pool: Sequence[x509.Certificate]
    ) -> tuple[x509.Certificate, ...] | None:
        if certificate in self._anchor_set:
            return (certificate,)
        key = (certificate, tuple(pool))
        with contextlib.suppress(KeyError):
            return self._paths[key]
        path = self._paths[key] = self._extend((certificate,), pool)
        if len(self._paths) > PATH_MEMO_SIZE:
            self._paths.pop(next(iter(self._paths)), None)  # the oldest first
        return path

    def _extend(
        self, path: tuple[x509.Certificate, ...], pool: Sequence[x509.Certificate]
    ) -> tuple[x509.Certificate, ...] | None:
        if len(path) > MAX_CHAIN:
            return None
        child = path[-1]
        for candidate in _issuer_candidates(child, pool):
            if candidate in path:
                continue
            try:
                child.verify_directly_issued_by(candidate)
            except (ValueError, TypeError, InvalidSignature):
                continue
            extended = (*path, candidate)
            if candidate in self._anchor_set:
                return extended
            found = self._extend(extended, pool)
            if found is not None:
                return found
        return None

    # -- checks -------------------------------------------------------------------------

    def _check_issuers(self, chain: tuple[x509.Certificate, ...], result: TrustResult) -> TrustResult:
        for depth, issuer in enumerate(chain[1:]):
            try:
                constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                constraints = None
            if constraints is None or not constraints.ca:
                result = result.with_problem(
                    TrustStatus.UNTRUSTED, f"{_describe(issuer)} is not a certification authority"
                )
            elif constraints.path_length is not None and depth > constraints.path_length:
                result = result.with_problem(
                    TrustStatus.UNTRUSTED, f"the chain is longer than {_describe(issuer)} allows"
                )
            try:
                usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
                if not usage.key_cert_sign:
                    result = result.with_problem(
                        TrustStatus.UNTRUSTED, f"{_describe(issuer)} may not issue certificates"
                    )
            except x509.ExtensionNotFound:
                pass
        return result

    def _check_dates(
        self, chain: tuple[x509.Certificate, ...], moment: datetime.datetime, result: TrustResult
    ) -> TrustResult:
        for certificate in chain:
            if moment > certificate.not_valid_after_utc:
                day = certificate.not_valid_after_utc.date().isoformat()
                result = result.with_problem(
                    TrustStatus.EXPIRED, f"the certificate {_describe(certificate)} expired on {day}"
                )
            elif moment < certificate.not_valid_before_utc:
                day = certificate.not_valid_before_utc.date().isoformat()
                result = result.with_problem(
                    TrustStatus.EXPIRED, f"the certificate {_describe(certificate)} is not valid before {day}"
                )
        return result

    def _check_extensions(self, chain: tuple[x509.Certificate, ...], result: TrustResult) -> TrustResult:
        for certificate in chain:
            try:
                extensions = list(certificate.extensions)
            except ValueError:
                return result.with_problem(TrustStatus.UNTRUSTED, f"{_describe(certificate)} has malformed extensions")
            for extension in extensions:
                if extension.critical and extension.oid not in _UNDERSTOOD:
                    result = result.with_problem(
                        TrustStatus.UNTRUSTED,
                        f"{_describe(certificate)} has a critical extension Gatekeeper does not support "
                        f"({extension.oid.dotted_string})",
                    )
        return result

    def _check_purpose(self, certificate: x509.Certificate, purpose: str, result: TrustResult) -> TrustResult:
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
            if constraints.ca:
                result = result.with_problem(TrustStatus.UNUSABLE, "a CA certificate cannot be used for mail")
        except x509.ExtensionNotFound:
            pass
        key = certificate.public_key()
        try:
            usage: x509.KeyUsage | None = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if purpose == "sign":
            if usage is not None and not (usage.digital_signature or usage.content_commitment):
                result = result.with_problem(TrustStatus.UNUSABLE, "the certificate's key usage does not allow signing")
        else:
            if isinstance(key, rsa.RSAPublicKey):
                allowed = usage is None or usage.key_encipherment
            elif isinstance(key, ec.EllipticCurvePublicKey):
                allowed = usage is None or usage.key_agreement
            else:
                allowed = False
            if not allowed:
                result = result.with_problem(
                    TrustStatus.UNUSABLE, "the certificate's key usage does not allow encryption"
                )
        try:
            eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if ExtendedKeyUsageOID.EMAIL_PROTECTION not in eku and _ANY_EKU not in eku:
                result = result.with_problem(
                    TrustStatus.UNUSABLE, "the certificate is not for e-mail (no emailProtection extended key usage)"
                )
        except x509.ExtensionNotFound:
            pass
        return result

    def _check_address(self, certificate: x509.Certificate, address: str, result: TrustResult) -> TrustResult:
        try:
            wanted = address_key(normalize_address(address))
        except InvalidAddress:
            return result.with_problem(TrustStatus.MISMATCH, "the sender address is not a valid e-mail address")
        addresses = certificate_addresses(certificate)
        if not any(address_key(found) == wanted for found in addresses):
            listed = ", ".join(addresses[:5]) or "no address"
            return result.with_problem(
                TrustStatus.MISMATCH, f"the certificate is for {listed}, not for {address[:254]}"
            )
        return result

    def _check_revocation(
        self, chain: tuple[x509.Certificate, ...], moment: datetime.datetime, result: TrustResult
    ) -> TrustResult:
        for certificate, issuer in itertools.pairwise(chain):
            for crl in self._crls:
                if crl.issuer != issuer.subject:
                    continue
                try:
                    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
                        continue
                except (TypeError, ValueError):
                    continue
                revoked = crl.get_revoked_certificate_by_serial_number(certificate.serial_number)
                if revoked is not None and revoked.revocation_date_utc <= moment:
                    day = revoked.revocation_date_utc.date().isoformat()
                    result = result.with_problem(
                        TrustStatus.REVOKED, f"the certificate {_describe(certificate)} was revoked on {day}"
                    )
        return result

    def _check_strength(self, chain: tuple[x509.Certificate, ...], result: TrustResult) -> TrustResult:
        for certificate in chain:
            if certificate in self._anchor_set:
                continue  # an anchor's own signature is not what makes it trusted
            algorithm = certificate.signature_hash_algorithm
            if algorithm is not None and algorithm.name in ("sha1", "md5"):
                result = result.with_problem(
                    TrustStatus.WEAK, f"{_describe(certificate)} is signed with {algorithm.name.upper()}"
                )
            key = certificate.public_key()
            if isinstance(key, rsa.RSAPublicKey | dsa.DSAPublicKey) and key.key_size < MIN_RSA_BITS:
                result = result.with_problem(TrustStatus.WEAK, f"{_describe(certificate)} has a {key.key_size}-bit key")
        return result


def _issuer_candidates(child: x509.Certificate, pool: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    try:
        authority = child.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except (x509.ExtensionNotFound, ValueError):
        authority = None
    found = []
    for candidate in pool:
        if candidate.subject != child.issuer or candidate in found:
            continue
        if authority is not None:
            try:
                subject_key = candidate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
                if subject_key != authority:
                    continue
            except (x509.ExtensionNotFound, ValueError):
                pass
        found.append(candidate)
    return found


# -- loading --------------------------------------------------------------------------


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Read the certificates in a PEM file (any number) or a DER file (one)."""
    data = path.read_bytes()
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise ConfigError("not a PEM or DER certificate file", str(path)) from None


def load_crls(paths: Iterable[Path]) -> list[x509.CertificateRevocationList]:
    """Read CRL files (PEM or DER)."""
    crls = []
    for path in paths:
        data = path.read_bytes()
        try:
            crls.append(x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data))
        except (ValueError, OSError):
            raise ConfigError("not a PEM or DER CRL file", str(path)) from None
    return crls


def load_anchors(
    files: Iterable[Path] = (), dirs: Iterable[Path] = (), *, system: bool = False
) -> list[x509.Certificate]:
    """Read trust anchors from files, from every ``*.pem/*.crt/*.cer/*.der`` in dirs, and the system bundle."""
    anchors: list[x509.Certificate] = []
    for path in files:
        anchors.extend(_read_or_fail(path))
    for directory in dirs:
        if not directory.is_dir():
            raise ConfigError("not a directory", str(directory))
        for path in sorted(directory.iterdir()):
            if path.suffix.lower() in (".pem", ".crt", ".cer", ".der") and path.is_file():
                anchors.extend(_read_or_fail(path))
    if system:
        anchors.extend(load_system_anchors())
    return anchors


def load_system_anchors() -> list[x509.Certificate]:
    """The operating system's CA bundle (empty if there is none)."""
    candidates = [ssl.get_default_verify_paths().cafile, *SYSTEM_BUNDLES]
    for name in candidates:
        if name and Path(name).is_file():
            try:
                return x509.load_pem_x509_certificates(Path(name).read_bytes())
            except ValueError:
                continue
    return []


def _read_or_fail(path: Path) -> list[x509.Certificate]:
    try:
        return load_certificates(path)
    except OSError as error:
        raise ConfigError(f"cannot read: {error.strerror}", str(path)) from None


def validator_from_config(
    config: TrustConfig,
    *,
    extra_anchors: Sequence[x509.Certificate] = (),
    intermediates: Sequence[x509.Certificate] = (),
    now: Callable[[], datetime.datetime] = _utc_now,
) -> TrustValidator:
    """Build the validator ``[trust]`` describes; ``extra_anchors`` adds e.g. the built-in CA."""
    anchors = [*extra_anchors, *load_anchors(config.anchors, config.anchor_dirs, system=config.system_anchors)]
    try:
        crls = load_crls(config.crls)
    except OSError as error:
        raise ConfigError(f"cannot read a CRL: {error.strerror}", "[trust] crls") from None
    return TrustValidator(anchors, intermediates=intermediates, crls=crls, now=now)

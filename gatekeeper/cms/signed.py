"""SignedData (RFC 5652 section 5): produce one signature, verify every signature found.

Producing builds the DER by hand around the content (see :mod:`gatekeeper.cms.der`);
reading walks the outer layers with the bounded TLV reader and decodes the small pieces
(capabilities, PSS parameters) with pyasn1-modules. Verification here is cryptographic
only: whether the signer's certificate is trusted is :mod:`gatekeeper.trust`'s question.
"""

from __future__ import annotations

import datetime
import functools
import hmac
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as CryptoUnsupported
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pyasn1.codec.ber import decoder as ber_decoder
from pyasn1_modules import rfc4055

from gatekeeper.cms import algorithms as alg
from gatekeeper.cms import der
from gatekeeper.cms.der import ASN1_ERRORS
from gatekeeper.cms.errors import LimitExceeded, Malformed, UnsupportedAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
Content = bytes | bytearray | memoryview

SIGNATURE_SCHEMES = ("pkcs1v15", "pss")
MAX_SIGNERS = 16
MAX_CERTIFICATES = 64
MAX_ATTRIBUTES = 64
MIN_RSA_BITS = 2048


# -- producing -----------------------------------------------------------------------


def capabilities_attribute_value(names: Sequence[str]) -> bytes:
    """The DER SMIMECapabilities value advertising ``names`` (strongest first)."""
    entries = []
    for name in names:
        dotted = alg.CAPABILITY_OIDS.get(name)
        if dotted is None:
            raise UnsupportedAlgorithm(f"unknown capability {name!r}")
        if name == "rsa-oaep":
            # RFC 8551 2.5.2: advertise OAEP with the parameters we want used (SHA-256).
            entries.append(alg.OAEP_SHA256_IDENTIFIER)
        else:
            entries.append(der.algorithm(dotted))
    return der.sequence(*entries)


def _time(moment: datetime.datetime) -> bytes:
    moment = moment.astimezone(datetime.UTC)
    if 1950 <= moment.year < 2050:
        return der.tlv(der.UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return der.tlv(der.GENERALIZED_TIME, moment.strftime("%Y%m%d%H%M%SZ").encode("ascii"))


def _attribute(dotted: str, value: bytes) -> bytes:
    return der.sequence(der.oid(dotted), der.tlv(der.SET, value))


_CONTENT_TYPE_ATTRIBUTE = _attribute(alg.ID_CONTENT_TYPE, der.oid(alg.ID_DATA))


@functools.lru_cache(maxsize=64)
def _capabilities_attribute(names: tuple[str, ...]) -> bytes:
    return _attribute(alg.ID_SMIME_CAPABILITIES, capabilities_attribute_value(names))


@functools.lru_cache(maxsize=1024)
def issuer_and_serial(certificate: x509.Certificate) -> bytes:
    """The DER IssuerAndSerialNumber naming ``certificate`` (cached: certificates are immutable)."""
    return der.sequence(certificate.issuer.public_bytes(), der.integer(certificate.serial_number))


@functools.lru_cache(maxsize=256)
def _signer_constants(certificate: x509.Certificate, chain: tuple[x509.Certificate, ...]) -> tuple[bytes, bytes]:
    """The signingCertificateV2 attribute and the ``[0]`` certificate set of a signer, encoded once."""
    certificate_der = certificate.public_bytes(serialization.Encoding.DER)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(certificate_der)
    # ESSCertIDv2 with the default hash (SHA-256, so omitted in DER) and no issuerSerial.
    cert_id = der.sequence(der.octet_string(digest.finalize()))
    attribute = _attribute(alg.ID_SIGNING_CERTIFICATE_V2, der.sequence(der.sequence(cert_id)))
    certificates = [certificate_der]
    certificates.extend(c.public_bytes(serialization.Encoding.DER) for c in chain if c != certificate)
    return attribute, der.tlv(der.context(0), *certificates)


@attrs.frozen
class _SignerTemplate:
    """Everything of a SignerInfo that does not change from one message to the next."""

    digest: alg.Digest
    attributes: tuple[bytes, ...]  # contentType, signingCertificateV2, SMIMECapabilities
    signer_prefix: bytes  # version, issuerAndSerialNumber, digestAlgorithm
    signature_identifier: bytes
    head: bytes  # SignedData version and digestAlgorithms
    certificate_set: bytes


@functools.lru_cache(maxsize=256)
def _signer_template(
    certificate: x509.Certificate,
    chain: tuple[x509.Certificate, ...],
    digest: str,
    scheme: str,
    capabilities: tuple[str, ...],
    ecdsa: bool,
) -> _SignerTemplate:
    chosen = alg.digest_by_name(digest)
    if chosen.name not in alg.SIGNING_DIGESTS:
        raise UnsupportedAlgorithm(f"refusing to sign with {chosen.name} (use one of {', '.join(alg.SIGNING_DIGESTS)})")
    if scheme not in SIGNATURE_SCHEMES:
        raise UnsupportedAlgorithm(f"unknown signature scheme {scheme!r} (known: pkcs1v15, pss)")
    if ecdsa:
        signature_identifier = der.algorithm(alg.ECDSA_OID_BY_DIGEST[chosen.name])
    else:
        signature_identifier = alg.PSS_IDENTIFIERS[chosen.name] if scheme == "pss" else alg.RSA_ENCRYPTION_IDENTIFIER
    signing_certificate, certificate_set = _signer_constants(certificate, chain)
    attributes = [_CONTENT_TYPE_ATTRIBUTE, signing_certificate]
    if capabilities:
        attributes.append(_capabilities_attribute(capabilities))
    digest_identifier = alg.digest_identifier(chosen)
    return _SignerTemplate(
        digest=chosen,
        attributes=tuple(attributes),
        signer_prefix=der.integer(1) + issuer_and_serial(certificate) + digest_identifier,
        signature_identifier=signature_identifier,
        head=der.integer(1) + der.tlv(der.SET, digest_identifier),
        certificate_set=certificate_set,
    )


def digest_of(content: Sequence[Content], digest: alg.Digest) -> bytes:
    """Hash the concatenation of ``content`` pieces without joining them."""
    hasher = hashes.Hash(digest.new())
    for piece in content:
        hasher.update(piece)
    return hasher.finalize()


def sign_parts(
    content: Sequence[Content],
    certificate: x509.Certificate,
    private_key: PrivateKey,
    *,
    chain: Sequence[x509.Certificate] = (),
    digest: str = "sha256",
    scheme: str = "pkcs1v15",
    detached: bool = True,
    capabilities: Sequence[str] | None = alg.DEFAULT_CAPABILITIES,
    signing_time: datetime.datetime | None = None,
) -> list[Content]:
    """Build a ContentInfo(SignedData) over ``content`` and return it as a list of pieces.

    The pieces joined are the DER; keeping them apart lets a large encapsulated content
    be base64-encoded or encrypted without ever being copied. ``content`` is a list of
    pieces too (e.g. MIME headers and a body), hashed in order.
    """
    template = _signer_template(
        certificate,
        tuple(chain),
        digest,
        scheme,
        tuple(capabilities) if capabilities else (),
        isinstance(private_key, ec.EllipticCurvePrivateKey),
    )
    if not isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise UnsupportedAlgorithm("only RSA and EC keys can sign")
    when = signing_time or datetime.datetime.now(datetime.UTC)
    attributes = [
        _attribute(alg.ID_SIGNING_TIME, _time(when)),
        _attribute(alg.ID_MESSAGE_DIGEST, der.octet_string(digest_of(content, template.digest))),
        *template.attributes,
    ]
    signed_attributes = der.der_set(attributes)
    signature = _sign(private_key, signed_attributes, template.digest, scheme)
    signer_info = der.sequence(
        template.signer_prefix,
        b"\xa0" + signed_attributes[1:],  # [0] IMPLICIT: same encoding, context tag
        template.signature_identifier,
        der.octet_string(signature),
    )
    head = template.head
    tail = template.certificate_set + der.tlv(der.SET, signer_info)
    if detached:
        body = head + der.sequence(der.oid(alg.ID_DATA)) + tail
        return [der.sequence(der.oid(alg.ID_SIGNED_DATA), der.tlv(der.context(0), der.sequence(body)))]
    content_length = sum(len(piece) for piece in content)
    octets_header = der.header(der.OCTET_STRING, content_length)
    explicit_header = der.header(der.context(0), len(octets_header) + content_length)
    encap_oid = der.oid(alg.ID_DATA)
    encap_length = len(encap_oid) + len(explicit_header) + len(octets_header) + content_length
    encap_header = der.header(der.SEQUENCE, encap_length)
    body_length = len(head) + len(encap_header) + encap_length + len(tail)
    signed_header = der.header(der.SEQUENCE, body_length)
    outer_oid = der.oid(alg.ID_SIGNED_DATA)
    explicit_outer = der.header(der.context(0), len(signed_header) + body_length)
    info_header = der.header(der.SEQUENCE, len(outer_oid) + len(explicit_outer) + len(signed_header) + body_length)
    prefix = b"".join(
        (info_header, outer_oid, explicit_outer, signed_header, head, encap_header, encap_oid, explicit_header)
    )
    return [prefix + octets_header, *content, tail]


def sign(content: bytes, certificate: x509.Certificate, private_key: PrivateKey, **options: object) -> bytes:
    """Return the DER ContentInfo(SignedData) over ``content``; options as :func:`sign_parts`."""
    return b"".join(sign_parts([content], certificate, private_key, **options))  # type: ignore[arg-type]


def _sign(private_key: PrivateKey, data: bytes, digest: alg.Digest, scheme: str) -> bytes:
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.sign(data, ec.ECDSA(digest.new()))
    if scheme == "pss":
        hash_algorithm = digest.new()
        return private_key.sign(
            data, padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size), hash_algorithm
        )
    return private_key.sign(data, padding.PKCS1v15(), digest.new())


# -- reading ---------------------------------------------------------------------------


@attrs.frozen
class SignerResult:
    """What one SignerInfo says and whether its signature is cryptographically correct.

    ``problem`` is None when ``verified``; otherwise a sentence safe to show. ``weak``
    lists reasons the signature is acceptable but not strong (SHA-1, a short RSA key).
    ``capabilities`` are the names of the SMIMECapabilities the signer advertised (OIDs
    Gatekeeper does not know are kept in dotted form).
    """

    certificate: x509.Certificate | None
    digest_algorithm: str
    signature_algorithm: str
    verified: bool
    problem: str | None = None
    weak: tuple[str, ...] = ()
    signing_time: datetime.datetime | None = None
    capabilities: tuple[str, ...] | None = None


@attrs.frozen
class SignedDataResult:
    """A parsed SignedData: the encapsulated content (None when detached), certificates, signers."""

    content: bytes | None
    content_type: str
    certificates: tuple[x509.Certificate, ...]
    signers: tuple[SignerResult, ...]


def read_content_info(data: Content) -> tuple[memoryview, str, der.Element]:
    """Parse a ContentInfo; return the buffer, the content type OID and the ``[0]`` content."""
    buf, info = der.parse(data, expect=der.SEQUENCE)
    parts = der.children(buf, info)
    if len(parts) != 2 or parts[1].tag != der.context(0):
        raise Malformed("malformed CMS ContentInfo")
    content_type = der.read_oid(buf, parts[0])
    inner = der.children(buf, parts[1])
    if len(inner) != 1:
        raise Malformed("malformed CMS ContentInfo")
    return buf, content_type, inner[0]


def verify(data: Content, *, detached_content: Sequence[Content] | None = None) -> SignedDataResult:
    """Parse a ContentInfo(SignedData) and check every signature in it.

    ``detached_content`` (pieces, hashed in order) is the signed content of a detached
    signature; it must be given exactly when the SignedData has no content of its own.
    """
    buf, content_type, element = read_content_info(data)
    if content_type != alg.ID_SIGNED_DATA:
        raise Malformed("not a CMS SignedData")
    return verify_signed_data(buf, element, detached_content=detached_content)


def verify_signed_data(
    buf: memoryview, element: der.Element, *, detached_content: Sequence[Content] | None = None
) -> SignedDataResult:
    """Check a SignedData element already located in ``buf``; see :func:`verify`."""
    der.expect(element, der.SEQUENCE, "SignedData")
    fields = der.children(buf, element)
    if len(fields) < 4:
        raise Malformed("malformed SignedData")
    der.read_integer(buf, fields[0])
    der.expect(fields[1], der.SET, "SignedData digest algorithms")
    encap = der.children(buf, der.expect(fields[2], der.SEQUENCE, "SignedData content"))
    if not encap or len(encap) > 2:
        raise Malformed("malformed SignedData content")
    content_type = der.read_oid(buf, encap[0])
    embedded: Content | None = None
    if len(encap) == 2:
        explicit = der.children(buf, der.expect(encap[1], der.context(0), "SignedData content"))
        if len(explicit) != 1 or explicit[0].tag not in (der.OCTET_STRING, der.CONSTRUCTED_OCTET_STRING):
            raise Malformed("malformed SignedData content")
        embedded = der.octets(buf, explicit[0])
    if embedded is not None and detached_content is not None:
        raise Malformed("a detached signature must not carry content of its own")
    if embedded is None and detached_content is None:
        raise Malformed("the signed content is missing")
    content: Sequence[Content] = [embedded] if embedded is not None else (detached_content or ())
    certificates: list[x509.Certificate] = []
    signer_infos = fields[-1]
    der.expect(signer_infos, der.SET, "SignerInfos")
    for extra in fields[3:-1]:
        if extra.tag == der.context(0):
            certificates = _read_certificates(buf, extra)
        elif extra.tag != der.context(1):
            raise Malformed("malformed SignedData")
    infos = der.children(buf, signer_infos)
    if len(infos) > MAX_SIGNERS:
        raise LimitExceeded("too many signatures")
    signers = tuple(_verify_signer(buf, info, content_type, content, certificates) for info in infos)
    return SignedDataResult(
        content=bytes(embedded) if embedded is not None else None,
        content_type=content_type,
        certificates=tuple(certificates),
        signers=signers,
    )


def _read_certificates(buf: memoryview, element: der.Element) -> list[x509.Certificate]:
    found: list[x509.Certificate] = []
    for child in der.children(buf, element):
        if child.tag != der.SEQUENCE:
            continue  # attribute certificates and other formats: not used for S/MIME
        if len(found) >= MAX_CERTIFICATES:
            raise LimitExceeded("too many certificates in the message")
        try:
            found.append(certificate_from_der(der.raw(buf, child)))
        except (ValueError, x509.InvalidVersion):
            raise Malformed("a certificate in the message is malformed") from None
    return found


@functools.lru_cache(maxsize=256)
def certificate_from_der(data: bytes) -> x509.Certificate:
    """The certificate in ``data``, the same object for the same bytes (the last 256 are kept).

    The same correspondents' certificates come with every message: a kept object has its
    extensions parsed already, and a validator's path memo recognises it.
    Raises ``ValueError`` for bytes that are not a certificate.
    """
    return x509.load_der_x509_certificate(data)


def read_algorithm(buf: memoryview, element: der.Element) -> tuple[str, bytes | None]:
    """An AlgorithmIdentifier as (OID, encoded parameters or None when absent or NULL)."""
    parts = der.children(buf, der.expect(element, der.SEQUENCE, "algorithm identifier"))
    if not parts or len(parts) > 2:
        raise Malformed("malformed algorithm identifier")
    dotted = der.read_oid(buf, parts[0])
    if len(parts) == 1 or parts[1].tag == der.NULL:
        return dotted, None
    return dotted, der.raw(buf, parts[1])


def find_certificate(
    buf: memoryview, sid: der.Element, certificates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The certificate a SignerIdentifier / RecipientIdentifier names, if present."""
    if sid.tag == der.SEQUENCE:
        issuer, serial = _issuer_serial(buf, sid)
        for certificate in certificates:
            try:
                if certificate.serial_number == serial and certificate.issuer.public_bytes() == issuer:
                    return certificate
            except ValueError:
                continue  # a damaged certificate names nobody
        return None
    if sid.tag in (der.context(0, constructed=False), der.OCTET_STRING):
        key_id = bytes(buf[sid.start : sid.end])
        for certificate in certificates:
            try:
                if hmac.compare_digest(subject_key_identifier(certificate), key_id):
                    return certificate
            except ValueError:
                continue
        return None
    raise Malformed("malformed signer or recipient identifier")


def _issuer_serial(buf: memoryview, element: der.Element) -> tuple[bytes, int]:
    parts = der.children(buf, element)
    if len(parts) != 2 or parts[0].tag != der.SEQUENCE:
        raise Malformed("malformed issuer and serial number")
    return der.raw(buf, parts[0]), der.read_integer(buf, parts[1])


def subject_key_identifier(certificate: x509.Certificate) -> bytes:
    """The certificate's subjectKeyIdentifier, or the RFC 5280 method 1 value when absent."""
    try:
        return certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest


def _verify_signer(
    buf: memoryview,
    element: der.Element,
    content_type: str,
    content: Sequence[Content],
    certificates: Sequence[x509.Certificate],
) -> SignerResult:
    parts = der.children(buf, der.expect(element, der.SEQUENCE, "SignerInfo"))
    if len(parts) < 5:
        raise Malformed("malformed SignerInfo")
    der.read_integer(buf, parts[0])
    certificate = find_certificate(buf, parts[1], certificates)
    digest = alg.digest_by_oid(read_algorithm(buf, parts[2])[0])
    index = 3
    signed_attributes: der.Element | None = None
    if parts[index].tag == der.context(0):
        signed_attributes = parts[index]
        index += 1
    if len(parts) < index + 2:
        raise Malformed("malformed SignerInfo")
    signature_oid, signature_params = read_algorithm(buf, parts[index])
    signature = bytes(buf[parts[index + 1].start : parts[index + 1].end])
    der.expect(parts[index + 1], der.OCTET_STRING, "signature")
    scheme, pss = _signature_scheme(signature_oid, signature_params, digest)
    weak: list[str] = []
    if digest.weak:
        weak.append(f"the message digest is {digest.name.upper()}, which is no longer considered secure")
    signing_time = None
    capabilities = None
    content_digest = digest_of(content, digest)
    problem = None
    if signed_attributes is not None:
        attributes = _read_attributes(buf, signed_attributes)
        signing_time = _read_signing_time(attributes.get(alg.ID_SIGNING_TIME))
        capabilities = _read_capabilities(attributes.get(alg.ID_SMIME_CAPABILITIES))
        declared_type = attributes.get(alg.ID_CONTENT_TYPE)
        declared_digest = attributes.get(alg.ID_MESSAGE_DIGEST)
        if declared_type is None or declared_digest is None:
            raise Malformed("the signed attributes lack the content type or message digest")
        if der.read_oid(*declared_type) != content_type:
            problem = "the signed content type does not match the content"
        elif not hmac.compare_digest(bytes(der.octets(*_octet(declared_digest))), content_digest):
            problem = "the content does not match the signature: it was altered after signing"
        # The signature covers the attributes' DER with the SET OF tag, not [0] IMPLICIT.
        signed_bytes: Sequence[Content] = [b"\x31", buf[signed_attributes.header_start + 1 : signed_attributes.next]]
    else:
        signed_bytes = content
    if certificate is None:
        problem = problem or "the signer's certificate is not in the message"
    elif problem is None:
        problem = _check_signature(certificate, signature, signed_bytes, digest, scheme, pss)
        if problem is None:
            key = certificate.public_key()
            if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
                weak.append(f"the signer's RSA key has only {key.key_size} bits")
    return SignerResult(
        certificate=certificate,
        digest_algorithm=digest.name,
        signature_algorithm=scheme,
        verified=problem is None,
        problem=problem,
        weak=tuple(weak),
        signing_time=signing_time,
        capabilities=capabilities,
    )


def _octet(value: tuple[memoryview, der.Element]) -> tuple[memoryview, der.Element]:
    buf, element = value
    if element.tag not in (der.OCTET_STRING, der.CONSTRUCTED_OCTET_STRING):
        raise Malformed("malformed message digest attribute")
    return buf, element


def _signature_scheme(dotted: str, params: bytes | None, digest: alg.Digest) -> tuple[str, padding.PSS | None]:
    if dotted in (alg.RSA_ENCRYPTION, *alg.RSA_WITH):
        return "rsa-pkcs1v15", None
    if dotted in (alg.ID_EC_PUBLIC_KEY, *alg.ECDSA_WITH):
        return "ecdsa", None
    if dotted == alg.RSASSA_PSS:
        return "rsa-pss", _pss_padding(params, digest)
    raise UnsupportedAlgorithm(f"unsupported signature algorithm {dotted}")


def _pss_padding(params: bytes | None, digest: alg.Digest) -> padding.PSS:
    if params is None:
        raise UnsupportedAlgorithm("RSASSA-PSS with default (SHA-1) parameters is not supported")
    try:
        decoded, _ = ber_decoder.decode(params, asn1Spec=rfc4055.RSASSA_PSS_params())
    except ASN1_ERRORS:
        raise Malformed("malformed RSASSA-PSS parameters") from None
    hash_oid = alg.DIGESTS["sha1"].oid
    if decoded["hashAlgorithm"].isValue:
        hash_oid = str(decoded["hashAlgorithm"]["algorithm"])
    mgf = decoded["maskGenAlgorithm"]
    mgf_hash = alg.DIGESTS["sha1"].oid
    if mgf.isValue:
        if str(mgf["algorithm"]) != alg.ID_MGF1:
            raise UnsupportedAlgorithm("unsupported RSASSA-PSS mask generation function")
        try:
            mgf_params, _ = ber_decoder.decode(bytes(mgf["parameters"]), asn1Spec=rfc4055.HashAlgorithm())
        except ASN1_ERRORS:
            raise Malformed("malformed RSASSA-PSS parameters") from None
        mgf_hash = str(mgf_params["algorithm"])
    if hash_oid != digest.oid:
        raise UnsupportedAlgorithm("RSASSA-PSS hash differs from the message digest")
    salt = int(decoded["saltLength"]) if decoded["saltLength"].isValue else 20
    if not 0 <= salt <= 512:
        raise Malformed("malformed RSASSA-PSS salt length")
    return padding.PSS(mgf=padding.MGF1(alg.digest_by_oid(mgf_hash).new()), salt_length=salt)


def _check_signature(
    certificate: x509.Certificate,
    signature: bytes,
    data: Sequence[Content],
    digest: alg.Digest,
    scheme: str,
    pss: padding.PSS | None,
) -> str | None:
    joined = b"".join(data)
    try:
        key = certificate.public_key()
        if scheme == "ecdsa":
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return "the signature algorithm does not fit the signer's key"
            key.verify(signature, joined, ec.ECDSA(digest.new()))
        else:
            if not isinstance(key, rsa.RSAPublicKey):
                return "the signature algorithm does not fit the signer's key"
            key.verify(signature, joined, pss or padding.PKCS1v15(), digest.new())
    except InvalidSignature:
        return "the signature does not match: the message was altered or signed with another key"
    except (CryptoUnsupported, ValueError):
        return "the signature cannot be checked with the signer's key"
    return None


def _read_attributes(buf: memoryview, element: der.Element) -> dict[str, tuple[memoryview, der.Element]]:
    found: dict[str, tuple[memoryview, der.Element]] = {}
    entries = der.children(buf, element)
    if len(entries) > MAX_ATTRIBUTES:
        raise LimitExceeded("too many signed attributes")
    for entry in entries:
        parts = der.children(buf, der.expect(entry, der.SEQUENCE, "attribute"))
        if len(parts) != 2:
            raise Malformed("malformed attribute")
        dotted = der.read_oid(buf, parts[0])
        values = der.children(buf, der.expect(parts[1], der.SET, "attribute values"))
        if dotted in found:
            raise Malformed("a signed attribute appears twice")
        if dotted in (alg.ID_CONTENT_TYPE, alg.ID_MESSAGE_DIGEST, alg.ID_SIGNING_TIME) and len(values) != 1:
            raise Malformed("a signed attribute must have exactly one value")
        if values:
            found[dotted] = (buf, values[0])
    return found


def _read_signing_time(value: tuple[memoryview, der.Element] | None) -> datetime.datetime | None:
    if value is None:
        return None
    buf, element = value
    text = bytes(buf[element.start : element.end]).decode("ascii", "replace")
    try:
        if element.tag == der.UTC_TIME:
            moment = _parse_time(text, "%y%m%d")
        elif element.tag == der.GENERALIZED_TIME:
            moment = _parse_time(text, "%Y%m%d")
        else:
            raise ValueError
    except ValueError:
        raise Malformed("malformed signing time") from None
    return moment


def _parse_time(text: str, date_format: str) -> datetime.datetime:
    short = date_format == "%y%m%d"
    if len(text) == (13 if short else 15) and text.endswith("Z") and text[:-1].isdigit():
        # The DER form (seconds, UTC), as nearly every signer writes it: read without strptime.
        year, rest = (_utc_time_year(text), text[2:]) if short else (int(text[:4]), text[4:])
        return datetime.datetime(
            year, int(rest[:2]), int(rest[2:4]), int(rest[4:6]), int(rest[6:8]), int(rest[8:10]), tzinfo=datetime.UTC
        )
    if text.endswith("Z"):
        text = text[:-1] + "+0000"
    body, zone = text[:-5], text[-5:]
    body = body.split(".")[0]
    date_length = 6 if date_format == "%y%m%d" else 8
    time_format = "%H%M%S" if len(body) == date_length + 6 else "%H%M"
    moment = datetime.datetime.strptime(body + zone, date_format + time_format + "%z")
    if short:  # strptime's %y puts 50-68 in this century; RFC 5280 puts them in the last
        moment = moment.replace(year=_utc_time_year(body))
    return moment.astimezone(datetime.UTC)


def _utc_time_year(text: str) -> int:
    """The year of a UTCTime: YY of 50 and above is 19YY, below 50 is 20YY (RFC 5280 4.1.2.5.1)."""
    two_digits = int(text[:2])
    return two_digits + (1900 if two_digits >= 50 else 2000)


def _read_capabilities(value: tuple[memoryview, der.Element] | None) -> tuple[str, ...] | None:
    # Walked with the DER reader: decoding it with pyasn1 cost a third of opening a
    # signed and encrypted 64 KB message.
    if value is None:
        return None
    buf, element = value
    der.expect(element, der.SEQUENCE, "SMIMECapabilities")
    names = []
    for capability in der.children(buf, element)[:MAX_ATTRIBUTES]:
        fields = der.children(buf, der.expect(capability, der.SEQUENCE, "SMIMECapabilities"))
        if not 1 <= len(fields) <= 2:
            raise Malformed("malformed SMIMECapabilities")
        dotted = der.read_oid(buf, fields[0])
        name = alg.CAPABILITY_NAMES.get(dotted, dotted)
        if name == "rsa-oaep" and len(fields) == 2:
            name = _oaep_capability(der.raw(buf, fields[1]))
        names.append(name)
    return tuple(names)


@functools.lru_cache(maxsize=64)
def _oaep_capability(params: bytes) -> str:
    # Cached: correspondents send the same few parameters, and pyasn1 is slow to decode them.
    try:
        decoded, _ = ber_decoder.decode(params, asn1Spec=rfc4055.RSAES_OAEP_params())
        hash_oid = str(decoded["hashFunc"]["algorithm"]) if decoded["hashFunc"].isValue else alg.DIGESTS["sha1"].oid
    except ASN1_ERRORS:
        return "rsa-oaep"
    if hash_oid == alg.DIGESTS["sha256"].oid:
        return "rsa-oaep"
    known = alg.DIGESTS_BY_OID.get(hash_oid)
    return f"rsa-oaep-{known.name if known else hash_oid}"

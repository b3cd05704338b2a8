"""EnvelopedData (RFC 5652 section 6) and AuthEnvelopedData (RFC 5083/5084, AES-GCM).

Recipients are reached by key transport (RSA PKCS#1 v1.5 or RSA-OAEP, RFC 3560/4055)
or by key agreement (ECDH ephemeral-static with the X9.63 KDF and AES key wrap, RFC
5753). Producing writes AES-CBC or AES-GCM; reading also accepts AES-192 and 3DES-CBC,
recipients named by issuer and serial number or by subjectKeyIdentifier, and GCM
parameters with or without the explicit ICV length.
"""

from __future__ import annotations

import functools
import hmac
import os
from collections.abc import Sequence
from typing import Protocol

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, keywrap
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pyasn1.codec.ber import decoder as ber_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_modules import rfc4055, rfc5084, rfc5280, rfc5753

from gatekeeper.cms import algorithms as alg
from gatekeeper.cms import der
from gatekeeper.cms.der import ASN1_ERRORS
from gatekeeper.cms.errors import LimitExceeded, Malformed, NotForMe, Tampered, UnsupportedAlgorithm
from gatekeeper.cms.signed import (
    Content,
    PrivateKey,
    find_certificate,
    issuer_and_serial,
    read_algorithm,
    read_content_info,
    subject_key_identifier,
)

MAX_RECIPIENTS = 1000
GCM_NONCE_SIZE = 12
GCM_TAG_SIZE = 16
_CURVES: dict[str, type[ec.EllipticCurve]] = {"secp256r1": ec.SECP256R1, "secp384r1": ec.SECP384R1}


class KeyPair(Protocol):
    """Anything with a certificate and its private key (e.g. ``UnlockedKey``)."""

    @property
    def certificate(self) -> x509.Certificate:
        """The certificate recipients are named by."""

    @property
    def private_key(self) -> PrivateKey:
        """The matching private key."""


@attrs.frozen
class Recipient:
    """A recipient's certificate and how to reach it.

    ``key_transport`` applies to RSA certificates (``rsa-pkcs1v15`` or ``rsa-oaep``); EC
    certificates always use ECDH. ``by_key_identifier`` names the recipient by
    subjectKeyIdentifier instead of issuer and serial number.
    """

    certificate: x509.Certificate
    key_transport: str = "rsa-pkcs1v15"
    by_key_identifier: bool = False


# -- producing -----------------------------------------------------------------------


def envelope_parts(
    content: Sequence[Content],
    recipients: Sequence[Recipient],
    *,
    cipher: str = "aes256-cbc",
) -> list[Content]:
    """Encrypt ``content`` (pieces, in order) to every recipient; return the DER as pieces.

    AES-CBC gives an EnvelopedData, AES-GCM an AuthEnvelopedData. The ciphertext is
    written once into a buffer and returned as a view: nothing is copied after that.
    """
    chosen = alg.cipher_by_name(cipher, producing=True)
    if not recipients:
        raise Malformed("an encrypted message needs at least one recipient")
    if len(recipients) > MAX_RECIPIENTS:
        raise LimitExceeded("too many recipients for one message")
    key = os.urandom(chosen.key_size)
    infos = [_recipient_info(recipient, key) for recipient in recipients]
    plain_length = sum(len(piece) for piece in content)
    if chosen.mode == "gcm":
        nonce = os.urandom(GCM_NONCE_SIZE)
        parameters = der.sequence(der.octet_string(nonce), der.integer(GCM_TAG_SIZE))
        encryptor: CipherContext = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
        cipher_length = plain_length
        trailer = b""
    else:
        iv = os.urandom(16)
        parameters = der.octet_string(iv)
        encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        pad = 16 - plain_length % 16
        cipher_length = plain_length + pad
        trailer = bytes((pad,)) * pad
    buffer = bytearray(cipher_length + 16)
    view = memoryview(buffer)
    written = 0
    for piece in (*content, trailer):
        if len(piece):
            written += encryptor.update_into(piece, view[written:])
    tail_bytes = encryptor.finalize()  # empty: the input was padded to whole blocks
    if tail_bytes:
        view[written : written + len(tail_bytes)] = tail_bytes
        written += len(tail_bytes)
    if written != cipher_length:
        raise AssertionError("ciphertext length mismatch")
    ciphertext = view[:cipher_length]
    any_v2 = any(r.by_key_identifier or not _recipient_template(r)[1] for r in recipients)
    version = der.integer(0 if chosen.mode == "gcm" or not any_v2 else 2)
    algorithm_id = der.algorithm(chosen.oid, parameters)
    content_header = der.header(der.context(0, constructed=False), cipher_length)
    eci_body_length = len(der.oid(alg.ID_DATA)) + len(algorithm_id) + len(content_header) + cipher_length
    eci_header = der.header(der.SEQUENCE, eci_body_length)
    head = version + der.der_set(infos)
    if chosen.mode == "gcm":
        tag = getattr(encryptor, "tag")  # noqa: B009 - the GCM encryptor's tag
        suffix = der.octet_string(tag)
        content_oid = alg.ID_AUTH_ENVELOPED_DATA
    else:
        suffix = b""
        content_oid = alg.ID_ENVELOPED_DATA
    body_length = len(head) + len(eci_header) + eci_body_length + len(suffix)
    body_header = der.header(der.SEQUENCE, body_length)
    outer_oid = der.oid(content_oid)
    explicit = der.header(der.context(0), len(body_header) + body_length)
    info = der.header(der.SEQUENCE, len(outer_oid) + len(explicit) + len(body_header) + body_length)
    prefix = b"".join(
        (info, outer_oid, explicit, body_header, head, eci_header, der.oid(alg.ID_DATA), algorithm_id, content_header)
    )
    return [prefix, ciphertext, suffix] if suffix else [prefix, ciphertext]


def envelope(content: bytes, recipients: Sequence[Recipient], *, cipher: str = "aes256-cbc") -> bytes:
    """Return the DER ContentInfo of ``content`` encrypted to ``recipients``."""
    return b"".join(envelope_parts([content], recipients, cipher=cipher))


@functools.lru_cache(maxsize=1024)
def _recipient_template(recipient: Recipient) -> tuple[object, bytes, bytes]:
    """A recipient's public key, its identifier prefix (version and rid) and key-encryption identifier."""
    public_key = recipient.certificate.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        if recipient.key_transport == "rsa-oaep":
            identifier = alg.OAEP_SHA256_IDENTIFIER
        elif recipient.key_transport == "rsa-pkcs1v15":
            identifier = alg.RSA_ENCRYPTION_IDENTIFIER
        else:
            raise UnsupportedAlgorithm(f"unknown key transport {recipient.key_transport!r}")
        if recipient.by_key_identifier:
            rid = der.tlv(der.context(0, constructed=False), subject_key_identifier(recipient.certificate))
            return public_key, der.integer(2) + rid, identifier
        return public_key, der.integer(0) + issuer_and_serial(recipient.certificate), identifier
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return public_key, b"", b""
    raise UnsupportedAlgorithm("a recipient's certificate has a key type that cannot receive mail")


_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_PKCS1V15 = padding.PKCS1v15()


def _recipient_info(recipient: Recipient, key: bytes) -> bytes:
    public_key, prefix, identifier = _recipient_template(recipient)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _key_agreement_info(recipient, public_key, key)
    assert isinstance(public_key, rsa.RSAPublicKey)
    pad = _OAEP if identifier is alg.OAEP_SHA256_IDENTIFIER else _PKCS1V15
    return der.sequence(prefix, identifier, der.octet_string(public_key.encrypt(key, pad)))


@functools.lru_cache(maxsize=64)
def _shared_info(wrap_identifier: bytes, ukm: bytes | None, key_size: int) -> bytes:
    # Cached: without a ukm (the usual case) it is one of a handful of values, and
    # encoding it with pyasn1 cost a tenth of opening a signed and encrypted message.
    info = rfc5753.ECC_CMS_SharedInfo()
    decoded, _ = ber_decoder.decode(wrap_identifier, asn1Spec=rfc5280.AlgorithmIdentifier())
    info["keyInfo"]["algorithm"] = decoded["algorithm"]
    if decoded["parameters"].isValue:
        info["keyInfo"]["parameters"] = decoded["parameters"]
    if ukm is not None:
        info["entityUInfo"] = ukm
    info["suppPubInfo"] = (key_size * 8).to_bytes(4, "big")
    encoded: bytes = der_encoder.encode(info)
    return encoded


def _key_agreement_info(recipient: Recipient, public_key: ec.EllipticCurvePublicKey, key: bytes) -> bytes:
    if public_key.curve.name not in _CURVES:
        raise UnsupportedAlgorithm(f"unsupported curve {public_key.curve.name}")
    ephemeral = ec.generate_private_key(public_key.curve)
    shared = ephemeral.exchange(ec.ECDH(), public_key)
    wrap_identifier = der.algorithm(alg.KEY_WRAP_BY_SIZE[len(key)])
    kek = X963KDF(hashes.SHA256(), len(key), _shared_info(wrap_identifier, None, len(key))).derive(shared)
    wrapped = keywrap.aes_key_wrap(kek, key)
    point = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    originator_key = der.tlv(
        der.context(1), der.algorithm(alg.ID_EC_PUBLIC_KEY), der.tlv(der.BIT_STRING, b"\x00" + point)
    )
    if recipient.by_key_identifier:
        rid = der.tlv(der.context(0), der.octet_string(subject_key_identifier(recipient.certificate)))
    else:
        rid = issuer_and_serial(recipient.certificate)
    return der.tlv(
        der.context(1),
        der.integer(3),
        der.tlv(der.context(0), originator_key),
        der.sequence(der.oid(alg.ECDH_SHA256_KDF), wrap_identifier),
        der.sequence(der.sequence(rid, der.octet_string(wrapped))),
    )


# -- reading ---------------------------------------------------------------------------


@attrs.frozen
class Decrypted:
    """The result of decrypting: the content and how it was protected.

    ``key_index`` is the position, in the keys offered, of the key that decrypted it;
    ``layer`` is ``"enveloped"`` or ``"auth-enveloped"``; ``key_encryption`` is
    ``rsa-pkcs1v15``, ``rsa-oaep`` or ``ecdh-<kdf hash>``.
    """

    content: bytes
    key_index: int
    layer: str
    cipher: str
    key_encryption: str
    recipient_count: int


def decrypt(data: Content, keys: Sequence[KeyPair]) -> Decrypted:
    """Decrypt a ContentInfo(EnvelopedData or AuthEnvelopedData) with one of ``keys``.

    Raises :class:`NotForMe` when no recipient is one of the keys, :class:`Tampered`
    when a named key cannot decrypt it or the authentication tag does not match.
    """
    buf, content_type, element = read_content_info(data)
    content, info = decrypt_element(buf, content_type, element, keys)
    return attrs.evolve(info, content=bytes(content))


def decrypt_element(
    buf: memoryview, content_type: str, element: der.Element, keys: Sequence[KeyPair]
) -> tuple[memoryview, Decrypted]:
    """Decrypt an already located (Auth)EnvelopedData; the content is returned as a view.

    The returned ``Decrypted`` carries an empty ``content``: the caller keeps the view
    (and copies only the part it reveals).
    """
    if content_type == alg.ID_ENVELOPED_DATA:
        layer = "enveloped"
    elif content_type == alg.ID_AUTH_ENVELOPED_DATA:
        layer = "auth-enveloped"
    else:
        raise Malformed("not a CMS EnvelopedData")
    fields = der.children(buf, der.expect(element, der.SEQUENCE, layer))
    if len(fields) < 3:
        raise Malformed(f"malformed {layer} structure")
    der.read_integer(buf, fields[0])
    index = 1
    if fields[index].tag == der.context(0):
        index += 1  # originatorInfo: certificates for key agreement, not needed here
    if len(fields) < index + 2:
        raise Malformed(f"malformed {layer} structure")
    infos = der.children(buf, der.expect(fields[index], der.SET, "recipient list"))
    if len(infos) > MAX_RECIPIENTS:
        raise LimitExceeded("too many recipients")
    content_info = der.children(buf, der.expect(fields[index + 1], der.SEQUENCE, "encrypted content"))
    rest = fields[index + 2 :]
    if len(content_info) != 3:
        raise Malformed("the encrypted content is missing")
    der.read_oid(buf, content_info[0])
    cipher_oid, cipher_params = read_algorithm(buf, content_info[1])
    cipher = alg.cipher_by_oid(cipher_oid)
    if content_info[2].tag not in (der.context(0, constructed=False), der.context(0)):
        raise Malformed("malformed encrypted content")
    if content_info[2].constructed:
        ciphertext: Content = der.octets(buf, content_info[2])
    else:
        ciphertext = buf[content_info[2].start : content_info[2].end]
    aad = b""
    tag = b""
    if layer == "auth-enveloped":
        if cipher.mode != "gcm":
            raise UnsupportedAlgorithm("AuthEnvelopedData needs an authenticated cipher (AES-GCM)")
        for extra in rest:
            if extra.tag == der.context(1):
                aad = b"\x31" + bytes(buf[extra.header_start + 1 : extra.next])
            elif extra.tag == der.OCTET_STRING:
                tag = bytes(buf[extra.start : extra.end])
        if not tag:
            raise Malformed("the authentication tag is missing")
    elif cipher.mode == "gcm":
        raise UnsupportedAlgorithm("AES-GCM must be sent as AuthEnvelopedData")
    matched = False
    for recipient in infos:
        for key_index, key_pair in enumerate(keys):
            attempt = _try_recipient(buf, recipient, key_pair, cipher.key_size)
            if attempt is None:
                continue
            matched = True
            content_key, key_encryption = attempt
            if content_key is None:
                continue
            plain = _decrypt_content(cipher, cipher_params, content_key, ciphertext, aad, tag)
            return plain, Decrypted(
                content=b"",
                key_index=key_index,
                layer=layer,
                cipher=cipher.name,
                key_encryption=key_encryption,
                recipient_count=len(infos),
            )
    if matched:
        raise Tampered("the message names your key but cannot be decrypted with it: it was damaged or altered")
    raise NotForMe("the message is not encrypted to any of your keys")


def _try_recipient(
    buf: memoryview, element: der.Element, key_pair: KeyPair, key_size: int
) -> tuple[bytes | None, str] | None:
    """Return None if the RecipientInfo is not for ``key_pair``, else (content key or None, method)."""
    if element.tag == der.SEQUENCE:
        return _try_key_transport(buf, element, key_pair, key_size)
    if element.tag == der.context(1):
        return _try_key_agreement(buf, element, key_pair, key_size)
    return None  # KEK, password and other recipient types: not for a personal key


def _try_key_transport(
    buf: memoryview, element: der.Element, key_pair: KeyPair, key_size: int
) -> tuple[bytes | None, str] | None:
    parts = der.children(buf, element)
    if len(parts) != 4:
        raise Malformed("malformed key transport recipient")
    if find_certificate(buf, parts[1], [key_pair.certificate]) is None:
        return None
    private_key = key_pair.private_key
    if not isinstance(private_key, rsa.RSAPrivateKey):
        return None
    dotted, params = read_algorithm(buf, parts[2])
    encrypted = bytes(der.octets(buf, der.expect(parts[3], der.OCTET_STRING, "encrypted key")))
    if dotted == alg.RSA_ENCRYPTION:
        pad: padding.AsymmetricPadding = padding.PKCS1v15()
        method = "rsa-pkcs1v15"
    elif dotted == alg.RSAES_OAEP:
        pad = _oaep_padding(params)
        method = "rsa-oaep"
    else:
        raise UnsupportedAlgorithm(f"unsupported key transport algorithm {dotted}")
    try:
        content_key = private_key.decrypt(encrypted, pad)
    except ValueError:
        return None, method
    # A wrong length means a wrong or altered key; compare without branching on content.
    return (content_key if len(content_key) == key_size else None), method


def _oaep_padding(params: bytes | None) -> padding.OAEP:
    hash_oid = mgf_oid = alg.DIGESTS["sha1"].oid
    if params is not None:
        try:
            decoded, _ = ber_decoder.decode(params, asn1Spec=rfc4055.RSAES_OAEP_params())
            if decoded["hashFunc"].isValue:
                hash_oid = str(decoded["hashFunc"]["algorithm"])
            if decoded["maskGenFunc"].isValue:
                if str(decoded["maskGenFunc"]["algorithm"]) != alg.ID_MGF1:
                    raise UnsupportedAlgorithm("unsupported RSA-OAEP mask generation function")
                mgf, _ = ber_decoder.decode(
                    bytes(decoded["maskGenFunc"]["parameters"]), asn1Spec=rfc4055.HashAlgorithm()
                )
                mgf_oid = str(mgf["algorithm"])
            if decoded["pSourceFunc"].isValue:
                label, _ = ber_decoder.decode(bytes(decoded["pSourceFunc"]["parameters"]))
                if bytes(label):
                    raise UnsupportedAlgorithm("RSA-OAEP with a label is not supported")
        except ASN1_ERRORS:
            raise Malformed("malformed RSA-OAEP parameters") from None
    return padding.OAEP(
        mgf=padding.MGF1(alg.digest_by_oid(mgf_oid).new()), algorithm=alg.digest_by_oid(hash_oid).new(), label=None
    )


def _try_key_agreement(
    buf: memoryview, element: der.Element, key_pair: KeyPair, key_size: int
) -> tuple[bytes | None, str] | None:
    parts = der.children(buf, element)
    if len(parts) not in (4, 5):
        raise Malformed("malformed key agreement recipient")
    der.read_integer(buf, parts[0])
    originator = der.children(buf, der.expect(parts[1], der.context(0), "key agreement originator"))
    ukm: bytes | None = None
    index = 2
    if parts[index].tag == der.context(1):
        inner = der.children(buf, parts[index])
        if len(inner) != 1:
            raise Malformed("malformed key agreement user keying material")
        ukm = bytes(der.octets(buf, der.expect(inner[0], der.OCTET_STRING, "user keying material")))
        index += 1
    if len(parts) != index + 2:
        raise Malformed("malformed key agreement recipient")
    scheme_oid, scheme_params = read_algorithm(buf, parts[index])
    encrypted_keys = der.children(buf, der.expect(parts[index + 1], der.SEQUENCE, "recipient encrypted keys"))
    if len(encrypted_keys) > MAX_RECIPIENTS:
        raise LimitExceeded("too many recipients")
    wanted: bytes | None = None
    for entry in encrypted_keys:
        rek = der.children(buf, der.expect(entry, der.SEQUENCE, "recipient encrypted key"))
        if len(rek) != 2:
            raise Malformed("malformed recipient encrypted key")
        rid = rek[0]
        if rid.tag == der.context(0):
            key_identifier = der.children(buf, rid)
            if not key_identifier:
                raise Malformed("malformed recipient key identifier")
            rid = key_identifier[0]
        if find_certificate(buf, rid, [key_pair.certificate]) is not None:
            wanted = bytes(der.octets(buf, der.expect(rek[1], der.OCTET_STRING, "encrypted key")))
            break
    if wanted is None:
        return None
    private_key = key_pair.private_key
    kdf_hash = alg.ECDH_KDF_DIGESTS.get(scheme_oid)
    if kdf_hash is None:
        raise UnsupportedAlgorithm(f"unsupported key agreement algorithm {scheme_oid}")
    method = f"ecdh-{kdf_hash}"
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or scheme_params is None:
        return None, method
    wrap_oid, _ = read_algorithm(*der.parse(scheme_params))
    wrap_size = alg.KEY_WRAPS.get(wrap_oid)
    if wrap_size is None:
        raise UnsupportedAlgorithm(f"unsupported key wrap algorithm {wrap_oid}")
    if len(originator) != 1 or originator[0].tag != der.context(1):
        raise UnsupportedAlgorithm("only ephemeral-static ECDH is supported")
    key_parts = der.children(buf, originator[0])
    if len(key_parts) != 2 or key_parts[1].tag != der.BIT_STRING or key_parts[1].length < 2:
        raise Malformed("malformed originator public key")
    point = bytes(buf[key_parts[1].start + 1 : key_parts[1].end])
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(private_key.curve, point)
        shared = private_key.exchange(ec.ECDH(), ephemeral)
    except ValueError:
        return None, method
    kek = X963KDF(alg.digest_by_name(kdf_hash).new(), wrap_size, _shared_info(scheme_params, ukm, wrap_size)).derive(
        shared
    )
    try:
        content_key = keywrap.aes_key_unwrap(kek, wanted)
    except (keywrap.InvalidUnwrap, ValueError):
        return None, method
    return (content_key if len(content_key) == key_size else None), method


def _decrypt_content(
    cipher: alg.Cipher, params: bytes | None, key: bytes, ciphertext: Content, aad: bytes, tag: bytes
) -> memoryview:
    if params is None:
        raise Malformed("the content encryption parameters are missing")
    length = len(ciphertext)
    buffer = bytearray(length + cipher.block_size)
    view = memoryview(buffer)
    if cipher.mode == "gcm":
        nonce, icv_length = _gcm_parameters(params)
        if icv_length is not None and icv_length != len(tag):
            raise Tampered("the authentication tag has the wrong length: the message was altered")
        if not 12 <= len(tag) <= 16:
            raise Tampered("the authentication tag has the wrong length: the message was altered")
        decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce, tag, min_tag_length=12)).decryptor()
        if aad:
            decryptor.authenticate_additional_data(aad)
        written = decryptor.update_into(ciphertext, view) if length else 0
        try:
            decryptor.finalize()
        except InvalidTag:
            raise Tampered("the message was altered: its authentication tag does not match") from None
        return view[:written]
    iv = _iv(params, cipher.block_size)
    if length == 0 or length % cipher.block_size:
        raise Tampered("the encrypted content has an impossible length: it was damaged or altered")
    block_cipher = TripleDES(key) if cipher.name == "des3-cbc" else algorithms.AES(key)
    cbc = Cipher(block_cipher, modes.CBC(iv)).decryptor()
    written = cbc.update_into(ciphertext, view)
    cbc.finalize()
    pad = buffer[written - 1]
    if not 1 <= pad <= cipher.block_size or not hmac.compare_digest(
        bytes(view[written - pad : written]), bytes((pad,)) * pad
    ):
        raise Tampered("the message cannot be decrypted: it was damaged or altered")
    return view[: written - pad]


def _iv(params: bytes, size: int) -> bytes:
    try:
        buf, element = der.parse(params, expect=der.OCTET_STRING)
    except Malformed:
        raise Malformed("malformed content encryption parameters") from None
    value = bytes(buf[element.start : element.end])
    if len(value) != size:
        raise Malformed("malformed content encryption parameters")
    return value


def _gcm_parameters(params: bytes) -> tuple[bytes, int | None]:
    try:
        decoded, rest = ber_decoder.decode(params, asn1Spec=rfc5084.GCMParameters())
    except ASN1_ERRORS:
        raise Malformed("malformed AES-GCM parameters") from None
    nonce = bytes(decoded["aes-nonce"])
    if not 8 <= len(nonce) <= 64 or rest:
        raise Malformed("malformed AES-GCM parameters")
    buf, element = der.parse(params)
    explicit = len(der.children(buf, element)) == 2
    return nonce, (int(decoded["aes-ICVlen"]) if explicit else None)

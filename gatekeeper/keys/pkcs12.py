"""Gatekeeper's own PKCS#12 (RFC 7292) files: one password-derived key opens them, no MAC.

Why not ``cryptography``'s serializer: it writes a MAC keyed with only 2048 PKCS#12-KDF
iterations, and readers check it first. Measured here, a wrong password is rejected in
0.2 ms, so the MAC is a fast offline password oracle that makes the 600,000 PBKDF2
rounds on the key bag worthless. Loading with ``load_pkcs12`` also holds the GIL for
~270 ms, whereas ``PBKDF2HMAC`` releases it (91 ms at 600k rounds), and the login path
runs the KDF in threads.

So a sealed file here is::

    PFX (version 3, no MacData)
      authSafe: data -> AuthenticatedSafe
        data -> SafeContents: certBag (user certificate; friendlyName, localKeyId),
                              certBag (each CA certificate of the chain)
        data -> SafeContents: pkcs8ShroudedKeyBag (friendlyName, localKeyId)
                              = PBES2(PBKDF2-HMAC-SHA256(salt, iterations), AES-256-CBC, random IV)

Certificates are public and stay unencrypted. The password is UTF-8 encoded (what
OpenSSL does for PBES2), and the salt and iteration count are stored in the file, so the
count can be raised later. All key files of one user share the user's salt and count:
:func:`derive_key` runs once per login and :func:`unseal` then opens every key with the
derived key (cheap: AES and a DER parse). A password change picks a new salt and re-seals
every file.

Interoperability (tested): ``openssl pkcs12`` 3.0 (3.0.22 here) reads a file without
MacData as it is, printing "Warning: MAC is absent!" on stderr; ``-nomacver`` is not
needed (it only silences the warning)::

    openssl pkcs12 -in alice.p12 -passin file:password.txt -nodes

``cryptography``'s ``pkcs12.load_pkcs12`` reads the files as they are (OpenSSL's
``PKCS12_parse`` only checks a MAC that is present). In the other direction,
:func:`unseal` opens a PBES2 file made by ``openssl pkcs12 -export -certpbe NONE``
(ignoring its MAC), and :func:`open_pkcs12` opens a default ``openssl pkcs12 -export``
file (whose encrypted certificate safe has a salt of its own) given the password, so an
administrator can import an existing key.

Errors: :class:`~gatekeeper.errors.BadPassword` when the key does not decrypt or does not
belong to the certificate, :class:`~gatekeeper.errors.KeyStoreError` for a malformed or
unsupported file. Neither message ever contains key material or the password.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.hazmat.primitives.serialization import pkcs12 as crypto_pkcs12
from pyasn1.codec.ber import decoder
from pyasn1.codec.der import encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import char, univ
from pyasn1_modules import rfc5280, rfc5652, rfc5958, rfc7292, rfc8018

from gatekeeper.errors import BadPassword, KeyStoreError
from gatekeeper.keys.identity import PrivateKey, UnlockedKey

__all__ = [
    "DERIVED_KEY_LENGTH",
    "MAX_ITERATIONS",
    "SALT_LENGTH",
    "KdfParameters",
    "check_key_matches",
    "derive_key",
    "kdf_parameters",
    "key_id_for",
    "new_kdf_parameters",
    "open_pkcs12",
    "pkcs12_kdf",
    "seal",
    "trips_gnupg_22",
    "unseal",
]

DERIVED_KEY_LENGTH = 32
SALT_LENGTH = 16
# A file's iteration count is read before any password check; a hostile or damaged
# file must not be able to make a login burn minutes of CPU.
MAX_ITERATIONS = 10_000_000
_MIN_SALT = 8
_MAX_SALT = 64

_AES_KEY_LENGTHS = {
    rfc8018.aes128_CBC_PAD: 16,
    rfc8018.aes192_CBC_PAD: 24,
    rfc8018.aes256_CBC_PAD: 32,
}
_PRF_HASHES: dict[univ.ObjectIdentifier, Callable[[], hashes.HashAlgorithm]] = {
    rfc8018.id_hmacWithSHA1: hashes.SHA1,
    rfc8018.id_hmacWithSHA256: hashes.SHA256,
    rfc8018.id_hmacWithSHA384: hashes.SHA384,
    rfc8018.id_hmacWithSHA512: hashes.SHA512,
}
_X509_CERTIFICATE = univ.ObjectIdentifier("1.2.840.113549.1.9.22.1")


@attrs.frozen
class KdfParameters:
    """How a sealed file's key was derived from the password: PBKDF2-HMAC-SHA256 with these."""

    salt: bytes
    iterations: int


@attrs.frozen
class _Pbes2:
    """One PBES2-encrypted blob with the parameters needed to decrypt it."""

    salt: bytes
    iterations: int
    prf: univ.ObjectIdentifier
    key_length: int
    iv: bytes
    ciphertext: bytes


@attrs.frozen
class _Bag:
    """A bag read from a file: a certificate (DER) or a still-encrypted key, with its localKeyId."""

    local_key_id: bytes | None
    certificate: bytes | None = None
    shrouded_key: _Pbes2 | None = None


# -- key derivation -----------------------------------------------------------------


def derive_key(password: str, salt: bytes, iterations: int) -> bytes:
    """Return the 32-byte PBKDF2-HMAC-SHA256 key for ``password`` (UTF-8) and the parameters.

    This is the one slow step of a login (~90 ms at 600,000 iterations); it releases the
    GIL, so it can run in a thread without stalling the reactor.
    """
    if not isinstance(password, str):
        raise TypeError("password must be str")
    _check_kdf_parameters(salt, iterations)
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=DERIVED_KEY_LENGTH, salt=salt, iterations=iterations)
    return kdf.derive(password.encode("utf-8"))


def new_kdf_parameters(iterations: int) -> KdfParameters:
    """Return fresh parameters: a random 16-byte salt and ``iterations``."""
    parameters = KdfParameters(os.urandom(SALT_LENGTH), iterations)
    _check_kdf_parameters(parameters.salt, parameters.iterations)
    return parameters


def _check_kdf_parameters(salt: bytes, iterations: int) -> None:
    if not isinstance(salt, bytes) or not _MIN_SALT <= len(salt) <= _MAX_SALT:
        raise KeyStoreError(f"a KDF salt must be {_MIN_SALT} to {_MAX_SALT} bytes")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or not 1 <= iterations <= MAX_ITERATIONS:
        raise KeyStoreError(f"a KDF iteration count must be between 1 and {MAX_ITERATIONS}")


# -- writing ------------------------------------------------------------------------


def key_id_for(certificate: x509.Certificate) -> str:
    """Return the identifier Gatekeeper gives the key pair of ``certificate`` (16 hex digits).

    Derived from the certificate's SHA-256 fingerprint, so it is stable, safe as a file
    name and the same wherever it is computed.
    """
    return certificate.fingerprint(hashes.SHA256()).hex()[:16]


def seal(
    private_key: PrivateKey,
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate],
    *,
    derived_key: bytes,
    salt: bytes,
    iterations: int,
    friendly_name: str,
) -> bytes:
    """Return a PKCS#12 file holding ``private_key`` encrypted under ``derived_key``.

    ``derived_key`` must be ``derive_key(password, salt, iterations)``; ``salt`` and
    ``iterations`` are written into the file so that readers (ours, OpenSSL) can derive
    it again. ``chain`` is the CA certificates above ``certificate``, issuer first.
    Raises :class:`BadPassword` if the key does not belong to the certificate (nothing
    would ever open such a file) and :class:`KeyStoreError` for unusable parameters.
    """
    _check_kdf_parameters(salt, iterations)
    if len(derived_key) != DERIVED_KEY_LENGTH:
        raise KeyStoreError("the derived key must be 32 bytes")
    if not friendly_name or len(friendly_name) > 255:
        raise KeyStoreError("a friendly name must be 1 to 255 characters")
    check_key_matches(private_key, certificate)

    local_key_id = certificate.fingerprint(hashes.SHA1())  # noqa: S303 - the PKCS#12 convention, not security
    attributes = _bag_attributes(friendly_name, local_key_id)

    certificate_bags = rfc7292.SafeContents()
    certificate_bags.append(_certificate_bag(certificate, attributes))
    for issuer in chain:
        certificate_bags.append(_certificate_bag(issuer, None))

    pkcs8 = private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(pkcs8) + padder.finalize()
    encryptor = Cipher(algorithms.AES(derived_key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()

    shrouded = rfc5958.EncryptedPrivateKeyInfo()
    shrouded["encryptionAlgorithm"] = _pbes2_algorithm(salt, iterations, iv)
    shrouded["encryptedData"] = ciphertext
    key_bag = rfc7292.SafeBag()
    key_bag["bagId"] = rfc7292.id_pkcs8ShroudedKeyBag
    key_bag["bagValue"] = univ.Any(encoder.encode(shrouded))
    _set_attributes(key_bag, attributes)
    key_bags = rfc7292.SafeContents()
    key_bags.append(key_bag)

    authenticated_safe = rfc7292.AuthenticatedSafe()
    authenticated_safe.append(_data_content_info(encoder.encode(certificate_bags)))
    authenticated_safe.append(_data_content_info(encoder.encode(key_bags)))

    pfx = rfc7292.PFX()
    pfx["version"] = 3
    pfx["authSafe"] = _data_content_info(encoder.encode(authenticated_safe))
    return bytes(encoder.encode(pfx))


def _data_content_info(payload: bytes) -> rfc5652.ContentInfo:
    info = rfc5652.ContentInfo()
    info["contentType"] = rfc5652.id_data
    info["content"] = univ.Any(encoder.encode(univ.OctetString(payload)))
    return info


def _certificate_bag(certificate: x509.Certificate, attributes: list[rfc5652.Attribute] | None) -> rfc7292.SafeBag:
    cert_bag = rfc7292.CertBag()
    cert_bag["certId"] = _X509_CERTIFICATE
    cert_bag["certValue"] = univ.Any(
        encoder.encode(univ.OctetString(certificate.public_bytes(serialization.Encoding.DER)))
    )
    bag = rfc7292.SafeBag()
    bag["bagId"] = rfc7292.id_certBag
    bag["bagValue"] = univ.Any(encoder.encode(cert_bag))
    if attributes:
        _set_attributes(bag, attributes)
    return bag


def _bag_attributes(friendly_name: str, local_key_id: bytes) -> list[rfc5652.Attribute]:
    name = rfc5652.Attribute()
    name["attrType"] = rfc7292.pkcs_9_at_friendlyName
    name["attrValues"].append(univ.Any(encoder.encode(char.BMPString(friendly_name))))
    key_id = rfc5652.Attribute()
    key_id["attrType"] = rfc7292.pkcs_9_at_localKeyId
    key_id["attrValues"].append(univ.Any(encoder.encode(univ.OctetString(local_key_id))))
    return [name, key_id]


def _set_attributes(bag: rfc7292.SafeBag, attributes: list[rfc5652.Attribute]) -> None:
    field = bag["bagAttributes"]
    for attribute in attributes:
        field.append(attribute)


def _pbes2_algorithm(salt: bytes, iterations: int, iv: bytes) -> rfc5280.AlgorithmIdentifier:
    prf = rfc5280.AlgorithmIdentifier()
    prf["algorithm"] = rfc8018.id_hmacWithSHA256
    prf["parameters"] = univ.Any(encoder.encode(univ.Null("")))
    kdf_params = rfc8018.PBKDF2_params()
    kdf_params["salt"]["specified"] = salt
    kdf_params["iterationCount"] = iterations
    kdf_params["prf"] = prf
    kdf = rfc5280.AlgorithmIdentifier()
    kdf["algorithm"] = rfc8018.id_PBKDF2
    kdf["parameters"] = univ.Any(encoder.encode(kdf_params))
    scheme = rfc5280.AlgorithmIdentifier()
    scheme["algorithm"] = rfc8018.aes256_CBC_PAD
    scheme["parameters"] = univ.Any(encoder.encode(univ.OctetString(iv)))
    pbes2 = rfc8018.PBES2_params()
    pbes2["keyDerivationFunc"] = kdf
    pbes2["encryptionScheme"] = scheme
    algorithm = rfc5280.AlgorithmIdentifier()
    algorithm["algorithm"] = rfc8018.id_PBES2
    algorithm["parameters"] = univ.Any(encoder.encode(pbes2))
    return algorithm


# -- reading ------------------------------------------------------------------------


def kdf_parameters(pfx: bytes) -> KdfParameters:
    """Return the salt and iteration count that the file's private key was sealed with.

    Raises :class:`KeyStoreError` when the file is malformed, holds no encrypted key, or
    uses a key derivation other than PBKDF2-HMAC-SHA256.
    """
    try:
        shrouded = _first_encryption(pfx)
    except _LegacyFormat:
        raise KeyStoreError("the PKCS#12 file uses legacy encryption (3DES/RC2); import it with its password") from None
    if shrouded.prf != rfc8018.id_hmacWithSHA256:
        raise KeyStoreError("the PKCS#12 key is not encrypted with PBKDF2-HMAC-SHA256")
    return KdfParameters(shrouded.salt, shrouded.iterations)


def unseal(pfx: bytes, derived_key: bytes) -> UnlockedKey:
    """Decrypt a sealed file with ``derive_key(password, *kdf_parameters(pfx))``.

    Returns the private key, its certificate and the chain. Raises :class:`BadPassword`
    when the key does not decrypt or does not belong to the certificate, and
    :class:`KeyStoreError` for a malformed file, or one with parts encrypted under other
    salts (use :func:`open_pkcs12` with the password for those).
    """
    if len(derived_key) != DERIVED_KEY_LENGTH:
        raise KeyStoreError("the derived key must be 32 bytes")
    expected = kdf_parameters(pfx)

    def key_for(encrypted: _Pbes2) -> bytes:
        if (
            encrypted.salt != expected.salt
            or encrypted.iterations != expected.iterations
            or encrypted.prf != rfc8018.id_hmacWithSHA256
        ):
            raise KeyStoreError("parts of the PKCS#12 file use other salts; import it with its password")
        # PBKDF2-HMAC-SHA256 output shorter than one SHA-256 block is a prefix of the 32 bytes.
        return derived_key[: encrypted.key_length]

    try:
        return _open(pfx, key_for)
    except _LegacyFormat:  # kdf_parameters has refused these already; kept for a mixed file
        raise KeyStoreError("the PKCS#12 file uses legacy encryption; import it with its password") from None


def open_pkcs12(pfx: bytes, password: str) -> UnlockedKey:
    """Open any PBES2 PKCS#12 file (e.g. from ``openssl pkcs12 -export``) with its password.

    For importing keys made elsewhere: every encrypted part may have its own salt,
    iteration count and PRF (HMAC-SHA1/256/384/512) and AES-128/192/256-CBC. A MAC, if
    present, is ignored: the key must still decrypt and match its certificate. Files
    using the legacy PKCS#12 PBE algorithms (3DES, RC2) are read through
    ``cryptography`` instead, which verifies their MAC.
    """
    derived: dict[tuple[bytes, int, univ.ObjectIdentifier], bytes] = {}

    def key_for(encrypted: _Pbes2) -> bytes:
        cache_key = (encrypted.salt, encrypted.iterations, encrypted.prf)
        if cache_key not in derived:
            _check_kdf_parameters(encrypted.salt, encrypted.iterations)
            kdf = PBKDF2HMAC(
                algorithm=_PRF_HASHES[encrypted.prf](),
                length=DERIVED_KEY_LENGTH,
                salt=encrypted.salt,
                iterations=encrypted.iterations,
            )
            derived[cache_key] = kdf.derive(password.encode("utf-8"))
        # PBKDF2 with dkLen <= hLen is a prefix of the longer output.
        return derived[cache_key][: encrypted.key_length]

    try:
        return _open(pfx, key_for)
    except _LegacyFormat:
        return _open_legacy(pfx, password)


class _LegacyFormat(Exception):
    """The file uses PKCS#12 PBE (not PBES2): left to cryptography's reader."""


def _open_legacy(pfx: bytes, password: str) -> UnlockedKey:
    try:
        loaded = crypto_pkcs12.load_pkcs12(pfx, password.encode("utf-8"))
    except ValueError:
        raise BadPassword("the password does not decrypt the PKCS#12 file") from None
    except UnsupportedAlgorithm:
        raise KeyStoreError("the PKCS#12 file uses an unsupported algorithm") from None
    if loaded.key is None or loaded.cert is None:
        raise KeyStoreError("the PKCS#12 file holds no private key with its certificate")
    key = loaded.key
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyStoreError("the PKCS#12 key is neither RSA nor EC")
    certificate = loaded.cert.certificate
    check_key_matches(key, certificate)
    chain = tuple(c.certificate for c in loaded.additional_certs)
    return UnlockedKey(key_id_for(certificate), certificate, key, chain)


def _open(pfx: bytes, key_for: Callable[[_Pbes2], bytes]) -> UnlockedKey:
    """Read every bag, decrypting encrypted safes and the key with ``key_for``'s keys."""
    parsed = _parse(pfx)
    bags = list(parsed.bags)
    for encrypted in parsed.encrypted_safes:
        bags.extend(_safe_contents(_decrypt(encrypted, key_for(encrypted), _corrupt_safe)))

    key_bags = [bag for bag in bags if bag.shrouded_key is not None]
    certificates = [bag for bag in bags if bag.certificate is not None]
    if len(key_bags) != 1:
        raise KeyStoreError(f"a PKCS#12 file to open must hold exactly one private key, found {len(key_bags)}")
    if not certificates:
        raise KeyStoreError("the PKCS#12 file holds no certificate")
    key_bag = key_bags[0]
    assert key_bag.shrouded_key is not None
    pkcs8 = _decrypt(key_bag.shrouded_key, key_for(key_bag.shrouded_key), _wrong_password)
    private_key = _load_pkcs8(pkcs8)

    loaded = [(bag, _load_certificate(bag.certificate)) for bag in certificates if bag.certificate]
    leaf = _find_leaf(private_key, key_bag.local_key_id, loaded)
    check_key_matches(private_key, leaf)
    chain = tuple(certificate for _, certificate in loaded if certificate != leaf)
    return UnlockedKey(key_id_for(leaf), leaf, private_key, chain)


def _find_leaf(
    private_key: PrivateKey, local_key_id: bytes | None, loaded: list[tuple[_Bag, x509.Certificate]]
) -> x509.Certificate:
    if local_key_id is not None:
        for bag, certificate in loaded:
            if bag.local_key_id == local_key_id:
                return certificate
    public = _public_der(private_key.public_key())
    for _, certificate in loaded:
        if _public_der(certificate.public_key()) == public:
            return certificate
    # No certificate holds this public key: most likely the password was wrong and the
    # decrypted bytes happened to parse. Either way the key cannot be used.
    raise BadPassword("the password does not decrypt the private key")


def _public_der(key: object) -> bytes:
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _first_encryption(pfx: bytes) -> _Pbes2:
    """The parameters of the shrouded key bag (or, failing that, the first encrypted safe)."""
    parsed = _parse(pfx)
    for bag in parsed.bags:
        if bag.shrouded_key is not None:
            return bag.shrouded_key
    if not parsed.encrypted_safes:
        raise KeyStoreError("the PKCS#12 file holds no encrypted private key")
    return parsed.encrypted_safes[0]


@attrs.frozen
class _Parsed:
    """What a file holds before any decryption: its clear bags and its encrypted safes."""

    bags: tuple[_Bag, ...]
    encrypted_safes: tuple[_Pbes2, ...]


# pyasn1 decoding is pure Python (~1 ms a file, holding the GIL); a login reads each file
# twice (kdf_parameters, then unseal), so the parse of recent files is kept. It holds
# only public data and ciphertext.
@functools.lru_cache(maxsize=256)
def _parse(pfx: bytes) -> _Parsed:
    bags: list[_Bag] = []
    encrypted_safes: list[_Pbes2] = []
    for content_type, payload in _authenticated_safe(pfx):
        if content_type == rfc5652.id_data:
            bags.extend(_safe_contents(payload))
        elif content_type == rfc5652.id_encryptedData:
            encrypted_safes.append(_encrypted_data(payload))
        else:
            raise KeyStoreError("the PKCS#12 file uses public-key encrypted safes, which are not supported")
    return _Parsed(tuple(bags), tuple(encrypted_safes))


def _authenticated_safe(pfx: bytes) -> list[tuple[univ.ObjectIdentifier, bytes]]:
    """Return (contentType, payload) per ContentInfo: id-data payloads unwrapped, others as DER."""
    try:
        decoded, rest = decoder.decode(pfx, asn1Spec=rfc7292.PFX())
        if rest or int(decoded["version"]) != 3:
            raise KeyStoreError("not a PKCS#12 (version 3) file")
        if decoded["authSafe"]["contentType"] != rfc5652.id_data:
            raise KeyStoreError("the PKCS#12 file is signed, not password-protected; not supported")
        authenticated_safe, rest = decoder.decode(
            _octets(decoded["authSafe"]["content"]), asn1Spec=rfc7292.AuthenticatedSafe()
        )
        if rest:
            raise KeyStoreError("trailing data in the PKCS#12 authenticated safe")
        safes = []
        for info in authenticated_safe:
            content_type = info["contentType"]
            content = bytes(info["content"])
            safes.append((content_type, _octets(univ.Any(content)) if content_type == rfc5652.id_data else content))
        return safes
    except (PyAsn1Error, TypeError, ValueError):
        raise KeyStoreError("not a well-formed PKCS#12 file") from None


def _octets(content: univ.Any) -> bytes:
    value, rest = decoder.decode(bytes(content), asn1Spec=univ.OctetString())
    if rest:
        raise KeyStoreError("trailing data in a PKCS#12 content")
    return bytes(value)


def _safe_contents(payload: bytes) -> list[_Bag]:
    try:
        contents, rest = decoder.decode(payload, asn1Spec=rfc7292.SafeContents())
        if rest:
            raise KeyStoreError("trailing data in a PKCS#12 safe")
        bags = []
        for safe_bag in contents:
            bag_id = safe_bag["bagId"]
            local_key_id = _local_key_id(safe_bag)
            value = bytes(safe_bag["bagValue"])
            if bag_id == rfc7292.id_certBag:
                cert_bag, rest = decoder.decode(value, asn1Spec=rfc7292.CertBag())
                if rest:
                    raise KeyStoreError("trailing data in a PKCS#12 certificate bag")
                if cert_bag["certId"] == _X509_CERTIFICATE:
                    bags.append(_Bag(local_key_id, certificate=_octets(cert_bag["certValue"])))
            elif bag_id == rfc7292.id_pkcs8ShroudedKeyBag:
                shrouded, rest = decoder.decode(value, asn1Spec=rfc5958.EncryptedPrivateKeyInfo())
                if rest:
                    raise KeyStoreError("trailing data in a PKCS#12 key bag")
                encrypted = _pbes2(shrouded["encryptionAlgorithm"], bytes(shrouded["encryptedData"]))
                bags.append(_Bag(local_key_id, shrouded_key=encrypted))
            elif bag_id == rfc7292.id_keyBag:
                # An unencrypted key has no place in a key store and must not be imported silently.
                raise KeyStoreError("the PKCS#12 file holds an unencrypted private key; refusing it")
            # CRL, secret and nested bags carry nothing Gatekeeper uses: skipped.
        return bags
    except (PyAsn1Error, TypeError, ValueError):
        raise KeyStoreError("not a well-formed PKCS#12 file") from None


def _local_key_id(safe_bag: rfc7292.SafeBag) -> bytes | None:
    attributes = safe_bag["bagAttributes"]
    if not attributes.isValue:
        return None
    for attribute in attributes:
        if attribute["attrType"] == rfc7292.pkcs_9_at_localKeyId and len(attribute["attrValues"]):
            return _octets(attribute["attrValues"][0])
    return None


def _encrypted_data(payload: bytes) -> _Pbes2:
    try:
        encrypted_data, rest = decoder.decode(payload, asn1Spec=rfc5652.EncryptedData())
        if rest:
            raise KeyStoreError("trailing data in a PKCS#12 encrypted safe")
        info = encrypted_data["encryptedContentInfo"]
        if info["contentType"] != rfc5652.id_data or not info["encryptedContent"].isValue:
            raise KeyStoreError("a PKCS#12 encrypted safe holds no data")
        return _pbes2(info["contentEncryptionAlgorithm"], bytes(info["encryptedContent"]))
    except (PyAsn1Error, TypeError, ValueError):
        raise KeyStoreError("not a well-formed PKCS#12 file") from None


def _pbes2(algorithm: rfc5280.AlgorithmIdentifier, ciphertext: bytes) -> _Pbes2:
    """Parse a PBES2 AlgorithmIdentifier with PBKDF2 and AES-CBC; anything else is refused."""
    oid = algorithm["algorithm"]
    if oid != rfc8018.id_PBES2:
        if tuple(oid)[:-1] == tuple(rfc7292.pkcs_12PbeIds):
            raise _LegacyFormat()
        raise KeyStoreError("the PKCS#12 file uses an unsupported encryption (expected PBES2)")
    params, rest = decoder.decode(bytes(algorithm["parameters"]), asn1Spec=rfc8018.PBES2_params())
    if rest:
        raise KeyStoreError("trailing data in PBES2 parameters")
    kdf = params["keyDerivationFunc"]
    scheme = params["encryptionScheme"]
    if kdf["algorithm"] != rfc8018.id_PBKDF2:
        raise KeyStoreError("the PKCS#12 file uses an unsupported key derivation (expected PBKDF2)")
    if scheme["algorithm"] not in _AES_KEY_LENGTHS:
        raise KeyStoreError("the PKCS#12 file uses an unsupported cipher (expected AES-CBC)")
    kdf_params, rest = decoder.decode(bytes(kdf["parameters"]), asn1Spec=rfc8018.PBKDF2_params())
    if rest or kdf_params["salt"].getName() != "specified":
        raise KeyStoreError("unsupported PBKDF2 parameters in the PKCS#12 file")
    prf = kdf_params["prf"]["algorithm"] if kdf_params["prf"].isValue else rfc8018.id_hmacWithSHA1
    if prf not in _PRF_HASHES:
        raise KeyStoreError("the PKCS#12 file uses an unsupported PBKDF2 hash")
    key_length = _AES_KEY_LENGTHS[scheme["algorithm"]]
    if kdf_params["keyLength"].isValue and int(kdf_params["keyLength"]) != key_length:
        raise KeyStoreError("the PKCS#12 file's PBKDF2 key length does not fit its cipher")
    iv, rest = decoder.decode(bytes(scheme["parameters"]), asn1Spec=univ.OctetString())
    if rest or len(iv) != 16:
        raise KeyStoreError("the PKCS#12 file has a bad AES IV")
    salt = bytes(kdf_params["salt"]["specified"])
    iterations = int(kdf_params["iterationCount"])
    _check_kdf_parameters(salt, iterations)
    if not ciphertext or len(ciphertext) % 16:
        raise KeyStoreError("the PKCS#12 file's encrypted data is truncated")
    return _Pbes2(salt, iterations, prf, key_length, bytes(iv), ciphertext)


def _wrong_password() -> Exception:
    return BadPassword("the password does not decrypt the private key")


def _corrupt_safe() -> Exception:
    # An encrypted certificate safe that does not decrypt: the same cause as a key.
    return BadPassword("the password does not decrypt the PKCS#12 file")


def _decrypt(encrypted: _Pbes2, key: bytes, failure: Callable[[], Exception]) -> bytes:
    decryptor = Cipher(algorithms.AES(key), modes.CBC(encrypted.iv)).decryptor()
    padded = decryptor.update(encrypted.ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise failure() from None


def _load_pkcs8(pkcs8: bytes) -> PrivateKey:
    try:
        # Full RSA validation (primality checks) holds the GIL ~110 ms for RSA-3072;
        # check_key_matches does the checks that matter, in microseconds.
        key = serialization.load_der_private_key(pkcs8, password=None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Almost always a wrong password whose garbage happened to end in valid padding.
        raise _wrong_password() from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyStoreError("the private key is neither RSA nor EC")
    return key


def _load_certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise KeyStoreError("the PKCS#12 file holds a malformed certificate") from None


def check_key_matches(private_key: PrivateKey, certificate: x509.Certificate) -> None:
    """Raise :class:`BadPassword` unless ``private_key`` is consistent and belongs to ``certificate``.

    Stands in for the full RSA validation skipped at load: the public numbers must equal
    the certificate's, and the CRT parameters must fit together (``p*q == n`` and so on),
    all cheap integer arithmetic. A key altered at rest (PBES2-CBC has no integrity
    check) then cannot yield faulty CRT signatures that would leak a factor. For EC, the
    public point is recomputed from the private scalar.
    """
    public = certificate.public_key()
    if isinstance(private_key, rsa.RSAPrivateKey) and isinstance(public, rsa.RSAPublicKey):
        numbers = private_key.private_numbers()
        p, q, d = numbers.p, numbers.q, numbers.d
        n, e = numbers.public_numbers.n, numbers.public_numbers.e
        consistent = (
            numbers.public_numbers == public.public_numbers()
            and p > 1
            and q > 1
            and p * q == n
            and numbers.dmp1 == d % (p - 1)
            and numbers.dmq1 == d % (q - 1)
            and (numbers.iqmp * q) % p == 1
            and (d * e) % (p - 1) == 1
            and (d * e) % (q - 1) == 1
        )
        if consistent:
            return
    elif (
        isinstance(private_key, ec.EllipticCurvePrivateKey)
        and isinstance(public, ec.EllipticCurvePublicKey)
        and private_key.curve.name == public.curve.name
    ):
        recomputed = ec.derive_private_key(private_key.private_numbers().private_value, private_key.curve)
        if recomputed.public_key().public_numbers() == public.public_numbers():
            return
    raise BadPassword("the private key does not belong to its certificate")


# -- GnuPG 2.2 and legacy files -----------------------------------------------------------

_PBE_SHA1_3DES = univ.ObjectIdentifier("1.2.840.113549.1.12.1.3")
_PBE_SHA1_BLOCK = 64
_LEGACY_MAX_ITERATIONS = 100_000


def trips_gnupg_22(pfx: bytes, password: str) -> bool:
    """Whether GnuPG 2.2 would fail to open this legacy (PBE-SHA1-3DES) PKCS#12 file with the right password.

    GnuPG 2.2's reader (``minip12.c``) computes the PKCS#12 key derivation (RFC 7292,
    appendix B.2) with big integers and writes each adjusted block ``I_j`` back without
    its leading zero octets: when one starts with a zero, gpgsm derives another key and
    refuses the password. Which files are hit depends on their random salts only.
    Measured with gpgsm 2.2.40 on 1,200 files: the 18 predicted here all failed to
    import, and the 296 others tried all imported. Files using PBES2 are not affected.
    Meant for files Gatekeeper writes (the derivation runs in Python: at most
    100,000 iterations, else :class:`KeyStoreError`).
    """
    for algorithm in _legacy_pbe_algorithms(pfx):
        params, _ = decoder.decode(bytes(algorithm["parameters"]), asn1Spec=rfc7292.Pkcs_12PbeParams())
        salt, iterations = bytes(params["salt"]), int(params["iterations"])
        if not 1 <= iterations <= _LEGACY_MAX_ITERATIONS:
            raise KeyStoreError("the PKCS#12 file's iteration count is out of range")
        # 3DES: a 24-octet key (ID 1) and an 8-octet IV (ID 2).
        if pkcs12_kdf(password, salt, iterations, 1, 24)[1] or pkcs12_kdf(password, salt, iterations, 2, 8)[1]:
            return True
    return False


def _legacy_pbe_algorithms(pfx: bytes) -> list[rfc5280.AlgorithmIdentifier]:
    """The PBE-SHA1-3DES algorithm identifiers of the key bags and encrypted safes."""
    found = []
    try:
        for content_type, payload in _authenticated_safe(pfx):
            if content_type == rfc5652.id_encryptedData:
                encrypted, _ = decoder.decode(payload, asn1Spec=rfc5652.EncryptedData())
                found.append(encrypted["encryptedContentInfo"]["contentEncryptionAlgorithm"])
            elif content_type == rfc5652.id_data:
                contents, _ = decoder.decode(payload, asn1Spec=rfc7292.SafeContents())
                for safe_bag in contents:
                    if safe_bag["bagId"] == rfc7292.id_pkcs8ShroudedKeyBag:
                        value = bytes(safe_bag["bagValue"])
                        shrouded, _ = decoder.decode(value, asn1Spec=rfc5958.EncryptedPrivateKeyInfo())
                        found.append(shrouded["encryptionAlgorithm"])
    except (PyAsn1Error, TypeError, ValueError):
        raise KeyStoreError("not a well-formed PKCS#12 file") from None
    return [algorithm for algorithm in found if algorithm["algorithm"] == _PBE_SHA1_3DES]


def pkcs12_kdf(password: str, salt: bytes, iterations: int, purpose: int, length: int) -> tuple[bytes, bool]:
    """The PKCS#12 key derivation (RFC 7292 B.2, SHA-1): ``length`` octets for ``purpose``.

    ``purpose`` is 1 (key), 2 (IV) or 3 (MAC key). The second value says whether an
    adjusted block ``I_j`` started with a zero octet, which GnuPG 2.2 gets wrong.
    """
    v = _PBE_SHA1_BLOCK

    def filled(data: bytes) -> bytes:  # ``data`` repeated to a whole number of blocks
        size = v * -(-len(data) // v)
        return (data * (size // len(data) + 1))[:size] if data else b""

    secret = password.encode("utf-16-be") + b"\0\0" if password else b""
    blocks = bytearray(filled(salt) + filled(secret))
    output = b""
    dropped = False
    while True:
        digest = bytes([purpose]) * v + bytes(blocks)
        for _ in range(iterations):
            digest = hashlib.sha1(digest).digest()  # noqa: S324 - the derivation RFC 7292 defines
        output += digest
        if len(output) >= length:
            return output[:length], dropped
        addend = int.from_bytes((digest * (v // len(digest) + 1))[:v], "big") + 1
        for start in range(0, len(blocks), v):
            block = (int.from_bytes(blocks[start : start + v], "big") + addend) % (1 << (8 * v))
            dropped = dropped or block >> (8 * (v - 1)) == 0
            blocks[start : start + v] = block.to_bytes(v, "big")

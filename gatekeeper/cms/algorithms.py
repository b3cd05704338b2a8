"""The algorithms Gatekeeper reads and writes, by name, OID and pre-encoded identifier.

Names are the short strings the public API takes (``"sha256"``, ``"aes256-gcm"``,
``"rsa-oaep"``). Constant AlgorithmIdentifiers are encoded once, with pyasn1-modules, at
import time; the hot path only concatenates bytes.
"""

from __future__ import annotations

import attrs
from cryptography.hazmat.primitives import hashes
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_modules import rfc4055

from gatekeeper.cms import der
from gatekeeper.cms.errors import UnsupportedAlgorithm

# -- content types -------------------------------------------------------------------

ID_DATA = "1.2.840.113549.1.7.1"
ID_SIGNED_DATA = "1.2.840.113549.1.7.2"
ID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
ID_AUTH_ENVELOPED_DATA = "1.2.840.113549.1.9.16.1.23"

# -- attributes ----------------------------------------------------------------------

ID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
ID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
ID_SIGNING_TIME = "1.2.840.113549.1.9.5"
ID_SMIME_CAPABILITIES = "1.2.840.113549.1.9.15"
ID_SIGNING_CERTIFICATE_V2 = "1.2.840.113549.1.9.16.2.47"

# -- digests -------------------------------------------------------------------------


@attrs.frozen
class Digest:
    """A digest algorithm: its name, OID, ``micalg`` label and hash class."""

    name: str
    oid: str
    micalg: str
    algorithm: type[hashes.HashAlgorithm]
    weak: bool = False

    def new(self) -> hashes.HashAlgorithm:
        """A fresh hash object for cryptography."""
        return self.algorithm()


DIGESTS = {
    d.name: d
    for d in (
        Digest("sha1", "1.3.14.3.2.26", "sha-1", hashes.SHA1, weak=True),
        Digest("sha224", "2.16.840.1.101.3.4.2.4", "sha-224", hashes.SHA224),
        Digest("sha256", "2.16.840.1.101.3.4.2.1", "sha-256", hashes.SHA256),
        Digest("sha384", "2.16.840.1.101.3.4.2.2", "sha-384", hashes.SHA384),
        Digest("sha512", "2.16.840.1.101.3.4.2.3", "sha-512", hashes.SHA512),
    )
}
DIGESTS_BY_OID = {d.oid: d for d in DIGESTS.values()}
SIGNING_DIGESTS = ("sha256", "sha384", "sha512")
MD5_OID = "1.2.840.113549.2.5"


def digest_by_oid(dotted: str) -> Digest:
    """The digest with this OID, or :class:`UnsupportedAlgorithm`."""
    try:
        return DIGESTS_BY_OID[dotted]
    except KeyError:
        name = "MD5" if dotted == MD5_OID else dotted
        raise UnsupportedAlgorithm(f"unsupported digest algorithm {name}") from None


def digest_by_name(name: str) -> Digest:
    """The digest called ``name`` (``sha256``...), or :class:`UnsupportedAlgorithm`."""
    try:
        return DIGESTS[name]
    except KeyError:
        raise UnsupportedAlgorithm(f"unsupported digest algorithm {name!r}") from None


def digest_identifier(digest: Digest) -> bytes:
    """The AlgorithmIdentifier of a digest as written in SignedData (parameters absent)."""
    return der.algorithm(digest.oid)


# -- signature algorithms -------------------------------------------------------------

RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
RSASSA_PSS = "1.2.840.113549.1.1.10"
RSAES_OAEP = "1.2.840.113549.1.1.7"
ID_MGF1 = "1.2.840.113549.1.1.8"
RSA_WITH = {
    "1.2.840.113549.1.1.5": "sha1",
    "1.2.840.113549.1.1.14": "sha224",
    "1.2.840.113549.1.1.11": "sha256",
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
}
ID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
ECDSA_WITH = {
    "1.2.840.10045.4.1": "sha1",
    "1.2.840.10045.4.3.1": "sha224",
    "1.2.840.10045.4.3.2": "sha256",
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
}
ECDSA_OID_BY_DIGEST = {name: dotted for dotted, name in ECDSA_WITH.items()}

RSA_ENCRYPTION_IDENTIFIER = der.algorithm(RSA_ENCRYPTION, der.NULL_DER)


def _pss_parameters(name: str) -> bytes:
    """RSASSA-PSS-params with the salt as long as the hash (RFC 8551), as OpenSSL writes them."""
    params = rfc4055.RSASSA_PSS_params()
    template = {
        "sha256": rfc4055.rSASSA_PSS_SHA256_Params,
        "sha384": rfc4055.rSASSA_PSS_SHA384_Params,
        "sha512": rfc4055.rSASSA_PSS_SHA512_Params,
    }[name]
    params["hashAlgorithm"] = template["hashAlgorithm"]
    params["maskGenAlgorithm"] = template["maskGenAlgorithm"]
    params["saltLength"] = DIGESTS[name].algorithm.digest_size
    encoded: bytes = der_encoder.encode(params)
    return encoded


PSS_IDENTIFIERS = {name: der.algorithm(RSASSA_PSS, _pss_parameters(name)) for name in SIGNING_DIGESTS}
OAEP_SHA256_IDENTIFIER = der.algorithm(RSAES_OAEP, der_encoder.encode(rfc4055.rSAES_OAEP_SHA256_Params))

# -- content encryption ---------------------------------------------------------------


@attrs.frozen
class Cipher:
    """A content-encryption algorithm: ``mode`` is ``cbc`` or ``gcm``; ``key_size`` in bytes."""

    name: str
    oid: str
    key_size: int
    mode: str
    produce: bool = True

    @property
    def block_size(self) -> int:
        """The cipher's block size in bytes (8 for 3DES, 16 for AES)."""
        return 8 if self.name == "des3-cbc" else 16


CIPHERS = {
    c.name: c
    for c in (
        Cipher("aes256-gcm", "2.16.840.1.101.3.4.1.46", 32, "gcm"),
        Cipher("aes192-gcm", "2.16.840.1.101.3.4.1.26", 24, "gcm", produce=False),
        Cipher("aes128-gcm", "2.16.840.1.101.3.4.1.6", 16, "gcm"),
        Cipher("aes256-cbc", "2.16.840.1.101.3.4.1.42", 32, "cbc"),
        Cipher("aes192-cbc", "2.16.840.1.101.3.4.1.22", 24, "cbc", produce=False),
        Cipher("aes128-cbc", "2.16.840.1.101.3.4.1.2", 16, "cbc"),
        Cipher("des3-cbc", "1.2.840.113549.3.7", 24, "cbc", produce=False),
    )
}
CIPHERS_BY_OID = {c.oid: c for c in CIPHERS.values()}
PRODUCED_CIPHERS = tuple(name for name, c in CIPHERS.items() if c.produce)
_REFUSED_CIPHERS = {"1.2.840.113549.3.2": "RC2", "1.3.14.3.2.7": "DES"}


def cipher_by_oid(dotted: str) -> Cipher:
    """The content cipher with this OID, or :class:`UnsupportedAlgorithm`."""
    try:
        return CIPHERS_BY_OID[dotted]
    except KeyError:
        name = _REFUSED_CIPHERS.get(dotted, dotted)
        raise UnsupportedAlgorithm(f"unsupported content encryption algorithm {name}") from None


def cipher_by_name(name: str, *, producing: bool = False) -> Cipher:
    """The content cipher called ``name``; when ``producing``, only those Gatekeeper writes."""
    cipher = CIPHERS.get(name)
    if cipher is None or (producing and not cipher.produce):
        known = ", ".join(PRODUCED_CIPHERS if producing else CIPHERS)
        raise UnsupportedAlgorithm(f"unsupported cipher {name!r} (known: {known})")
    return cipher


# -- key transport and key agreement ---------------------------------------------------

KEY_TRANSPORTS = ("rsa-pkcs1v15", "rsa-oaep")

# dhSinglePass-stdDH-*kdf-scheme (RFC 5753) and the cofactor variants (same result on
# the NIST prime curves, whose cofactor is 1).
ECDH_KDF_DIGESTS = {
    "1.3.133.16.840.63.0.2": "sha1",
    "1.3.132.1.11.0": "sha224",
    "1.3.132.1.11.1": "sha256",
    "1.3.132.1.11.2": "sha384",
    "1.3.132.1.11.3": "sha512",
    "1.3.133.16.840.63.0.3": "sha1",
    "1.3.132.1.14.0": "sha224",
    "1.3.132.1.14.1": "sha256",
    "1.3.132.1.14.2": "sha384",
    "1.3.132.1.14.3": "sha512",
}
ECDH_SHA256_KDF = "1.3.132.1.11.1"
KEY_WRAPS = {
    "2.16.840.1.101.3.4.1.5": 16,
    "2.16.840.1.101.3.4.1.25": 24,
    "2.16.840.1.101.3.4.1.45": 32,
}
KEY_WRAP_BY_SIZE = {size: dotted for dotted, size in KEY_WRAPS.items()}

# -- SMIMECapabilities -----------------------------------------------------------------

# What Gatekeeper advertises, strongest first (RFC 8551 section 2.5.2).
CAPABILITY_NAMES = {
    CIPHERS["aes256-gcm"].oid: "aes256-gcm",
    CIPHERS["aes128-gcm"].oid: "aes128-gcm",
    CIPHERS["aes256-cbc"].oid: "aes256-cbc",
    CIPHERS["aes192-cbc"].oid: "aes192-cbc",
    CIPHERS["aes128-cbc"].oid: "aes128-cbc",
    CIPHERS["des3-cbc"].oid: "des3-cbc",
    RSAES_OAEP: "rsa-oaep",
    RSA_ENCRYPTION: "rsa-pkcs1v15",
    RSASSA_PSS: "rsa-pss",
    DIGESTS["sha256"].oid: "sha256",
    DIGESTS["sha384"].oid: "sha384",
    DIGESTS["sha512"].oid: "sha512",
    ECDH_SHA256_KDF: "ecdh-sha256",
}
CAPABILITY_OIDS = {name: dotted for dotted, name in CAPABILITY_NAMES.items()}
DEFAULT_CAPABILITIES = (
    "aes256-gcm",
    "aes128-gcm",
    "aes256-cbc",
    "aes128-cbc",
    "rsa-oaep",
    "rsa-pkcs1v15",
    "rsa-pss",
    "ecdh-sha256",
    "sha256",
    "sha384",
    "sha512",
)

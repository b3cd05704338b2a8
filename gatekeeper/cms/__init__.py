"""CMS (RFC 5652) for S/MIME 4.0: SignedData, EnvelopedData and AuthEnvelopedData.

A synchronous, pure layer in the style of pyca/cryptography: DER bytes in, DER bytes
out, no logging, no Twisted, and one exception family (:class:`SMIMEError`). Inputs and
outputs are plain picklable values (bytes, cryptography objects, frozen attrs), so the
work can run in a thread or a worker process.

- :func:`sign` / :func:`verify` (``signed.py``): SignedData with RSA PKCS#1 v1.5,
  RSASSA-PSS or ECDSA; signed attributes contentType, messageDigest, signingTime,
  SMIMECapabilities and ESS signingCertificateV2.
- :func:`envelope` / :func:`decrypt` (``enveloped.py``): EnvelopedData (AES-CBC) and
  AuthEnvelopedData (AES-GCM) to RSA (PKCS#1 v1.5, OAEP) and EC (ECDH) recipients.
- ``der.py``: the bounded TLV reader and DER writer for the outer layers.
"""

from gatekeeper.cms.enveloped import Decrypted, KeyPair, Recipient, decrypt, envelope, envelope_parts
from gatekeeper.cms.errors import LimitExceeded, Malformed, NotForMe, SMIMEError, Tampered, UnsupportedAlgorithm
from gatekeeper.cms.signed import SignedDataResult, SignerResult, certificate_from_der, sign, sign_parts, verify

__all__ = [
    "Decrypted",
    "KeyPair",
    "LimitExceeded",
    "Malformed",
    "NotForMe",
    "Recipient",
    "SMIMEError",
    "SignedDataResult",
    "SignerResult",
    "Tampered",
    "UnsupportedAlgorithm",
    "certificate_from_der",
    "decrypt",
    "envelope",
    "envelope_parts",
    "sign",
    "sign_parts",
    "verify",
]

"""TLS for the listeners: one server context, and the rule "no secrets before TLS".

The private key of the TLS certificate is kept encrypted at rest like every other key;
it is decrypted in memory here and handed to pyOpenSSL, never written out.
"""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import crypto
from twisted.internet.interfaces import IAddress, ISSLTransport, ITransport
from twisted.internet.ssl import CertificateOptions, TLSVersion

from gatekeeper.errors import ConfigError


def server_tls_options(
    certificate_pem: bytes, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
) -> CertificateOptions:
    """Build the server context factory from a PEM chain (leaf first) and its (decrypted) key.

    TLS 1.2 is the minimum; Twisted's defaults choose the ciphers. Problems raise
    :class:`ConfigError` naming the ``[tls]`` setting, without key material.
    """
    try:
        chain = x509.load_pem_x509_certificates(certificate_pem)
    except ValueError:
        raise ConfigError("not a PEM certificate (chain)", "[tls] certificate") from None
    certificate_key = chain[0].public_key()
    if not isinstance(certificate_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey) or (
        key.public_key().public_numbers() != certificate_key.public_numbers()
    ):
        raise ConfigError("the private key does not belong to the certificate", "[tls] key")
    return CertificateOptions(
        # pyOpenSSL's stubs only name RSA/DSA, but EC keys work the same way.
        privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


def transport_is_secure(transport: ITransport | None) -> bool:
    """Tell whether a connection runs over TLS (implicit, or after STARTTLS/STLS)."""
    return transport is not None and ISSLTransport.providedBy(transport)


def peer_is_loopback(peer: IAddress | None) -> bool:
    """Tell whether the client connected from a loopback address."""
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secrets_allowed(transport: ITransport | None, *, allow_plaintext_on_loopback: bool) -> bool:
    """Tell whether a password may be received on this connection now.

    Always after TLS; without TLS only from loopback and only when configured.
    """
    if transport_is_secure(transport):
        return True
    return allow_plaintext_on_loopback and transport is not None and peer_is_loopback(transport.getPeer())

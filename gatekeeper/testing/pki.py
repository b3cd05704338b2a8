"""Certificate factories for tests: CAs, intermediates, TLS servers and S/MIME users.

Keys are generated at test time and cached per process (RSA generation is the slow part
of most tests), so nothing secret is ever committed. Every option a trust test needs
(expired, not yet valid, wrong EKU, no SAN, another CA) is a keyword argument.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_SignatureHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512


@functools.lru_cache(maxsize=64)
def _cached_key(kind: str, index: int) -> PrivateKey:
    if kind.startswith("rsa"):
        return rsa.generate_private_key(65537, int(kind[3:]))
    curve = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}[kind]
    return ec.generate_private_key(curve)


def make_key(kind: str = "rsa2048", *, fresh: bool = False, index: int = 0) -> PrivateKey:
    """Return a private key of ``kind`` (``rsa2048``, ``rsa3072``, ``p256``, ``p384``).

    Keys are shared by (kind, index) within a test process unless ``fresh`` is set;
    give different ``index`` values to get distinct keys of the same kind.
    """
    if fresh:
        return _cached_key.__wrapped__(kind, index)
    return _cached_key(kind, index)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@attrs.frozen
class Issued:
    """A certificate with its private key and the chain above it (issuer first, root last)."""

    certificate: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    def cert_pem(self) -> bytes:
        """The certificate in PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def cert_der(self) -> bytes:
        """The certificate in DER."""
        return self.certificate.public_bytes(serialization.Encoding.DER)

    def key_pem(self) -> bytes:
        """The private key in unencrypted PKCS#8 PEM (write it only under a test's temp dir)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def chain_pem(self) -> bytes:
        """The chain above the certificate in PEM, issuer first."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)


class TestPKI:
    """A tiny certificate authority for tests.

    >>> pki = TestPKI("Test CA")
    >>> alice = pki.user("alice@example.org")
    >>> server = pki.server(["localhost", "127.0.0.1"])
    """

    __test__ = False  # not a test case, whatever trial thinks of the name

    def __init__(
        self,
        name: str = "Gatekeeper Test CA",
        *,
        key_kind: str = "rsa2048",
        key_index: int = 0,
        parent: TestPKI | None = None,
        days: int = 3650,
    ) -> None:
        self.name = name
        self.key: PrivateKey = make_key(key_kind, index=1000 + key_index)
        self.parent = parent
        self._serial = 1
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Gatekeeper Tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        if parent is None:
            issuer_name, issuer_key, issuer_public = subject, self.key, self.key.public_key()
        else:
            issuer_name = parent.certificate.subject
            issuer_key, issuer_public = parent.key, parent.key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(days=1))
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False)
        )
        self.certificate: x509.Certificate = builder.sign(_signing_key(issuer_key), hashes.SHA256())

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """This CA's certificate and those above it, nearest first."""
        return (self.certificate,) + (self.parent.chain if self.parent else ())

    def cert_pem(self) -> bytes:
        """This CA's certificate in PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def intermediate(self, name: str, **kwargs: object) -> TestPKI:
        """Return a subordinate CA signed by this one."""
        return TestPKI(name, parent=self, **kwargs)  # type: ignore[arg-type]

    def _build(
        self,
        subject: x509.Name,
        key: PrivateKey,
        *,
        sans: Sequence[x509.GeneralName],
        key_usage: x509.KeyUsage | None,
        eku: Sequence[x509.ObjectIdentifier] | None,
        not_before: datetime.datetime | None,
        not_after: datetime.datetime | None,
        days: int,
        hash_algorithm: _SignatureHash,
    ) -> Issued:
        start = not_before or (_now() - datetime.timedelta(hours=1))
        end = not_after or (start + datetime.timedelta(days=days))
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        if key_usage is not None:
            builder = builder.add_extension(key_usage, critical=True)
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        certificate = builder.sign(_signing_key(self.key), hash_algorithm)
        return Issued(certificate, key, self.chain)

    def server(self, names: Sequence[str] = ("localhost", "127.0.0.1"), *, key: PrivateKey | None = None) -> Issued:
        """Issue a TLS server certificate for host names and IP addresses."""
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        return self._build(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]),
            key or make_key("rsa2048", index=1),
            sans=sans,
            key_usage=x509.KeyUsage(True, False, True, False, False, False, False, False, False),
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
            not_before=None,
            not_after=None,
            days=825,
            hash_algorithm=hashes.SHA256(),
        )

    def user(
        self,
        address: str,
        *,
        key: PrivateKey | None = None,
        key_kind: str = "rsa2048",
        key_index: int = 0,
        eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.EMAIL_PROTECTION,),
        key_usage: x509.KeyUsage | str | None = "default",
        san: bool = True,
        email_in_subject: bool = False,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        days: int = 365,
        hash_algorithm: _SignatureHash | None = None,
    ) -> Issued:
        """Issue an S/MIME certificate for ``address``.

        ``key_usage="default"`` gives digitalSignature+keyEncipherment for RSA and
        digitalSignature+keyAgreement for EC; pass ``None`` to omit the extension.
        ``key_index`` picks a distinct cached key of the same kind.
        """
        private_key = key or make_key(key_kind, index=10 + key_index)
        if key_usage == "default":
            if isinstance(private_key, rsa.RSAPrivateKey):
                key_usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
            else:
                key_usage = x509.KeyUsage(True, False, False, False, True, False, False, False, False)
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, address.partition("@")[0])]
        if email_in_subject:
            attributes.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, address))
        return self._build(
            x509.Name(attributes),
            private_key,
            sans=[x509.RFC822Name(address)] if san else [],
            key_usage=key_usage if isinstance(key_usage, x509.KeyUsage) else None,
            eku=eku,
            not_before=not_before,
            not_after=not_after,
            days=days,
            hash_algorithm=hash_algorithm or hashes.SHA256(),
        )

    def crl(self, revoked: Sequence[x509.Certificate] = (), *, days: int = 7) -> x509.CertificateRevocationList:
        """Return a CRL of this CA revoking the given certificates."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(_now() - datetime.timedelta(minutes=5))
            .next_update(_now() + datetime.timedelta(days=days))
        )
        for certificate in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(certificate.serial_number)
                .revocation_date(_now() - datetime.timedelta(minutes=1))
                .build()
            )
        return builder.sign(_signing_key(self.key), hashes.SHA256())


def _signing_key(key: PrivateKeyTypes) -> CertificateIssuerPrivateKeyTypes:
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return key

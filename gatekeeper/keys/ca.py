"""The built-in organisation CA: user S/MIME certificates, the gateway's TLS certificate, a CRL.

``gatekeeper init`` creates it in ``<key store>/ca/``::

    ca.p12       the CA key and certificate, sealed with :mod:`gatekeeper.keys.pkcs12`
                 under the CA passphrase (PBKDF2-HMAC-SHA256, AES-256-CBC, no MAC)
    ca.pem       the CA certificate, for clients and ``openssl verify -CAfile``
    index.json   every certificate issued, and when it was revoked
    crl.pem      the CRL, rewritten atomically on every revocation
    passphrase   the generated CA passphrase (0600), unless ``[keys] ca_passphrase_file``
                 or ``ca_passphrase_env`` names one

and the TLS certificate (issued by the CA for ``[server] hostname``, ``localhost`` and
``127.0.0.1``) at ``[tls] certificate``, with its key at ``[tls] key`` as an encrypted
PEM under the same passphrase (:func:`load_tls_private_key_pem` opens it for the server).

User certificates: key type from ``[keys] key_type``; ``basicConstraints`` CA:FALSE and a
critical ``keyUsage`` (digitalSignature + keyEncipherment for RSA, digitalSignature +
keyAgreement for EC); ``extendedKeyUsage`` emailProtection; ``subjectAltName`` rfc822Name;
subject and authority key identifiers; random 159-bit serials; ``[keys]
certificate_days`` of validity (never beyond the CA's own).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gatekeeper.config import KEY_TYPES, MIN_KDF_ITERATIONS, Config, KeysConfig
from gatekeeper.errors import ConfigError, KeyStoreError
from gatekeeper.keys import pkcs12
from gatekeeper.keys.identity import PrivateKey
from gatekeeper.keys.store import FileKeyStore, FileLock, atomic_write, private_directory

__all__ = [
    "CertificateAuthority",
    "ca_certificate_path",
    "ca_directory",
    "generate_private_key",
    "initialize",
    "load_tls_private_key",
    "open_ca",
    "read_ca_passphrase",
]

CA_KEY_FILE = "ca.p12"
CA_CERTIFICATE_FILE = "ca.pem"
CRL_FILE = "crl.pem"
INDEX_FILE = "index.json"
PASSPHRASE_FILE = "passphrase"  # noqa: S105 - a file name, not a secret
INDEX_FORMAT = "gatekeeper-ca-index/1"
TLS_KEY_TYPE = "p256"
TLS_DAYS = 825  # the longest validity Apple clients accept for TLS server certificates
CRL_DAYS = 30
_BACKDATE = datetime.timedelta(minutes=5)  # tolerate clients whose clocks run a little behind

Now = Callable[[], datetime.datetime]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def generate_private_key(key_type: str) -> PrivateKey:
    """Generate a key of ``key_type`` (``rsa2048``, ``rsa3072``, ``rsa4096``, ``p256``, ``p384``)."""
    if key_type not in KEY_TYPES:
        raise ConfigError(f"expected one of {', '.join(KEY_TYPES)}, got {key_type!r}", "[keys] key_type")
    if key_type.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    return ec.generate_private_key(ec.SECP256R1() if key_type == "p256" else ec.SECP384R1())


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


@attrs.frozen
class IssuedRecord:
    """One line of the CA's index: a certificate issued, and whether it was revoked."""

    serial: int
    subject: str
    not_after: datetime.datetime
    issued: datetime.datetime
    revoked: datetime.datetime | None = None


class CertificateAuthority:
    """An unlocked CA in a directory: issues certificates and keeps the index and CRL.

    Get one with :meth:`create` or :meth:`load`; every change to the directory holds
    its lock and is written atomically.
    """

    def __init__(
        self, directory: Path, certificate: x509.Certificate, private_key: PrivateKey, *, now: Now = _utc_now
    ) -> None:
        self.directory = directory
        self.certificate = certificate
        self._key = private_key
        self._now = now
        self._lock = FileLock(directory / ".lock")

    def __repr__(self) -> str:
        return f"<CertificateAuthority {self.certificate.subject.rfc4514_string()}>"

    # -- creating and opening

    @staticmethod
    def exists(directory: Path) -> bool:
        """Tell whether ``directory`` holds a CA."""
        return (directory / CA_KEY_FILE).exists()

    @classmethod
    def create(
        cls,
        directory: Path,
        passphrase: str,
        *,
        common_name: str,
        key_type: str = "rsa3072",
        days: int = 3650,
        iterations: int = MIN_KDF_ITERATIONS,
        now: Now = _utc_now,
    ) -> CertificateAuthority:
        """Create a self-signed CA in ``directory``, its key sealed under ``passphrase``.

        Raises :class:`KeyStoreError` if a CA is already there.
        """
        if not passphrase:
            raise KeyStoreError("the CA passphrase must not be empty")
        directory = private_directory(directory)
        lock = FileLock(directory / ".lock")
        with lock.hold(exclusive=True):
            if cls.exists(directory):
                raise KeyStoreError(f"a CA already exists in {directory}")
            key = generate_private_key(key_type)
            start = now()
            name = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Gatekeeper"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
                ]
            )
            certificate = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start - _BACKDATE)
                .not_valid_after(start + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
                )
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, _signature_hash(key))
            )
            parameters = pkcs12.new_kdf_parameters(iterations)
            sealed = pkcs12.seal(
                key,
                certificate,
                (),
                derived_key=pkcs12.derive_key(passphrase, parameters.salt, parameters.iterations),
                salt=parameters.salt,
                iterations=parameters.iterations,
                friendly_name=common_name[:64],
            )
            ca = cls(directory, certificate, key, now=now)
            ca._write_index({"format": INDEX_FORMAT, "crl_number": 0, "certificates": []})
            ca.write_crl()
            atomic_write(directory / CA_CERTIFICATE_FILE, certificate.public_bytes(serialization.Encoding.PEM))
            # The sealed key last: its presence is what marks the CA as created.
            atomic_write(directory / CA_KEY_FILE, sealed)
        return ca

    @classmethod
    def load(cls, directory: Path, passphrase: str, *, now: Now = _utc_now) -> CertificateAuthority:
        """Open the CA in ``directory``; raises :class:`BadPassword` for a wrong passphrase."""
        try:
            sealed = (directory / CA_KEY_FILE).read_bytes()
        except FileNotFoundError:
            raise KeyStoreError(f"there is no CA in {directory}; run `gatekeeper init` first") from None
        except OSError as error:
            raise KeyStoreError(f"cannot read the CA key in {directory}: {error.strerror}") from None
        parameters = pkcs12.kdf_parameters(sealed)
        unlocked = pkcs12.unseal(sealed, pkcs12.derive_key(passphrase, parameters.salt, parameters.iterations))
        return cls(directory, unlocked.certificate, unlocked.private_key, now=now)

    # -- issuing

    @property
    def certificate_path(self) -> Path:
        """Where the CA certificate is kept in PEM."""
        return self.directory / CA_CERTIFICATE_FILE

    @property
    def crl_path(self) -> Path:
        """Where the CRL is kept in PEM."""
        return self.directory / CRL_FILE

    def issue_user_certificate(
        self, address: str, public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, *, days: int
    ) -> x509.Certificate:
        """Issue an S/MIME certificate for the (normalised) ``address`` and ``public_key``."""
        if isinstance(public_key, rsa.RSAPublicKey):
            usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            usage = x509.KeyUsage(True, False, False, False, True, False, False, False, False)
        else:
            raise KeyStoreError("user keys must be RSA or EC")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address[:64])])
        return self._issue(
            subject,
            public_key,
            days=days,
            extensions=[
                (usage, True),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False),
                (x509.SubjectAlternativeName([x509.RFC822Name(address)]), False),
            ],
        )

    def issue_server_certificate(
        self, names: Sequence[str], public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, *, days: int = TLS_DAYS
    ) -> x509.Certificate:
        """Issue a TLS server certificate for host names and IP addresses (the first is the CN)."""
        if not names:
            raise KeyStoreError("a server certificate needs at least one name")
        alternative: list[x509.GeneralName] = []
        for name in dict.fromkeys(names):
            try:
                alternative.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternative.append(x509.DNSName(name))
        if isinstance(public_key, rsa.RSAPublicKey):
            usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
        else:
            usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
        return self._issue(
            subject,
            public_key,
            days=days,
            extensions=[
                (usage, True),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
                (x509.SubjectAlternativeName(alternative), False),
            ],
        )

    def _issue(
        self,
        subject: x509.Name,
        public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        *,
        days: int,
        extensions: Iterable[tuple[x509.ExtensionType, bool]],
    ) -> x509.Certificate:
        start = self._now()
        end = min(start + datetime.timedelta(days=days), self.certificate.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - _BACKDATE)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        certificate = builder.sign(self._key, _signature_hash(self._key))
        with self._lock.hold(exclusive=True):
            index = self._read_index()
            index["certificates"].append(
                {
                    "serial": format(certificate.serial_number, "x"),
                    "subject": subject.rfc4514_string(),
                    "not_after": end.isoformat(),
                    "issued": start.isoformat(),
                    "revoked": None,
                }
            )
            self._write_index(index)
        return certificate

    # -- revoking

    def issued(self) -> list[IssuedRecord]:
        """Return the index: every certificate issued, oldest first."""
        with self._lock.hold(exclusive=False):
            index = self._read_index()
        return [
            IssuedRecord(
                serial=int(entry["serial"], 16),
                subject=entry["subject"],
                not_after=datetime.datetime.fromisoformat(entry["not_after"]),
                issued=datetime.datetime.fromisoformat(entry["issued"]),
                revoked=None if entry["revoked"] is None else datetime.datetime.fromisoformat(entry["revoked"]),
            )
            for entry in index["certificates"]
        ]

    def revoke(self, certificates: Iterable[x509.Certificate]) -> x509.CertificateRevocationList:
        """Mark the certificates revoked in the index and rewrite the CRL; returns the new CRL.

        Certificates this CA did not issue are refused with :class:`KeyStoreError`;
        revoking one twice keeps the first revocation time.
        """
        certificates = list(certificates)
        for certificate in certificates:
            if certificate.issuer != self.certificate.subject:
                raise KeyStoreError("cannot revoke a certificate issued by another CA")
        with self._lock.hold(exclusive=True):
            index = self._read_index()
            by_serial = {entry["serial"]: entry for entry in index["certificates"]}
            when = self._now().isoformat()
            for certificate in certificates:
                serial = format(certificate.serial_number, "x")
                entry = by_serial.get(serial)
                if entry is None:
                    # Issued before the index existed, or the index was restored: record it now.
                    entry = {
                        "serial": serial,
                        "subject": certificate.subject.rfc4514_string(),
                        "not_after": certificate.not_valid_after_utc.isoformat(),
                        "issued": certificate.not_valid_before_utc.isoformat(),
                        "revoked": None,
                    }
                    index["certificates"].append(entry)
                    by_serial[serial] = entry
                if entry["revoked"] is None:
                    entry["revoked"] = when
            self._write_index(index)
            return self.write_crl()

    def revoked_serials(self) -> set[int]:
        """Return the serial numbers of every revoked certificate."""
        return {record.serial for record in self.issued() if record.revoked is not None}

    def write_crl(self) -> x509.CertificateRevocationList:
        """Sign a fresh CRL (valid ``CRL_DAYS``) from the index and write it atomically."""
        with self._lock.hold(exclusive=True):
            index = self._read_index()
            index["crl_number"] = int(index.get("crl_number", 0)) + 1
            now = self._now()
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(self.certificate.subject)
                .last_update(now - _BACKDATE)
                .next_update(now + datetime.timedelta(days=CRL_DAYS))
                .add_extension(x509.CRLNumber(index["crl_number"]), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
                )
            )
            for entry in index["certificates"]:
                if entry["revoked"] is not None:
                    builder = builder.add_revoked_certificate(
                        x509.RevokedCertificateBuilder()
                        .serial_number(int(entry["serial"], 16))
                        .revocation_date(datetime.datetime.fromisoformat(entry["revoked"]))
                        .build()
                    )
            crl = builder.sign(self._key, _signature_hash(self._key))
            self._write_index(index)
            atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return crl

    def crl_due(self, *, margin: datetime.timedelta = datetime.timedelta(days=7)) -> bool:
        """Tell whether the CRL is missing, unreadable or expires within ``margin``."""
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return True
        next_update = crl.next_update_utc
        return next_update is None or next_update - margin <= self._now()

    # -- the index

    def _read_index(self) -> dict[str, Any]:
        path = self.directory / INDEX_FILE
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"format": INDEX_FORMAT, "crl_number": 0, "certificates": []}
        except (OSError, UnicodeDecodeError, ValueError):
            raise KeyStoreError(f"the CA index {path} cannot be read") from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise KeyStoreError(f"the CA index {path} is not a {INDEX_FORMAT} file")
        return index

    def _write_index(self, index: dict[str, Any]) -> None:
        atomic_write(self.directory / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode("utf-8"))


# -- configuration-level helpers ------------------------------------------------------


def ca_certificate_path(keys: KeysConfig) -> Path:
    """The built-in CA's certificate (PEM), for trust anchors and clients."""
    return ca_directory(keys) / CA_CERTIFICATE_FILE


def ca_directory(keys: KeysConfig) -> Path:
    """Return the CA's directory inside the key store."""
    return keys.store / "ca"


def read_ca_passphrase(keys: KeysConfig, *, create: bool = False) -> str:
    """Return the CA passphrase named by ``[keys]``.

    From ``ca_passphrase_file`` (which must not be readable by group or others), from
    the environment variable ``ca_passphrase_env``, or else from ``<store>/ca/passphrase``.
    With ``create`` (``gatekeeper init``), a missing file is created holding a random
    passphrase. Raises :class:`ConfigError` naming the setting when it cannot be read.
    """
    if keys.ca_passphrase_file is not None and keys.ca_passphrase_env is not None:
        raise ConfigError("set ca_passphrase_file or ca_passphrase_env, not both", "[keys] ca_passphrase_env")
    if keys.ca_passphrase_env is not None:
        value = os.environ.get(keys.ca_passphrase_env, "")
        if not value:
            raise ConfigError(
                f"the environment variable {keys.ca_passphrase_env} is not set or empty", "[keys] ca_passphrase_env"
            )
        return value
    path = _passphrase_path(keys)
    setting = "[keys] store" if keys.ca_passphrase_file is None else "[keys] ca_passphrase_file"
    if create and not path.exists():
        if not path.parent.exists():
            private_directory(path.parent)
        atomic_write(path, (secrets.token_urlsafe(32) + "\n").encode("ascii"))
    try:
        mode = os.stat(path).st_mode
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"the CA passphrase file {path} does not exist; run `gatekeeper init`", setting) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the CA passphrase file {path}: {error}", setting) from None
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(f"the CA passphrase file {path} must not be readable by others (chmod 600 it)", setting)
    passphrase = text[:-1] if text.endswith("\n") else text
    passphrase = passphrase[:-1] if passphrase.endswith("\r") else passphrase
    if not passphrase:
        raise ConfigError(f"the CA passphrase file {path} is empty", setting)
    return passphrase


def _passphrase_path(keys: KeysConfig) -> Path:
    return keys.ca_passphrase_file or ca_directory(keys) / PASSPHRASE_FILE


def open_ca(keys: KeysConfig, *, now: Now = _utc_now) -> CertificateAuthority:
    """Open the store's CA with the configured passphrase."""
    return CertificateAuthority.load(ca_directory(keys), read_ca_passphrase(keys), now=now)


def _tls_names(config: Config) -> list[str]:
    return list(dict.fromkeys([config.server.hostname, "localhost", "127.0.0.1"]))


def initialize(config: Config, *, if_absent: bool = False, now: Now = _utc_now) -> list[str]:
    """Set up the key store: directories, CA passphrase, CA, CRL and TLS certificate.

    Returns one line per thing done. With ``if_absent`` an existing set-up is kept and
    completed (a missing TLS certificate is issued, a CRL close to expiry renewed);
    without it, an existing CA is an error. TLS files that already exist are never
    replaced.
    """
    store = FileKeyStore(config.keys.store)
    directory = ca_directory(config.keys)
    done: list[str] = []
    with store.locked():
        if CertificateAuthority.exists(directory):
            if not if_absent:
                raise KeyStoreError(f"the key store is already initialised (CA in {directory})")
            ca = CertificateAuthority.load(directory, read_ca_passphrase(config.keys), now=now)
        else:
            passphrase_path = _passphrase_path(config.keys)
            generated = config.keys.ca_passphrase_env is None and not passphrase_path.exists()
            passphrase = read_ca_passphrase(config.keys, create=True)
            if generated:
                done.append(f"generated the CA passphrase in {passphrase_path}")
            ca = CertificateAuthority.create(
                directory,
                passphrase,
                common_name=f"Gatekeeper CA {config.server.hostname}",
                key_type=config.keys.key_type,
                days=config.keys.ca_days,
                iterations=config.keys.kdf_iterations,
                now=now,
            )
            done.append(f"created the CA in {directory}")
        done.extend(_ensure_tls(config, ca, read_ca_passphrase(config.keys)))
        if ca.crl_due():
            ca.write_crl()
            done.append(f"wrote the CRL {ca.crl_path}")
    return done


def _ensure_tls(config: Config, ca: CertificateAuthority, passphrase: str) -> list[str]:
    certificate_path, key_path = config.tls.certificate, config.tls.key
    have_certificate, have_key = certificate_path.exists(), key_path.exists()
    if have_certificate and have_key:
        return []
    if have_certificate != have_key:
        missing = "[tls] key" if have_certificate else "[tls] certificate"
        raise ConfigError(f"the file {key_path if have_certificate else certificate_path} is missing", missing)
    for parent in {certificate_path.parent, key_path.parent}:
        if not parent.exists():
            private_directory(parent)
    key = generate_private_key(TLS_KEY_TYPE)
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    certificate = ca.issue_server_certificate(_tls_names(config), key.public_key())
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode("utf-8")),
    )
    atomic_write(key_path, encrypted)
    # The leaf, then the CA: servers send the file as the chain.
    atomic_write(
        certificate_path,
        certificate.public_bytes(serialization.Encoding.PEM) + ca.certificate.public_bytes(serialization.Encoding.PEM),
    )
    return [f"issued the TLS certificate {certificate_path} for {', '.join(_tls_names(config))}"]


def load_tls_private_key(config: Config) -> PrivateKey:
    """Load the TLS key at ``[tls] key``, decrypting it with the CA passphrase.

    A key an administrator installed unencrypted is accepted as it is.
    """
    path = config.tls.key
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read the TLS key {path}: {error.strerror}", "[tls] key") from None
    try:
        try:
            key = serialization.load_pem_private_key(data, read_ca_passphrase(config.keys).encode("utf-8"))
        except TypeError:  # "Password was given but private key is not encrypted"
            key = serialization.load_pem_private_key(data, None)
    except ValueError:
        raise ConfigError(
            f"the TLS key {path} does not decrypt with the CA passphrase or is not a PEM key", "[tls] key"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(f"the TLS key {path} is neither RSA nor EC", "[tls] key")
    return key

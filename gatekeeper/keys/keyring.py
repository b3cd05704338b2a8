"""The local key ring: certificates imported by the admin and harvested from verified mail.

Each certificate is one JSON file under ``root`` named by its SHA-256 fingerprint,
holding the certificate, the chain it arrived with, where it came from and (for
harvested certificates) the sender's S/MIME capabilities. One file per certificate
keeps every change a single atomic ``os.replace``, so the daemon and the admin CLI
can share the directory without locks: the daemon notices changes by the directory's
modification time and re-reads only then.

The key ring is also the first key source (:class:`KeyRingSource`), which adds the
gateway's own users' current certificates from the key store.

A lookup never writes: :meth:`KeyRing.harvest` is the explicit call the inbound
pipeline makes after it has verified a signature.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from gatekeeper.address import address_key, normalize_address
from gatekeeper.errors import InvalidAddress, KeyStoreError, PermanentError
from gatekeeper.interfaces import IKeySource, IKeyStore

MAX_IMPORT_BYTES = 10 * 1024 * 1024
_FORMAT_VERSION = 1
_ORIGINS = ("imported", "harvested")


class CertificateFormatError(PermanentError):
    """Data given to the key ring is not a certificate in a format it reads.

    Accepted: PEM certificates (one or more), a DER certificate, and a PKCS#7
    certs-only bundle (``.p7c``/``.p7b``, DER or PEM).
    """


def fingerprint(certificate: x509.Certificate) -> str:
    """Return the certificate's SHA-256 fingerprint as lower-case hex (no colons)."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def normalize_fingerprint(text: str) -> str:
    """Return a fingerprint as lower-case hex, accepting colons, spaces and upper case."""
    return "".join(ch for ch in text if ch not in ": \t").lower()


def certificate_addresses(certificate: x509.Certificate) -> tuple[str, ...]:
    """Return the e-mail addresses a certificate names (SAN rfc822Name, then subject emailAddress).

    Addresses that do not normalise are left out; the result is normalised and
    de-duplicated case-insensitively, in certificate order.
    """
    found: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound, ValueError):
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        found.extend(san.get_values_for_type(x509.RFC822Name))
    with contextlib.suppress(ValueError):
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
            if isinstance(attribute.value, str):
                found.append(attribute.value)
    result: list[str] = []
    seen: set[str] = set()
    for text in found:
        try:
            address = normalize_address(text)
        except InvalidAddress:
            continue
        if address_key(address) not in seen:
            seen.add(address_key(address))
            result.append(address)
    return tuple(result)


def is_ca_certificate(certificate: x509.Certificate) -> bool:
    """Tell whether a certificate is a CA certificate (basicConstraints cA=TRUE)."""
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Parse PEM (certificates or PKCS#7), DER, or a DER PKCS#7 certs-only bundle.

    Raises :class:`CertificateFormatError` saying what was expected when nothing in
    ``data`` parses, or when it is empty or too large.
    """
    if not data.strip():
        raise CertificateFormatError("no certificate data (the input is empty)")
    if len(data) > MAX_IMPORT_BYTES:
        raise CertificateFormatError(f"certificate data too large ({len(data)} bytes, at most {MAX_IMPORT_BYTES})")
    if b"-----BEGIN" in data:
        certificates: list[x509.Certificate] = []
        try:
            if b"-----BEGIN CERTIFICATE-----" in data or b"-----BEGIN X509 CERTIFICATE-----" in data:
                certificates.extend(x509.load_pem_x509_certificates(data))
            if b"-----BEGIN PKCS7-----" in data:
                certificates.extend(pkcs7.load_pem_pkcs7_certificates(data))
        except ValueError as error:
            raise CertificateFormatError(f"not a readable PEM certificate or PKCS#7 bundle: {error}") from None
        if not certificates:
            raise CertificateFormatError("PEM data holds no CERTIFICATE or PKCS7 block")
        return certificates
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        pass
    try:
        bundle = pkcs7.load_der_pkcs7_certificates(data)
    except ValueError:
        raise CertificateFormatError(
            "not a certificate: expected PEM, DER or a PKCS#7 certs-only bundle (.p7c)"
        ) from None
    if not bundle:
        raise CertificateFormatError("the PKCS#7 bundle holds no certificates")
    return list(bundle)


@attrs.frozen
class KeyRingEntry:
    """One certificate in the key ring and what is known about it.

    ``origin`` is ``"imported"`` (by the admin) or ``"harvested"`` (from verified
    mail); ``chain`` holds the certificates it arrived with (intermediates);
    ``capabilities`` is the DER of the sender's SMIMECapabilities attribute, if the
    signed mail carried one, kept as opaque bytes.
    """

    certificate: x509.Certificate
    origin: str
    added: datetime.datetime
    chain: tuple[x509.Certificate, ...] = ()
    capabilities: bytes | None = None
    last_seen: datetime.datetime | None = None

    @property
    def fingerprint(self) -> str:
        """The SHA-256 fingerprint in lower-case hex."""
        return fingerprint(self.certificate)

    @property
    def addresses(self) -> tuple[str, ...]:
        """The e-mail addresses the certificate names."""
        return certificate_addresses(self.certificate)


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


class KeyRing:
    """Certificates kept on the gateway's disk, under ``root`` (created 0700, files 0600).

    Synchronous and fast: small files, re-read only when the directory changed.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cache_stamp: int | None = None
        self._entries: dict[str, KeyRingEntry] = {}
        self._by_address: dict[str, list[str]] = {}

    # -- reading ---------------------------------------------------------------------

    def entries(self) -> list[KeyRingEntry]:
        """Return every entry, oldest first (ties by fingerprint)."""
        self._refresh()
        return sorted(self._entries.values(), key=lambda e: (e.added, e.fingerprint))

    def certificates(self) -> list[x509.Certificate]:
        """Return every certificate in the key ring, oldest first."""
        return [entry.certificate for entry in self.entries()]

    def entry(self, fingerprint_hex: str) -> KeyRingEntry | None:
        """Return the entry with this SHA-256 fingerprint, or None."""
        self._refresh()
        return self._entries.get(normalize_fingerprint(fingerprint_hex))

    def find_entries(self, address: str) -> list[KeyRingEntry]:
        """Return the entries whose certificate names ``address`` (case-insensitive)."""
        key = address_key(normalize_address(address))
        self._refresh()
        return [self._entries[fp] for fp in self._by_address.get(key, ())]

    def find(self, address: str) -> list[x509.Certificate]:
        """Return the certificates naming ``address``, matched case-insensitively.

        Raises :class:`~gatekeeper.errors.InvalidAddress` for a malformed address.
        """
        return [entry.certificate for entry in self.find_entries(address)]

    # -- writing ---------------------------------------------------------------------

    def import_certificates(self, data: bytes) -> list[x509.Certificate]:
        """Import every certificate in ``data`` (PEM, DER or PKCS#7 certs-only); return them.

        Each certificate becomes an entry; the CA certificates of a bundle are also
        kept as the chain of its end-entity certificates. Importing a certificate that
        is already present keeps the original entry (and its date).
        """
        certificates = load_certificates(data)
        cas = tuple(c for c in certificates if is_ca_certificate(c))
        now = _now()
        self._ensure_root()
        for certificate in certificates:
            existing = self.entry(fingerprint(certificate))
            if existing is not None:
                continue
            chain = () if is_ca_certificate(certificate) else cas
            self._write(KeyRingEntry(certificate, "imported", now, chain))
        return certificates

    def harvest(
        self,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate] = (),
        capabilities: bytes | None = None,
    ) -> KeyRingEntry:
        """Remember a certificate from a verified signed message; return its entry.

        Called explicitly by the inbound pipeline after verification. A known
        certificate keeps its origin and date; its chain and capabilities are
        updated with what the latest message carried.
        """
        if not isinstance(certificate, x509.Certificate):
            raise CertificateFormatError("harvest expects an x509.Certificate")
        if capabilities is not None and not isinstance(capabilities, bytes):
            raise CertificateFormatError("capabilities must be the DER of an SMIMECapabilities attribute")
        now = _now()
        existing = self.entry(fingerprint(certificate))
        if existing is None:
            entry = KeyRingEntry(certificate, "harvested", now, tuple(chain), capabilities, now)
        else:
            entry = attrs.evolve(
                existing,
                chain=tuple(chain) or existing.chain,
                capabilities=capabilities if capabilities is not None else existing.capabilities,
                last_seen=now,
            )
        self._ensure_root()
        self._write(entry)
        return entry

    def remove(self, fingerprint_hex: str) -> bool:
        """Remove the certificate with this SHA-256 fingerprint; return whether it was there."""
        name = normalize_fingerprint(fingerprint_hex)
        if not name or any(ch not in "0123456789abcdef" for ch in name):
            return False
        try:
            (self.root / f"{name}.json").unlink()
        except FileNotFoundError:
            return False
        except OSError as error:
            raise KeyStoreError(f"cannot remove a key ring entry: {error.strerror}") from None
        self._sync_dir()
        return True

    # -- files -----------------------------------------------------------------------

    def _ensure_root(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.root.chmod(0o700)
        except OSError as error:
            raise KeyStoreError(f"cannot create the key ring directory {self.root}: {error.strerror}") from None

    def _write(self, entry: KeyRingEntry) -> None:
        document = {
            "version": _FORMAT_VERSION,
            "origin": entry.origin,
            "added": entry.added.isoformat(),
            "last_seen": entry.last_seen.isoformat() if entry.last_seen else None,
            "certificate": _pem(entry.certificate),
            "chain": [_pem(c) for c in entry.chain],
            "capabilities": base64.b64encode(entry.capabilities).decode("ascii") if entry.capabilities else None,
        }
        data = json.dumps(document, indent=1).encode("utf-8")
        target = self.root / f"{entry.fingerprint}.json"
        try:
            handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
            try:
                os.fchmod(handle, 0o600)
                os.write(handle, data)
                os.fsync(handle)
            finally:
                os.close(handle)
            os.replace(temporary, target)
        except OSError as error:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(temporary)
            raise KeyStoreError(f"cannot write a key ring entry: {error.strerror}") from None
        self._sync_dir()

    def _sync_dir(self) -> None:
        # Without the directory fsync a crash could lose the rename that made the entry visible.
        with contextlib.suppress(OSError):
            descriptor = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

    def _refresh(self) -> None:
        try:
            stamp = self.root.stat().st_mtime_ns
        except FileNotFoundError:
            self._cache_stamp, self._entries, self._by_address = None, {}, {}
            return
        except OSError as error:
            raise KeyStoreError(f"cannot read the key ring directory {self.root}: {error.strerror}") from None
        if stamp == self._cache_stamp:
            return
        entries: dict[str, KeyRingEntry] = {}
        for path in self.root.glob("*.json"):
            entry = self._read(path)
            if entry is not None:
                entries[entry.fingerprint] = entry
        by_address: dict[str, list[str]] = {}
        for entry in sorted(entries.values(), key=lambda e: (e.added, e.fingerprint)):
            for address in entry.addresses:
                by_address.setdefault(address_key(address), []).append(entry.fingerprint)
        self._cache_stamp, self._entries, self._by_address = stamp, entries, by_address

    def _read(self, path: Path) -> KeyRingEntry | None:
        try:
            document: dict[str, Any] = json.loads(path.read_bytes())
            certificate = x509.load_pem_x509_certificate(document["certificate"].encode("ascii"))
            chain = tuple(x509.load_pem_x509_certificate(pem.encode("ascii")) for pem in document.get("chain", ()))
            capabilities = document.get("capabilities")
            last_seen = document.get("last_seen")
            origin = document.get("origin", "imported")
            return KeyRingEntry(
                certificate=certificate,
                origin=origin if origin in _ORIGINS else "imported",
                added=datetime.datetime.fromisoformat(document["added"]),
                chain=chain,
                capabilities=base64.b64decode(capabilities) if capabilities else None,
                last_seen=datetime.datetime.fromisoformat(last_seen) if last_seen else None,
            )
        except FileNotFoundError:
            return None  # removed between listing and reading
        except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            # A damaged file must not hide every other certificate; the admin sees it is missing.
            return None


@implementer(IKeySource)
class KeyRingSource:
    """The key ring as the first key source: local entries plus the gateway's own users.

    Returns, for an address, the key ring's certificates naming it, the chains they
    arrived with (CA certificates, which :class:`~gatekeeper.keys.directory.KeyDirectory`
    uses as intermediates), and the current certificate of the gateway user with that
    address, if there is one.
    """

    name = "keyring"

    def __init__(self, keyring: KeyRing, store: IKeyStore | None = None) -> None:
        self.keyring = keyring
        self.store = store

    def find_now(self, address: str) -> list[x509.Certificate]:
        """The synchronous lookup behind :meth:`find` (small local reads only)."""
        found: list[x509.Certificate] = []
        for entry in self.keyring.find_entries(address):
            found.append(entry.certificate)
            found.extend(entry.chain)
        if self.store is not None:
            user = self.store.get_user(address)
            if user is not None and user.keys:
                found.append(user.current.certificate)
        return _unique(found)

    def find(self, address: str) -> Deferred[list[x509.Certificate]]:
        """Return a Deferred (already fired) with the candidates for ``address``."""
        try:
            return succeed(self.find_now(address))
        except Exception as error:
            return fail(error)

    def users(self) -> list[str]:
        """The gateway's own users (for the admin's view of what this source covers)."""
        return list(self.store.list_users()) if self.store is not None else []


def _unique(certificates: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    seen: set[bytes] = set()
    result = []
    for certificate in certificates:
        digest = certificate.fingerprint(hashes.SHA256())
        if digest not in seen:
            seen.add(digest)
            result.append(certificate)
    return result

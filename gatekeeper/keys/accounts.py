"""The user lifecycle, in one place for the CLI, the SSH console and the web page.

:class:`Accounts` adds users (a key pair, a certificate from the built-in CA, the key
sealed under the password), lists them, changes passwords (the old one must decrypt the
keys; a new salt re-seals every key), rotates key pairs (old private keys are kept,
sealed, to read old mail), deletes users (revoking every certificate) and exports the
current key as a PKCS#12 for mail clients.

:func:`unlock` is the login: one :func:`~gatekeeper.keys.pkcs12.derive_key`, then every
key file opened with the derived key. :func:`dummy_unlock` costs the same for a user who
does not exist, so response times do not tell who has an account.

A rotation without the password (the admin console's ``gk.rotate(address)``) cannot seal
the new private key under the password, and it must never be on disk unencrypted: it is
encrypted to the user's current public key (:func:`seal_to_public_key`: RSA-OAEP-SHA256,
or ECDH + HKDF-SHA256, protecting an AES-256-GCM key) and kept as a *pending* key. The
next login, which has both the old private key and the derived key, completes it.

Store writes happen under the store's lock and only after the slow work (key
generation, the KDF): a record that changed meanwhile is not overwritten
(:class:`~gatekeeper.errors.KeyStoreError`, "try again").
"""

from __future__ import annotations

import contextlib
import datetime
import os
import struct
from collections.abc import Callable, Iterator

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import pkcs12 as crypto_pkcs12

from gatekeeper.address import normalize_address
from gatekeeper.config import KeysConfig
from gatekeeper.errors import BadPassword, InvalidPassword, KeyStoreError, UnknownUser, UserExists
from gatekeeper.interfaces import ICertificatePublisher, IKeyStore, PendingKey, StoredKey, StoredUser
from gatekeeper.keys import pkcs12
from gatekeeper.keys.ca import CertificateAuthority, generate_private_key
from gatekeeper.keys.identity import Identity, PrivateKey, UnlockedKey

__all__ = [
    "MAX_PASSWORD",
    "Accounts",
    "UnlockResult",
    "check_new_password",
    "current_certificate",
    "dummy_unlock",
    "open_with_private_key",
    "seal_to_public_key",
    "unlock",
]

MAX_PASSWORD = 1024
LEGACY_EXPORT_ITERATIONS = 2048  # what old importers (Windows XP/7-era, old NSS) were built for
_LEGACY_EXPORT_ATTEMPTS = 16  # each fails GnuPG 2.2 with a chance of about 1.5%: all 16, never

Now = Callable[[], datetime.datetime]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def check_new_password(password: str) -> None:
    """Raise :class:`InvalidPassword` unless ``password`` can protect a key.

    It must be text, not empty, at most ``MAX_PASSWORD`` characters (what a login
    accepts) and without NUL (which SASL PLAIN cannot carry).
    """
    if not isinstance(password, str) or not password:
        raise InvalidPassword("the password must not be empty")
    if len(password) > MAX_PASSWORD:
        raise InvalidPassword(f"the password must be at most {MAX_PASSWORD} characters")
    if "\0" in password:
        raise InvalidPassword("the password must not contain a NUL character")


def current_certificate(user: StoredUser) -> x509.Certificate:
    """The certificate others should encrypt to: the newest pending one, else the current key's."""
    return user.pending[0].certificate if user.pending else user.current.certificate


# -- sealing a key to a public key (pending rotations) -------------------------------

_WRAP_MAGIC = b"GKWRAP1\0"
_WRAP_RSA = b"R"
_WRAP_EC = b"E"
_HKDF_INFO = b"gatekeeper pending key / ECDH-HKDF-SHA256 / AES-256-GCM"


def seal_to_public_key(
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, plaintext: bytes, associated_data: bytes
) -> bytes:
    """Encrypt ``plaintext`` so that only the holder of ``public_key``'s private key reads it.

    AES-256-GCM under a fresh key; that key is sent with RSA-OAEP-SHA256, or (EC) is
    derived with HKDF-SHA256 from an ECDH with an ephemeral key on the same curve.
    ``associated_data`` is authenticated, not stored: pass the same to
    :func:`open_with_private_key`.
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        content_key = AESGCM.generate_key(bit_length=256)
        transported = public_key.encrypt(content_key, _oaep())
        header = _WRAP_MAGIC + _WRAP_RSA + struct.pack(">H", len(transported)) + transported
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        ephemeral = ec.generate_private_key(public_key.curve)
        point = ephemeral.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        content_key = _ecdh_key(ephemeral.exchange(ec.ECDH(), public_key), point, public_key)
        header = _WRAP_MAGIC + _WRAP_EC + struct.pack(">H", len(point)) + point
    else:
        raise KeyStoreError("keys can only be sealed to RSA or EC public keys")
    nonce = os.urandom(12)
    return header + nonce + AESGCM(content_key).encrypt(nonce, plaintext, header + associated_data)


def open_with_private_key(private_key: PrivateKey, blob: bytes, associated_data: bytes) -> bytes:
    """Decrypt what :func:`seal_to_public_key` sealed to ``private_key``'s public key.

    Raises :class:`KeyStoreError` when the blob is malformed, altered, or sealed to
    another key.
    """
    if not blob.startswith(_WRAP_MAGIC) or len(blob) < len(_WRAP_MAGIC) + 3:
        raise KeyStoreError("a pending key is not in Gatekeeper's sealed format")
    kind = blob[len(_WRAP_MAGIC) : len(_WRAP_MAGIC) + 1]
    (length,) = struct.unpack(">H", blob[len(_WRAP_MAGIC) + 1 : len(_WRAP_MAGIC) + 3])
    start = len(_WRAP_MAGIC) + 3
    field = blob[start : start + length]
    header = blob[: start + length]
    nonce = blob[start + length : start + length + 12]
    ciphertext = blob[start + length + 12 :]
    if len(field) != length or len(nonce) != 12 or len(ciphertext) < 16:
        raise KeyStoreError("a pending key is truncated")
    try:
        if kind == _WRAP_RSA and isinstance(private_key, rsa.RSAPrivateKey):
            content_key = private_key.decrypt(field, _oaep())
        elif kind == _WRAP_EC and isinstance(private_key, ec.EllipticCurvePrivateKey):
            peer = ec.EllipticCurvePublicKey.from_encoded_point(private_key.curve, field)
            content_key = _ecdh_key(private_key.exchange(ec.ECDH(), peer), field, private_key.public_key())
        else:
            raise KeyStoreError("a pending key is sealed to another kind of key")
        return AESGCM(content_key).decrypt(nonce, ciphertext, header + associated_data)
    except (ValueError, InvalidTag):
        raise KeyStoreError("a pending key does not open with the key it names") from None


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _ecdh_key(shared: bytes, ephemeral_point: bytes, recipient: ec.EllipticCurvePublicKey) -> bytes:
    recipient_point = recipient.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO + ephemeral_point + recipient_point
    ).derive(shared)


def _pending_context(key_id: str, certificate: x509.Certificate) -> bytes:
    """Bind a pending key to its id and certificate, so blobs cannot be swapped between records."""
    return b"gatekeeper-pending/1\0" + key_id.encode("ascii") + b"\0" + certificate.fingerprint(hashes.SHA256())


# -- the login ----------------------------------------------------------------------


@attrs.frozen(repr=False)
class UnlockResult:
    """What a login yields: the unlocked identity, and the record to write back, if any.

    ``updated_user`` is not None when the login completed pending rotations; the caller
    writes it to the store (the pending keys are then sealed like the others).
    """

    identity: Identity
    updated_user: StoredUser | None

    def __repr__(self) -> str:
        return f"<UnlockResult {self.identity!r} updated={self.updated_user is not None}>"


@attrs.frozen(repr=False)
class _Unlocked:
    identity: Identity
    updated_user: StoredUser | None
    derived_key: bytes
    parameters: pkcs12.KdfParameters


def unlock(user: StoredUser, password: str) -> UnlockResult:
    """Decrypt every key of ``user`` with ``password``: the login, and nothing else.

    Pure and synchronous (run it in a thread): one PBKDF2 for all the user's keys (they
    share a salt), then AES and a DER parse per key. Pending rotations are completed.
    Raises :class:`BadPassword` when the password does not decrypt the keys and
    :class:`KeyStoreError` when the record is inconsistent.
    """
    unlocked = _unlock(user, password)
    return UnlockResult(unlocked.identity, unlocked.updated_user)


def dummy_unlock(iterations: int, password: str = "") -> None:
    """Spend what :func:`unlock` spends on a wrong password, for a user who does not exist.

    Runs the same KDF on a random salt (and an AES decryption), so that an unknown user
    name costs the same time as a wrong password. Returns nothing; the caller then
    refuses the login as for a wrong password.
    """
    derived = pkcs12.derive_key(password if isinstance(password, str) else "", os.urandom(16), iterations)
    # The cheap rest of a failed unseal: a CBC decryption of a key-sized blob.
    decryptor = Cipher(algorithms.AES(derived), modes.CBC(os.urandom(16))).decryptor()
    decryptor.update(os.urandom(1232))
    decryptor.finalize()


def _unlock(user: StoredUser, password: str) -> _Unlocked:
    if not isinstance(password, str) or not password or len(password) > MAX_PASSWORD:
        raise BadPassword("authentication failed")
    if not user.keys:
        raise KeyStoreError(f"{user.address} has no keys")
    derived: dict[pkcs12.KdfParameters, bytes] = {}

    def derived_for(sealed: bytes) -> tuple[bytes, pkcs12.KdfParameters]:
        parameters = pkcs12.kdf_parameters(sealed)
        if parameters not in derived:
            # Normally only the first key gets here; keys sealed with other parameters
            # (which Gatekeeper does not write) cost a KDF each.
            derived[parameters] = pkcs12.derive_key(password, parameters.salt, parameters.iterations)
        return derived[parameters], parameters

    unlocked_keys = []
    for stored in user.keys:
        key, _ = derived_for(stored.sealed)
        unlocked = pkcs12.unseal(stored.sealed, key)
        if unlocked.certificate != stored.certificate:
            raise KeyStoreError(f"a key file of {user.address} does not hold the certificate its record names")
        unlocked_keys.append(attrs.evolve(unlocked, key_id=stored.key_id))
    derived_key, parameters = derived_for(user.keys[0].sealed)

    updated_user = None
    if user.pending:
        by_id = {key.key_id: key for key in unlocked_keys}
        chain = unlocked_keys[0].chain
        completed_stored = []
        completed_unlocked = []
        for pending in user.pending:
            sealing = by_id.get(pending.sealed_to)
            if sealing is None:
                raise KeyStoreError(f"a pending key of {user.address} is sealed to a key it does not have")
            plaintext = open_with_private_key(
                sealing.private_key, pending.wrapped, _pending_context(pending.key_id, pending.certificate)
            )
            private_key = _load_private_key(plaintext)
            pkcs12.check_key_matches(private_key, pending.certificate)
            sealed = pkcs12.seal(
                private_key,
                pending.certificate,
                chain,
                derived_key=derived_key,
                salt=parameters.salt,
                iterations=parameters.iterations,
                friendly_name=_friendly_name(user.address, pending.created),
            )
            completed_stored.append(StoredKey(pending.key_id, pending.certificate, sealed, pending.created))
            completed_unlocked.append(UnlockedKey(pending.key_id, pending.certificate, private_key, chain))
        retired = [attrs.evolve(key, retired=True) for key in user.keys]
        updated_user = attrs.evolve(user, keys=(*completed_stored, *retired), pending=())
        unlocked_keys = completed_unlocked + unlocked_keys
    identity = Identity(user.address, tuple(unlocked_keys))
    return _Unlocked(identity, updated_user, derived_key, parameters)


def _load_private_key(der: bytes) -> PrivateKey:
    try:
        key = serialization.load_der_private_key(der, password=None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyStoreError("a pending key does not parse") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyStoreError("a pending key is neither RSA nor EC")
    return key


def _friendly_name(address: str, created: datetime.datetime) -> str:
    return f"{address} ({created:%Y-%m-%d})"[:255]


# -- the lifecycle --------------------------------------------------------------------


class Accounts:
    """Adds, lists, re-keys, deletes and exports users; the one implementation of each.

    ``ca`` is the unlocked built-in CA, or a function returning it (called only by the
    operations that issue or revoke, so listing users or changing a password does not
    need the CA passphrase). ``publisher`` is told about new and removed certificates.
    ``generate_key`` makes key pairs of a ``[keys] key_type`` (tests inject cached keys).
    """

    def __init__(
        self,
        store: IKeyStore,
        ca: CertificateAuthority | Callable[[], CertificateAuthority],
        keys_config: KeysConfig,
        publisher: ICertificatePublisher | None = None,
        now: Now = _utc_now,
        generate_key: Callable[[str], PrivateKey] = generate_private_key,
    ) -> None:
        self.store = store
        self._ca = ca
        self.keys_config = keys_config
        self.publisher = publisher
        self._now = now
        self._generate_key = generate_key

    @property
    def ca(self) -> CertificateAuthority:
        """The built-in CA (opened on first use when given as a function)."""
        if not isinstance(self._ca, CertificateAuthority):
            self._ca = self._ca()
        return self._ca

    # -- reading

    def list(self) -> list[StoredUser]:
        """Return every user, sorted by address."""
        users = []
        for address in self.store.list_users():
            user = self.store.get_user(address)
            if user is not None:
                users.append(user)
        return users

    def get(self, address: str) -> StoredUser:
        """Return the user with ``address``; raises :class:`UnknownUser` if there is none."""
        normalized = normalize_address(address)
        user = self.store.get_user(normalized)
        if user is None:
            raise UnknownUser(f"no such user: {normalized}")
        return user

    # -- changing

    def add(self, address: str, password: str) -> StoredUser:
        """Create a user: a new key pair, its certificate, the key sealed under ``password``.

        Raises :class:`UserExists`, :class:`InvalidAddress` or :class:`InvalidPassword`.
        """
        normalized = normalize_address(address)
        check_new_password(password)
        if self.store.get_user(normalized) is not None:
            raise UserExists(f"the user already exists: {normalized}")
        created = self._now()
        parameters = pkcs12.new_kdf_parameters(self.keys_config.kdf_iterations)
        derived_key = pkcs12.derive_key(password, parameters.salt, parameters.iterations)
        stored = self._new_key(normalized, created, derived_key, parameters)
        user = StoredUser(normalized, (stored,), created)
        with self._locked():
            if self.store.get_user(normalized) is not None:
                self.ca.revoke([stored.certificate])
                raise UserExists(f"the user already exists: {normalized}")
            self.store.put_user(user)
        if self.publisher is not None:
            self.publisher.publish(normalized, stored.certificate)
        return user

    def change_password(self, address: str, old: str, new: str) -> StoredUser:
        """Re-seal every key under ``new``, with a new salt; ``old`` must decrypt them.

        Raises :class:`BadPassword` when ``old`` is wrong. Pending rotations are
        completed on the way.
        """
        check_new_password(new)
        user = self.get(address)
        unlocked = _unlock(user, old)
        base = unlocked.updated_user or user
        iterations = max(self.keys_config.kdf_iterations, unlocked.parameters.iterations)
        parameters = pkcs12.new_kdf_parameters(iterations)
        derived_key = pkcs12.derive_key(new, parameters.salt, parameters.iterations)
        resealed = []
        for stored, key in zip(base.keys, unlocked.identity.keys, strict=True):
            sealed = pkcs12.seal(
                key.private_key,
                key.certificate,
                key.chain,
                derived_key=derived_key,
                salt=parameters.salt,
                iterations=parameters.iterations,
                friendly_name=_friendly_name(base.address, stored.created),
            )
            resealed.append(attrs.evolve(stored, sealed=sealed))
        updated = attrs.evolve(base, keys=tuple(resealed))
        return self._commit(user, updated)

    def reissue(self, address: str, password: str) -> StoredUser:
        """Reset a forgotten password: one new key pair sealed under ``password``, the old keys gone.

        Without the old password the old private keys cannot be re-encrypted, so they are
        deleted and their certificates revoked; mail encrypted to them can no longer be
        decrypted through the gateway. The new certificate is published.
        """
        check_new_password(password)
        user = self.get(address)
        parameters = pkcs12.new_kdf_parameters(self.keys_config.kdf_iterations)
        derived_key = pkcs12.derive_key(password, parameters.salt, parameters.iterations)
        stored = self._new_key(user.address, self._now(), derived_key, parameters)
        try:
            committed = self._commit(user, attrs.evolve(user, keys=(stored,), pending=()))
        except (KeyStoreError, UnknownUser):
            self.ca.revoke([stored.certificate])
            raise
        old = [key.certificate for key in user.keys] + [key.certificate for key in user.pending]
        ours = [c for c in old if c.issuer == self.ca.certificate.subject]
        if ours:
            self.ca.revoke(ours)
        if self.publisher is not None:
            self.publisher.publish(committed.address, stored.certificate)
        return committed

    def rotate(self, address: str, password: str | None = None) -> StoredUser:
        """Give the user a new key pair and certificate; old private keys stay, for old mail.

        With ``password`` the new key is sealed at once (and the old ones retired).
        Without it, the new key is sealed to the user's current public key and stays
        pending until the next login (see :func:`unlock`); its certificate is published
        at once either way.
        """
        user = self.get(address)
        created = self._now()
        if password is not None:
            unlocked = _unlock(user, password)
            base = unlocked.updated_user or user
            stored = self._new_key(base.address, created, unlocked.derived_key, unlocked.parameters)
            retired = tuple(attrs.evolve(key, retired=True) for key in base.keys)
            updated = attrs.evolve(base, keys=(stored, *retired))
            certificate = stored.certificate
        else:
            sealing = user.keys[0]
            sealing_public = sealing.certificate.public_key()
            if not isinstance(sealing_public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
                raise KeyStoreError("the current key is neither RSA nor EC")
            private_key = self._generate_key(self.keys_config.key_type)
            certificate = self._issue(user.address, private_key)
            key_id = pkcs12.key_id_for(certificate)
            plaintext = private_key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            wrapped = seal_to_public_key(sealing_public, plaintext, _pending_context(key_id, certificate))
            pending = PendingKey(key_id, certificate, wrapped, sealing.key_id, created)
            updated = attrs.evolve(user, pending=(pending, *user.pending))
        try:
            committed = self._commit(user, updated)
        except (KeyStoreError, UnknownUser):
            self.ca.revoke([certificate])  # never leave a valid certificate without its key
            raise
        if self.publisher is not None:
            self.publisher.publish(committed.address, certificate)
        return committed

    def delete(self, address: str) -> None:
        """Revoke every certificate of the user (CRL rewritten), delete all key files, unpublish."""
        user = self.get(address)
        certificates = [key.certificate for key in user.keys] + [key.certificate for key in user.pending]
        ours = [c for c in certificates if c.issuer == self.ca.certificate.subject]
        if ours:
            self.ca.revoke(ours)
        self.store.delete_user(user.address)
        if self.publisher is not None:
            self.publisher.unpublish(user.address)

    def export(self, address: str, password: str, export_password: str, *, legacy: bool = False) -> bytes:
        """Return the current key, its certificate and chain as a PKCS#12 for mail clients.

        Written by ``cryptography``: PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) with a
        SHA-256 MAC by default; ``legacy`` gives PBE-SHA1-3DES with a SHA-1 MAC for
        importers that know nothing newer (weak: move such files with care), with salts
        GnuPG 2.2 can use (:func:`~gatekeeper.keys.pkcs12.trips_gnupg_22`).
        ``password`` must decrypt the user's keys; ``export_password`` protects the file.
        """
        check_new_password(export_password)
        user = self.get(address)
        unlocked = _unlock(user, password)
        if unlocked.updated_user is not None:
            self._commit(user, unlocked.updated_user)
        current = unlocked.identity.current
        builder = serialization.PrivateFormat.PKCS12.encryption_builder()
        if legacy:
            builder = (
                builder.kdf_rounds(LEGACY_EXPORT_ITERATIONS)
                .key_cert_algorithm(crypto_pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
                .hmac_hash(hashes.SHA1())  # noqa: S303 - the only MAC legacy importers know
            )
        else:
            builder = (
                builder.kdf_rounds(self.keys_config.kdf_iterations)
                .key_cert_algorithm(crypto_pkcs12.PBES.PBESv2SHA256AndAES256CBC)
                .hmac_hash(hashes.SHA256())
            )
        for _attempt in range(_LEGACY_EXPORT_ATTEMPTS):
            data = crypto_pkcs12.serialize_key_and_certificates(
                name=user.address.encode("utf-8"),
                key=current.private_key,
                cert=current.certificate,
                cas=list(current.chain) or None,
                encryption_algorithm=builder.build(export_password.encode("utf-8")),
            )
            # About one legacy file in 70 has salts GnuPG 2.2 cannot use (it refuses the right
            # password): another file, with new random salts, is as good for everyone else.
            if not legacy or not pkcs12.trips_gnupg_22(data, export_password):
                break
        return data

    # -- internals

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        locked = getattr(self.store, "locked", None)
        if locked is None:
            yield
        else:
            with locked():
                yield

    def _commit(self, expected: StoredUser, updated: StoredUser) -> StoredUser:
        """Write ``updated`` unless the stored record changed since ``expected`` was read."""
        with self._locked():
            current = self.store.get_user(expected.address)
            if current is None:
                raise UnknownUser(f"no such user: {expected.address}")
            if attrs.evolve(current, last_login=None) != attrs.evolve(expected, last_login=None):
                raise KeyStoreError(f"{expected.address} was changed by someone else meanwhile; try again")
            updated = attrs.evolve(updated, last_login=current.last_login)
            self.store.put_user(updated)
        return updated

    def _issue(self, address: str, private_key: PrivateKey) -> x509.Certificate:
        return self.ca.issue_user_certificate(address, private_key.public_key(), days=self.keys_config.certificate_days)

    def _new_key(
        self, address: str, created: datetime.datetime, derived_key: bytes, parameters: pkcs12.KdfParameters
    ) -> StoredKey:
        private_key = self._generate_key(self.keys_config.key_type)
        certificate = self._issue(address, private_key)
        sealed = pkcs12.seal(
            private_key,
            certificate,
            (self.ca.certificate,),
            derived_key=derived_key,
            salt=parameters.salt,
            iterations=parameters.iterations,
            friendly_name=_friendly_name(address, created),
        )
        return StoredKey(pkcs12.key_id_for(certificate), certificate, sealed, created)

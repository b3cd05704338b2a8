"""Tests for gatekeeper.keys.accounts: the user lifecycle and the login's unlock."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12 as crypto_pkcs12
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from gatekeeper.config import KeysConfig
from gatekeeper.errors import BadPassword, InvalidAddress, InvalidPassword, KeyStoreError, UnknownUser, UserExists
from gatekeeper.interfaces import ICertificatePublisher, StoredUser
from gatekeeper.keys import accounts as accounts_module
from gatekeeper.keys import pkcs12
from gatekeeper.keys.accounts import (
    Accounts,
    current_certificate,
    dummy_unlock,
    open_with_private_key,
    seal_to_public_key,
    unlock,
)
from gatekeeper.keys.ca import CertificateAuthority
from gatekeeper.keys.identity import PrivateKey
from gatekeeper.keys.store import FileKeyStore
from gatekeeper.testing.pki import make_key
from tests.keys_support import FAST_ITERATIONS, files_containing, key_generator, keys_config, make_ca, private_der

PASSWORD = "Alice's passwörd"


@implementer(ICertificatePublisher)
class RecordingPublisher:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, x509.Certificate | None]] = []

    def publish(self, address: str, certificate: x509.Certificate) -> None:
        self.calls.append(("publish", address, certificate))

    def unpublish(self, address: str) -> None:
        self.calls.append(("unpublish", address, None))


class AccountsTestCase(SynchronousTestCase):
    key_type = "p256"

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.store = FileKeyStore(self.root)
        self.ca = make_ca(self.root / "ca")
        self.publisher = RecordingPublisher()
        self.accounts = Accounts(
            self.store,
            self.ca,
            keys_config(self.root, key_type=self.key_type),
            publisher=self.publisher,
            generate_key=key_generator(),
        )

    def stored(self, address: str = "alice@example.org") -> StoredUser:
        user = self.store.get_user(address)
        assert user is not None
        return user

    def login(self, password: str = PASSWORD, address: str = "alice@example.org") -> accounts_module.UnlockResult:
        """Unlock as the server does, writing back a completed rotation."""
        result = unlock(self.stored(address), password)
        if result.updated_user is not None:
            self.store.put_user(result.updated_user)
        return result


def decrypts(key: PrivateKey, certificate: x509.Certificate) -> bool:
    """Whether ``key`` opens what was encrypted to ``certificate`` (as old mail was)."""
    public = certificate.public_key()
    if isinstance(public, rsa.RSAPublicKey) and isinstance(key, rsa.RSAPrivateKey):
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        return key.decrypt(public.encrypt(b"old mail", oaep), oaep) == b"old mail"
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(key, ec.EllipticCurvePrivateKey):
        ephemeral = ec.generate_private_key(public.curve)
        return key.exchange(ec.ECDH(), ephemeral.public_key()) == ephemeral.exchange(ec.ECDH(), public)
    return False


class AddTests(AccountsTestCase):
    def test_add_and_unlock(self) -> None:
        user = self.accounts.add("Alice@Example.ORG", PASSWORD)
        self.assertEqual(user.address, "Alice@example.org")
        self.assertEqual(self.stored(), user)
        certificate = user.current.certificate
        self.assertEqual(certificate.issuer, self.ca.certificate.subject)
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.RFC822Name), ["Alice@example.org"])
        self.assertEqual(pkcs12.kdf_parameters(user.current.sealed).iterations, FAST_ITERATIONS)
        result = unlock(user, PASSWORD)
        self.assertIsNone(result.updated_user)
        self.assertEqual(result.identity.address, "Alice@example.org")
        self.assertEqual(result.identity.current.certificate, certificate)
        self.assertEqual(result.identity.current.key_id, user.current.key_id)
        self.assertEqual(result.identity.current.chain, (self.ca.certificate,))
        self.assertTrue(decrypts(result.identity.current.private_key, certificate))
        self.assertEqual(self.publisher.calls, [("publish", "Alice@example.org", certificate)])

    def test_wrong_password(self) -> None:
        user = self.accounts.add("alice@example.org", PASSWORD)
        for wrong in ("alice's passwörd", "", PASSWORD + " ", "x" * 2000):
            self.assertRaises(BadPassword, unlock, user, wrong)

    def test_exists_case_insensitively(self) -> None:
        self.accounts.add("alice@example.org", PASSWORD)
        self.assertRaises(UserExists, self.accounts.add, "ALICE@EXAMPLE.ORG", "other")
        self.assertEqual(len(self.accounts.list()), 1)

    def test_bad_input(self) -> None:
        self.assertRaises(InvalidAddress, self.accounts.add, "alice", PASSWORD)
        self.assertRaises(InvalidAddress, self.accounts.add, "alice@localhost", PASSWORD)
        for password in ("", "a\0b", "x" * 1025):
            self.assertRaises(InvalidPassword, self.accounts.add, "alice@example.org", password)
        self.assertEqual(self.accounts.list(), [])

    def test_list_and_get(self) -> None:
        self.accounts.add("bob@example.org", "bob's")
        self.accounts.add("alice@example.org", PASSWORD)
        self.assertEqual([u.address for u in self.accounts.list()], ["alice@example.org", "bob@example.org"])
        self.assertEqual(self.accounts.get("BOB@example.org").address, "bob@example.org")
        self.assertRaises(UnknownUser, self.accounts.get, "carol@example.org")


class ChangePasswordTests(AccountsTestCase):
    def test_change(self) -> None:
        self.accounts.add("alice@example.org", PASSWORD)
        self.accounts.rotate("alice@example.org", PASSWORD)
        before = self.stored()
        self.accounts.change_password("alice@example.org", PASSWORD, "new secret")
        after = self.stored()
        self.assertEqual([k.key_id for k in after.keys], [k.key_id for k in before.keys])
        salts = {pkcs12.kdf_parameters(key.sealed).salt for key in after.keys}
        self.assertEqual(len(salts), 1)  # one KDF opens every key
        self.assertNotIn(pkcs12.kdf_parameters(before.keys[0].sealed).salt, salts)
        self.assertRaises(BadPassword, unlock, after, PASSWORD)
        self.assertEqual(len(unlock(after, "new secret").identity.keys), 2)

    def test_old_password_must_decrypt(self) -> None:
        self.accounts.add("alice@example.org", PASSWORD)
        before = self.stored()
        self.assertRaises(BadPassword, self.accounts.change_password, "alice@example.org", "wrong", "new secret")
        self.assertEqual(self.stored(), before)
        self.assertRaises(InvalidPassword, self.accounts.change_password, "alice@example.org", PASSWORD, "")
        self.assertRaises(UnknownUser, self.accounts.change_password, "bob@example.org", PASSWORD, "x")

    def test_completes_pending_rotation(self) -> None:
        self.accounts.add("alice@example.org", PASSWORD)
        self.accounts.rotate("alice@example.org")
        self.accounts.change_password("alice@example.org", PASSWORD, "new secret")
        after = self.stored()
        self.assertEqual((len(after.keys), len(after.pending)), (2, 0))
        self.assertEqual(len(unlock(after, "new secret").identity.keys), 2)


class RotateTests(AccountsTestCase):
    def test_with_password(self) -> None:
        first = self.accounts.add("alice@example.org", PASSWORD)
        rotated = self.accounts.rotate("ALICE@example.org", PASSWORD)
        self.assertEqual(rotated, self.stored())
        self.assertEqual(len(rotated.keys), 2)
        self.assertFalse(rotated.keys[0].retired)
        self.assertTrue(rotated.keys[1].retired)
        self.assertEqual(rotated.keys[1].key_id, first.current.key_id)
        self.assertEqual(rotated.pending, ())
        identity = self.login().identity
        self.assertEqual([k.certificate for k in identity.keys], [k.certificate for k in rotated.keys])
        # The retired key still opens mail encrypted to the old certificate.
        self.assertTrue(decrypts(identity.keys[1].private_key, first.current.certificate))
        self.assertEqual(self.publisher.calls[-1], ("publish", "alice@example.org", rotated.current.certificate))
        self.assertRaises(BadPassword, self.accounts.rotate, "alice@example.org", "wrong")

    def check_pending_rotation(self) -> None:
        first = self.accounts.add("alice@example.org", PASSWORD)
        pending_user = self.accounts.rotate("alice@example.org")
        self.assertEqual(len(pending_user.keys), 1)
        self.assertEqual(len(pending_user.pending), 1)
        pending = pending_user.pending[0]
        self.assertEqual(pending.sealed_to, first.current.key_id)
        self.assertEqual(current_certificate(pending_user), pending.certificate)
        self.assertEqual(self.publisher.calls[-1], ("publish", "alice@example.org", pending.certificate))

        # A wrong password completes nothing.
        self.assertRaises(BadPassword, unlock, self.stored(), "wrong")
        result = self.login()
        assert result.updated_user is not None
        identity = result.identity
        self.assertEqual(identity.current.certificate, pending.certificate)
        self.assertEqual(identity.current.key_id, pending.key_id)
        self.assertTrue(decrypts(identity.current.private_key, pending.certificate))
        self.assertTrue(decrypts(identity.keys[1].private_key, first.current.certificate))
        completed = self.stored()
        self.assertEqual(completed.pending, ())
        self.assertEqual([k.key_id for k in completed.keys], [pending.key_id, first.current.key_id])
        self.assertEqual([k.retired for k in completed.keys], [False, True])
        # Sealed like the others: same salt, and the next login has nothing to complete.
        self.assertEqual(
            pkcs12.kdf_parameters(completed.keys[0].sealed), pkcs12.kdf_parameters(completed.keys[1].sealed)
        )
        self.assertIsNone(unlock(completed, PASSWORD).updated_user)
        # The new private key was never on disk unencrypted.
        self.assertEqual(files_containing(self.root, private_der(identity.current.private_key)), [])

    def test_without_password_ec(self) -> None:
        self.check_pending_rotation()

    def test_twice_without_password(self) -> None:
        self.accounts.add("alice@example.org", PASSWORD)
        self.accounts.rotate("alice@example.org")
        second = self.accounts.rotate("alice@example.org")
        self.assertEqual(len(second.pending), 2)
        identity = self.login().identity
        self.assertEqual([k.certificate for k in identity.keys[:2]], [p.certificate for p in second.pending])
        self.assertEqual(len(self.stored().keys), 3)

    def test_tampered_pending_key(self) -> None:
        self.accounts.add("alice@example.org", PASSWORD)
        user = self.accounts.rotate("alice@example.org")
        pending = user.pending[0]
        altered = bytearray(pending.wrapped)
        altered[-5] ^= 1
        tampered = attrs.evolve(user, pending=(attrs.evolve(pending, wrapped=bytes(altered)),))
        self.assertRaises(KeyStoreError, unlock, tampered, PASSWORD)
        # Swapping in another user's certificate is detected too (the certificate is authenticated).
        other = self.accounts.add("bob@example.org", "bob's").current.certificate
        swapped = attrs.evolve(user, pending=(attrs.evolve(pending, certificate=other),))
        self.assertRaises(KeyStoreError, unlock, swapped, PASSWORD)

    def test_concurrent_change_refused_and_revoked(self) -> None:
        self.accounts.add("alice@example.org", PASSWORD)
        real_get = self.accounts.get

        def get_then_change(address: str) -> StoredUser:
            user = real_get(address)
            # Someone else rotates between our read and our write.
            Accounts(self.store, self.ca, self.accounts.keys_config, generate_key=key_generator(50)).rotate(address)
            return user

        self.patch(self.accounts, "get", get_then_change)
        self.assertRaises(KeyStoreError, self.accounts.rotate, "alice@example.org")
        self.assertEqual(len(self.stored().pending), 1)  # the other rotation survived
        self.assertEqual(len(self.ca.revoked_serials()), 1)  # ours was revoked


class RsaRotateTests(RotateTests):
    key_type = "rsa2048"

    def test_without_password_rsa(self) -> None:
        self.check_pending_rotation()


class DeleteTests(AccountsTestCase):
    def test_delete_revokes_everything(self) -> None:
        self.accounts.add("alice@example.org", PASSWORD)
        self.accounts.rotate("alice@example.org", PASSWORD)
        user = self.accounts.rotate("alice@example.org")
        certificates = [k.certificate for k in user.keys] + [p.certificate for p in user.pending]
        self.accounts.delete("ALICE@example.org")
        self.assertIsNone(self.store.get_user("alice@example.org"))
        self.assertEqual(self.ca.revoked_serials(), {c.serial_number for c in certificates})
        crl = x509.load_pem_x509_crl(self.ca.crl_path.read_bytes())
        for certificate in certificates:
            self.assertIsNotNone(crl.get_revoked_certificate_by_serial_number(certificate.serial_number))
        self.assertEqual(self.publisher.calls[-1], ("unpublish", "alice@example.org", None))
        self.assertRaises(UnknownUser, self.accounts.delete, "alice@example.org")


class ExportTests(AccountsTestCase):
    def test_modern_and_legacy(self) -> None:
        self.accounts.add("alice@example.org", PASSWORD)
        identity = self.login().identity
        for legacy in (False, True):
            data = self.accounts.export("alice@example.org", PASSWORD, "export pw", legacy=legacy)
            loaded = crypto_pkcs12.load_pkcs12(data, b"export pw")
            assert loaded.key is not None and loaded.cert is not None
            self.assertEqual(loaded.cert.certificate, identity.current.certificate)
            self.assertEqual([c.certificate for c in loaded.additional_certs], [self.ca.certificate])
            self.assertEqual(
                loaded.key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
                identity.current.certificate.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
            )
            self.assertRaises(ValueError, crypto_pkcs12.load_pkcs12, data, b"wrong")
        self.assertRaises(BadPassword, self.accounts.export, "alice@example.org", "wrong", "export pw")
        self.assertRaises(InvalidPassword, self.accounts.export, "alice@example.org", PASSWORD, "")


class UnlockCostTests(AccountsTestCase):
    def count_kdf(self) -> list[int]:
        calls: list[int] = []
        real = pkcs12.derive_key

        def counting(password: str, salt: bytes, iterations: int) -> bytes:
            calls.append(iterations)
            return real(password, salt, iterations)

        self.patch(pkcs12, "derive_key", counting)
        return calls

    def test_one_kdf_for_all_keys(self) -> None:
        self.accounts.add("alice@example.org", PASSWORD)
        self.accounts.rotate("alice@example.org", PASSWORD)
        self.accounts.rotate("alice@example.org", PASSWORD)
        user = self.stored()
        calls = self.count_kdf()
        self.assertEqual(len(unlock(user, PASSWORD).identity.keys), 3)
        self.assertEqual(calls, [FAST_ITERATIONS])

    def test_dummy_unlock_runs_the_same_kdf(self) -> None:
        calls = self.count_kdf()
        self.assertIsNone(dummy_unlock(600_000, "some password"))
        self.assertEqual(calls, [600_000])

    def test_lazy_ca(self) -> None:
        opened: list[CertificateAuthority] = []

        def open_ca() -> CertificateAuthority:
            opened.append(self.ca)
            return self.ca

        accounts = Accounts(self.store, open_ca, self.accounts.keys_config, generate_key=key_generator())
        self.accounts.add("alice@example.org", PASSWORD)
        accounts.list()
        accounts.change_password("alice@example.org", PASSWORD, "new")
        self.assertEqual(opened, [])
        accounts.rotate("alice@example.org", "new")
        self.assertEqual(len(opened), 1)


class DefaultsTests(SynchronousTestCase):
    """The production defaults, once: RSA-3072 keys and 600,000 PBKDF2 rounds."""

    def test_rsa3072_at_600k(self) -> None:
        root = Path(self.mktemp())
        store = FileKeyStore(root)
        ca = make_ca(root / "ca")
        config = KeysConfig(store=root)
        self.assertEqual((config.key_type, config.kdf_iterations), ("rsa3072", 600_000))
        accounts = Accounts(store, ca, config)  # the real key generator
        started = time.perf_counter()
        user = accounts.add("alice@example.org", PASSWORD)
        add_seconds = time.perf_counter() - started
        public = user.current.certificate.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        self.assertEqual(public.key_size, 3072)
        self.assertEqual(pkcs12.kdf_parameters(user.current.sealed).iterations, 600_000)
        started = time.perf_counter()
        identity = unlock(user, PASSWORD).identity
        unlock_seconds = time.perf_counter() - started
        self.assertTrue(decrypts(identity.current.private_key, user.current.certificate))
        # Generous bounds (a busy CI machine): the point is the order of magnitude.
        self.assertLess(unlock_seconds, 2.0)
        self.assertLess(add_seconds, 30.0)


class SealToPublicKeyTests(SynchronousTestCase):
    def check(self, kind: str) -> None:
        key = make_key(kind, index=60)
        other = make_key(kind, index=61)
        public = key.public_key()
        assert isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        blob = seal_to_public_key(public, b"the new private key", b"context")
        self.assertNotIn(b"the new private key", blob)
        self.assertEqual(open_with_private_key(key, blob, b"context"), b"the new private key")
        self.assertRaises(KeyStoreError, open_with_private_key, key, blob, b"other context")
        self.assertRaises(KeyStoreError, open_with_private_key, other, blob, b"context")
        self.assertRaises(KeyStoreError, open_with_private_key, key, blob[:40], b"context")
        self.assertRaises(KeyStoreError, open_with_private_key, key, b"nonsense" * 10, b"context")
        self.assertNotEqual(blob, seal_to_public_key(public, b"the new private key", b"context"))

    def test_rsa_oaep(self) -> None:
        self.check("rsa2048")

    def test_ecdh_p256(self) -> None:
        self.check("p256")

    def test_ecdh_p384(self) -> None:
        self.check("p384")

    def test_kind_mismatch(self) -> None:
        public = make_key("p256", index=60).public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        blob = seal_to_public_key(public, b"x", b"")
        self.assertRaises(KeyStoreError, open_with_private_key, make_key("rsa2048", index=60), blob, b"")


class RecordConsistencyTests(AccountsTestCase):
    def test_record_certificate_must_match_key_file(self) -> None:
        user = self.accounts.add("alice@example.org", PASSWORD)
        other = self.accounts.add("bob@example.org", "bob's").current.certificate
        mixed = attrs.evolve(user, keys=(attrs.evolve(user.current, certificate=other),))
        self.assertRaises(KeyStoreError, unlock, mixed, PASSWORD)

    def test_times(self) -> None:
        clock = datetime.datetime(2027, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)
        accounts = Accounts(self.store, self.ca, self.accounts.keys_config, now=lambda: clock)
        user = accounts.add("alice@example.org", PASSWORD)
        self.assertEqual((user.created, user.current.created), (clock, clock))

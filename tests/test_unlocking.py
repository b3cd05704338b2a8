"""The login's key work as a worker runs it: the store, the unlock, the trip back."""

from __future__ import annotations

import pickle
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gatekeeper.errors import BadPassword
from gatekeeper.keys.accounts import Accounts
from gatekeeper.keys.store import FileKeyStore
from gatekeeper.keys.unlocking import (
    WireIdentity,
    WorkerIdentities,
    identity_from_wire,
    identity_to_wire,
    unlock_from_store,
)
from gatekeeper.testing.login import make_identity
from gatekeeper.workers import WorkerPool
from tests.keys_support import FAST_ITERATIONS, key_generator, keys_config, make_ca

PASSWORD = "unlocking test password"


def make_accounts(root: Path) -> Accounts:
    ca = make_ca(root / "ca")
    store = FileKeyStore(root / "store")
    return Accounts(store, ca, keys_config(store.root), generate_key=key_generator(700))


class UnlockFromStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.accounts = make_accounts(Path(self.mktemp()))
        self.root = str(self.accounts.store.root)  # type: ignore[attr-defined]
        self.accounts.add("alice@example.org", PASSWORD)

    def test_right_password_brings_back_working_keys(self) -> None:
        wire = unlock_from_store(self.root, "Alice@example.org", PASSWORD, FAST_ITERATIONS)
        identity = identity_from_wire(pickle.loads(pickle.dumps(wire)))  # noqa: S301 - our own bytes
        self.assertEqual(identity.address, "alice@example.org")
        key = identity.current
        assert isinstance(key.private_key, ec.EllipticCurvePrivateKey)
        signature = key.private_key.sign(b"data", ec.ECDSA(hashes.SHA256()))
        public = key.certificate.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, b"data", ec.ECDSA(hashes.SHA256()))  # raises if the pair is wrong

    def test_wrong_password_unknown_user_and_invalid_input_fail_alike(self) -> None:
        for address, password in (
            ("alice@example.org", "wrong"),
            ("ghost@example.org", PASSWORD),
            (None, PASSWORD),
            ("alice@example.org", None),
        ):
            with self.assertRaises(BadPassword) as caught:
                unlock_from_store(self.root, address, password, FAST_ITERATIONS)
            self.assertEqual(str(caught.exception), "authentication failed")

    def test_login_records_the_time(self) -> None:
        self.assertIsNone(self.accounts.store.get_user("alice@example.org").last_login)  # type: ignore[union-attr]
        unlock_from_store(self.root, "alice@example.org", PASSWORD, FAST_ITERATIONS)
        self.assertIsNotNone(self.accounts.store.get_user("alice@example.org").last_login)  # type: ignore[union-attr]

    def test_a_pending_rotation_is_completed_and_written_back(self) -> None:
        self.accounts.rotate("alice@example.org")  # the admin has no password: pending until login
        before = self.accounts.store.get_user("alice@example.org")
        assert before is not None
        self.assertEqual((len(before.keys), len(before.pending)), (1, 1))
        wire = unlock_from_store(self.root, "alice@example.org", PASSWORD, FAST_ITERATIONS)
        after = self.accounts.store.get_user("alice@example.org")
        assert after is not None
        self.assertEqual((len(after.keys), len(after.pending)), (2, 0))
        self.assertEqual(wire.keys[0].key_id, after.keys[0].key_id)
        self.assertEqual(len(wire.keys), 2)

    def test_the_wire_form_does_not_show_keys(self) -> None:
        wire = unlock_from_store(self.root, "alice@example.org", PASSWORD, FAST_ITERATIONS)
        self.assertEqual(repr(wire), "<WireIdentity alice@example.org keys=1>")
        self.assertNotIn("private", repr(wire.keys[0]))


class UnlockInWorkerTests(TestCase):
    timeout = 60

    async def test_through_a_real_worker_process(self) -> None:
        accounts = make_accounts(Path(self.mktemp()).absolute())
        accounts.add("bob@example.org", PASSWORD)
        pool = WorkerPool(reactor, processes=1)
        self.addCleanup(pool.stop)
        root = str(accounts.store.root)  # type: ignore[attr-defined]
        wire = await pool.run(unlock_from_store, root, "bob@example.org", PASSWORD, FAST_ITERATIONS)
        self.assertIsInstance(wire, WireIdentity)
        self.assertEqual(identity_from_wire(wire).address, "bob@example.org")
        with self.assertRaises(BadPassword):
            await pool.run(unlock_from_store, root, "bob@example.org", "nope", FAST_ITERATIONS)


class WorkerIdentitiesTests(SynchronousTestCase):
    """A worker keeps rebuilt key objects while they are used, and not for longer."""

    def setUp(self) -> None:
        self.now = 0.0
        self.cache = WorkerIdentities(size=2, seconds=30, clock=lambda: self.now)
        self.wires = [identity_to_wire(make_identity(f"user{n}@example.org", key_index=n)) for n in range(3)]

    def test_kept_while_used(self) -> None:
        first = self.cache.get(self.wires[0])
        for self.now in (10.0, 35.0, 60.0):  # each use within 30 s of the last
            copy = pickle.loads(pickle.dumps(self.wires[0]))  # noqa: S301 - our own bytes: an equal wire
            self.assertIs(self.cache.get(copy), first)
        key = first.current
        self.assertEqual(key.private_key.public_key().public_numbers(), key.certificate.public_key().public_numbers())

    def test_forgotten_30_seconds_after_the_last_use(self) -> None:
        first = self.cache.get(self.wires[0])
        self.now = 31.0
        self.cache.get(self.wires[1])  # any job sweeps what went stale
        self.assertEqual(len(self.cache), 1)
        self.assertIsNot(self.cache.get(self.wires[0]), first)

    def test_at_most_size_identities(self) -> None:
        first = self.cache.get(self.wires[0])
        self.cache.get(self.wires[1])
        self.cache.get(self.wires[2])
        self.assertEqual(len(self.cache), 2)
        self.assertIsNot(self.cache.get(self.wires[0]), first)  # the least recently used went first

    def test_clear(self) -> None:
        self.cache.get(self.wires[0])
        self.cache.clear()
        self.assertEqual(len(self.cache), 0)

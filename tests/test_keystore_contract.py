"""IKeyStore's contract, checked on the file store and on the in-memory fake alike."""

from __future__ import annotations

import datetime
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gatekeeper.errors import UnknownUser
from gatekeeper.interfaces import IKeyStore, StoredKey, StoredUser
from gatekeeper.keys.store import FileKeyStore
from gatekeeper.testing.memory_store import MemoryKeyStore
from gatekeeper.testing.pki import TestPKI

NOW = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)


def stored(address: str, index: int = 0) -> StoredUser:
    certificate = TestPKI().user(address, key_kind="p256", key_index=index).certificate
    return StoredUser(address, (StoredKey(f"k{index}", certificate, b"sealed-%d" % index, NOW),), NOW)


class KeyStoreContract:
    """Mixed into a test case whose ``make_store`` returns a fresh store."""

    def make_store(self) -> IKeyStore:
        raise NotImplementedError

    def test_provides_the_interface(self) -> None:
        verifyObject(IKeyStore, self.make_store())

    def test_round_trip_case_insensitive(self) -> None:
        store = self.make_store()
        store.put_user(stored("Alice@example.org"))
        user = store.get_user("alice@EXAMPLE.org")
        assert user is not None
        self.assertEqual(user.keys[0].sealed, b"sealed-0")  # type: ignore[attr-defined]
        self.assertEqual(store.list_users(), ["Alice@example.org"])  # type: ignore[attr-defined]
        self.assertIsNone(store.get_user("bob@example.org"))  # type: ignore[attr-defined]

    def test_delete(self) -> None:
        store = self.make_store()
        store.put_user(stored("alice@example.org"))
        store.delete_user("ALICE@example.org")
        self.assertEqual(store.list_users(), [])  # type: ignore[attr-defined]
        with self.assertRaises(UnknownUser):  # type: ignore[attr-defined]
            store.delete_user("alice@example.org")

    def test_put_if_unchanged(self) -> None:
        store = self.make_store()
        first = stored("alice@example.org")
        store.put_user(first)
        read = store.get_user("alice@example.org")
        assert read is not None
        self.assertTrue(store.put_user_if_unchanged(read, stored("alice@example.org", 1)))  # type: ignore[attr-defined]
        self.assertFalse(store.put_user_if_unchanged(read, stored("alice@example.org", 2)))  # type: ignore[attr-defined]
        current = store.get_user("alice@example.org")
        assert current is not None
        self.assertEqual(current.keys[0].key_id, "k1")  # type: ignore[attr-defined]


class FileKeyStoreContractTests(KeyStoreContract, SynchronousTestCase):
    def make_store(self) -> IKeyStore:
        return FileKeyStore(Path(self.mktemp()))


class MemoryKeyStoreContractTests(KeyStoreContract, SynchronousTestCase):
    def make_store(self) -> IKeyStore:
        return MemoryKeyStore()

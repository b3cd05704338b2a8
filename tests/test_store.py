"""Tests for gatekeeper.keys.store: the file key store's layout, modes, atomicity and locking."""

from __future__ import annotations

import datetime
import json
import os
import stat
import threading
import time
from pathlib import Path

import attrs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from gatekeeper.errors import InvalidAddress, KeyStoreError, UnknownUser
from gatekeeper.interfaces import IKeyStore, PendingKey, StoredKey, StoredUser
from gatekeeper.keys import store as store_module
from gatekeeper.keys.store import FileKeyStore, FileLock, atomic_write, safe_name
from gatekeeper.testing.pki import TestPKI

T0 = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)

_pki: TestPKI | None = None


def pki() -> TestPKI:
    global _pki
    if _pki is None:
        _pki = TestPKI("Store Test CA", key_kind="p256", key_index=8)
    return _pki


def stored_key(index: int, sealed: bytes | None = None, *, retired: bool = False) -> StoredKey:
    # The store never opens key files: opaque bytes stand in for sealed PKCS#12 here.
    certificate = pki().user("alice@example.org", key_kind="p256", key_index=index).certificate
    return StoredKey(f"key{index}", certificate, sealed or f"sealed key {index}".encode(), T0, retired)


def user(*keys: StoredKey, address: str = "Alice@example.org", **changes: object) -> StoredUser:
    return attrs.evolve(StoredUser(address, keys or (stored_key(1),), T0), **changes)


class StoreTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.store = FileKeyStore(self.root)

    def user_dir(self, address: str = "alice@example.org") -> Path:
        return self.store.user_directory(address)


class RoundTripTests(StoreTestCase):
    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IKeyStore, self.store))

    def test_put_get(self) -> None:
        pending = PendingKey(
            "key3", pki().user("alice@example.org", key_kind="p256", key_index=3).certificate, b"wrapped", "key1", T0
        )
        original = user(
            stored_key(1), stored_key(2, retired=True), pending=(pending,), last_login=T0 + datetime.timedelta(days=1)
        )
        self.store.put_user(original)
        self.assertEqual(self.store.get_user("Alice@example.org"), original)
        # A second store on the same directory (another process) reads the same thing.
        self.assertEqual(FileKeyStore(self.root).get_user("alice@example.org"), original)

    def test_case_insensitive(self) -> None:
        self.store.put_user(user())
        for spelling in ("alice@example.org", "ALICE@EXAMPLE.ORG", "<Alice@Example.Org>"):
            found = self.store.get_user(spelling)
            assert found is not None
            self.assertEqual(found.address, "Alice@example.org")
        self.assertEqual(self.store.list_users(), ["Alice@example.org"])
        # Storing another spelling replaces the same record.
        self.store.put_user(user(address="ALICE@example.org"))
        self.assertEqual(self.store.list_users(), ["ALICE@example.org"])

    def test_unknown_and_invalid(self) -> None:
        self.assertIsNone(self.store.get_user("nobody@example.org"))
        self.assertRaises(InvalidAddress, self.store.get_user, "not an address")

    def test_list_sorted(self) -> None:
        for address in ("carol@example.org", "Bob@example.org", "alice@example.net"):
            self.store.put_user(user(address=address))
        self.assertEqual(self.store.list_users(), ["alice@example.net", "Bob@example.org", "carol@example.org"])

    def test_replace_removes_old_key_files(self) -> None:
        self.store.put_user(user(stored_key(1, b"first")))
        self.store.put_user(user(stored_key(1, b"second"), stored_key(2)))
        files = sorted(p.name for p in self.user_dir().iterdir())
        self.assertEqual(len(files), 3)  # user.json and two key files
        self.assertFalse(any(b"first" in (self.user_dir() / name).read_bytes() for name in files))
        found = self.store.get_user("alice@example.org")
        assert found is not None
        self.assertEqual(found.keys[0].sealed, b"second")

    def test_delete(self) -> None:
        self.store.put_user(user())
        self.store.put_user(user(address="bob@example.org"))
        self.store.delete_user("ALICE@example.org")
        self.assertIsNone(self.store.get_user("alice@example.org"))
        self.assertFalse(self.user_dir().exists())
        self.assertEqual(self.store.list_users(), ["bob@example.org"])
        self.assertEqual([p.name for p in (self.root / "users").iterdir()], [self.user_dir("bob@example.org").name])
        self.assertRaises(UnknownUser, self.store.delete_user, "alice@example.org")

    def test_record_login(self) -> None:
        original = user()
        self.store.put_user(original)
        key_files = {p.name: p.stat().st_ino for p in self.user_dir().iterdir() if p.suffix == ".p12"}
        when = T0 + datetime.timedelta(hours=5)
        self.store.record_login("ALICE@example.org", when)
        found = self.store.get_user("alice@example.org")
        assert found is not None
        self.assertEqual(found.last_login, when)
        self.assertEqual(found, attrs.evolve(original, last_login=when))
        # Only user.json was rewritten.
        self.assertEqual({p.name: p.stat().st_ino for p in self.user_dir().iterdir() if p.suffix == ".p12"}, key_files)
        self.assertRaises(UnknownUser, self.store.record_login, "bob@example.org", when)

    def test_record_login_defaults_to_now(self) -> None:
        self.store.put_user(user())
        before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        self.store.record_login("alice@example.org")
        found = self.store.get_user("alice@example.org")
        assert found is not None and found.last_login is not None
        self.assertGreaterEqual(found.last_login, before)

    def test_put_if_unchanged(self) -> None:
        original = user()
        self.store.put_user(original)
        self.store.record_login("alice@example.org", T0)  # a login time alone is not a change
        changed = user(stored_key(1), stored_key(2))
        self.assertTrue(self.store.put_user_if_unchanged(original, changed))
        self.assertFalse(self.store.put_user_if_unchanged(original, user(stored_key(5))))
        found = self.store.get_user("alice@example.org")
        assert found is not None
        self.assertEqual(len(found.keys), 2)


class ValidationTests(StoreTestCase):
    def test_refuses_bad_users(self) -> None:
        self.assertRaises(KeyStoreError, self.store.put_user, user(address="Alice@EXAMPLE.org"))  # not normalised
        self.assertRaises(KeyStoreError, self.store.put_user, StoredUser("alice@example.org", (), T0))
        self.assertRaises(KeyStoreError, self.store.put_user, user(attrs.evolve(stored_key(1), key_id="../x")))
        self.assertRaises(KeyStoreError, self.store.put_user, user(stored_key(1), stored_key(1)))
        naive = attrs.evolve(stored_key(1), created=datetime.datetime(2026, 1, 1))
        self.assertRaises(KeyStoreError, self.store.put_user, user(naive))
        self.assertEqual(self.store.list_users(), [])

    def test_safe_names(self) -> None:
        for address in (
            "a/b@example.org",
            "../../etc/passwd@example.org",
            "x'.\"@example.org",
            "ÄÖÜ@example.org",
            "user+tag@bücher.example",
            "%2e%2e@example.org",
        ):
            try:
                name = safe_name(address)
            except InvalidAddress:
                continue
            self.assertNotIn("/", name)
            self.assertFalse(name.startswith("."))
            self.assertEqual(self.store.user_directory(address).parent, self.root / "users")
        self.assertEqual(safe_name("Alice@Example.org"), safe_name("alice@example.org"))
        self.assertNotEqual(safe_name("a_b@example.org"), safe_name("a+b@example.org"))

    def test_slash_in_local_part_stays_inside(self) -> None:
        self.store.put_user(user(address="a/b@example.org"))
        self.assertEqual(self.store.list_users(), ["a/b@example.org"])
        self.assertEqual([p.parent for p in (self.root / "users").iterdir()], [self.root / "users"])

    def test_damaged_records(self) -> None:
        self.store.put_user(user())
        record_path = self.user_dir() / "user.json"
        record = json.loads(record_path.read_text())

        def damaged(change: dict[str, object]) -> None:
            record_path.write_text(json.dumps({**record, **change}))
            self.assertRaises(KeyStoreError, self.store.get_user, "alice@example.org")

        key = record["keys"][0]
        damaged({"keys": [{**key, "file": "../../../etc/passwd"}]})
        damaged({"keys": [{**key, "file": f"{key['key_id']}.0000000000000000.p12"}]})  # missing
        damaged({"keys": []})
        damaged({"keys": [{**key, "certificate": "nonsense"}]})
        damaged({"created": "yesterday"})
        damaged({"format": "something else"})
        damaged({"address": "bob@example.org"})  # a record in the wrong place
        record_path.write_text("{not json")
        self.assertRaises(KeyStoreError, self.store.get_user, "alice@example.org")

    def test_altered_key_file_detected(self) -> None:
        self.store.put_user(user())
        (key_file,) = [p for p in self.user_dir().iterdir() if p.suffix == ".p12"]
        key_file.write_bytes(b"swapped")
        self.assertRaises(KeyStoreError, self.store.get_user, "alice@example.org")


class ModeTests(StoreTestCase):
    def check_modes(self) -> None:
        for path in [self.root, *self.root.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            self.assertEqual(mode, 0o700 if path.is_dir() else 0o600, f"{path}: {oct(mode)}")

    def with_umask(self, umask: int) -> None:
        old = os.umask(umask)
        try:
            store = FileKeyStore(self.root / f"umask{umask:o}")
            store.put_user(user(stored_key(1), stored_key(2)))
            store.record_login("alice@example.org", T0)
            store.put_user(user(address="bob@example.org"))
        finally:
            os.umask(old)
        self.check_modes()

    def test_modes_umask_000(self) -> None:
        self.with_umask(0o000)

    def test_modes_umask_022(self) -> None:
        self.with_umask(0o022)

    def test_modes_umask_277(self) -> None:
        self.with_umask(0o277)

    def test_tightens_existing_root(self) -> None:
        root = Path(self.mktemp())
        root.mkdir()
        os.chmod(root, 0o755)  # noqa: S103 - the too-open directory the store must tighten
        FileKeyStore(root)
        self.assertEqual(stat.S_IMODE(root.stat().st_mode), 0o700)

    def test_atomic_write_mode_and_content(self) -> None:
        target = self.root / "file"
        old = os.umask(0)
        try:
            atomic_write(target, b"one")
            atomic_write(target, b"two")
        finally:
            os.umask(old)
        self.assertEqual(target.read_bytes(), b"two")
        self.assertEqual(stat.S_IMODE(target.stat().st_mode), 0o600)
        self.assertEqual(sorted(p.name for p in self.root.iterdir() if p.name.startswith(".tmp")), [])


class AtomicityTests(StoreTestCase):
    """A failure before the user.json rename leaves the old record, and its files, readable."""

    def fail_on(self, name_test: object) -> None:
        real = store_module.atomic_write

        def failing(path: Path, data: bytes, *, mode: int = 0o600) -> None:
            if self.failing and name_test(path):  # type: ignore[operator]
                raise KeyStoreError("disk full (simulated)")
            real(path, data, mode=mode)

        self.failing = True
        self.patch(store_module, "atomic_write", failing)

    def test_failure_at_commit(self) -> None:
        original = user(stored_key(1, b"old"))
        self.store.put_user(original)
        self.fail_on(lambda path: path.name == "user.json")
        self.assertRaises(KeyStoreError, self.store.put_user, user(stored_key(1, b"new"), stored_key(2)))
        self.assertEqual(self.store.get_user("alice@example.org"), original)

    def test_failure_between_key_files(self) -> None:
        original = user(stored_key(1, b"old"))
        self.store.put_user(original)
        self.fail_on(lambda path: path.name.startswith("key2."))
        self.assertRaises(KeyStoreError, self.store.put_user, user(stored_key(1, b"new"), stored_key(2)))
        self.assertEqual(self.store.get_user("alice@example.org"), original)

    def test_orphans_cleaned_by_next_write(self) -> None:
        self.store.put_user(user(stored_key(1, b"old")))
        self.fail_on(lambda path: path.name == "user.json")
        self.assertRaises(KeyStoreError, self.store.put_user, user(stored_key(1, b"orphan")))
        self.assertEqual(len(list(self.user_dir().iterdir())), 3)  # the orphan is still there
        (self.user_dir() / ".tmp-leftover").write_bytes(b"x")
        self.failing = False
        self.store.put_user(user(stored_key(1, b"final")))
        self.assertEqual(len(list(self.user_dir().iterdir())), 2)

    def test_new_user_failure_leaves_no_user(self) -> None:
        self.fail_on(lambda path: path.name == "user.json")
        self.assertRaises(KeyStoreError, self.store.put_user, user())
        self.assertIsNone(self.store.get_user("alice@example.org"))
        self.assertEqual(self.store.list_users(), [])


class LockTests(StoreTestCase):
    def test_writer_waits_for_lock_holder(self) -> None:
        self.store.put_user(user())
        other = FileKeyStore(self.root)  # as the server process would hold it
        finished = threading.Event()

        def login() -> None:
            other.record_login("alice@example.org", T0)
            finished.set()

        with self.store.locked():
            thread = threading.Thread(target=login)
            thread.start()
            time.sleep(0.2)
            self.assertFalse(finished.is_set())
        thread.join(5)
        self.assertTrue(finished.is_set())

    def test_reentrant_in_one_thread(self) -> None:
        with self.store.locked():
            self.store.put_user(user())
            with FileKeyStore(self.root).locked():
                self.assertIsNotNone(self.store.get_user("alice@example.org"))
                self.store.record_login("alice@example.org", T0)
        self.assertEqual(self.store.list_users(), ["Alice@example.org"])

    def test_no_upgrade_from_shared(self) -> None:
        lock = FileLock(self.root / ".lock")
        with lock.hold(exclusive=False), self.assertRaises(RuntimeError), lock.hold(exclusive=True):
            pass

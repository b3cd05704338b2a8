"""A login checker for protocol tests: real checker logic, fake (instant) key unlocking.

:func:`fake_login` builds a :class:`~gatekeeper.auth.KeyUnlockingChecker` over a
:class:`MemoryKeyStore` whose users' "keys" unlock when the password matches, with every
thread hop run synchronously, so adapter tests can log in without a KDF or a thread.
"""

from __future__ import annotations

import datetime

import attrs
from twisted.cred.portal import Portal

from gatekeeper.address import address_key, normalize_address
from gatekeeper.auth import AvatarFactory, GatekeeperRealm, KeyUnlockingChecker, SessionRegistry, UnlockCache
from gatekeeper.errors import BadPassword
from gatekeeper.interfaces import StoredKey, StoredUser
from gatekeeper.keys.identity import Identity, UnlockedKey
from gatekeeper.testing.memory_store import MemoryKeyStore
from gatekeeper.testing.pki import TestPKI
from gatekeeper.testing.threads import ImmediatePool, ImmediateReactor
from gatekeeper.throttle import LoginThrottle

_EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


@attrs.frozen
class FakeUnlockResult:
    """What :func:`gatekeeper.keys.accounts.unlock` returns, for the fake."""

    identity: Identity
    updated_user: StoredUser | None = None


def make_identity(address: str, pki: TestPKI | None = None, key_index: int = 0) -> tuple[Identity, StoredUser]:
    """Return an unlocked identity for ``address`` and the stored record it comes from."""
    issued = (pki or TestPKI()).user(address, key_index=key_index)
    key = UnlockedKey("k1", issued.certificate, issued.key, issued.chain)
    stored = StoredUser(address, (StoredKey("k1", issued.certificate, b"sealed", _EPOCH),), _EPOCH)
    return Identity(address, (key,)), stored


class FakeUnlocker:
    """Stands in for the key store's unlock: right when the password is the user's."""

    def __init__(self) -> None:
        self.passwords: dict[str, str] = {}
        self.identities: dict[str, Identity] = {}
        self.calls = 0
        self.dummy_calls = 0

    def unlock(self, user: StoredUser, password: str) -> FakeUnlockResult:
        """Unlock when ``password`` is the one registered for the user."""
        self.calls += 1
        key = address_key(user.address)
        if self.passwords.get(key) != password:
            raise BadPassword("authentication failed")
        return FakeUnlockResult(self.identities[key])

    def dummy(self) -> None:
        """Count the stand-in KDF runs for unknown users."""
        self.dummy_calls += 1


@attrs.define
class FakeLogin:
    """Everything a protocol test needs to log users in."""

    reactor: ImmediateReactor
    store: MemoryKeyStore
    unlocker: FakeUnlocker
    checker: KeyUnlockingChecker
    sessions: SessionRegistry
    pki: TestPKI

    def add_user(self, address: str, password: str) -> Identity:
        """Create a user whose keys unlock with ``password``."""
        address = normalize_address(address)
        identity, stored = make_identity(address, self.pki, key_index=len(self.unlocker.identities))
        self.store.put_user(stored)
        self.unlocker.passwords[address_key(address)] = password
        self.unlocker.identities[address_key(address)] = identity
        return identity

    def portal(self, interface: object, make_avatar: AvatarFactory) -> Portal:
        """A portal for one protocol's avatars over this checker."""
        return Portal(GatekeeperRealm(interface, make_avatar, self.sessions), [self.checker])  # type: ignore[arg-type]


def fake_login(*, cache_ttl: float = 300.0, free_failures: int = 3) -> FakeLogin:
    """Build a :class:`FakeLogin` with an empty user list."""
    reactor = ImmediateReactor()
    store = MemoryKeyStore()
    unlocker = FakeUnlocker()
    checker = KeyUnlockingChecker(
        store=store,
        reactor=reactor,
        pool=ImmediatePool(),  # type: ignore[arg-type]
        cache=UnlockCache(reactor, cache_ttl),
        throttle=LoginThrottle(reactor, free_failures=free_failures),
        unlock=unlocker.unlock,
        dummy_unlock=unlocker.dummy,
        record_login=store.record_login,
    )
    return FakeLogin(reactor, store, unlocker, checker, SessionRegistry(reactor), TestPKI())

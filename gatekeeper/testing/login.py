"""A login checker for protocol tests: the real checker, with instant fake key unlocking.

:func:`fake_login` builds a :class:`~gatekeeper.auth.KeyUnlockingChecker` whose
``unlock`` knows a dict of users and passwords and answers at once, so adapter tests
can log in without a KDF, a worker process or a thread.
"""

from __future__ import annotations

import attrs
from twisted.cred.portal import Portal
from twisted.internet.task import Clock

from gatekeeper.address import address_key, normalize_address
from gatekeeper.auth import AvatarFactory, GatekeeperRealm, KeyUnlockingChecker, SessionRegistry, UnlockCache
from gatekeeper.errors import BadPassword
from gatekeeper.keys.identity import Identity, UnlockedKey
from gatekeeper.testing.pki import TestPKI
from gatekeeper.throttle import LoginThrottle


def make_identity(address: str, pki: TestPKI | None = None, key_index: int = 0) -> Identity:
    """Return an unlocked identity for ``address`` with a certificate from ``pki``."""
    issued = (pki or TestPKI()).user(address, key_index=key_index)
    return Identity(address, (UnlockedKey("k1", issued.certificate, issued.key, issued.chain),))


class FakeUnlocker:
    """Stands in for the worker-process unlock: right when the password is the user's.

    Counts real unlocks (``calls``) and the same-cost dummy runs for unknown users
    (``dummy_calls``); ``error`` makes the next unlocks fail with that exception.
    """

    def __init__(self) -> None:
        self.users: dict[str, tuple[str, Identity]] = {}
        self.calls = 0
        self.dummy_calls = 0
        self.error: Exception | None = None

    async def unlock(self, address: str | None, password: str | None) -> Identity:
        """Unlock when ``password`` is the one registered for ``address``."""
        if self.error is not None:
            raise self.error
        entry = self.users.get(address_key(address)) if address is not None else None
        if entry is None or password is None:
            self.dummy_calls += 1
            raise BadPassword("authentication failed")
        self.calls += 1
        if password != entry[0]:
            raise BadPassword("authentication failed")
        return entry[1]


@attrs.define
class FakeLogin:
    """Everything a protocol test needs to log users in."""

    clock: Clock
    unlocker: FakeUnlocker
    cache: UnlockCache
    throttle: LoginThrottle
    checker: KeyUnlockingChecker
    sessions: SessionRegistry
    pki: TestPKI

    def add_user(self, address: str, password: str) -> Identity:
        """Create a user whose keys unlock with ``password``."""
        address = normalize_address(address)
        identity = make_identity(address, self.pki, key_index=len(self.unlocker.users))
        self.unlocker.users[address_key(address)] = (password, identity)
        return identity

    def portal(self, interface: object, make_avatar: AvatarFactory) -> Portal:
        """A portal for one protocol's avatars over this checker."""
        return Portal(GatekeeperRealm(interface, make_avatar, self.sessions), [self.checker])  # type: ignore[arg-type]


def fake_login(*, cache_ttl: float = 300.0, free_failures: int = 3) -> FakeLogin:
    """Build a :class:`FakeLogin` with no users."""
    clock = Clock()
    unlocker = FakeUnlocker()
    cache = UnlockCache(clock, cache_ttl)
    throttle = LoginThrottle(clock, free_failures=free_failures)
    checker = KeyUnlockingChecker(cache=cache, throttle=throttle, unlock=unlocker.unlock)
    return FakeLogin(clock, unlocker, cache, throttle, checker, SessionRegistry(clock), TestPKI())

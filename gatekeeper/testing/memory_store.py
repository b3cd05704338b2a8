"""An in-memory key store implementing :class:`~gatekeeper.interfaces.IKeyStore`."""

from __future__ import annotations

from zope.interface import implementer

from gatekeeper.address import address_key
from gatekeeper.errors import UnknownUser
from gatekeeper.interfaces import IKeyStore, StoredUser


@implementer(IKeyStore)
class MemoryKeyStore:
    """Keeps :class:`StoredUser` records in a dict; counts reads and writes for tests."""

    def __init__(self) -> None:
        self._users: dict[str, StoredUser] = {}
        self.reads = 0
        self.writes = 0
        self.logins: list[str] = []

    def list_users(self) -> list[str]:
        """Return the addresses of all users, sorted."""
        return sorted(user.address for user in self._users.values())

    def get_user(self, address: str) -> StoredUser | None:
        """Return the user (case-insensitive) or None."""
        self.reads += 1
        return self._users.get(address_key(address))

    def put_user(self, user: StoredUser) -> None:
        """Create or replace a user record."""
        self.writes += 1
        self._users[address_key(user.address)] = user

    def put_user_if_unchanged(self, expected: StoredUser, user: StoredUser) -> bool:
        """Write ``user`` only if the stored record is still ``expected``."""
        if self._users.get(address_key(expected.address)) != expected:
            return False
        self.put_user(user)
        return True

    def delete_user(self, address: str) -> None:
        """Remove a user; UnknownUser if absent."""
        if self._users.pop(address_key(address), None) is None:
            raise UnknownUser(f"no such user: {address}")

    def record_login(self, address: str) -> None:
        """Remember that the user logged in (tests read ``logins``)."""
        self.logins.append(address)

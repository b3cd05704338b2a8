"""Exponential back-off for failed logins, per user and per client address.

Every login costs a 600,000-round KDF, so a password-guessing client is both an attack
on an account and on the gateway's CPU. After ``free_failures`` failures a user name or a
client address has to wait ``base * 2**k`` seconds (capped) before its next attempt is
even looked at; a throttled attempt is refused without running the KDF. Unknown and
known user names are throttled alike, so throttling reveals nothing about who exists.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime


@attrs.define
class _Record:
    failures: int
    last_failure: float


class LoginThrottle:
    """Counts failed logins and says how long a user name or client must wait.

    Records are forgotten ``forget_after`` seconds after their last failure, and the
    table holds at most ``max_entries`` of each kind (oldest dropped first) so a flood
    of made-up user names cannot grow memory without bound.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        free_failures: int = 3,
        base_seconds: float = 1.0,
        max_seconds: float = 300.0,
        forget_after: float = 3600.0,
        max_entries: int = 100_000,
    ) -> None:
        self._clock = clock
        self._free = free_failures
        self._base = base_seconds
        self._max = max_seconds
        self._forget_after = forget_after
        self._max_entries = max_entries
        self._users: OrderedDict[str, _Record] = OrderedDict()
        self._clients: OrderedDict[str, _Record] = OrderedDict()

    def _delay(self, record: _Record | None, now: float) -> float:
        if record is None or record.failures <= self._free:
            return 0.0
        if now - record.last_failure > self._forget_after:
            return 0.0
        wait = min(self._max, math.ldexp(self._base, record.failures - self._free - 1))
        return max(0.0, record.last_failure + wait - now)

    def retry_after(self, user: str, client: str) -> float:
        """Return how many seconds this user name and client must still wait (0: go ahead)."""
        now = self._clock.seconds()
        return max(self._delay(self._users.get(user), now), self._delay(self._clients.get(client), now))

    def failed(self, user: str, client: str) -> None:
        """Count one failed login for the user name and the client address."""
        now = self._clock.seconds()
        for table, key in ((self._users, user), (self._clients, client)):
            record = table.pop(key, None)
            if record is None or now - record.last_failure > self._forget_after:
                record = _Record(0, now)
            record.failures += 1
            record.last_failure = now
            table[key] = record
            while len(table) > self._max_entries:
                table.popitem(last=False)

    def succeeded(self, user: str) -> None:
        """Forget the failures of a user who has just logged in.

        The client address keeps its count: an attacker who owns one account must not
        be able to reset the address's back-off by logging in to it between guesses.
        """
        self._users.pop(user, None)

    def failures(self, user: str, client: str) -> tuple[int, int]:
        """Return the current failure counts (user, client), for admins and tests."""
        user_record, client_record = self._users.get(user), self._clients.get(client)
        return (user_record.failures if user_record else 0, client_record.failures if client_record else 0)

"""The web page's users list with 10,000 users: one page against reading every user.

A gateway key store gets 10,000 users (copies of one real record, so no KDF runs), then,
in one run, with the facade's jobs called in this process:

- the baseline: ``gk.users()``'s job, which reads and parses every record (what a
  users page without paging would cost);
- the first page (50 users) and a later page, through ``users_page`` (the address index
  is built at the first call and kept while the users directory is unchanged; the first
  call is timed separately);
- a search matching 1,000 addresses, its 5th page;
- the page rendered to HTML with ``twisted.web.template``.

Run: ``.venv/bin/python bench/webadmin.py``. The last lines are the targets:
``ratio NAME = VALUE (target OP VALUE)``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from gatekeeper.admin.facade import list_users_job, users_page_job
from gatekeeper.admin.web import pages
from gatekeeper.testing.gateway import GatewayHarness

USERS = 10_000
PAGE = 50


def best(function: Callable[[], Any], rounds: int = 5) -> float:
    """The fastest of ``rounds`` calls, in seconds."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def rendered(page: Any) -> bytes:
    """The users page's HTML (the flattening of plain tags finishes at once)."""
    result: list[bytes] = []
    d: Deferred[bytes] = Deferred.fromCoroutine(
        pages.render_page(
            pages.layout(
                "Users", "users", pages.users_page(page, "", "t" * 43), admin="root", csrf="t" * 43, hostname="bench"
            )
        )
    )
    d.addCallback(result.append)
    return result[0]


def main() -> None:
    """Build the store, measure, print the ratio lines."""
    with tempfile.TemporaryDirectory() as directory:
        harness = GatewayHarness(Path(directory) / "gateway")
        harness.add_user("seed@example.org", "bench seed password")
        seed = harness.store.get_user("seed@example.org")
        assert seed is not None
        start = time.perf_counter()
        for number in range(USERS):
            harness.store.put_user(attrs.evolve(seed, address=f"user{number:05d}@example.org"))
        print(f"made {USERS} users in {time.perf_counter() - start:.1f} s")
        config = harness.config

        full = best(lambda: list_users_job(config), rounds=3)
        start = time.perf_counter()
        users_page_job(config, "", 0, PAGE)
        first_call = time.perf_counter() - start
        first = best(lambda: users_page_job(config, "", 0, PAGE))
        later = best(lambda: users_page_job(config, "", 150 * PAGE, PAGE))
        search = best(lambda: users_page_job(config, "user03", 4 * PAGE, PAGE))
        page = users_page_job(config, "", 0, PAGE)
        html = best(lambda: rendered(page))
        print(f"every record read (baseline): {full * 1000:.0f} ms")
        print(f"users_page, first call (builds the index): {first_call * 1000:.0f} ms")
        print(f"users_page, page 1: {first * 1000:.1f} ms; page 151: {later * 1000:.1f} ms")
        print(f"search matching 1,000, page 5: {search * 1000:.1f} ms; HTML of a page: {html * 1000:.1f} ms")
        print(f"ratio webadmin_users_page_vs_full_listing = {(first + html) / full:.3f} (target <= 0.1)")
        print(f"ratio webadmin_search_page_vs_full_listing = {(search + html) / full:.3f} (target <= 0.1)")
        print(f"ratio webadmin_first_index_vs_full_listing = {first_call / full:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()

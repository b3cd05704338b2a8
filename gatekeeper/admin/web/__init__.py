"""The web administration page: users, key pairs, the key ring, lookups, status and the audit log.

Served by the gateway's own process over HTTPS only (the ``[tls]`` certificate) on
``[admin] web`` (off unless given an endpoint; loopback unless it names an
``interface=``), server-rendered with ``twisted.web.template`` and usable without
JavaScript. Every action calls :class:`~gatekeeper.admin.facade.Gatekeeper`, the same
code as the ``gatekeeper`` command and the SSH console, and is audited as made by the
logged-in administrator "via web".

- :mod:`.admins`: the administrators (``gatekeeper admin add NAME``), scrypt hashes.
- :mod:`.sessions`: server-side sessions, idle time-out, CSRF tokens.
- :mod:`.app`: the site, the request cycle, security headers, upload limits.
- :mod:`.pages`: the pages, as tags.
- :mod:`.activity`: relays per minute over the last hour, and its SVG chart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.application.service import Service
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory

from gatekeeper.admin.facade import Gatekeeper
from gatekeeper.admin.web.activity import Activity, ActivityService
from gatekeeper.admin.web.admins import admins_path
from gatekeeper.admin.web.app import AdminSite, WebAdmin
from gatekeeper.throttle import LoginThrottle

if TYPE_CHECKING:
    from gatekeeper.tap import Parts

__all__ = ["AdminSite", "WebAdmin", "web_admin_site"]


def web_admin_site(parts: Parts) -> AdminSite:
    """The administration site over the gateway's parts (plain HTTP: wrap it with :func:`tls_factory`)."""
    config = parts.config
    login = config.login
    admin = WebAdmin(
        Gatekeeper(parts, actor="web", via="web"),
        workers=parts.message_workers,
        admins=admins_path(config),
        clock=parts.reactor,
        hostname=config.server.hostname,
        activity=Activity(parts.reactor),
        throttle=LoginThrottle(
            parts.reactor,
            free_failures=login.free_failures,
            base_seconds=login.backoff_base_seconds,
            max_seconds=login.backoff_max_seconds,
            forget_after=login.forget_after_seconds,
        ),
        idle_seconds=config.admin.web_idle_minutes * 60.0,
    )
    return AdminSite(admin, reactor=parts.reactor)


def tls_factory(site: AdminSite, tls: CertificateOptions) -> TLSMemoryBIOFactory:
    """The site behind TLS (there is no plain-HTTP way in)."""
    return TLSMemoryBIOFactory(tls, False, site)


def activity_service(site: AdminSite) -> Service:
    """The service that feeds the gateway's events to the site's status chart."""
    return ActivityService(site.admin.activity)


__all__ += ["activity_service", "tls_factory"]

"""Structured events: what happened, as log events with named fields.

Every module reports what the gateway did through :func:`emit`; the log shows it as a
line, and observers turn the same events into metrics (counters, histograms) and the
audit log, without the code that emits them knowing about either. An event is a
``twisted.logger`` event with a ``gk_event`` field naming it and fields from the table
below. Field values are names, addresses, counts and durations: never a password, a key
or any part of a message body.

=================  ==========================================================================
``gk_event``       fields
=================  ==========================================================================
``login``          ``outcome`` (ok, cached, failed, throttled, unavailable), ``protocol``
                   (``admin-web`` for the web page's administrators), ``user``, ``client``
``session``        ``action`` (open, close), ``protocol``, ``user``, ``client``, ``session``
``relay``          ``outcome`` (encrypted, signed_only, plain, rejected, temp_failed,
                   passed_through), ``recipients``, ``user``, ``session``, ``message_id``
``reveal``         ``decrypted`` (yes, no, failed), ``signature`` (valid, invalid, untrusted,
                   none, ...), ``user``, ``protocol``, ``seconds``
``lookup``         ``source``, ``outcome`` (found, not_found, unavailable, cached), ``seconds``
``upstream``       ``protocol``, ``outcome`` (ok, error, timeout), ``detail``
``store``          the embedded mail store: ``action`` (deliver, refuse, recover, rebuild),
                   ``user``; deliver: ``uid``, ``size``; refuse: ``detail``, ``temporary``;
                   recover: ``detail`` (what the recovery found, counted)
``key_use``        audit: ``operation`` (unlock, sign, decrypt), ``user``, ``session``,
                   ``message_id``, ``peer``
``admin``          audit: ``operation`` (add_user, passwd, reset_password, rotate,
                   delete_user, export, import_cert, remove_cert, flush, kick,
                   set_upstream_login, clear_upstream_login, add_admin, remove_admin),
                   ``target``, ``actor``, ``via`` (cli, manhole, web, ...)
=================  ==========================================================================

``key_use`` and ``admin`` events carry ``gk_audit=True`` and go to the audit log.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

AUDITED = frozenset({"key_use", "admin"})


def emit(logger: Logger, event: str, message: str, *, level: str = "info", **fields: Any) -> None:
    """Log ``message`` (a ``twisted.logger`` format string over ``fields``) as event ``event``.

    ``level`` is a ``twisted.logger`` level name (``info``, ``warn``, ``error``).
    Audited events are marked so the audit observer picks them up.
    """
    getattr(logger, level)(message, gk_event=event, gk_audit=event in AUDITED, **fields)

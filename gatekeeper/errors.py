"""One vocabulary of failures, shared by every layer.

Errors are either *permanent* (retrying the same thing will fail again: a wrong
password, a recipient without a certificate under a mandatory policy) or *temporary*
(an outage: a directory that is down, an upstream that timed out). Adapters translate
them once, at the edge: permanent to ``5xx``/``NO``/``-ERR``, temporary to
``4xx``/``NO [UNAVAILABLE]``/``-ERR [SYS/TEMP]``.

Messages are shown to users and written to logs: they never contain a password, a key
or any part of a message body.
"""

from __future__ import annotations


class GatekeeperError(Exception):
    """Base of every error Gatekeeper raises on purpose."""

    temporary: bool = False


class PermanentError(GatekeeperError):
    """Retrying the same operation will fail the same way."""


class TemporaryError(GatekeeperError):
    """An outage or a timeout: the client should try again later."""

    temporary = True


class ConfigError(PermanentError):
    """A configuration value is missing or wrong.

    ``path`` names the setting (``"[upstream] imap"``); ``str(error)`` is one line that
    says what was expected and what was found.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.message = message
        self.path = path


class BadPassword(PermanentError):
    """The password does not decrypt the private key (or the user does not exist).

    The two cases are deliberately indistinguishable.
    """


class InvalidPassword(PermanentError):
    """A new password cannot be used (empty, too long, or holding a NUL character)."""


class LoginThrottled(TemporaryError):
    """Too many failed logins for this user or client address; try again later."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many failed logins; try again later")
        self.retry_after = retry_after


class UnknownUser(PermanentError):
    """An administrative operation named a user the key store does not have."""


class UserExists(PermanentError):
    """An administrative operation tried to create a user that already exists."""


class InvalidAddress(PermanentError):
    """A string is not a usable e-mail address."""


class KeyStoreError(PermanentError):
    """The key store is damaged or cannot be written."""


class NoCertificate(PermanentError):
    """No trusted certificate was found for a recipient."""


class PolicyRejected(PermanentError):
    """The policy refuses to send this message to this recipient."""


class SourceUnavailable(TemporaryError):
    """A key source (a directory, DNS) could not be asked: down, slow or refusing."""


class UpstreamUnavailable(TemporaryError):
    """The upstream mail server could not be reached or timed out."""


class RelayRefused(GatekeeperError):
    """The server mail is relayed to refused a sender, a recipient or a message; nothing was kept.

    ``temporary`` follows the server's reply code (4xx or 5xx); ``recipient`` names the
    recipient it refused, if it was one. The message quotes the server's reply text.
    """

    def __init__(self, message: str, *, code: int, status: str, recipient: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.recipient = recipient
        self.temporary = 400 <= code < 500


class MessageRejected(PermanentError):
    """A submitted message cannot be sent as it is (and cannot be repaired).

    ``status`` is the enhanced status code (RFC 3463) that fits, e.g. ``5.6.0``; the
    message says what is wrong in words safe to show to the client.
    """

    def __init__(self, message: str, *, status: str = "5.6.0") -> None:
        super().__init__(message)
        self.status = status


class UpstreamRefused(GatekeeperError):
    """The upstream mail server answered a request with an error (e.g. POP3 ``-ERR``).

    ``code`` is the RFC 3206 response code it gave (``AUTH``, ``IN-USE``, ``SYS/TEMP``,
    ``SYS/PERM``) or None; ``temporary`` follows it. The message is Gatekeeper's own
    wording, safe to show; the server's text is never passed on.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.temporary = code in ("IN-USE", "SYS/TEMP", "LOGIN-DELAY")

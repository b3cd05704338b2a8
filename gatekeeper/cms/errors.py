"""The one exception family of the CMS and S/MIME layers.

Every failure to read or produce a message is an :class:`SMIMEError`; its message is
safe to show to a user or write to a log: it names what was wrong (a structure, an
algorithm, a limit), never key material or any part of the plaintext.
"""

from __future__ import annotations

from gatekeeper.errors import PermanentError


class SMIMEError(PermanentError):
    """Base of every error raised by :mod:`gatekeeper.cms` and :mod:`gatekeeper.smime`.

    It is permanent: the same message fails the same way when tried again.
    """


class NotForMe(SMIMEError):
    """The message is encrypted, but to none of the keys that were offered."""


class Tampered(SMIMEError):
    """The message was altered (or damaged) after it was protected.

    Raised when authenticated encryption fails or the content cannot be decrypted with
    a key the message names. A signature that does not match is reported in the
    signature's trust result (``BAD_SIGNATURE``) rather than raised, so that the rest of
    the message can still be shown with a warning.
    """


class Malformed(SMIMEError):
    """The message is not well-formed MIME/CMS, or exceeds a size or nesting limit."""


class LimitExceeded(Malformed):
    """An element is larger, or nested deeper, than Gatekeeper accepts."""


class UnsupportedAlgorithm(SMIMEError):
    """The message uses an algorithm Gatekeeper does not implement (or refuses: MD5, RC2...)."""

"""The SMTP submission adapter: Twisted's ESMTP server, with Gatekeeper's login rules.

Only translation lives here: SMTP replies to and from the core. AUTH is offered as
PLAIN and LOGIN only (CRAM-MD5 carries a hash, which cannot decrypt a key), and only
once the connection is encrypted (or from loopback when ``[tls]
allow_plaintext_on_loopback`` is set). ``MAIL FROM`` must be the authenticated user.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.mail import smtp
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeeper.address import same_address
from gatekeeper.auth import AvatarFactory, LoginThrottledError, Session, connection_portal
from gatekeeper.connections import Connections
from gatekeeper.keys.identity import Identity
from gatekeeper.tls import secrets_allowed

CHALLENGERS = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}


class SubmissionServer(smtp.ESMTP):
    """ESMTP for authenticated mail submission (ports 587 and 465)."""

    def __init__(self, context_factory: CertificateOptions | None, *, allow_plaintext_on_loopback: bool) -> None:
        super().__init__(chal=dict(CHALLENGERS), contextFactory=context_factory)
        self._allow_plaintext_on_loopback = allow_plaintext_on_loopback

    connections: Connections | None = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Clean up the session, then tell the listener this connection is gone."""
        super().connectionLost(reason)
        if self.connections is not None:
            self.connections.remove(self)

    def _secrets_allowed(self) -> bool:
        return secrets_allowed(self.transport, allow_plaintext_on_loopback=self._allow_plaintext_on_loopback)

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        """Advertise AUTH only where a password may be sent."""
        extensions: dict[bytes, list[bytes] | None] = super().extensions()
        if not self._secrets_allowed():
            extensions.pop(b"AUTH", None)
        return extensions

    def ext_AUTH(self, rest: bytes) -> None:
        """Refuse AUTH before TLS (RFC 4954's 538), otherwise let Twisted run the exchange."""
        if not self._secrets_allowed():
            self.sendCode(538, b"5.7.11 Encryption required for requested authentication mechanism")
            return
        super().ext_AUTH(rest)

    def _ebAuthenticated(self, reason: Failure) -> None:
        """Translate login failures: throttled and temporary ones are 454, wrong passwords 535."""
        self.challenge = None
        if reason.check(LoginThrottledError):
            self.sendCode(454, b"4.7.0 Too many failed logins, try again later")
        elif reason.check(UnauthorizedLogin):
            self.sendCode(535, b"5.7.8 Authentication credentials invalid")
        else:
            self.sendCode(454, b"4.7.0 Temporary authentication failure")

    def do_MAIL(self, rest: bytes) -> None:
        """Nobody sends without logging in (RFC 4954's 530)."""
        if self.delivery is None:
            self.sendCode(530, b"5.7.0 Authentication required")
            return
        super().do_MAIL(rest)


class SubmissionFactory(ServerFactory):
    """Builds one :class:`SubmissionServer` per connection, tagged with the client's address."""

    def __init__(
        self,
        portal: Portal,
        context_factory: CertificateOptions | None,
        *,
        hostname: str,
        allow_plaintext_on_loopback: bool = False,
    ) -> None:
        self.portal = portal
        self.context_factory = context_factory
        self.hostname = hostname.encode("ascii")
        self.connections = Connections()
        self.allow_plaintext_on_loopback = allow_plaintext_on_loopback

    def buildProtocol(self, addr: IAddress | None) -> SubmissionServer:
        """Give the new connection its own view of the portal."""
        protocol = SubmissionServer(self.context_factory, allow_plaintext_on_loopback=self.allow_plaintext_on_loopback)
        protocol.factory = self
        protocol.host = self.hostname
        protocol.portal = connection_portal(self.portal, "smtp", protocol, addr)  # type: ignore[assignment]
        protocol.connections = self.connections
        self.connections.add(protocol)
        return protocol


@implementer(smtp.IMessageDelivery)
class SubmissionDelivery:
    """What an authenticated submission session may do.

    Relaying (signing, encrypting and handing mail to the upstream server) arrives with
    the SMTP proxy issue; until then recipients are refused with a temporary error, so
    clients keep their messages and retry.
    """

    def __init__(self, identity: Identity, session: Session) -> None:
        self.identity = identity
        self.session = session

    def receivedHeader(self, helo: tuple[bytes, bytes], origin: smtp.Address, recipients: list[smtp.User]) -> None:
        """No Received: header yet (nothing is relayed)."""
        return None

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        """``MAIL FROM`` must be the logged-in user (or the null sender for bounces)."""
        sender = str(origin)
        if sender and not same_address(sender, self.identity.address):
            raise smtp.SMTPBadSender(origin, 553, "5.7.1 Sender address does not belong to the logged-in user")
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], smtp.IMessage]:
        """Relaying is not available in this version: refuse with a temporary error."""
        raise smtp.SMTPBadRcpt(user, 451, "4.3.2 Relaying is not available yet, try again later")


def make_delivery_avatar() -> AvatarFactory:
    """Return the realm's avatar factory for SMTP sessions."""

    def make(identity: Identity, session: Session) -> tuple[Any, Callable[[], None]]:
        return SubmissionDelivery(identity, session), lambda: None

    return make

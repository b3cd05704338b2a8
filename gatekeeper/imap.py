"""The IMAP4 adapter: Twisted's IMAP4Server with Gatekeeper's login rules.

LOGIN and AUTHENTICATE (PLAIN, LOGIN) are only accepted over TLS: on port 143 the
server says ``LOGINDISABLED`` and advertises no AUTH= mechanism until STARTTLS. Login
failures carry RFC 5530 response codes (``AUTHENTICATIONFAILED``, ``UNAVAILABLE``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.mail import imap4
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeeper.auth import AvatarFactory, LoginThrottledError, Session, connection_portal
from gatekeeper.connections import Connections
from gatekeeper.keys.identity import Identity
from gatekeeper.tls import secrets_allowed

CHALLENGERS = {b"PLAIN": imap4.PLAINCredentials, b"LOGIN": imap4.LOGINCredentials}


class ImapServer(imap4.IMAP4Server):
    """IMAP4rev1 for Gatekeeper: STARTTLS on 143, implicit TLS on 993."""

    IDENT = b"Gatekeeper IMAP4rev1 ready"

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

    def capabilities(self) -> dict[bytes, Any]:
        """Before TLS: STARTTLS and LOGINDISABLED, no AUTH= mechanisms."""
        capabilities: dict[bytes, Any] = super().capabilities()
        if self._secrets_allowed():
            capabilities.pop(b"LOGINDISABLED", None)
        else:
            capabilities[b"AUTH"] = []
            capabilities[b"LOGINDISABLED"] = None
        return capabilities

    def do_LOGIN(self, tag: bytes, user: bytes, passwd: bytes) -> None:
        """LOGIN, refused before TLS; failures answered with RFC 5530 codes."""
        if not self._secrets_allowed():
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] LOGIN is disabled before STARTTLS")
            return
        d = maybeDeferred(self.authenticateLogin, user, passwd)
        d.addCallbacks(self._login_succeeded, self._login_failed, callbackArgs=(tag,), errbackArgs=(tag,))

    unauth_LOGIN = (do_LOGIN, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_finalastring)  # type: ignore[assignment]

    def do_AUTHENTICATE(self, tag: bytes, args: bytes) -> None:
        """AUTHENTICATE PLAIN/LOGIN, refused before TLS."""
        if not self._secrets_allowed():
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] Authentication requires STARTTLS first")
            return
        super().do_AUTHENTICATE(tag, args)

    unauth_AUTHENTICATE = (do_AUTHENTICATE, imap4.IMAP4Server.arg_atom)  # type: ignore[assignment]

    def _login_succeeded(self, result: tuple[Any, Any, Callable[[], None]], tag: bytes) -> None:
        _interface, avatar, logout = result
        self.account = avatar
        self._onLogout = logout
        self.state = "auth"
        self.sendPositiveResponse(tag, b"LOGIN completed")
        self.setTimeout(self.POSTAUTH_TIMEOUT)

    def _login_failed(self, failure: Failure, tag: bytes) -> None:
        if failure.check(LoginThrottledError):
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Too many failed logins, try again later")
        elif failure.check(UnauthorizedLogin):
            self.sendNegativeResponse(tag, b"[AUTHENTICATIONFAILED] Authentication failed")
        else:
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Temporary authentication failure, try again later")


class ImapFactory(ServerFactory):
    """Builds one :class:`ImapServer` per connection, tagged with the client's address."""

    def __init__(
        self, portal: Portal, context_factory: CertificateOptions | None, *, allow_plaintext_on_loopback: bool = False
    ) -> None:
        self.portal = portal
        self.context_factory = context_factory
        self.allow_plaintext_on_loopback = allow_plaintext_on_loopback
        self.connections = Connections()

    def buildProtocol(self, addr: IAddress | None) -> ImapServer:
        """Give the new connection its own view of the portal."""
        protocol = ImapServer(self.context_factory, allow_plaintext_on_loopback=self.allow_plaintext_on_loopback)
        protocol.factory = self
        protocol.portal = connection_portal(self.portal, "imap", protocol, addr)  # type: ignore[assignment]
        protocol.connections = self.connections
        self.connections.add(protocol)
        return protocol


@implementer(imap4.IAccount)
class EmptyAccount:
    """The account of a session before the IMAP proxy exists: no mailboxes, nothing lost."""

    def addMailbox(self, name: str, mbox: object = None) -> bool:
        """Mailboxes cannot be created yet."""
        raise imap4.MailboxException("mailboxes are not available yet")

    def create(self, pathspec: str) -> bool:
        """Mailboxes cannot be created yet."""
        raise imap4.MailboxException("mailboxes are not available yet")

    def select(self, name: str, rw: bool = True) -> None:
        """There is no mailbox to select."""
        return None

    def delete(self, name: str) -> None:
        """There is no mailbox to delete."""
        raise imap4.MailboxException("no such mailbox")

    def rename(self, oldname: str, newname: str) -> None:
        """There is no mailbox to rename."""
        raise imap4.MailboxException("no such mailbox")

    def isSubscribed(self, name: str) -> bool:
        """Nothing is subscribed."""
        return False

    def subscribe(self, name: str) -> None:
        """There is no mailbox to subscribe to."""
        raise imap4.MailboxException("no such mailbox")

    def unsubscribe(self, name: str) -> None:
        """There is no mailbox to unsubscribe from."""
        raise imap4.MailboxException("no such mailbox")

    def listMailboxes(self, ref: str, wildcard: str) -> list[tuple[str, Any]]:
        """No mailboxes."""
        return []


def make_account_avatar() -> AvatarFactory:
    """Return the realm's avatar factory for IMAP sessions."""

    def make(identity: Identity, session: Session) -> tuple[Any, Callable[[], None]]:
        return EmptyAccount(), lambda: None

    return make

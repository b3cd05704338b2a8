"""The POP3 adapter: Twisted's POP3 server with STLS, SASL PLAIN/LOGIN and no APOP.

Twisted's server lacks STLS (RFC 2595), and its ``AUTH`` only does CRAM-MD5-shaped
exchanges; APOP carries a hash, which cannot decrypt a private key. This subclass adds
STLS and a real SASL exchange through the protocol's own ``do_X`` dispatch, refuses
passwords before TLS, and answers with RFC 2449/3206 response codes.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IAddress, ITLSTransport
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.mail import pop3
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeeper.auth import AvatarFactory, LoginThrottledError, Session, connection_portal
from gatekeeper.connections import Connections
from gatekeeper.keys.identity import Identity
from gatekeeper.tls import secrets_allowed, transport_is_secure

CHALLENGERS: dict[bytes, Callable[[], Any]] = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}
MAX_SASL_LINE = 4096


class Pop3Server(pop3.POP3):
    """POP3 for Gatekeeper: STLS on port 110, implicit TLS on 995, passwords only over TLS."""

    AUTH_CMDS = [b"CAPA", b"USER", b"PASS", b"AUTH", b"STLS", b"APOP", b"QUIT"]

    def __init__(self, context_factory: CertificateOptions | None, *, allow_plaintext_on_loopback: bool) -> None:
        self.context_factory = context_factory
        self._allow_plaintext_on_loopback = allow_plaintext_on_loopback
        self._sasl: Any = None

    connections: Connections | None = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Clean up the session, then tell the listener this connection is gone."""
        super().connectionLost(reason)
        if self.connections is not None:
            self.connections.remove(self)

    def _secrets_allowed(self) -> bool:
        return secrets_allowed(self.transport, allow_plaintext_on_loopback=self._allow_plaintext_on_loopback)

    def _can_start_tls(self) -> bool:
        return (
            self.context_factory is not None
            and ITLSTransport.providedBy(self.transport)
            and not transport_is_secure(self.transport)
        )

    def connectionMade(self) -> None:
        """Greet without an APOP timestamp: APOP is not offered."""
        self.successResponse(b"Gatekeeper POP3 ready")
        self.setTimeout(self.timeOut)

    def state_COMMAND(self, line: bytes) -> None:
        """Dispatch one command; a bad or premature command is an answer, not a logged traceback."""
        try:
            self.processCommand(*line.split(b" "))
        except pop3.POP3Error as error:
            self.failResponse(b" ".join(error.args) if error.args else b"command failed")
        except (TypeError, ValueError):
            # Wrong number of arguments or a bad message number: the client's mistake.
            self.failResponse(b"bad command arguments")

    def listCapabilities(self) -> list[bytes]:
        """CAPA: what this server does, in the current state of the connection."""
        capabilities = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"IMPLEMENTATION Gatekeeper"]
        if self.mbox is None:
            if self._can_start_tls():
                capabilities.append(b"STLS")
            if self._secrets_allowed():
                capabilities += [b"USER", b"SASL " + b" ".join(CHALLENGERS)]
        return capabilities

    def do_STLS(self) -> None:
        """Start TLS (RFC 2595); only before login and only once."""
        if self.mbox is not None or self.context_factory is None or not self._can_start_tls():
            self.failResponse(b"STLS not available")
            return
        self.successResponse(b"Begin TLS negotiation now")
        ITLSTransport(self.transport).startTLS(self.context_factory)
        # Forget anything said before TLS (RFC 2595 section 4).
        self._userIs = None

    def do_APOP(self, user: bytes, digest: bytes) -> None:
        """APOP sends a hash of the password, which cannot unlock a key: refuse it."""
        self.failResponse(b"[AUTH] APOP is not supported; use USER/PASS or AUTH PLAIN over TLS")

    def _refuse_without_tls(self) -> bool:
        if self._secrets_allowed():
            return False
        self.failResponse(b"[AUTH] Authentication requires TLS; use STLS first")
        return True

    def do_USER(self, user: bytes) -> None:
        """Accept a user name, but only over TLS (the password follows it)."""
        if self._refuse_without_tls():
            return
        super().do_USER(user)

    def do_PASS(self, password: bytes, *words: bytes) -> None:
        """Log in; later pipelined commands wait until the KDF has answered."""
        if self._refuse_without_tls():
            return
        if self._userIs is None:
            self.failResponse(b"USER required before PASS")
            return
        user, self._userIs = self._userIs, None
        self._login(user, b" ".join((password, *words)))

    def do_AUTH(self, mechanism: bytes | None = None, initial: bytes | None = None) -> None:
        """SASL (RFC 5034): PLAIN, with or without an initial response, and LOGIN."""
        if mechanism is None:
            self.successResponse(b"Supported authentication methods:")
            for name in CHALLENGERS:
                self.sendLine(name)
            self.sendLine(b".")
            return
        if self._refuse_without_tls():
            return
        factory = CHALLENGERS.get(mechanism.upper())
        if factory is None:
            self.failResponse(b"Unsupported SASL mechanism")
            return
        self._sasl = factory()
        if initial is not None and initial != b"=":
            self._sasl_response(initial)
        else:
            self._sasl_challenge()

    def _sasl_challenge(self) -> None:
        self.sendLine(b"+ " + base64.b64encode(self._sasl.getChallenge()))
        self.state = "AUTH"

    def state_AUTH(self, line: bytes) -> None:
        """One client line of a SASL exchange."""
        self.state = "COMMAND"
        if line.strip() == b"*":
            self._sasl = None
            self.failResponse(b"Authentication cancelled")
            return
        self._sasl_response(line)

    def _sasl_response(self, encoded: bytes) -> None:
        try:
            if len(encoded) > MAX_SASL_LINE:
                raise ValueError("too long")
            self._sasl.setResponse(base64.b64decode(encoded.strip(), validate=True))
        except Exception:  # bad base64, a wrong number of PLAIN parts: all one answer
            self._sasl = None
            self.failResponse(b"Malformed SASL response")
            return
        if self._sasl.moreChallenges():
            self._sasl_challenge()
            return
        credentials, self._sasl = self._sasl, None
        self._login(credentials.username, credentials.password)

    def _login(self, user: bytes, password: bytes) -> None:
        d: Deferred[Any] = maybeDeferred(self.authenticateUserPASS, user, password)
        d.addCallbacks(self._cbMailbox, self._login_failed, callbackArgs=(user,))
        self._longOperation(d)

    def _login_failed(self, failure: Failure) -> None:
        if failure.check(LoginThrottledError):
            self.failResponse(b"[SYS/TEMP] Too many failed logins, try again later")
        elif failure.check(UnauthorizedLogin):
            self.failResponse(b"[AUTH] Authentication failed")
        else:
            self.failResponse(b"[SYS/TEMP] Temporary authentication failure, try again later")


class Pop3Factory(ServerFactory):
    """Builds one :class:`Pop3Server` per connection, tagged with the client's address."""

    noisy = False

    def __init__(
        self,
        portal: Portal,
        context_factory: CertificateOptions | None,
        *,
        allow_plaintext_on_loopback: bool = False,
        scheduler: Callable[[Any], Any] | None = None,
    ) -> None:
        """``scheduler`` replaces Twisted's cooperator for writing listings (tests pass ``list``)."""
        self.portal = portal
        self.context_factory = context_factory
        self.allow_plaintext_on_loopback = allow_plaintext_on_loopback
        self.scheduler = scheduler
        self.connections = Connections()

    def buildProtocol(self, addr: IAddress | None) -> Pop3Server:  # type: ignore[override]
        """Give the new connection its own view of the portal."""
        protocol = Pop3Server(self.context_factory, allow_plaintext_on_loopback=self.allow_plaintext_on_loopback)
        protocol.factory = self  # type: ignore[assignment]
        if self.scheduler is not None:
            protocol.schedule = self.scheduler  # type: ignore[assignment]
        protocol.portal = connection_portal(self.portal, "pop3", protocol, addr)  # type: ignore[assignment]
        protocol.connections = self.connections
        self.connections.add(protocol)
        return protocol


@implementer(pop3.IMailbox)
class EmptyMailbox:
    """The mailbox of a session before the POP3 proxy exists: nothing in it, nothing lost."""

    def listMessages(self, index: int | None = None) -> Any:
        """No messages."""
        if index is None:
            return []
        raise ValueError("no such message")

    def getMessage(self, index: int) -> Any:
        """No messages."""
        raise ValueError("no such message")

    def getUidl(self, index: int) -> bytes:
        """No messages."""
        raise ValueError("no such message")

    def deleteMessage(self, index: int) -> None:
        """No messages."""
        raise ValueError("no such message")

    def undeleteMessages(self) -> None:
        """Nothing to undelete."""

    def sync(self) -> None:
        """Nothing to commit."""


def make_mailbox_avatar() -> AvatarFactory:
    """Return the realm's avatar factory for POP3 sessions."""

    def make(identity: Identity, session: Session) -> tuple[Any, Callable[[], None]]:
        return EmptyMailbox(), lambda: None

    return make

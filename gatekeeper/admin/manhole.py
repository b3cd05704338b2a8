"""The SSH manhole: a Python console on the running gateway whose namespace holds one object, ``gk``.

Off unless ``[admin] manhole`` names an endpoint (loopback unless it names an
``interface=``). SSH only (no telnet), public-key login only (no passwords, no
keyboard-interactive): a key is accepted when it is listed in ``[admin]
authorized_keys``, an OpenSSH ``authorized_keys`` file re-read at every login, so a
removed key is refused from then on. Lines with options (``from=``, ``command=`` ...)
are refused rather than half honoured. Only a shell session is offered: no exec, no
subsystems, no port forwarding.

The SSH host key (Ed25519) is generated into the key store on the first start
(``<store>/ssh/manhole_host_key.pem``), encrypted under the CA passphrase like the TLS
key: no private key is ever on disk in the clear. Its public half is what clients put
in ``known_hosts`` (:func:`known_hosts_line`).

The console is a full Python interpreter running on the reactor thread: whoever holds
an authorized key can do anything the gateway can. ``gk`` is the documented way
(``help(gk)``); its changes are audited as made by the key's owner (the key's comment,
or its fingerprint) "via manhole". ``help()`` writes to the session, never to the
gateway's own terminal, and never pages.
"""

from __future__ import annotations

import functools
import io
import pydoc
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.error import ValidPublicKey
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser, ISession
from twisted.conch.manhole import FileWrapper, Manhole, ManholeInterpreter
from twisted.conch.manhole_ssh import (
    ConchFactory,
    TerminalRealm,
    TerminalSession,
    TerminalSessionTransport,
    TerminalUser,
)
from twisted.conch.ssh import keys
from twisted.conch.ssh.transport import SSHServerTransport
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeeper.admin.facade import Gatekeeper
from gatekeeper.config import Config
from gatekeeper.connections import Connections
from gatekeeper.errors import ConfigError
from gatekeeper.keys.ca import read_ca_passphrase
from gatekeeper.keys.store import atomic_write, private_directory

__all__ = [
    "AuthorizedKey",
    "AuthorizedKeysChecker",
    "ManholeAdmin",
    "ManholeFactory",
    "ensure_host_key",
    "host_key_path",
    "known_hosts_line",
    "manhole_factory",
    "prepare_manhole",
    "read_authorized_keys",
]

log = Logger()

HOST_KEY_FILE = "manhole_host_key.pem"
MAX_AUTHORIZED_KEYS_FILE = 1024 * 1024


# -- the host key --------------------------------------------------------------------------


def host_key_path(config: Config) -> Path:
    """Where the manhole's SSH host key is kept: ``ssh/`` in the key store."""
    return config.keys.store / "ssh" / HOST_KEY_FILE


def ensure_host_key(config: Config) -> keys.Key:
    """Load the host key, generating it (encrypted under the CA passphrase) on the first start."""
    path = host_key_path(config)
    passphrase = read_ca_passphrase(config.keys).encode("utf-8")
    if not path.exists():
        if not path.parent.exists():
            private_directory(path.parent)
        key = ed25519.Ed25519PrivateKey.generate()
        atomic_write(
            path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(passphrase),
            ),
        )
        log.info("generated the manhole's SSH host key {path}", path=str(path))
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), passphrase)
    except OSError as error:
        raise ConfigError(f"cannot read the manhole host key {path}: {error.strerror}", "[admin] manhole") from None
    except (ValueError, TypeError):
        raise ConfigError(
            f"the manhole host key {path} does not decrypt with the CA passphrase (or is not a PEM key)",
            "[admin] manhole",
        ) from None
    return keys.Key(loaded)


def known_hosts_line(key: keys.Key, host: str, port: int) -> str:
    """The ``known_hosts`` line for the manhole at ``host:port``."""
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {key.public().toString('openssh').decode('ascii')}"


# -- who may log in ------------------------------------------------------------------------


@attrs.frozen
class AuthorizedKey:
    """One usable line of the authorized-keys file."""

    key: keys.Key = attrs.field(eq=False)
    blob: bytes
    comment: str
    line: int

    @property
    def fingerprint(self) -> str:
        """The OpenSSH-style SHA-256 fingerprint (``SHA256:...``)."""
        return "SHA256:" + str(self.key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)).rstrip("=")


def read_authorized_keys(path: Path, *, strict: bool = False) -> list[AuthorizedKey]:
    """Parse an OpenSSH ``authorized_keys`` file: ``TYPE BASE64 [COMMENT]`` per line.

    Blank lines and ``#`` comments are skipped. A line with options, or one that does
    not parse, is refused: with ``strict`` (at start-up) as a :class:`ConfigError`
    naming the line, otherwise (at each login) with a warning.
    """
    setting = "[admin] authorized_keys"
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_AUTHORIZED_KEYS_FILE + 1)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}", setting) from None
    if len(data) > MAX_AUTHORIZED_KEYS_FILE:
        raise ConfigError(f"{path} is larger than {MAX_AUTHORIZED_KEYS_FILE} bytes", setting)
    found: list[AuthorizedKey] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        fields = line.split(None, 2)
        problem = ""
        if fields[0].startswith((b"ssh-", b"ecdsa-", b"sk-")) and len(fields) >= 2:
            try:
                key = keys.Key.fromString(b" ".join(fields[:2]))
            except (keys.BadKeyError, ValueError, IndexError):
                problem = "not a public key"
            else:
                if key.isPublic():
                    comment = fields[2].decode("utf-8", "replace") if len(fields) > 2 else ""
                    found.append(AuthorizedKey(key, key.blob(), comment, number))
                    continue
                problem = "a private key (only public keys belong here)"
        else:
            problem = "options are not supported (only TYPE BASE64 [COMMENT])"
        if strict:
            raise ConfigError(f"{path} line {number}: {problem}", setting)
        log.warn("manhole: ignored line {line} of {path}: {problem}", line=number, path=str(path), problem=problem)
    return found


@attrs.frozen
class ManholeAdmin:
    """Who logged in to the manhole: the SSH user name and the authorized key used."""

    username: str
    fingerprint: str
    comment: str

    @property
    def actor(self) -> str:
        """How the audit log names this administrator."""
        return f"{self.username} (key {self.comment or self.fingerprint})"


@implementer(ICredentialsChecker)
class AuthorizedKeysChecker:
    """Accepts an SSH public key listed in the authorized-keys file, with a valid signature.

    The file is read at every attempt. A key that is not listed is refused before the
    client is asked to sign anything, so probing tells nothing about the file.
    """

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, path: Path) -> None:
        self.path = path

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        """Check the offered key (and, when there is one, its signature)."""
        username = bytes(credentials.username).decode("utf-8", "replace")[:64]
        try:
            listed = {entry.blob: entry for entry in read_authorized_keys(self.path)}
        except ConfigError as error:
            log.error("manhole: {reason}; refusing every login", reason=str(error))
            return fail(UnauthorizedLogin("no authorized keys"))
        entry = listed.get(bytes(credentials.blob))
        if entry is None:
            log.warn("manhole: refused a key that is not authorized (user {user})", user=username)
            return fail(UnauthorizedLogin("key not authorized"))
        if not credentials.signature:
            return fail(ValidPublicKey())  # the client now proves it holds the private key
        try:
            valid = entry.key.verify(credentials.signature, credentials.sigData)
        except Exception:  # a malformed signature must refuse, never crash the transport
            valid = False
        if not valid:
            log.warn("manhole: bad signature for key {key} (user {user})", key=entry.fingerprint, user=username)
            return fail(UnauthorizedLogin("bad signature"))
        admin = ManholeAdmin(username, entry.fingerprint, entry.comment)
        log.info("manhole: {actor} logged in", actor=admin.actor)
        return succeed(admin)


# -- the console ----------------------------------------------------------------------------


class GatekeeperInterpreter(ManholeInterpreter):
    """The manhole's interpreter, with ``help()`` writing into the session (never paging)."""

    def __init__(self, handler: Any, namespace: dict[str, Any] | None = None) -> None:
        super().__init__(handler, namespace)
        # pydoc's help would page on the gateway's own terminal, or read its stdin.
        helper = pydoc.Helper(io.StringIO(), FileWrapper(handler))  # type: ignore[arg-type]
        self.monkeyPatcher.addPatch(pydoc, "help", helper)

    def displayhook(self, obj: Any) -> None:
        """Show a result; a Deferred's failure, once shown, is handled (not logged as unhandled)."""
        super().displayhook(obj)
        if isinstance(obj, Deferred):
            obj.addErrback(lambda _: None)


class GatekeeperManhole(Manhole):
    """The manhole protocol with :class:`GatekeeperInterpreter`."""

    def connectionMade(self) -> None:
        """Set up the line editor, then our interpreter."""
        super().connectionMade()
        self.interpreter = GatekeeperInterpreter(self, self.namespace)


class ManholeSessionTransport(TerminalSessionTransport):
    """Conch's glue between the SSH channel and the console; quitting reports exit status 0."""

    def __init__(self, proto: Any, chainedProtocol: Any, avatar: Any, width: int, height: int) -> None:
        super().__init__(proto, chainedProtocol, avatar, width, height)
        # Conch closes the channel without an exit status, which ssh reports as an error.
        chainedProtocol.transport.loseConnection = lambda: proto.processEnded(Failure(ProcessDone(0)))


class ManholeSession(TerminalSession):
    """A shell session only; end of input closes it, a resize is remembered."""

    width = 80
    height = 24
    _process: Any = None

    def openShell(self, proto: Any) -> None:
        """Start the console on the session."""
        self._process = proto
        super().openShell(proto)

    def execCommand(self, proto: Any, cmd: bytes) -> None:
        """Refuse commands politely (exit status 1): the manhole is a console, not a shell."""
        proto.write(b"gatekeeper manhole: commands are not run here; log in without one for the console\r\n")
        proto.processEnded(Failure(ProcessTerminated(exitCode=1)))

    def windowChanged(self, newWindowSize: Any) -> None:
        """Remember the size (the console does not reflow)."""
        self.height, self.width = newWindowSize[:2]

    def eofReceived(self) -> None:
        """The client closed its input: end the session."""
        if self._process is not None:
            self._process.loseConnection()


@implementer(IRealm)
class ManholeRealm(TerminalRealm):
    """Gives each administrator a console whose ``gk`` audits changes in their name."""

    def __init__(self, gk: Gatekeeper) -> None:
        super().__init__()
        self.gk = gk

    def _getAvatar(self, avatarId: Any) -> TerminalUser:
        actor = avatarId.actor if isinstance(avatarId, ManholeAdmin) else str(avatarId)
        namespace = {"gk": self.gk.acting_as(actor, "manhole")}
        component = Componentized()
        user = TerminalUser(component, avatarId)
        session = ManholeSession(component)
        session.transportFactory = ManholeSessionTransport
        session.chainedProtocolFactory = functools.partial(  # type: ignore[assignment]
            insults.ServerProtocol, GatekeeperManhole, namespace
        )
        component.setComponent(IConchUser, user)
        component.setComponent(ISession, session)
        return user


class _TrackedTransport(SSHServerTransport):
    """The SSH server transport, registered with the factory's open connections."""

    factory: ManholeFactory

    def connectionMade(self) -> None:
        """Register, then start SSH."""
        self.factory.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Clean up SSH, then unregister."""
        super().connectionLost(reason)
        self.factory.connections.remove(self)


class ManholeFactory(ConchFactory):
    """The SSH server of the manhole, with its host key and its open connections."""

    protocol = _TrackedTransport
    noisy = False

    def __init__(self, portal: Portal, host_key: keys.Key) -> None:
        super().__init__(portal)
        self.connections = Connections()
        self.publicKeys = {host_key.sshType(): host_key.public()}
        self.privateKeys = {host_key.sshType(): host_key}  # type: ignore[dict-item]


def prepare_manhole(config: Config) -> None:
    """Check the manhole's files before anything listens (a no-op when it is off).

    Generates the host key on the first start; the authorized-keys file must parse
    and list at least one key.
    """
    if not config.admin.manhole:
        return
    assert config.admin.authorized_keys is not None  # the configuration guarantees it
    if not read_authorized_keys(config.admin.authorized_keys, strict=True):
        raise ConfigError(f"{config.admin.authorized_keys} lists no key", "[admin] authorized_keys")
    ensure_host_key(config)


def manhole_factory(gk: Gatekeeper, config: Config) -> ManholeFactory:
    """The SSH factory for ``[admin] manhole``: public keys from ``authorized_keys``, ``gk`` in the namespace."""
    assert config.admin.authorized_keys is not None
    portal = Portal(ManholeRealm(gk), [AuthorizedKeysChecker(config.admin.authorized_keys)])
    return ManholeFactory(portal, ensure_host_key(config))

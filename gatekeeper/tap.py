"""``twistd gatekeeper``: parse the configuration, then build the services.

The only module that imports the global reactor and wires the parts together. Every
problem found while parsing (the TOML file, the TLS certificate and key, the key store)
becomes one :class:`~twisted.python.usage.UsageError` naming the setting, before any
socket is opened.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from twisted.application.service import IService, MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.mail import imap4, pop3, smtp
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from gatekeeper import imap as imap_adapter
from gatekeeper import pop3 as pop3_adapter
from gatekeeper import smtp as smtp_adapter
from gatekeeper.admin.facade import Gatekeeper
from gatekeeper.admin.manhole import manhole_factory, prepare_manhole
from gatekeeper.admin.web import activity_service, tls_factory, web_admin_site
from gatekeeper.audit import AuditService, audit_log_path
from gatekeeper.auth import AvatarFactory, GatekeeperRealm, KeyUnlockingChecker, SessionRegistry, UnlockCache
from gatekeeper.capabilities import FileCapabilityStore
from gatekeeper.config import DEFAULT_CONFIG_PATH, Config, ListenerConfig, UpstreamConfig, load_config
from gatekeeper.connections import Connections
from gatekeeper.errors import GatekeeperError
from gatekeeper.inbound import Revealer, RevealOptions, TrustSpec
from gatekeeper.interfaces import IPop3Upstream, ISubmissionRelay, UpstreamLogin
from gatekeeper.keys.ca import ca_certificate_path, load_tls_private_key
from gatekeeper.keys.discovery import KeyManager, build_key_manager, keyring_path, make_threadpool
from gatekeeper.keys.identity import Identity
from gatekeeper.keys.keyring import KeyRing
from gatekeeper.keys.store import FileKeyStore
from gatekeeper.keys.unlocking import identity_from_wire, unlock_from_store
from gatekeeper.localstore.embedded import EmbeddedStore
from gatekeeper.localstore.imap import LocalImapStore
from gatekeeper.localstore.pop3 import LocalPop3Upstream
from gatekeeper.localstore.relay import LocalRelay
from gatekeeper.metrics import GatewayMetrics, MetricsService, metrics_site
from gatekeeper.outbound import OutboundPipeline, handoff_directory
from gatekeeper.throttle import LoginThrottle
from gatekeeper.tls import server_tls_options
from gatekeeper.trust import TrustValidator, validator_from_config
from gatekeeper.upstream.credentials import CredentialStore, LoginResolver
from gatekeeper.upstream.pop3 import NetworkPop3Upstream
from gatekeeper.upstream.smtp import SmtpRelay, read_smtp_password
from gatekeeper.workers import WorkerPool, background_priority

log = Logger()


class Options(usage.Options):
    """Command-line options of ``twistd gatekeeper``."""

    synopsis = "[--config FILE]"
    optParameters = [["config", "c", DEFAULT_CONFIG_PATH, "The configuration file (TOML)."]]

    def postOptions(self) -> None:
        """Read and check everything the services need, or fail with one clear line."""
        try:
            self["prepared"] = prepare(load_config(self["config"]))
        except GatekeeperError as error:
            raise usage.UsageError(str(error)) from None


@attrs.frozen
class Prepared:
    """What parsing produced: the configuration and the loaded TLS context."""

    config: Config
    tls: CertificateOptions
    store: FileKeyStore


def prepare(config: Config) -> Prepared:
    """Load the TLS certificate and key and open the key store; raise on any problem."""
    store_root = config.keys.store
    if not store_root.is_dir():
        raise GatekeeperError(
            f"[keys] store: no key store at {store_root}; run `gatekeeper --config {config.path} init` first"
        )
    try:
        certificate_pem = config.tls.certificate.read_bytes()
    except OSError as error:
        raise GatekeeperError(
            f"[tls] certificate: cannot read {error.filename} ({error.strerror}); "
            f"`gatekeeper init` creates one issued by the built-in CA"
        ) from None
    tls = server_tls_options(certificate_pem, load_tls_private_key(config))
    read_smtp_password(config.upstream)  # a missing upstream password file is reported now
    prepare_manhole(config)
    return Prepared(config=config, tls=tls, store=FileKeyStore(store_root))


def makeService(options: Options) -> IService:
    """Build the gateway on the global reactor (twistd's entry point)."""
    from twisted.internet import reactor

    return build_service(options["prepared"], reactor)


class PoolService(Service):
    """Starts a thread or worker pool with the application and stops it on shutdown."""

    def __init__(self, pool: ThreadPool | WorkerPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        """Start the pool."""
        super().startService()
        self.pool.start()

    def stopService(self) -> Deferred[None] | None:
        """Stop the pool, waiting for its threads or processes to end."""
        super().stopService()
        stopped = self.pool.stop()
        return stopped if isinstance(stopped, Deferred) else None


class FreezeStartupObjects(Service):
    """Once the reactor runs, move everything made at start-up out of the garbage collector's sight.

    Measured: a full collection in the gateway's process took 54 ms, the reactor
    stopped all that time, and logins make enough garbage to trigger one now and then:
    a tail latency for every session. The modules, configuration and services made at
    start-up live as long as the process, so ``gc.freeze()`` keeps them out of every
    later collection (a full one then costs what the sessions' own objects cost).
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        """Freeze when the reactor is running (everything started by then)."""
        super().startService()
        self._reactor.callWhenRunning(freeze_startup_objects)


def freeze_startup_objects() -> None:
    """Collect once, then freeze what survives (see :class:`FreezeStartupObjects`)."""
    gc.collect()
    gc.freeze()
    log.info("{count} objects made at start-up are left out of garbage collection", count=gc.get_freeze_count())


class StopAction(Service):
    """Runs a cleanup when the application stops (e.g. dropping unlocked keys from memory).

    An action that returns a Deferred (closing connections) is waited for.
    """

    def __init__(self, action: Callable[[], object]) -> None:
        self.action = action

    def stopService(self) -> Deferred[None] | None:
        """Run the action."""
        super().stopService()
        result = self.action()
        return result if isinstance(result, Deferred) else None


class ListenerService(Service):
    """Listens on one endpoint; a port that cannot be opened stops the gateway with a clear message."""

    def __init__(
        self,
        reactor: Any,
        description: str,
        factory: IProtocolFactory,
        what: str,
        connections: Connections | None = None,
    ) -> None:
        self._reactor = reactor
        self.description = description
        self.factory = factory
        self.what = what
        self.connections = connections
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        """Open the port (before twistd drops privileges)."""
        super().privilegedStartService()
        endpoint = serverFromString(self._reactor, self.description)
        d = endpoint.listen(self.factory)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        log.info(
            "{what} listening on {host}:{port}",
            what=self.what,
            host=getattr(address, "host", "?"),
            port=getattr(address, "port", "?"),
        )

    def _failed(self, failure: Failure) -> None:
        log.critical(
            "cannot listen for {what} on {endpoint}: {reason}; stopping",
            what=self.what,
            endpoint=self.description,
            reason=failure.getErrorMessage(),
        )
        self._reactor.callWhenRunning(self._reactor.stop)

    def stopService(self) -> Deferred[None] | None:
        """Close the port, then the connections it accepted."""
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        if self.connections is not None:
            await self.connections.close_all(self._reactor)


@attrs.define
class Parts:
    """The shared pieces the protocol adapters are built from (one of each per gateway)."""

    config: Config
    reactor: Any
    tls: CertificateOptions
    store: FileKeyStore
    sessions: SessionRegistry
    checker: KeyUnlockingChecker
    unlock_cache: UnlockCache
    message_workers: WorkerPool
    validator: TrustValidator
    keyring: KeyRing
    key_manager: KeyManager
    capabilities: FileCapabilityStore
    inbound: Revealer
    upstream_logins: LoginResolver
    relay: ISubmissionRelay | None = None  # where SMTP submissions go (None: nowhere configured)
    mail_store: EmbeddedStore | None = None  # the embedded mail store (None: proxying to [upstream])

    def portal(self, interface: Any, make_avatar: AvatarFactory) -> Portal:
        """A portal for one protocol: the shared checker, that protocol's avatars."""
        return Portal(GatekeeperRealm(interface, make_avatar, self.sessions), [self.checker])


def build_parts(prepared: Prepared, reactor: Any, top: MultiService) -> Parts:
    """Build the shared pieces; services that need starting and stopping join ``top``."""
    config = prepared.config
    login_workers = WorkerPool(
        reactor, processes=config.keys.kdf_workers or None, max_queue=1000, initializer=background_priority
    )
    PoolService(login_workers).setServiceParent(top)
    message_workers = WorkerPool(reactor, max_queue=1000, initializer=background_priority)
    PoolService(message_workers).setServiceParent(top)
    store_root = str(prepared.store.root)

    async def unlock(address: str | None, password: str | None) -> Identity:
        wire = await login_workers.run(unlock_from_store, store_root, address, password, config.keys.kdf_iterations)
        return identity_from_wire(wire)

    cache = UnlockCache(reactor, config.keys.unlock_cache_seconds)
    StopAction(cache.drop).setServiceParent(top)
    checker = KeyUnlockingChecker(
        cache=cache,
        throttle=LoginThrottle(
            reactor,
            free_failures=config.login.free_failures,
            base_seconds=config.login.backoff_base_seconds,
            max_seconds=config.login.backoff_max_seconds,
            forget_after=config.login.forget_after_seconds,
        ),
        unlock=unlock,
    )
    built_in_ca = x509.load_pem_x509_certificate(ca_certificate_path(config.keys).read_bytes())
    validator = validator_from_config(config.trust, extra_anchors=[built_in_ca])
    keyring = KeyRing(keyring_path(config.keys))
    directory_pool = make_threadpool(config.directory)
    PoolService(directory_pool).setServiceParent(top)
    key_manager = build_key_manager(
        config.directory,
        reactor=reactor,
        threadpool=directory_pool,
        validator=validator,
        keyring=keyring,
        store=prepared.store,
    )
    StopAction(key_manager.close).setServiceParent(top)
    capabilities = FileCapabilityStore(config.keys.store / "capabilities")
    inbound = Revealer(
        message_workers,
        TrustSpec.load(config.trust, extra_anchors=[built_in_ca]),
        RevealOptions(local_domains=config.server.domains, plain_from_local=config.inbound.plain_from_local),
        clock=reactor,
        keyring=keyring,
        capabilities=capabilities,
    )
    upstream_logins = LoginResolver(
        CredentialStore(config.keys.store / "upstream-logins"),
        message_workers.run,
        pass_through=config.upstream.pass_through,
    )
    relay: ISubmissionRelay | None = SmtpRelay.from_config(reactor, config.upstream, config.server.hostname)
    if isinstance(relay, SmtpRelay):
        StopAction(relay.close).setServiceParent(top)
    mail_store = None
    if config.upstream.embedded:
        # Gatekeeper is its own mail system: opened at start (its lock file), closed at stop.
        key_store = prepared.store
        mail_store = EmbeddedStore.from_config(config, reactor, users=lambda a: key_store.get_user(a) is not None)
        mail_store.setServiceParent(top)
        smarthost = smarthost_relay(reactor, config.upstream, config.server.hostname)
        if smarthost is not None:
            StopAction(smarthost.close).setServiceParent(top)
        relay = LocalRelay(mail_store, smarthost)
    return Parts(
        config=config,
        reactor=reactor,
        tls=prepared.tls,
        store=prepared.store,
        sessions=SessionRegistry(reactor),
        checker=checker,
        unlock_cache=cache,
        message_workers=message_workers,
        validator=validator,
        keyring=keyring,
        key_manager=key_manager,
        capabilities=capabilities,
        inbound=inbound,
        upstream_logins=upstream_logins,
        relay=relay,
        mail_store=mail_store,
    )


def smtp_factory(parts: Parts) -> smtp_adapter.SubmissionFactory:
    """The SMTP submission adapter over the outbound pipeline (relaying to ``parts.relay``)."""
    config = parts.config
    pipeline = OutboundPipeline(
        key_manager=parts.key_manager,
        workers=parts.message_workers,
        relay=parts.relay,
        policy=config.policy,
        hostname=config.server.hostname,
        capabilities=parts.capabilities,
        verify_recipients=config.upstream.verify_recipients,
        spool_directory=config.smtp.spool_directory,
        handoff_directory=handoff_directory(),
        clock=parts.reactor,
    )
    return smtp_adapter.SubmissionFactory(
        parts.portal(smtp.IMessageDelivery, smtp_adapter.make_delivery_avatar(pipeline)),
        parts.tls,
        hostname=config.server.hostname,
        allow_plaintext_on_loopback=config.tls.allow_plaintext_on_loopback,
        limits=smtp_adapter.SubmissionLimits(
            max_message_size=config.smtp.max_message_size,
            max_recipients=config.smtp.max_recipients,
            spool_threshold=config.smtp.spool_threshold,
            spool_directory=config.smtp.spool_directory,
        ),
        clock=parts.reactor,
    )


def pop3_factory(parts: Parts) -> pop3_adapter.Pop3Factory:
    """The POP3 proxy: to the upstream POP3 server, or over the embedded store's INBOXes."""
    upstream = parts.config.upstream
    maildrops: IPop3Upstream | None = None
    if upstream.pop3 is not None:
        maildrops = NetworkPop3Upstream(
            parts.reactor, upstream.pop3, ca_file=upstream.ca_file, timeout=upstream.timeout_seconds
        )
    elif parts.mail_store is not None:
        maildrops = LocalPop3Upstream(parts.mail_store)
    avatars = pop3_adapter.make_mailbox_avatar(
        maildrops,
        # the embedded store has no logins of its own: the gateway login is the only one
        resolver=parts.upstream_logins if parts.mail_store is None else None,
        revealer=parts.inbound,
        cache_bytes=parts.config.pop3.cache_bytes,
        parallel=parts.message_workers.processes,
    )
    return pop3_adapter.Pop3Factory(
        parts.portal(pop3.IMailbox, avatars),
        parts.tls,
        allow_plaintext_on_loopback=parts.config.tls.allow_plaintext_on_loopback,
    )


def imap_factory(parts: Parts) -> imap_adapter.ImapFactory:
    """The IMAP proxy: to the upstream IMAP server, or over the embedded store."""
    config = parts.config
    backend = None
    if config.upstream.imap is not None:
        backend = imap_adapter.proxy_backend(
            parts.reactor,
            config.upstream,
            config.imap,
            revealer=parts.inbound,
            resolve=parts.upstream_logins.resolve,
            workers=parts.message_workers,
        )
    elif parts.mail_store is not None:
        sessions = LocalImapStore(parts.mail_store, parts.reactor, render=parts.message_workers.run)
        backend = imap_adapter.proxy_backend(
            parts.reactor,
            config.upstream,
            config.imap,
            revealer=parts.inbound,
            resolve=embedded_login,
            workers=parts.message_workers,
            open_store=sessions.open,
        )
    return imap_adapter.ImapFactory(
        parts.portal(imap4.IAccount, imap_adapter.make_account_avatar(backend)),
        parts.tls,
        allow_plaintext_on_loopback=config.tls.allow_plaintext_on_loopback,
        max_append_size=config.imap.max_append_size,
        on_stop=backend.caches.drop_all if backend is not None else None,
    )


def smarthost_relay(reactor: Any, upstream: UpstreamConfig, hostname: str) -> SmtpRelay | None:
    """The relay to ``[upstream] smarthost`` (the embedded store's way out), with the upstream SMTP settings."""
    if upstream.smarthost is None:
        return None
    return SmtpRelay(
        reactor,
        upstream.smarthost,
        hostname=hostname,
        ca_file=upstream.ca_file,
        timeout=upstream.timeout_seconds,
        user=upstream.smtp_user,
        password=read_smtp_password(upstream),
        pool_size=upstream.smtp_connections,
    )


async def embedded_login(identity: Identity, password: str) -> UpstreamLogin:
    """The embedded store's login for a gateway user: the gateway login itself (no password kept)."""
    return UpstreamLogin(identity.address, identity.address, "")


def build_service(prepared: Prepared, reactor: Any) -> MultiService:
    """Wire the gateway: the shared parts, then two listeners per protocol."""
    config = prepared.config
    top = MultiService()
    FreezeStartupObjects(reactor).setServiceParent(top)
    parts = build_parts(prepared, reactor, top)
    top.parts = parts  # type: ignore[attr-defined]
    admin_services(parts, top)
    for what, listeners, factory in (
        ("SMTP", config.smtp.listen, smtp_factory(parts)),
        ("POP3", config.pop3.listen, pop3_factory(parts)),
        ("IMAP", config.imap.listen, imap_factory(parts)),
    ):
        _add_listeners(top, reactor, what, listeners, factory, prepared.tls, factory.connections)
    return top


def admin_services(parts: Parts, top: MultiService) -> None:
    """The administrative side: the audit log, and metrics, the web page and the SSH manhole when configured."""
    config = parts.config
    AuditService(audit_log_path(config)).setServiceParent(top)
    gk = Gatekeeper(parts, actor="gateway", via="python")
    if config.admin.metrics:
        metrics = GatewayMetrics(parts)
        MetricsService(metrics).setServiceParent(top)
        ListenerService(parts.reactor, config.admin.metrics, metrics_site(metrics), "metrics (HTTP)").setServiceParent(
            top
        )
    if config.admin.web:
        site = web_admin_site(parts)
        activity_service(site).setServiceParent(top)
        ListenerService(
            parts.reactor, config.admin.web, tls_factory(site, parts.tls), "web admin (HTTPS)", site.connections
        ).setServiceParent(top)
    if config.admin.manhole:
        manhole = manhole_factory(gk, config)
        ListenerService(
            parts.reactor, config.admin.manhole, manhole, "manhole (SSH)", manhole.connections
        ).setServiceParent(top)


def _add_listeners(
    parent: MultiService,
    reactor: Any,
    what: str,
    listeners: ListenerConfig,
    factory: IProtocolFactory,
    tls: CertificateOptions,
    connections: Connections,
) -> None:
    if listeners.starttls:
        ListenerService(reactor, listeners.starttls, factory, f"{what} (STARTTLS)", connections).setServiceParent(
            parent
        )
    if listeners.tls:
        wrapped = TLSMemoryBIOFactory(tls, False, factory)
        ListenerService(reactor, listeners.tls, wrapped, f"{what} (TLS)", connections).setServiceParent(parent)

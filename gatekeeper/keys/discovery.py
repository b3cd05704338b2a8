"""Build the key manager from ``[directory]``: sources in order, guards, cache, publisher.

One function for ``tap.py`` and the CLI alike, so the gateway and ``gatekeeper lookup``
ask the same sources the same way. The caller owns the LDAP thread pool's life cycle
(start it before the first lookup, stop it when shutting down) and passes in the
reactor, the trust validator and the key store.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.python.threadpool import ThreadPool

from gatekeeper.config import DirectoryConfig, KeysConfig
from gatekeeper.interfaces import IKeySource, IKeyStore
from gatekeeper.keys.cache import CachingDirectory, SourceGuard
from gatekeeper.keys.directory import KeyDirectory, Validator
from gatekeeper.keys.dns import SmimeaSource
from gatekeeper.keys.keyring import KeyRing, KeyRingSource
from gatekeeper.keys.ldap import LdapPublisher, LdapSource, read_bind_password


def keyring_path(keys: KeysConfig) -> Path:
    """Where the key ring lives: ``keyring`` inside the key store (as ``gatekeeper cert`` uses it)."""
    return keys.store / "keyring"


def make_threadpool(config: DirectoryConfig) -> ThreadPool:
    """The bounded pool LDAP searches run in (``[directory] threads``); not started."""
    return ThreadPool(minthreads=0, maxthreads=config.threads, name="gatekeeper-directory")


@attrs.define
class KeyManager:
    """The parts of certificate discovery, for the pipelines and the admin console.

    ``lookup`` is the cached entry point; ``directory`` asks every time (the CLI uses
    it); ``guards`` hold per-source back-off state; ``publisher`` is set when
    ``[directory.ldap]`` is writable.
    """

    cache: CachingDirectory
    directory: KeyDirectory
    guards: tuple[SourceGuard, ...]
    keyring: KeyRing
    ldap_sources: tuple[LdapSource, ...]
    publisher: LdapPublisher | None

    def lookup(self, address: str) -> Any:
        """Cached lookup: a Deferred firing with a :class:`~gatekeeper.keys.directory.LookupResult`."""
        return self.cache.lookup(address)

    def flush(self, address: str | None = None) -> int:
        """Admin: forget the cached answer for one address, or all; return how many."""
        return self.cache.flush(address)

    def reset_backoff(self) -> None:
        """Admin: ask every source again at the next lookup, whatever failed before."""
        for guard in self.guards:
            guard.reset()

    def close(self) -> None:
        """Drop kept LDAP connections (the thread pool is the caller's)."""
        for source in self.ldap_sources:
            source.close()


def build_key_manager(
    config: DirectoryConfig,
    *,
    reactor: Any,
    threadpool: ThreadPool,
    validator: Validator,
    keyring: KeyRing,
    store: IKeyStore | None = None,
    environ: Mapping[str, str] | None = None,
) -> KeyManager:
    """Build the sources named in ``config.order``, each guarded, behind one cache.

    ``reactor`` provides time, threads, UDP and TCP; ``keyring`` is the key ring in
    the key store (:func:`keyring_path`), ``store`` the key store whose users'
    current certificates the key ring source adds. Bind passwords are read here
    (from file or environment); a missing one is a :class:`~gatekeeper.errors.ConfigError`.
    """
    sources: list[IKeySource] = []
    ldap_sources: list[LdapSource] = []
    for name in config.order:
        if name == "keyring":
            sources.append(KeyRingSource(keyring, store))
        elif name == "ldap" and config.ldap is not None:
            source = LdapSource(
                config.ldap,
                reactor=reactor,
                threadpool=threadpool,
                password=read_bind_password(config.ldap, environ),
                timeout=config.timeout_seconds,
            )
            ldap_sources.append(source)
            sources.append(source)
        elif name == "external":
            for external in config.external:
                source = LdapSource(
                    external,
                    reactor=reactor,
                    threadpool=threadpool,
                    password=read_bind_password(external, environ),
                    timeout=config.timeout_seconds,
                    name=f"external:{external.name}",
                )
                ldap_sources.append(source)
                sources.append(source)
        elif name == "dns" and config.dns is not None:
            sources.append(SmimeaSource(config.dns.resolver, reactor=reactor, timeout=config.timeout_seconds))
    guards = tuple(
        SourceGuard(
            source,
            clock=reactor,
            timeout=config.timeout_seconds,
            backoff=config.backoff_seconds,
            backoff_max=config.backoff_max_seconds,
        )
        for source in sources
    )
    directory = KeyDirectory(guards, validator, clock=reactor)
    cache = CachingDirectory(
        directory,
        clock=reactor,
        positive_ttl=config.cache_seconds,
        negative_ttl=config.negative_cache_seconds,
        incomplete_ttl=config.incomplete_cache_seconds,
    )
    return KeyManager(cache, directory, guards, keyring, tuple(ldap_sources), build_publisher(config, environ))


def build_publisher(config: DirectoryConfig, environ: Mapping[str, str] | None = None) -> LdapPublisher | None:
    """The publisher for ``[directory.ldap]`` when it is writable, else None."""
    if config.ldap is None or not config.ldap.writable:
        return None
    return LdapPublisher(config.ldap, read_bind_password(config.ldap, environ), timeout=config.timeout_seconds)

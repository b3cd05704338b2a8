"""A whole gateway for integration tests: its own config, key store, CA and users.

:class:`GatewayHarness` writes a configuration into a directory (listeners on loopback,
port 0), runs ``gatekeeper init``'s set-up, adds users with the real account code
(600,000-round KDF and all), and runs the real service (``tap.build_service``) on the
reactor it is given. Clients verify the gateway's TLS certificate with :attr:`ca_file`.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService

from gatekeeper.config import Config, load_config
from gatekeeper.keys.accounts import Accounts
from gatekeeper.keys.ca import initialize, open_ca
from gatekeeper.keys.store import FileKeyStore
from gatekeeper.tap import ListenerService, build_service, prepare

LISTENERS = ("smtp", "pop3", "imap")


class GatewayHarness:
    """One gateway instance under ``directory`` (created if missing)."""

    def __init__(
        self,
        directory: Path,
        *,
        extra_config: str = "",
        domains: tuple[str, ...] = ("example.org",),
        protocol_config: Mapping[str, str] | None = None,
    ) -> None:
        """``protocol_config`` adds lines to the ``[smtp]``, ``[pop3]`` or ``[imap]`` section (by name)."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        more = protocol_config or {}
        listeners = "".join(
            f'[{name}]\nstarttls = "tcp:0:interface=127.0.0.1"\ntls = "tcp:0:interface=127.0.0.1"\n'
            + (more[name].rstrip("\n") + "\n" if name in more else "")
            for name in LISTENERS
        )
        domain_list = ", ".join(f'"{d}"' for d in domains)
        self.config_path = directory / "gatekeeper.toml"
        self.config_path.write_text(
            f'[server]\nhostname = "gatekeeper.test"\ndomains = [{domain_list}]\n'
            f'{listeners}[keys]\nstore = "keys"\nkey_type = "p256"\n'
            f'[tls]\ncertificate = "keys/tls/server.crt"\nkey = "keys/tls/server.key"\n'
            f"{extra_config}"
        )
        self.config: Config = load_config(self.config_path)
        initialize(self.config)
        self.store = FileKeyStore(self.config.keys.store)
        self.accounts = Accounts(self.store, lambda: open_ca(self.config.keys), self.config.keys)
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.accounts.ca.certificate_path.read_bytes())
        self.service: MultiService | None = None

    def add_user(self, address: str, password: str) -> None:
        """Create a user with the real account code (key pair, certificate, sealed key)."""
        self.accounts.add(address, password)

    def start(self, reactor: Any) -> MultiService:
        """Build and start the service on ``reactor``; listeners are open when this returns."""
        self.service = build_service(prepare(self.config), reactor)
        self.service.privilegedStartService()
        self.service.startService()
        return self.service

    def stop(self) -> Any:
        """Stop the service (returns a Deferred that fires when ports are closed)."""
        service, self.service = self.service, None
        return service.stopService() if service is not None else None

    def port(self, protocol: str, kind: str) -> int:
        """The port a listener got: ``port("imap", "tls")`` or ``port("smtp", "starttls")``."""
        assert self.service is not None, "start the gateway first"
        suffix = "(TLS)" if kind == "tls" else "(STARTTLS)"
        for child in self.service:
            if isinstance(child, ListenerService) and child.what == f"{protocol.upper()} {suffix}":
                assert child.port is not None, f"{child.what} is not listening"
                return int(getattr(child.port.getHost(), "port"))  # noqa: B009 - IAddress has no port
        raise KeyError(f"no {protocol} {kind} listener")

    def client_context(self) -> ssl.SSLContext:
        """An SSL context that trusts only this gateway's CA."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return context

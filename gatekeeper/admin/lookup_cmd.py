"""``gatekeeper lookup ADDRESS``: ask every configured key source, and say what happened, in plain words.

The lookup is the gateway's own (:func:`gatekeeper.keys.discovery.build_key_manager`
with the same sources, trust anchors and time-outs) but never cached: it shows what the
directory says now. It runs on a private reactor instance (the global one belongs to
``twistd``) with the configured LDAP thread pool. A lookup never writes anything.

Exit status: 0 when a usable certificate was found, 1 when none was, and 75
(``EX_TEMPFAIL``) when none was found and a source could not be asked, the case in
which a mandatory-encryption policy answers with a temporary error.
"""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from cryptography import x509
from twisted.internet.selectreactor import SelectReactor
from twisted.python.failure import Failure

from gatekeeper.admin import cli
from gatekeeper.config import Config
from gatekeeper.keys.ca import CA_CERTIFICATE_FILE, ca_directory
from gatekeeper.keys.directory import LookupResult, RefusedCandidate, SourceOutcome, SourceState, key_strength
from gatekeeper.keys.discovery import build_key_manager, keyring_path, make_threadpool
from gatekeeper.keys.keyring import KeyRing, fingerprint
from gatekeeper.keys.store import FileKeyStore
from gatekeeper.trust import TrustValidator, load_certificates, validator_from_config

EX_TEMPFAIL = 75


def register(subparsers: Any) -> None:
    """Add ``lookup``."""
    parser = subparsers.add_parser(
        "lookup",
        help="find the certificate mail to ADDRESS would be encrypted to, showing every source asked",
        description="Ask the key sources in order (no cache) and show what each returned and the decision.",
    )
    parser.add_argument("address", metavar="ADDRESS")
    parser.set_defaults(handler=run_lookup)


def run_lookup(args: argparse.Namespace) -> int:
    """``lookup ADDRESS``."""
    config = cli.load(args)
    result = lookup(config, args.address)
    for line in describe(result, config):
        cli.output(line)
    if result.found:
        return 0
    return EX_TEMPFAIL if result.incomplete else 1


def lookup(config: Config, address: str) -> LookupResult:
    """Run one uncached lookup with the configured sources on a private reactor."""
    reactor = SelectReactor()
    pool = make_threadpool(config.directory)
    manager = build_key_manager(
        config.directory,
        reactor=reactor,
        threadpool=pool,
        validator=_validator(config),
        keyring=KeyRing(keyring_path(config.keys)),
        store=_store(config),
    )
    outcome: list[LookupResult | Failure] = []

    def start() -> None:
        query = manager.directory.lookup(address)
        query.addBoth(outcome.append)
        query.addBoth(lambda _: reactor.stop())

    pool.start()
    try:
        reactor.callWhenRunning(start)
        reactor.run(installSignalHandlers=False)
    finally:
        manager.close()
        pool.stop()
    (result,) = outcome
    if isinstance(result, Failure):
        result.raiseException()
    assert isinstance(result, LookupResult)
    return result


def _validator(config: Config) -> TrustValidator:
    """The gateway's validator: ``[trust]`` anchors plus the built-in CA, if there is one."""
    builtin = ca_directory(config.keys) / CA_CERTIFICATE_FILE
    extra = load_certificates(builtin) if builtin.exists() else []
    return validator_from_config(config.trust, extra_anchors=extra)


def _store(config: Config) -> FileKeyStore | None:
    # Opening a missing key store would create it, and a lookup writes nothing.
    if not (config.keys.store / "users").is_dir():
        return None
    return FileKeyStore(config.keys.store)


# -- words ------------------------------------------------------------------------------


def describe(result: LookupResult, config: Config | None = None) -> list[str]:
    """The lookup in plain words: every source, what it returned, every refusal, the decision."""
    lines = [f"Looking up a certificate for {result.address}:"]
    refused_by_source: dict[str, list[RefusedCandidate]] = {}
    for refused in result.refused:
        refused_by_source.setdefault(refused.source, []).append(refused)
    for outcome in result.outcomes:
        lines.append(f"  {_where(outcome.source, config)}: {_outcome(outcome)}")
        for refused in refused_by_source.get(outcome.source, []):
            reasons = "; ".join(refused.reasons) or refused.status
            lines.append(f"      refused {_certificate(refused.certificate)}: {refused.status}: {reasons}")
    certificate = result.certificate
    if certificate is not None:
        lines.append(
            f"Decision: encrypt to {_certificate(certificate)}, valid until "
            f"{certificate.not_valid_after_utc:%Y-%m-%d}, found in {result.source}."
        )
        if len(result.certificates) > 1:
            lines.append(f"  ({len(result.certificates) - 1} other usable certificate(s) there are older or weaker.)")
        if result.incomplete:
            lines.append("  (A source before it could not be asked; it might have held a different certificate.)")
    elif result.incomplete:
        lines.append(
            "Decision: no usable certificate, but a source could not be asked: the answer may be incomplete "
            "(a mandatory-encryption policy defers the mail with a temporary error)."
        )
    else:
        lines.append("Decision: no usable certificate; mail to this address cannot be encrypted.")
    return lines


def _where(source: str, config: Config | None) -> str:
    if config is None:
        return source
    directory = config.directory
    if source == "ldap" and directory.ldap is not None:
        return f"ldap ({directory.ldap.url})"
    if source.startswith("external:"):
        for external in directory.external:
            if source == f"external:{external.name}":
                return f"{source} ({external.url})"
    if source == "dns" and directory.dns is not None:
        host, port = directory.dns.resolver
        return f"dns (SMIMEA via {host}:{port})"
    return source


def _outcome(outcome: SourceOutcome) -> str:
    milliseconds = outcome.seconds * 1000
    timing = f" in {milliseconds:.{1 if milliseconds < 10 else 0}f} ms" if outcome.seconds else ""
    note = f" ({outcome.detail})" if outcome.detail else ""
    state = outcome.state
    if state is SourceState.FOUND:
        return f"found {outcome.candidates} certificate(s), {outcome.usable} usable{timing}{note}"
    if state is SourceState.REFUSED:
        return f"found {outcome.candidates} certificate(s), none usable{timing}{note}"
    if state is SourceState.NOT_FOUND:
        return f"nothing found{timing}{note}"
    if state is SourceState.UNAVAILABLE:
        return f"unavailable{timing}: {outcome.detail}"
    if state is SourceState.BACKED_OFF:
        return f"not asked, failed recently ({outcome.detail})"
    if state is SourceState.SKIPPED_DOMAIN:
        return f"not asked, {outcome.detail}"
    return "not asked (an earlier source answered)"


def _certificate(certificate: x509.Certificate) -> str:
    subject = certificate.subject.rfc4514_string() or "(empty subject)"
    issuer = certificate.issuer.rfc4514_string()
    strength = key_strength(certificate)
    expired = certificate.not_valid_after_utc < datetime.datetime.now(datetime.UTC)
    when = f"expired {certificate.not_valid_after_utc:%Y-%m-%d}, " if expired else ""
    return f"{subject} (issuer {issuer}, {when}{strength}-bit security, SHA-256 {fingerprint(certificate)[:16]}...)"

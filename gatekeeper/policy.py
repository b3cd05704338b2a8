"""What to do with an outbound message, per recipient: a pure decision table.

A recipient's *rule* comes from ``[policy]`` (:func:`rule_for`): an ``[policy.addresses]``
entry wins over the longest matching ``[policy.domains]`` entry (a domain covers its
subdomains), which wins over ``default``/``sign``; a rule that sets only one of
``encryption`` and ``sign`` leaves the other to the next less specific rule.

The key manager's answer is reduced to a :class:`CertificateState`: ``FOUND`` (a
trusted certificate), ``NONE`` (every source answered and none had one) or ``UNKNOWN``
(none found, but a source could not be asked, so one may exist). :data:`TABLE` then
gives the action, one row per (encryption rule, certificate state, sign rule):

=============  ===========  ======  ==================
encryption     certificate  sign    action
=============  ===========  ======  ==================
opportunistic  found        always  encrypt+sign
opportunistic  found        never   encrypt
opportunistic  none         always  sign
opportunistic  none         never   plain
opportunistic  unknown      always  sign
opportunistic  unknown      never   plain
mandatory      found        always  encrypt+sign
mandatory      found        never   encrypt
mandatory      none         always  reject-permanent
mandatory      none         never   reject-permanent
mandatory      unknown      always  reject-temporary
mandatory      unknown      never   reject-temporary
=============  ===========  ======  ==================

Nothing here does I/O or knows about SMTP: the adapter turns ``reject-permanent`` into
``550 5.7.1`` and ``reject-temporary`` into ``450 4.7.1``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs
from cryptography import x509

from gatekeeper.address import address_key, domain_of, normalize_address
from gatekeeper.config import PolicyConfig, PolicyRule
from gatekeeper.errors import InvalidAddress
from gatekeeper.keys.directory import LookupResult, SourceState


class Action(enum.Enum):
    """What happens to the copy of a message for one recipient."""

    ENCRYPT_AND_SIGN = "encrypt+sign"
    ENCRYPT = "encrypt"
    SIGN = "sign"
    PLAIN = "plain"
    REJECT_PERMANENT = "reject-permanent"
    REJECT_TEMPORARY = "reject-temporary"

    @property
    def encrypts(self) -> bool:
        """Whether the recipient's copy is encrypted."""
        return self in (Action.ENCRYPT_AND_SIGN, Action.ENCRYPT)

    @property
    def signs(self) -> bool:
        """Whether the recipient's copy is signed."""
        return self in (Action.ENCRYPT_AND_SIGN, Action.SIGN)

    @property
    def rejects(self) -> bool:
        """Whether the recipient is refused."""
        return self in (Action.REJECT_PERMANENT, Action.REJECT_TEMPORARY)


class CertificateState(enum.Enum):
    """The key manager's answer, as far as the policy cares."""

    FOUND = "found"
    NONE = "none"
    UNKNOWN = "unknown"


_OPP, _MAN = "opportunistic", "mandatory"
_FOUND, _NONE, _UNKNOWN = CertificateState.FOUND, CertificateState.NONE, CertificateState.UNKNOWN

TABLE: Mapping[tuple[str, CertificateState, str], Action] = {
    (_OPP, _FOUND, "always"): Action.ENCRYPT_AND_SIGN,
    (_OPP, _FOUND, "never"): Action.ENCRYPT,
    (_OPP, _NONE, "always"): Action.SIGN,
    (_OPP, _NONE, "never"): Action.PLAIN,
    (_OPP, _UNKNOWN, "always"): Action.SIGN,
    (_OPP, _UNKNOWN, "never"): Action.PLAIN,
    (_MAN, _FOUND, "always"): Action.ENCRYPT_AND_SIGN,
    (_MAN, _FOUND, "never"): Action.ENCRYPT,
    (_MAN, _NONE, "always"): Action.REJECT_PERMANENT,
    (_MAN, _NONE, "never"): Action.REJECT_PERMANENT,
    (_MAN, _UNKNOWN, "always"): Action.REJECT_TEMPORARY,
    (_MAN, _UNKNOWN, "never"): Action.REJECT_TEMPORARY,
}


@attrs.frozen
class Rule:
    """The rule that applies to one recipient and where each half of it came from."""

    encryption: str
    sign: str
    source: str


@attrs.frozen
class Decision:
    """The policy's answer for one recipient.

    ``reason`` says why in words safe to show to the sender (addresses, source names
    and certificate statuses; never key material); ``certificates`` are the ones to
    encrypt to (empty unless the action encrypts).
    """

    recipient: str
    action: Action
    rule: Rule
    state: CertificateState
    reason: str
    certificates: tuple[x509.Certificate, ...] = ()
    source: str | None = None
    lookup: str = ""

    def trace(self) -> str:
        """One line for the log: the decision, the rule and what each key source said."""
        asked = f"; asked {self.lookup}" if self.lookup else ""
        return f"{self.recipient}: {self.action.value} ({self.reason}; rule {self.rule.source}{asked})"


def rule_for(recipient: str, config: PolicyConfig) -> Rule:
    """The rule for ``recipient``: address rule, then the longest domain rule, then the defaults."""
    key = address_key(recipient)
    domain = domain_of(recipient).lower()
    layers: list[tuple[str, PolicyRule]] = []
    for rule in config.addresses:
        if address_key(rule.target) == key:
            layers.append((f"[policy.addresses] {rule.target}", rule))
    matching = [rule for rule in config.domains if domain == rule.target or domain.endswith("." + rule.target)]
    for rule in sorted(matching, key=lambda r: len(r.target), reverse=True):
        layers.append((f"[policy.domains] {rule.target}", rule))
    encryption = sign = None
    sources = []
    for name, rule in layers:
        if encryption is None and rule.encryption is not None:
            encryption = rule.encryption
            sources.append(name)
        if sign is None and rule.sign is not None:
            sign = rule.sign
            if name not in sources:
                sources.append(name)
    if encryption is None or sign is None:
        sources.append("[policy] default")
    return Rule(
        encryption=encryption or config.default,
        sign=sign or config.sign,
        source=", ".join(sources),
    )


def certificate_state(lookup: LookupResult) -> CertificateState:
    """Reduce a lookup to found / none / unknown (none found while a source was down)."""
    if lookup.found:
        return CertificateState.FOUND
    return CertificateState.UNKNOWN if lookup.incomplete else CertificateState.NONE


def explain(lookup: LookupResult) -> str:
    """Why a certificate was or was not found, in a few words safe to show to the sender."""
    if lookup.found:
        return f"trusted certificate from {lookup.source}"
    parts = []
    down = [o.source for o in lookup.outcomes if o.state in (SourceState.UNAVAILABLE, SourceState.BACKED_OFF)]
    if down:
        parts.append(f"key source unavailable: {', '.join(down)}")
    refused = sorted({f"{r.source}: {r.status}" for r in lookup.refused})
    if refused:
        parts.append(f"certificates not trusted ({'; '.join(refused)})")
    asked = [o.source for o in lookup.outcomes if o.state is SourceState.NOT_FOUND]
    if asked:
        parts.append(f"none in {', '.join(asked)}")
    return "no trusted certificate" + (": " + ", ".join(parts) if parts else "")


def decide(recipient: str, lookup: LookupResult, config: PolicyConfig) -> Decision:
    """Apply the table to one recipient and the key manager's answer for it."""
    rule = rule_for(recipient, config)
    state = certificate_state(lookup)
    action = TABLE[(rule.encryption, state, rule.sign)]
    return Decision(
        recipient=recipient,
        action=action,
        rule=rule,
        state=state,
        reason=explain(lookup),
        certificates=tuple(lookup.certificates) if action.encrypts else (),
        source=lookup.source,
        lookup=", ".join(f"{o.source} {o.state.value}" for o in lookup.outcomes),
    )


def sender_allowed(user: str, sender: str, config: PolicyConfig) -> bool:
    """Whether ``user`` may use ``sender`` as ``MAIL FROM``: their own address or an allowed alias.

    The null sender (``""``, for bounces and receipts) is always allowed.
    """
    if sender == "":
        return True
    try:
        wanted = address_key(normalize_address(sender))
        owner = address_key(normalize_address(user))
    except InvalidAddress:
        return False
    if wanted == owner:
        return True
    for name, aliases in config.sender_aliases:
        if address_key(name) == owner and wanted in {address_key(a) for a in aliases}:
            return True
    return False

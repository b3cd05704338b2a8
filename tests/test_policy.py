"""The outbound policy: one test per row of the decision table, the rules, the aliases, the config."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.config import PolicyConfig, PolicyRule, parse_config_text
from gatekeeper.errors import ConfigError
from gatekeeper.keys.directory import LookupResult, RefusedCandidate, SourceOutcome, SourceState
from gatekeeper.policy import TABLE, Action, CertificateState, decide, explain, rule_for, sender_allowed
from gatekeeper.testing.pki import TestPKI

PKI = TestPKI("Policy Test CA")
BOB = PKI.user("bob@partner.example", key_kind="p256").certificate


def found(address: str = "bob@partner.example", certificate: x509.Certificate = BOB) -> LookupResult:
    outcomes = (SourceOutcome("keyring", SourceState.NOT_FOUND), SourceOutcome("ldap", SourceState.FOUND, 1, 1))
    return LookupResult(address, (certificate,), (), "ldap", outcomes, (), False)


def none(address: str = "bob@partner.example") -> LookupResult:
    outcomes = (SourceOutcome("keyring", SourceState.NOT_FOUND), SourceOutcome("ldap", SourceState.NOT_FOUND))
    return LookupResult(address, (), (), None, outcomes, (), False)


def unknown(address: str = "bob@partner.example") -> LookupResult:
    outcomes = (
        SourceOutcome("keyring", SourceState.NOT_FOUND),
        SourceOutcome("ldap", SourceState.UNAVAILABLE, detail="timed out"),
    )
    return LookupResult(address, (), (), None, outcomes, (), True)


def config(encryption: str, sign: str) -> PolicyConfig:
    return PolicyConfig(default=encryption, sign=sign)


class DecisionTableTests(SynchronousTestCase):
    """Each row of the table, through :func:`decide` (rule from the defaults)."""

    def check(self, encryption: str, lookup: LookupResult, sign: str, expected: Action) -> None:
        decision = decide("bob@partner.example", lookup, config(encryption, sign))
        self.assertIs(decision.action, expected)
        self.assertEqual(decision.rule.encryption, encryption)
        self.assertEqual(decision.rule.sign, sign)
        if expected.encrypts:
            self.assertEqual(decision.certificates, (BOB,))
        else:
            self.assertEqual(decision.certificates, ())

    def test_opportunistic_found_always(self) -> None:
        self.check("opportunistic", found(), "always", Action.ENCRYPT_AND_SIGN)

    def test_opportunistic_found_never(self) -> None:
        self.check("opportunistic", found(), "never", Action.ENCRYPT)

    def test_opportunistic_none_always(self) -> None:
        self.check("opportunistic", none(), "always", Action.SIGN)

    def test_opportunistic_none_never(self) -> None:
        self.check("opportunistic", none(), "never", Action.PLAIN)

    def test_opportunistic_unknown_always(self) -> None:
        self.check("opportunistic", unknown(), "always", Action.SIGN)

    def test_opportunistic_unknown_never(self) -> None:
        self.check("opportunistic", unknown(), "never", Action.PLAIN)

    def test_mandatory_found_always(self) -> None:
        self.check("mandatory", found(), "always", Action.ENCRYPT_AND_SIGN)

    def test_mandatory_found_never(self) -> None:
        self.check("mandatory", found(), "never", Action.ENCRYPT)

    def test_mandatory_none_always(self) -> None:
        self.check("mandatory", none(), "always", Action.REJECT_PERMANENT)

    def test_mandatory_none_never(self) -> None:
        self.check("mandatory", none(), "never", Action.REJECT_PERMANENT)

    def test_mandatory_unknown_always(self) -> None:
        self.check("mandatory", unknown(), "always", Action.REJECT_TEMPORARY)

    def test_mandatory_unknown_never(self) -> None:
        self.check("mandatory", unknown(), "never", Action.REJECT_TEMPORARY)

    def test_the_table_covers_every_combination(self) -> None:
        keys = {
            (e, s, g) for e in ("opportunistic", "mandatory") for s in CertificateState for g in ("always", "never")
        }
        self.assertEqual(set(TABLE), keys)


class ReasonTests(SynchronousTestCase):
    def test_a_refused_certificate_is_named_with_its_status(self) -> None:
        lookup = LookupResult(
            "bob@partner.example",
            (),
            (),
            None,
            (SourceOutcome("ldap", SourceState.REFUSED, 1, 0),),
            (RefusedCandidate("ldap", BOB, "expired", ("outside the validity period",)),),
            False,
        )
        decision = decide("bob@partner.example", lookup, config("mandatory", "always"))
        self.assertIs(decision.action, Action.REJECT_PERMANENT)
        self.assertIn("ldap: expired", decision.reason)

    def test_unavailable_sources_are_named(self) -> None:
        self.assertIn("key source unavailable: ldap", explain(unknown()))
        self.assertIn("none in keyring, ldap", explain(none()))
        self.assertEqual(explain(found()), "trusted certificate from ldap")

    def test_the_trace_names_recipient_action_and_rule(self) -> None:
        trace = decide("bob@partner.example", none(), config("opportunistic", "always")).trace()
        self.assertIn("bob@partner.example: sign", trace)
        self.assertIn("[policy] default", trace)


class RuleTests(SynchronousTestCase):
    policy = PolicyConfig(
        default="opportunistic",
        sign="always",
        domains=(
            PolicyRule("partner.example", encryption="mandatory"),
            PolicyRule("lists.partner.example", sign="never"),
        ),
        addresses=(PolicyRule("ceo@partner.example", encryption="opportunistic"),),
    )

    def test_default_applies_to_unnamed_domains(self) -> None:
        rule = rule_for("someone@elsewhere.example", self.policy)
        self.assertEqual((rule.encryption, rule.sign, rule.source), ("opportunistic", "always", "[policy] default"))

    def test_domain_rule_covers_subdomains(self) -> None:
        rule = rule_for("x@mail.partner.example", self.policy)
        self.assertEqual(rule.encryption, "mandatory")

    def test_longer_domain_adds_to_shorter_one(self) -> None:
        rule = rule_for("list@lists.partner.example", self.policy)
        self.assertEqual((rule.encryption, rule.sign), ("mandatory", "never"))
        self.assertIn("[policy.domains] lists.partner.example", rule.source)
        self.assertIn("[policy.domains] partner.example", rule.source)

    def test_address_rule_wins_and_is_case_insensitive(self) -> None:
        rule = rule_for("CEO@Partner.example", self.policy)
        self.assertEqual(rule.encryption, "opportunistic")
        self.assertTrue(rule.source.startswith("[policy.addresses] ceo@partner.example"))

    def test_a_lookalike_domain_is_not_a_subdomain(self) -> None:
        self.assertEqual(rule_for("x@notpartner.example", self.policy).encryption, "opportunistic")


class SenderTests(SynchronousTestCase):
    policy = PolicyConfig(sender_aliases=(("alice@example.org", ("sales@example.org",)),))

    def test_own_address_any_case(self) -> None:
        self.assertTrue(sender_allowed("alice@example.org", "ALICE@Example.Org", self.policy))

    def test_alias(self) -> None:
        self.assertTrue(sender_allowed("alice@example.org", "Sales@example.org", self.policy))

    def test_someone_elses_alias(self) -> None:
        self.assertFalse(sender_allowed("bob@example.org", "sales@example.org", self.policy))

    def test_other_address(self) -> None:
        self.assertFalse(sender_allowed("alice@example.org", "mallory@example.org", self.policy))

    def test_null_sender(self) -> None:
        self.assertTrue(sender_allowed("alice@example.org", "", self.policy))

    def test_garbage(self) -> None:
        self.assertFalse(sender_allowed("alice@example.org", "not an address", self.policy))


class PolicyConfigTests(SynchronousTestCase):
    def parse(self, text: str) -> PolicyConfig:
        return parse_config_text(text, Path("/etc")).policy

    def test_defaults(self) -> None:
        policy = self.parse("")
        self.assertEqual((policy.default, policy.sign, policy.outbound_header), ("opportunistic", "always", False))
        self.assertEqual((policy.domains, policy.addresses, policy.sender_aliases), ((), (), ()))

    def test_rules_in_both_forms(self) -> None:
        policy = self.parse(
            '[policy]\noutbound_header = true\n[policy.domains]\n"Partner.EXAMPLE" = "mandatory"\n'
            '"lists.example" = { sign = "never" }\n'
            '[policy.addresses]\n"Ceo@Partner.example" = { encryption = "opportunistic", sign = "always" }\n'
            '[policy.sender_aliases]\n"alice@example.org" = ["sales@Example.org"]\n'
        )
        self.assertTrue(policy.outbound_header)
        self.assertEqual(
            policy.domains,
            (PolicyRule("partner.example", encryption="mandatory"), PolicyRule("lists.example", sign="never")),
        )
        self.assertEqual(policy.addresses, (PolicyRule("Ceo@partner.example", "opportunistic", "always"),))
        self.assertEqual(policy.sender_aliases, (("alice@example.org", ("sales@example.org",)),))

    def assertFails(self, text: str, *fragments: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.parse(text)
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))

    def test_unknown_mode(self) -> None:
        self.assertFails('[policy.domains]\n"x.example" = "always"\n', "[policy] domains: x.example", "mandatory")

    def test_unknown_key_in_a_rule(self) -> None:
        self.assertFails('[policy.domains]\n"x.example" = { encrypt = "mandatory" }\n', "unknown setting 'encrypt'")

    def test_bad_sign_value(self) -> None:
        self.assertFails('[policy.addresses]\n"a@x.example" = { sign = "sometimes" }\n', "sign: expected one of")

    def test_bad_address(self) -> None:
        self.assertFails('[policy.addresses]\n"not-an-address" = "mandatory"\n', "[policy] addresses")

    def test_aliases_must_be_a_list(self) -> None:
        self.assertFails('[policy.sender_aliases]\n"a@example.org" = "b@example.org"\n', "expected a list")

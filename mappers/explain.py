"""Why one Encounter has its level of care: the rule that fired (id and source), the qualifier evidence it
used, and every other rule that matched something of it and why it did not decide; or why it has none.

``map --explain`` explains episodes; an Encounter of no level belongs to no episode, so this explains the
Encounter itself (``iop-bridge explain-encounter``). Pure, codes and ids only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mappers.codes import codings
from mappers.coverage import Signature, signature_of
from mappers.fhir import items, reference_key
from mappers.index import collect
from mappers.levels import (
    BackRefs,
    References,
    classify_encounter,
    encounter_classes,
    location_types,
    qualifier_of,
    service_codes,
)
from mappers.rules import NONE_LEVEL, Rule, Rules


@dataclass(frozen=True)
class Candidate:
    """A rule that matched something of the Encounter, and what became of it."""

    rule: str
    level: str
    tier: str
    matched: str
    verdict: str

    def to_dict(self) -> dict[str, str]:
        return {
            "rule": self.rule,
            "level": self.level,
            "tier": self.tier,
            "matched": self.matched,
            "verdict": self.verdict,
        }


@dataclass(frozen=True)
class EncounterExplanation:
    encounter: str
    level: str | None
    rule: str | None
    rule_source: str | None
    reason: str
    rules_version: str
    signature: Signature
    #: Behavioral-health qualifier evidence (``"<qualifier id>: <where> <system> <code>"``) or None.
    qualifier_any: str | None
    qualifier_purpose: str | None
    candidates: tuple[Candidate, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "encounter": self.encounter,
            "level": self.level or NONE_LEVEL,
            "rule": self.rule,
            "rule_source": self.rule_source,
            "reason": self.reason,
            "rules_version": self.rules_version,
            "signature": self.signature.to_dict(),
            "qualifier": {"any": self.qualifier_any, "purpose": self.qualifier_purpose},
            "candidates": [c.to_dict() for c in self.candidates],
        }

    def lines(self) -> list[str]:
        """The explanation as text lines (the CLI's output)."""
        found = [
            f"{self.encounter}: level {self.level or NONE_LEVEL} (rules {self.rules_version})",
            f"  because: {self.reason}",
        ]
        if self.rule_source:
            found.append(f"  rule {self.rule} source: {self.rule_source}")
        sig = self.signature
        found.append(f"  class: {', '.join(sig.classes) or '-'}")
        found.append(f"  type/serviceType: {', '.join(sig.codes) or '-'}")
        found.append(f"  location types: {', '.join(sig.location_types) or '-'}")
        if sig.locations:
            found.append(f"  locations: {', '.join(sig.locations)}")
        found.append(f"  BH qualifier of purpose: {self.qualifier_purpose or 'none'}")
        found.append(f"  BH qualifier (any): {self.qualifier_any or 'none'}")
        if self.candidates:
            found.append("  rules that matched something:")
            found.extend(
                f"    {c.rule} ({c.level}, {c.tier} {c.matched}): {c.verdict}" for c in self.candidates
            )
        else:
            found.append(
                "  no rule names any of its codes, locations or class: write one (docs/rules-recipes.md)"
            )
        return found


def _tier_hits(
    encounter: Mapping[str, Any], context: References, rules: Rules
) -> list[tuple[str, str, tuple[Rule, ...]]]:
    """Every (tier, matched value, rules) the Encounter hits, tiers in precedence order."""
    hits: list[tuple[str, str, tuple[Rule, ...]]] = []
    refs = [reference_key(i.get("location")) for i in items(encounter, "location") if isinstance(i, dict)]
    refs.append(reference_key(encounter.get("serviceProvider")))
    for key in (k for k in refs if k):
        found = rules.location_rules(key) + rules.location_rules(key.split("/")[-1])
        if found:
            hits.append(("location", key, found))
    for system, code in service_codes(encounter):
        if found := rules.candidates("code", system, code):
            hits.append(("code", f"{system} {code}", found))
    for system, code in location_types(encounter, context):
        if found := rules.candidates("location_type", system, code):
            hits.append(("Location.type", f"{system} {code}", found))
    for system, code in ((s or "actcode", c) for s, c in codings(encounter.get("class"))):
        if found := rules.candidates("class", system, code):
            hits.append(("class", f"{system} {code}", found))
    return hits


def explain_encounter(
    encounter: Mapping[str, Any], context: References, rules: Rules, backrefs: BackRefs
) -> EncounterExplanation:
    """The explanation of one Encounter's classification (see the module docstring)."""
    result = classify_encounter(encounter, context, rules, backrefs=backrefs)
    classes = encounter_classes(encounter)
    qualifiers = {
        "any": qualifier_of(encounter, context, rules, backrefs),
        "purpose": qualifier_of(encounter, context, rules, backrefs, purpose=True),
    }
    fired = rules.rule(result.rule_id) if result.rule_id else None
    candidates: list[Candidate] = []
    seen: set[tuple[str, str]] = set()
    for tier, matched, found in _tier_hits(encounter, context, rules):
        for rule in found:
            if (rule.id, matched) in seen:
                continue
            seen.add((rule.id, matched))
            candidates.append(
                Candidate(rule.id, rule.level, tier, matched, _verdict(rule, fired, classes, qualifiers))
            )
    return EncounterExplanation(
        encounter=f"Encounter/{encounter.get('id')}",
        level=result.level,
        rule=result.rule_id,
        rule_source=fired.source if fired else None,
        reason=result.reason,
        rules_version=rules.version,
        signature=signature_of(encounter, context, rules, backrefs, by_location=True),
        qualifier_any=qualifiers["any"],
        qualifier_purpose=qualifiers["purpose"],
        candidates=tuple(candidates),
    )


def _verdict(
    rule: Rule, fired: Rule | None, classes: frozenset[str], qualifiers: Mapping[str, str | None]
) -> str:
    if fired is not None and rule.id == fired.id:
        return "fired"
    if rule.classes and not (rule.classes & classes):
        have = ", ".join(sorted(classes)) or "none"
        return f"needs class {', '.join(sorted(rule.classes))} (the Encounter's: {have})"
    if rule.qualifier and qualifiers.get(rule.qualifier) is None:
        if rule.qualifier == "purpose" and qualifiers.get("any") is not None:
            return "needs a BH qualifier of purpose; the Encounter only records a BH diagnosis"
        return "needs a BH qualifier" + (" of purpose" if rule.qualifier == "purpose" else "")
    if fired is not None:
        return f"applies, but {fired.id} decided first (an earlier tier, or earlier in the table)"
    return "applies"


def explain_encounter_in(
    resources: Iterable[Mapping[str, Any]], encounter_id: str, rules: Rules
) -> EncounterExplanation | None:
    """Explain the Encounter ``encounter_id`` among ``resources`` (its patient's and the shared ones), as
    ``map`` would see it (newest version; entered-in-error gone: None then, as for an absent id)."""
    collected = collect(resources)
    for holder in collected.patients.values():
        for encounter in holder.of("Encounter"):
            if encounter.get("id") == encounter_id:
                return explain_encounter(encounter, collected.shared, rules, collected.by_encounter)
    return None

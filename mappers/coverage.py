"""Rule coverage: which Encounters no level-of-care rule classifies, grouped by what a rule could match.

An Encounter's *signature* is what the rule tiers read (``mappers.levels``): its ``class``, its
``type``/``serviceType`` codings, the ``Location.type`` codings of its locations, and whether it carries
a behavioral-health qualifier (``purpose``: its reason, type, services, place or admit source;
``recorded``: only a diagnosis it records, which ``qualifier = "purpose"`` rules do not accept; or
none). Optionally the Location / department references themselves (``by_location``: Epic's
department-based setups need them). Signatures of Encounters that no rule classifies (no rule fired,
or the rules that matched needed a qualifier the Encounter lacks) are counted, most frequent first, with
the smallest Encounter id as the example: hospital IT reads the top of the list and writes the missing
rules.

Pure: resources in, a report out; codes and ids only (no free text, no patient data).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from mappers.codes import codings
from mappers.fhir import items, reference_key
from mappers.index import collect
from mappers.levels import (
    BackRefs,
    Classifier,
    References,
    location_types,
    qualifier_of,
    service_codes,
)
from mappers.rules import NONE_LEVEL, Rules

#: Which kind of behavioral-health qualifier an Encounter has (see the module docstring).
QUALIFIER_STATES: Final = ("purpose", "recorded", "none")


@dataclass(frozen=True, order=True)
class Signature:
    """What the rules read of an Encounter, as ``"<system key> <code>"`` strings, sorted."""

    classes: tuple[str, ...]
    codes: tuple[str, ...]
    location_types: tuple[str, ...]
    qualifier: str
    locations: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "class": list(self.classes),
            "codes": list(self.codes),
            "location_types": list(self.location_types),
            "qualifier": self.qualifier,
        }
        if self.locations:
            found["locations"] = list(self.locations)
        return found


@dataclass(frozen=True)
class Unclassified:
    """One signature no rule classifies: how many Encounters have it, one example, why it is none."""

    signature: Signature
    count: int
    example: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.signature.to_dict(),
            "count": self.count,
            "example": self.example,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class CoverageReport:
    """Encounters read, how many each level got (``none`` = a rule said no level), and the rest."""

    rules_version: str
    encounters: int
    classified: Mapping[str, int]
    unclassified: int
    signatures: tuple[Unclassified, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules_version": self.rules_version,
            "encounters": self.encounters,
            "classified": dict(self.classified),
            "unclassified": self.unclassified,
            "signatures": [s.to_dict() for s in self.signatures],
        }


@dataclass
class CoverageTally:
    """Counts coverage over batches of resources (a batch holds whole patients with the shared
    resources they refer to), so a caller can feed a large input a part at a time."""

    rules: Rules
    by_location: bool = False
    encounters: int = 0
    classified: Counter[str] = field(default_factory=Counter)
    _counts: Counter[Signature] = field(default_factory=Counter)
    _examples: dict[Signature, tuple[str, str]] = field(default_factory=dict)

    def add(self, resources: Iterable[Mapping[str, Any]]) -> None:
        collected = collect(resources)
        classifier = Classifier(collected.shared, self.rules, collected.by_encounter)
        for patient_id in sorted(collected.patients):
            for encounter in collected.patients[patient_id].of("Encounter"):
                codes = service_codes(encounter)
                result = classifier.classify(encounter, codes)
                self.encounters += 1
                if result.rule_id is not None:
                    self.classified[result.level or NONE_LEVEL] += 1
                    continue
                signature = signature_of(
                    encounter,
                    collected.shared,
                    self.rules,
                    collected.by_encounter,
                    by_location=self.by_location,
                    codes=codes,
                )
                self._counts[signature] += 1
                example = (str(encounter.get("id")), result.reason)
                known = self._examples.get(signature)
                if known is None or example[0] < known[0]:
                    self._examples[signature] = example

    def report(self, limit: int | None = None) -> CoverageReport:
        """Most frequent first; equal counts in signature order (the same input gives the same list)."""
        ordered = sorted(self._counts.items(), key=lambda item: (-item[1], item[0]))
        if limit is not None:
            ordered = ordered[:limit]
        return CoverageReport(
            rules_version=self.rules.version,
            encounters=self.encounters,
            classified=dict(sorted(self.classified.items())),
            unclassified=sum(self._counts.values()),
            signatures=tuple(
                Unclassified(signature, count, *self._examples[signature]) for signature, count in ordered
            ),
        )


def encounter_coverage(
    resources: Iterable[Mapping[str, Any]],
    rules: Rules,
    *,
    by_location: bool = False,
    limit: int | None = None,
) -> CoverageReport:
    """The coverage report of one set of resources (see the module docstring)."""
    tally = CoverageTally(rules, by_location=by_location)
    tally.add(resources)
    return tally.report(limit)


def _keys(pairs: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    return tuple(sorted({f"{system or '(no system)'} {code}" for system, code in pairs}))


def signature_of(
    encounter: Mapping[str, Any],
    context: References,
    rules: Rules,
    backrefs: BackRefs,
    *,
    by_location: bool = False,
    codes: list[tuple[str, str]] | None = None,
) -> Signature:
    """The signature of one Encounter (see the module docstring)."""
    if qualifier_of(encounter, context, rules, backrefs, purpose=True) is not None:
        qualifier = "purpose"
    elif qualifier_of(encounter, context, rules, backrefs) is not None:
        qualifier = "recorded"
    else:
        qualifier = "none"
    classes = [(system or "actcode", code) for system, code in codings(encounter.get("class"))]
    locations: tuple[str, ...] = ()
    if by_location:
        found = [
            reference_key(i.get("location")) for i in items(encounter, "location") if isinstance(i, dict)
        ]
        found.append(reference_key(encounter.get("serviceProvider")))
        locations = tuple(sorted({key for key in found if key}))
    return Signature(
        classes=_keys(classes),
        codes=_keys(service_codes(encounter) if codes is None else codes),
        location_types=_keys(location_types(encounter, context)),
        qualifier=qualifier,
        locations=locations,
    )

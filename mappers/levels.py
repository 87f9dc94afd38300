"""Classifying an Encounter into a level of care by the rule table.

Tiers in order of precedence: a hospital Location / department id, ``Encounter.type`` / ``serviceType``
codings, the ``Location.type`` of the Encounter's locations, then ``Encounter.class``. Within a tier the
first matching rule in table order wins. A rule marked ``qualifier`` needs a behavioral-health qualifier
(an F01-F99 diagnosis, a psychiatric location, admit source ``psych``, a configured service type or
department). Every result says which rule fired and why, for ``--explain``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from mappers.codes import codings
from mappers.fhir import element, items, reference_key
from mappers.rules import NONE_LEVEL, Rule, Rules

#: The resources an Encounter refers to, by reference key (``"Location/1"``, ``"Condition/7"``, and
#: ``"urn:uuid:…"`` for Bundle entries).
References = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Classification:
    """The level of an Encounter (None = not a level-of-care encounter) and the rule that decided it."""

    level: str | None
    rule_id: str | None
    reason: str


def _refs(encounter: Mapping[str, Any]) -> list[str]:
    """Location and department (serviceProvider) reference keys of an Encounter."""
    found = []
    for item in items(encounter, "location"):
        if isinstance(item, (dict, Mapping)):
            key = reference_key(item.get("location"))
            if key:
                found.append(key)
    provider = reference_key(encounter.get("serviceProvider"))
    if provider:
        found.append(provider)
    return found


def _resolve(key: str, context: References, encounter: Mapping[str, Any]) -> Mapping[str, Any] | None:
    if key.startswith("#"):
        for contained in items(encounter, "contained"):
            if isinstance(contained, (dict, Mapping)) and contained.get("id") == key[1:]:
                return contained
        return None
    return context.get(key)


def _location_types(encounter: Mapping[str, Any], context: References) -> Iterator[tuple[str, str]]:
    for item in items(encounter, "location"):
        if not isinstance(item, (dict, Mapping)):
            continue
        key = reference_key(item.get("location"))
        location = _resolve(key, context, encounter) if key else None
        if location is not None:
            yield from codings(location.get("type"))


def service_codes(encounter: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``Encounter.type`` and ``serviceType`` codings as (system key, code)."""
    return codings(encounter.get("type")) + codings(encounter.get("serviceType"))


def _class_codes(encounter: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``Encounter.class`` as (system key, code); a class without a system is read as v3 ActCode."""
    return [((system or "actcode"), code) for system, code in codings(encounter.get("class"))]


def encounter_classes(encounter: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(code for system, code in _class_codes(encounter) if system == "actcode")


def diagnosis_codings(encounter: Mapping[str, Any], context: References) -> Iterator[tuple[str, str]]:
    """Codings of ``reasonCode``, ``diagnosis.condition`` and ``reasonReference`` Conditions."""
    yield from codings(encounter.get("reasonCode"))
    targets = [d.get("condition") for d in items(encounter, "diagnosis") if isinstance(d, (dict, Mapping))]
    targets.extend(items(encounter, "reasonReference"))
    for target in targets:
        if isinstance(target, (dict, Mapping)) and "concept" in target:
            yield from codings(target)
            continue
        key = reference_key(target)
        condition = _resolve(key, context, encounter) if key else None
        if condition is not None:
            yield from codings(condition.get("code"))


def qualifier_of(encounter: Mapping[str, Any], context: References, rules: Rules) -> str | None:
    """Why the Encounter is behavioral-health care (``"<qualifier id>: <evidence>"``), or None."""
    checks: list[tuple[str, Iterator[tuple[str, str]]]] = [
        ("diagnosis", diagnosis_codings(encounter, context)),
        ("location_type", _location_types(encounter, context)),
        ("admit_source", iter(codings(element(encounter, "hospitalization").get("admitSource")))),
        ("service_type", iter(service_codes(encounter))),
    ]
    for kind, found in checks:
        qualifiers = rules.qualifiers_on(kind)
        if not qualifiers:
            continue
        for system, code in found:
            for qualifier in qualifiers:
                if (not qualifier.system or qualifier.system == system) and qualifier.matches_code(code):
                    return f"{qualifier.id}: {kind} {system} {code}"
    departments = rules.qualifiers_on("location")
    if departments:
        for key in _refs(encounter):
            for qualifier in departments:
                if key in qualifier.ids or key.split("/")[-1] in qualifier.ids:
                    return f"{qualifier.id}: location {key}"
    return None


class _Qualified:
    """The behavioral-health qualifier, computed at most once per classification."""

    def __init__(self, encounter: Mapping[str, Any], context: References, rules: Rules) -> None:
        self._args = (encounter, context, rules)
        self._done = False
        self._value: str | None = None

    def get(self) -> str | None:
        if not self._done:
            self._value = qualifier_of(*self._args)
            self._done = True
        return self._value


def _applies(rule: Rule, classes: frozenset[str], qualified: _Qualified) -> bool:
    if rule.classes and not (rule.classes & classes):
        return False
    return not rule.qualifier or qualified.get() is not None


def classify_encounter(
    encounter: Mapping[str, Any],
    context: References,
    rules: Rules,
    *,
    codes: list[tuple[str, str]] | None = None,
) -> Classification:
    """The level of care of one Encounter and the rule that fired (pure; no I/O).

    ``context`` maps reference keys to the Locations and Conditions the Encounter may point at;
    ``codes`` are its ``service_codes`` when the caller has them already.
    """
    if codes is None:
        codes = service_codes(encounter)
    return _classify(encounter, context, rules, codes, _Qualified(encounter, context, rules))


def _classify(
    encounter: Mapping[str, Any],
    context: References,
    rules: Rules,
    codes: list[tuple[str, str]],
    qualified: _Qualified,
) -> Classification:
    class_codes = _class_codes(encounter)
    classes = frozenset(code for system, code in class_codes if system == "actcode")
    order = rules.order
    missing_qualifier: Rule | None = None

    # Tiers in precedence order, each computed only when the ones before it found nothing.
    tiers: tuple[Callable[[], list[tuple[str, str, tuple[Rule, ...]]]], ...] = (
        lambda: [
            ("location", key, rules.location_rules(key) + rules.location_rules(key.split("/")[-1]))
            for key in (_refs(encounter) if rules.has_location_rules else ())
        ],
        lambda: [("code", f"{s} {c}", hits) for s, c in codes if (hits := rules.candidates("code", s, c))],
        lambda: [
            ("Location.type", f"{s} {c}", hits)
            for s, c in (_location_types(encounter, context) if rules.has_location_type_rules else ())
            if (hits := rules.candidates("location_type", s, c))
        ],
        lambda: [
            ("class", f"{s} {c}", hits) for s, c in class_codes if (hits := rules.candidates("class", s, c))
        ],
    )
    for tier in tiers:
        best: tuple[int, Rule, str, str] | None = None
        for what, value, candidates in tier():
            for rule in candidates:
                if not _applies(rule, classes, qualified):
                    if rule.qualifier and (not rule.classes or rule.classes & classes):
                        missing_qualifier = missing_qualifier or rule
                    continue
                rank = order[rule.id]
                if best is None or rank < best[0]:
                    best = (rank, rule, what, value)
        if best is not None:
            _, rule, what, value = best
            reason = f"rule {rule.id}: {what} {value}"
            if rule.qualifier:
                reason += f"; behavioral-health qualifier {qualified.get()}"
            level = None if rule.level == NONE_LEVEL else rule.level
            return Classification(level=level, rule_id=rule.id, reason=reason)
    if missing_qualifier is not None:
        return Classification(
            level=None,
            rule_id=None,
            reason=f"no level: rule {missing_qualifier.id} needs a behavioral-health qualifier",
        )
    return Classification(level=None, rule_id=None, reason="no rule matched")


class _Consulted(_Qualified):
    """A ``_Qualified`` that remembers whether the rules asked for the qualifier."""

    def __init__(self, encounter: Mapping[str, Any], context: References, rules: Rules) -> None:
        super().__init__(encounter, context, rules)
        self.asked = False

    def get(self) -> str | None:
        self.asked = True
        return super().get()


class _Known(_Qualified):
    """A qualifier computed already."""

    def __init__(self, value: str | None) -> None:
        self._done = True
        self._value = value


_ASKS_QUALIFIER: Final = object()


class Classifier:
    """``classify_encounter`` over one fixed ``context`` and rule table, memoised by what decides it.

    An Encounter's level depends only on its service codes, ``class``, ``location`` and
    ``serviceProvider`` (with the types of those Locations, fixed by ``context``), plus its behavioral-health
    qualifier when a candidate rule needs one. Encounters with the same such signature (a program's
    sessions, week after week) share one Classification; the qualifier, when a rule asks for it, is
    still read from each Encounter (its diagnoses) and is part of the memo key. Encounters with
    contained resources (``#id`` references) are classified afresh. Give each ``context`` its own.
    """

    def __init__(self, context: References, rules: Rules) -> None:
        self.context = context
        self.rules = rules
        self._memo: dict[Any, Any] = {}

    def classify(self, encounter: Mapping[str, Any], codes: list[tuple[str, str]]) -> Classification:
        if encounter.get("contained"):
            return classify_encounter(encounter, self.context, self.rules, codes=codes)
        try:  # the elements the class and location tiers read, as JSON: cheaper than reading them
            where = orjson.dumps(
                (encounter.get("class"), encounter.get("location"), encounter.get("serviceProvider"))
            )
        except TypeError:  # what orjson cannot write (integers beyond 64 bits…): no memo
            return classify_encounter(encounter, self.context, self.rules, codes=codes)
        key = (tuple(codes), where)
        known = self._memo.get(key)
        if known is not None and known is not _ASKS_QUALIFIER:
            return known  # type: ignore[no-any-return]
        if known is _ASKS_QUALIFIER:
            qualifier = qualifier_of(encounter, self.context, self.rules)
            found = self._memo.get((key, qualifier))
            if found is None:
                found = self._memo[(key, qualifier)] = _classify(
                    encounter, self.context, self.rules, codes, _Known(qualifier)
                )
            return found
        consulted = _Consulted(encounter, self.context, self.rules)
        result = _classify(encounter, self.context, self.rules, codes, consulted)
        if consulted.asked:
            self._memo[key] = _ASKS_QUALIFIER
            self._memo[(key, consulted.get())] = result
        else:
            self._memo[key] = result
        return result

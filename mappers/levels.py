"""Classifying an Encounter into a level of care by the rule table.

Tiers in order of precedence: a hospital Location / department id, ``Encounter.type`` / ``serviceType``
codings, the ``Location.type`` (and ``physicalType``) of the Encounter's locations, then
``Encounter.class``. Within a tier the first matching rule in table order wins. A rule marked
``qualifier`` needs a behavioral-health qualifier (an F01-F99 diagnosis, a psychiatric location, admit
source ``psych``, a configured service type or department). Every result says which rule fired and
why, for ``--explain``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
            # Oracle Health puts its local location types (Millennium code set 222) in physicalType.
            yield from codings(location.get("physicalType"))


def location_types(encounter: Mapping[str, Any], context: References) -> list[tuple[str, str]]:
    """``Location.type`` codings of the Encounter's locations (resolved through ``context``)."""
    return list(_location_types(encounter, context))


def service_codes(encounter: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``Encounter.type`` and ``serviceType`` codings as (system key, code)."""
    return codings(encounter.get("type")) + codings(encounter.get("serviceType"))


def _class_codes(encounter: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``Encounter.class`` as (system key, code); a class without a system is read as v3 ActCode."""
    return [((system or "actcode"), code) for system, code in codings(encounter.get("class"))]


def encounter_classes(encounter: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(code for system, code in _class_codes(encounter) if system == "actcode")


#: Conditions and Procedures that point at an Encounter (``Condition.encounter``, ``Procedure.encounter``),
#: by the Encounter's key (``"Encounter/1"``): US Core records an encounter diagnosis this way only.
BackRefs = Mapping[str, Sequence[Mapping[str, Any]]]
_NO_BACKREFS: Final[BackRefs] = {}


def _condition_codings(
    targets: Iterable[Any], context: References, encounter: Mapping[str, Any]
) -> Iterator[tuple[str, str]]:
    for target in targets:
        if isinstance(target, (dict, Mapping)) and "concept" in target:
            yield from codings(target)
            continue
        key = reference_key(target)
        condition = _resolve(key, context, encounter) if key else None
        if condition is not None:
            yield from codings(condition.get("code"))


def reason_codings(encounter: Mapping[str, Any], context: References) -> Iterator[tuple[str, str]]:
    """Codings of the Encounter's reason: ``reasonCode`` and ``reasonReference`` Conditions."""
    yield from codings(encounter.get("reasonCode"))
    yield from _condition_codings(items(encounter, "reasonReference"), context, encounter)


def recorded_codings(
    encounter: Mapping[str, Any], context: References, backrefs: BackRefs = _NO_BACKREFS
) -> Iterator[tuple[str, str]]:
    """Codings of diagnoses recorded for the Encounter: ``diagnosis.condition`` and Conditions pointing
    at it (``Condition.encounter``; a refuted one does not count)."""
    targets = [d.get("condition") for d in items(encounter, "diagnosis") if isinstance(d, (dict, Mapping))]
    yield from _condition_codings(targets, context, encounter)
    for resource in backrefs.get(f"Encounter/{encounter.get('id')}", ()):
        if resource.get("resourceType") == "Condition" and not _refuted(resource):
            yield from codings(resource.get("code"))


def _refuted(condition: Mapping[str, Any]) -> bool:
    return any(code == "REFUTED" for _, code in codings(condition.get("verificationStatus")))


def diagnosis_codings(
    encounter: Mapping[str, Any], context: References, backrefs: BackRefs = _NO_BACKREFS
) -> Iterator[tuple[str, str]]:
    """Codings of the reason, ``diagnosis.condition`` and the Conditions pointing at the Encounter."""
    yield from reason_codings(encounter, context)
    yield from recorded_codings(encounter, context, backrefs)


def procedure_codings(encounter: Mapping[str, Any], backrefs: BackRefs) -> Iterator[tuple[str, str]]:
    """Codes of the Procedures done in the Encounter (``Procedure.encounter``), not ``not-done`` ones."""
    for resource in backrefs.get(f"Encounter/{encounter.get('id')}", ()):
        if resource.get("resourceType") == "Procedure" and resource.get("status") not in (
            "not-done",
            "entered-in-error",
            "preparation",
        ):
            yield from codings(resource.get("code"))


def qualifier_of(
    encounter: Mapping[str, Any],
    context: References,
    rules: Rules,
    backrefs: BackRefs = _NO_BACKREFS,
    *,
    purpose: bool = False,
) -> str | None:
    """Why the Encounter is behavioral-health care (``"<qualifier id>: <evidence>"``), or None.

    With ``purpose``, only what shows the Encounter was *for* behavioral-health care counts: its reason,
    type/serviceType, the services done in it, its place or admit source; not a diagnosis it merely
    records (``Encounter.diagnosis``, a Condition pointing at it), as a check-up does.
    """
    checks: list[tuple[str, str, Iterator[tuple[str, str]]]] = [
        ("diagnosis", "reason", reason_codings(encounter, context)),
    ]
    if not purpose:
        checks.append(("diagnosis", "diagnosis", recorded_codings(encounter, context, backrefs)))
    checks += [
        ("location_type", "location_type", _location_types(encounter, context)),
        (
            "admit_source",
            "admit_source",
            iter(codings(element(encounter, "hospitalization").get("admitSource"))),
        ),
        ("service_type", "service_type", iter(service_codes(encounter))),
        ("service_type", "Procedure.encounter", procedure_codings(encounter, backrefs)),
    ]
    for kind, label, found in checks:
        qualifiers = rules.qualifiers_on(kind)
        if not qualifiers:
            continue
        for system, code in found:
            for qualifier in qualifiers:
                if qualifier.matches(system, code):
                    return f"{qualifier.id}: {label} {system} {code}"
    departments = rules.qualifiers_on("location")
    if departments:
        for key in _refs(encounter):
            for qualifier in departments:
                if key in qualifier.ids or key.split("/")[-1] in qualifier.ids:
                    return f"{qualifier.id}: location {key}"
    return None


class _Qualified:
    """The behavioral-health qualifiers (any, and of purpose), each computed at most once."""

    def __init__(
        self,
        encounter: Mapping[str, Any],
        context: References,
        rules: Rules,
        backrefs: BackRefs = _NO_BACKREFS,
    ) -> None:
        self._args = (encounter, context, rules, backrefs)
        self._values: dict[str, str | None] = {}

    def get(self, need: str = "any") -> str | None:
        if need not in self._values:
            self._values[need] = qualifier_of(*self._args, purpose=need == "purpose")
        return self._values[need]


def _applies(rule: Rule, classes: frozenset[str], qualified: _Qualified) -> bool:
    if rule.classes and not (rule.classes & classes):
        return False
    return not rule.qualifier or qualified.get(rule.qualifier) is not None


def classify_encounter(
    encounter: Mapping[str, Any],
    context: References,
    rules: Rules,
    *,
    codes: list[tuple[str, str]] | None = None,
    backrefs: BackRefs = _NO_BACKREFS,
) -> Classification:
    """The level of care of one Encounter and the rule that fired (pure; no I/O).

    ``context`` maps reference keys to the Locations and Conditions the Encounter may point at;
    ``codes`` are its ``service_codes`` when the caller has them already; ``backrefs`` the Conditions
    and Procedures pointing at Encounters (``index.Collected.by_encounter``).
    """
    if codes is None:
        codes = service_codes(encounter)
    return _classify(encounter, context, rules, codes, _Qualified(encounter, context, rules, backrefs))


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
                reason += f"; behavioral-health qualifier {qualified.get(rule.qualifier)}"
            level = None if rule.level == NONE_LEVEL else rule.level
            return Classification(level=level, rule_id=rule.id, reason=reason)
    if missing_qualifier is not None:
        return Classification(
            level=None,
            rule_id=None,
            reason=f"no level: rule {missing_qualifier.id} needs a behavioral-health qualifier"
            + (
                " of purpose (reason, type, service or place)"
                if missing_qualifier.qualifier == "purpose"
                else ""
            ),
        )
    return Classification(level=None, rule_id=None, reason="no rule matched")


class _Consulted(_Qualified):
    """A ``_Qualified`` that remembers whether the rules asked for a qualifier."""

    def __init__(
        self, encounter: Mapping[str, Any], context: References, rules: Rules, backrefs: BackRefs
    ) -> None:
        super().__init__(encounter, context, rules, backrefs)
        self.asked = False

    def get(self, need: str = "any") -> str | None:
        self.asked = True
        return super().get(need)

    def both(self) -> tuple[str | None, str | None]:
        return super().get("any"), super().get("purpose")


class _Known(_Qualified):
    """Qualifiers computed already."""

    def __init__(self, values: tuple[str | None, str | None]) -> None:
        self._values = {"any": values[0], "purpose": values[1]}


_ASKS_QUALIFIER: Final = object()


class Classifier:
    """``classify_encounter`` over one fixed ``context`` and rule table, memoised by what decides it.

    An Encounter's level depends only on its service codes, ``class``, ``location`` and
    ``serviceProvider`` (with the types of those Locations, fixed by ``context``), plus its behavioral-health
    qualifiers when a candidate rule needs one. Encounters with the same such signature (a program's
    sessions, week after week) share one Classification; the qualifiers, when a rule asks for one, are
    still read from each Encounter (its diagnoses, reasons, the resources pointing at it) and are part of
    the memo key. Encounters with contained resources (``#id`` references) are classified afresh. Give
    each ``context`` its own.
    """

    def __init__(self, context: References, rules: Rules, backrefs: BackRefs = _NO_BACKREFS) -> None:
        self.context = context
        self.rules = rules
        self.backrefs = backrefs
        self._memo: dict[Any, Any] = {}

    def classify(self, encounter: Mapping[str, Any], codes: list[tuple[str, str]]) -> Classification:
        if encounter.get("contained"):
            return classify_encounter(
                encounter, self.context, self.rules, codes=codes, backrefs=self.backrefs
            )
        try:  # the elements the class and location tiers read, as JSON: cheaper than reading them
            where = orjson.dumps(
                (encounter.get("class"), encounter.get("location"), encounter.get("serviceProvider"))
            )
        except TypeError:  # what orjson cannot write (integers beyond 64 bits…): no memo
            return classify_encounter(
                encounter, self.context, self.rules, codes=codes, backrefs=self.backrefs
            )
        key = (tuple(codes), where)
        known = self._memo.get(key)
        if known is not None and known is not _ASKS_QUALIFIER:
            return known  # type: ignore[no-any-return]
        if known is _ASKS_QUALIFIER:
            qualifiers = _Consulted(encounter, self.context, self.rules, self.backrefs).both()
            found = self._memo.get((key, qualifiers))
            if found is None:
                found = self._memo[(key, qualifiers)] = _classify(
                    encounter, self.context, self.rules, codes, _Known(qualifiers)
                )
            return found
        consulted = _Consulted(encounter, self.context, self.rules, self.backrefs)
        result = _classify(encounter, self.context, self.rules, codes, consulted)
        if consulted.asked:
            self._memo[key] = _ASKS_QUALIFIER
            self._memo[(key, consulted.both())] = result
        else:
            self._memo[key] = result
        return result

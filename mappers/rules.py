"""The versioned level-of-care rule table (TOML) and its precompiled lookups.

The default table ships as ``mappers/levels.default.toml``; a hospital's file in the same format extends
it by rule id (see the comments at the top of the default file). Parsing TOML text is the caller's
business only in that the caller reads the file: this module never opens one except the shipped default,
through ``importlib.resources``.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Final

from mappers.codes import normalise_code, system_key

#: Levels of care and their rank (episode-model.md): the rank decides a transition's direction.
LEVEL_RANK: Final[Mapping[str, int]] = {
    "outpatient": 1,
    "iop": 2,
    "php": 3,
    "residential": 4,
    "inpatient": 5,
    "emergency": 5,
}
NONE_LEVEL: Final = "none"
#: Rule tiers in order of precedence.
TIERS: Final = ("location", "code", "location_type", "class")
QUALIFIER_KINDS: Final = ("diagnosis", "location_type", "admit_source", "service_type", "location")
#: What a rule's ``qualifier`` asks for: nothing, any behavioral-health qualifier, or one showing the
#: Encounter's *purpose* is behavioral-health care (its reason, type/serviceType, services or place; not
#: a diagnosis it merely records: ``Encounter.diagnosis`` or a Condition pointing at it).
QUALIFIER_NEEDS: Final = ("", "any", "purpose")
#: Reads a value set file named by a rule (``value_set = "..."``): the caller's I/O, the mappers stay pure.
ValueSetReader = Callable[[str], str]


class RulesError(ValueError):
    """A rule file is malformed: the message names the entry and what is wrong."""


@dataclass(frozen=True)
class Rule:
    """One level-of-care rule: when it matches, the Encounter gets ``level`` (``"none"`` = no level)."""

    id: str
    level: str
    on: str
    source: str
    system: str = ""
    codes: frozenset[str] = frozenset()
    ranges: tuple[tuple[str, str], ...] = ()
    ids: frozenset[str] = frozenset()
    classes: frozenset[str] = frozenset()
    qualifier: str = ""
    exclude: tuple[str, ...] = ()
    pairs: frozenset[tuple[str, str]] = frozenset()  # (system key, code) from a value set file

    def matches_code(self, code: str) -> bool:
        return (code in self.codes or _in_ranges(code, self.ranges)) and not _excluded(code, self.exclude)


@dataclass(frozen=True)
class Qualifier:
    """One way an Encounter shows it is behavioral-health care."""

    id: str
    on: str
    source: str
    system: str = ""
    codes: frozenset[str] = frozenset()
    ranges: tuple[tuple[str, str], ...] = ()
    ids: frozenset[str] = frozenset()
    exclude: tuple[str, ...] = ()
    pairs: frozenset[tuple[str, str]] = frozenset()  # (system key, code) from a value set file

    def matches_code(self, code: str) -> bool:
        return (code in self.codes or _in_ranges(code, self.ranges)) and not _excluded(code, self.exclude)

    def matches(self, system: str, code: str) -> bool:
        """Whether a coding ``(system key, normalised code)`` is one of this qualifier's."""
        if (system, code) in self.pairs:
            return True
        return (not self.system or self.system == system) and self.matches_code(code)


def _excluded(code: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``code`` matches one of the glob ``patterns`` (``?`` one character, ``*`` any run)."""
    return any(_glob(pattern).fullmatch(code) for pattern in patterns)


@cache
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(
        ".*".join(".".join(re.escape(p) for p in part.split("?")) for part in pattern.split("*"))
    )


def _in_ranges(code: str, ranges: tuple[tuple[str, str], ...]) -> bool:
    for low, high in ranges:
        head = code[: len(low)]
        if len(head) == len(low) and low <= head <= high:
            return True
    return False


@dataclass(frozen=True)
class Rules:
    """The rule table: ordered rules and qualifiers plus dict lookups keyed by (system key, code)."""

    version: str
    rules: tuple[Rule, ...]
    qualifiers: tuple[Qualifier, ...] = ()
    # Precompiled: exact-code hits per tier, and the (few) range/system rules scanned per system.
    _exact: dict[tuple[str, str, str], tuple[Rule, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _ranged: dict[tuple[str, str], tuple[Rule, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _by_id: dict[str, tuple[Rule, ...]] = field(init=False, repr=False, compare=False, default_factory=dict)
    order: dict[str, int] = field(init=False, repr=False, compare=False, default_factory=dict)
    has_location_rules: bool = field(init=False, repr=False, compare=False, default=False)
    has_location_type_rules: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        exact: dict[tuple[str, str, str], list[Rule]] = {}
        ranged: dict[tuple[str, str], list[Rule]] = {}
        by_id: dict[str, list[Rule]] = {}
        for rule in self.rules:
            if rule.on == "location":
                for ref in rule.ids:
                    by_id.setdefault(ref, []).append(rule)
                continue
            for code in rule.codes:
                exact.setdefault((rule.on, rule.system, code), []).append(rule)
            for system, code in rule.pairs:
                exact.setdefault((rule.on, system, code), []).append(rule)
            if rule.ranges:
                ranged.setdefault((rule.on, rule.system), []).append(rule)
        object.__setattr__(self, "_exact", {k: tuple(v) for k, v in exact.items()})
        object.__setattr__(self, "_ranged", {k: tuple(v) for k, v in ranged.items()})
        object.__setattr__(self, "_by_id", {k: tuple(v) for k, v in by_id.items()})
        object.__setattr__(self, "order", {rule.id: i for i, rule in enumerate(self.rules)})
        object.__setattr__(self, "has_location_rules", any(r.on == "location" for r in self.rules))
        object.__setattr__(self, "has_location_type_rules", any(r.on == "location_type" for r in self.rules))

    def candidates(self, tier: str, system: str, code: str) -> tuple[Rule, ...]:
        """Rules of ``tier`` that match ``(system, code)``, in table order."""
        hits = self._exact.get((tier, system, code), ())
        if hits and any(r.exclude for r in hits):
            hits = tuple(r for r in hits if (system, code) in r.pairs or r.matches_code(code))
        ranged = self._ranged.get((tier, system))
        if ranged:
            extra = tuple(r for r in ranged if r not in hits and r.matches_code(code))
            if extra:
                return tuple(sorted((*hits, *extra), key=lambda r: self.order[r.id]))
        return hits

    def location_rules(self, reference: str) -> tuple[Rule, ...]:
        """Rules naming a Location / Organization id (``"Location/123"`` or a bare id)."""
        return self._by_id.get(reference, ())

    def qualifiers_on(self, kind: str) -> tuple[Qualifier, ...]:
        return tuple(q for q in self.qualifiers if q.on == kind)

    def rule(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)


# --- parsing --------------------------------------------------------------------------------------------


def _strings(entry: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = entry.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RulesError(f"{where}: {key} must be a list of strings")
    return list(value)


def _ranges(entry: Mapping[str, Any], system: str, where: str) -> tuple[tuple[str, str], ...]:
    found = []
    for text in _strings(entry, "ranges", where):
        low, sep, high = text.partition("-")
        if not sep or not low.strip() or not high.strip():
            raise RulesError(f"{where}: range {text!r} is not LOW-HIGH")
        low_n, high_n = normalise_code(system, low), normalise_code(system, high)
        if len(low_n) != len(high_n) or low_n > high_n:
            raise RulesError(f"{where}: range {text!r} must have equal-length bounds, low <= high")
        found.append((low_n, high_n))
    return tuple(found)


def _value_set_pairs(name: str, read: ValueSetReader | None, where: str) -> frozenset[tuple[str, str]]:
    """``(system key, code)`` of every code in a FHIR ValueSet's ``expansion.contains`` (nested too)."""
    if read is None:
        raise RulesError(f"{where}: value_set {name!r} needs a rules file read from disk")
    try:
        document = json.loads(read(name))
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"{where}: cannot read value set {name!r}: {exc}") from exc
    except ValueError as exc:
        raise RulesError(f"{where}: value set {name!r} is not JSON: {exc}") from exc
    expansion = document.get("expansion") if isinstance(document, dict) else None
    if not isinstance(document, dict) or document.get("resourceType") != "ValueSet":
        raise RulesError(f"{where}: value set {name!r} is not a FHIR ValueSet")
    if not isinstance(expansion, dict) or not isinstance(expansion.get("contains"), list):
        raise RulesError(f"{where}: value set {name!r} has no expansion.contains (expand it first)")
    found: set[tuple[str, str]] = set()
    pending: list[Any] = list(expansion["contains"])
    while pending:
        item = pending.pop()
        if not isinstance(item, dict):
            continue
        pending.extend(item.get("contains") or [])
        code, system = item.get("code"), item.get("system")
        if isinstance(code, str) and code.strip() and isinstance(system, str) and system:
            key = system_key(system)
            found.add((key, normalise_code(key, code)))
    if not found:
        raise RulesError(f"{where}: value set {name!r} lists no codes")
    return frozenset(found)


def _common(
    entry: Mapping[str, Any], where: str, kinds: Sequence[str], read: ValueSetReader | None = None
) -> dict[str, Any]:
    on = entry.get("on")
    if on not in kinds:
        raise RulesError(f"{where}: on must be one of {', '.join(kinds)}")
    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        raise RulesError(f"{where}: every entry needs a source")
    system = system_key(entry["system"]) if isinstance(entry.get("system"), str) else ""
    codes = frozenset(normalise_code(system, c) for c in _strings(entry, "codes", where))
    ranges = _ranges(entry, system, where)
    ids = frozenset(_strings(entry, "ids", where))
    exclude = tuple(normalise_code(system, c) for c in _strings(entry, "exclude", where))
    value_set = entry.get("value_set")
    if value_set is not None and (not isinstance(value_set, str) or not value_set.strip()):
        raise RulesError(f"{where}: value_set must be a file name")
    pairs = _value_set_pairs(value_set, read, where) if value_set else frozenset()
    if on == "location":
        if not ids:
            raise RulesError(f"{where}: a location entry needs ids")
    elif pairs:
        pass
    elif on != "service_type" or codes or ranges:
        if not system:
            raise RulesError(f"{where}: a {on} entry needs a system")
        if not codes and not ranges:
            raise RulesError(f"{where}: needs codes or ranges (or a value_set)")
    return {
        "on": on,
        "source": source.strip(),
        "system": system,
        "codes": codes,
        "ranges": ranges,
        "ids": ids,
        "exclude": exclude,
        "pairs": pairs,
    }


def _rule(entry: Mapping[str, Any], index: int, read: ValueSetReader | None = None) -> Rule:
    rule_id = entry.get("id")
    where = f"rule {rule_id!r}" if isinstance(rule_id, str) else f"rule #{index + 1}"
    if not isinstance(rule_id, str) or not rule_id:
        raise RulesError(f"{where}: needs an id")
    level = entry.get("level")
    if level not in (*LEVEL_RANK, NONE_LEVEL):
        raise RulesError(f"{where}: level must be one of {', '.join((*LEVEL_RANK, NONE_LEVEL))}")
    common = _common(entry, where, TIERS, read)
    qualifier = entry.get("qualifier", False)
    if qualifier is True:
        qualifier = "any"
    elif qualifier is False:
        qualifier = ""
    if qualifier not in QUALIFIER_NEEDS:
        raise RulesError(f'{where}: qualifier must be true, false or "purpose"')
    classes = frozenset(c.upper() for c in _strings(entry, "classes", where))
    return Rule(id=rule_id, level=str(level), qualifier=str(qualifier), classes=classes, **common)


def _qualifier(entry: Mapping[str, Any], index: int, read: ValueSetReader | None = None) -> Qualifier:
    qualifier_id = entry.get("id")
    where = f"qualifier {qualifier_id!r}" if isinstance(qualifier_id, str) else f"qualifier #{index + 1}"
    if not isinstance(qualifier_id, str) or not qualifier_id:
        raise RulesError(f"{where}: needs an id")
    return Qualifier(id=qualifier_id, **_common(entry, where, QUALIFIER_KINDS, read))


def _entries(document: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    entries = document.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, (dict, Mapping)) for e in entries):
        raise RulesError(f"{key}: must be an array of tables ([[{key}]])")
    return entries


def _merge(base: Sequence[Any], entries: list[Mapping[str, Any]], build: Any) -> tuple[Any, ...]:
    """Override by id in place, drop ``disabled`` ones, put new entries first (they win within a tier)."""
    result = list(base)
    added = []
    for index, entry in enumerate(entries):
        entry_id = entry.get("id")
        position = next((i for i, b in enumerate(result) if b.id == entry_id), None)
        if entry.get("disabled") is True:
            if position is not None:
                result.pop(position)
            continue
        built = build(entry, index)
        if position is not None:
            result[position] = built
        else:
            added.append(built)
    merged = (*added, *result)
    seen: set[str] = set()
    for item in merged:
        if item.id in seen:
            raise RulesError(f"rule {item.id!r}: duplicate id")
        seen.add(item.id)
    return merged


def load_rules(
    text: str | None = None, *, base: Rules | None = None, value_sets: ValueSetReader | None = None
) -> Rules:
    """Rules from TOML text extending ``base`` (default: the shipped table); no text = ``base`` itself.

    An entry may name a FHIR ValueSet file (``value_set = "mh-dx.json"``, with ``expansion.contains``)
    instead of listing codes; ``value_sets`` reads such a file by that name (the caller resolves it,
    normally beside the rules file), so a hospital plugs in its licensed sets without our shipping them.

    The resulting version is ``"<base version>+<file version>"`` for an extension, so every record says
    which default table and which hospital file classified it.
    """
    if base is None and text is not None:
        base = default_rules()
    if text is None:
        return base if base is not None else default_rules()
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"rules file is not valid TOML: {exc}") from exc
    version = document.get("version")
    if not isinstance(version, str) or not version.strip():
        raise RulesError("rules file needs a version string")
    unknown = set(document) - {"version", "rule", "qualifier"}
    if unknown:
        raise RulesError(f"rules file has unknown keys: {', '.join(sorted(unknown))}")
    rules = _merge(
        base.rules if base else (), _entries(document, "rule"), lambda e, i: _rule(e, i, value_sets)
    )
    qualifiers = _merge(
        base.qualifiers if base else (),
        _entries(document, "qualifier"),
        lambda e, i: _qualifier(e, i, value_sets),
    )
    full_version = f"{base.version}+{version.strip()}" if base and base.version else version.strip()
    return Rules(version=full_version, rules=rules, qualifiers=qualifiers)


@cache
def default_rules() -> Rules:
    """The rule table shipped with the mappers (``mappers/levels.default.toml``)."""
    text = resources.files("mappers").joinpath("levels.default.toml").read_text("utf-8")
    return load_rules(text, base=_EMPTY)


_EMPTY: Final = Rules(version="", rules=(), qualifiers=())

"""The lean projection (``mappers.projection``) and ``iop-bridge map``'s lean / ``--strict`` reading.

Lean keeps only the fields the mappers read, each type-checked, so mapping the projection must give the
records mapping the whole resources gives; a wrong type rejects the resource naming the field path;
``--strict`` validates the whole resource and so rejects what lean lets through.
"""

from __future__ import annotations

import contextlib
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints, is_typeddict

import orjson
import pytest
import yaml

from mappers import default_rules, map_episodes, map_referrals
from mappers.projection import LEAN_TYPES, Other, ProjectionError, project, project_line, resource_type_of
from sync.cli import main
from sync.journeys import build_resources, parse_book
from tests.unit.mappers.golden import case_names, load_case

ROOT = Path(__file__).resolve().parents[3]
AS_OF = datetime(2026, 6, 1, 23, 59, tzinfo=UTC)

ENCOUNTER: dict[str, Any] = {
    "resourceType": "Encounter",
    "id": "e1",
    "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    "type": [
        {"coding": [{"system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "S9480"}]}
    ],
    "subject": {"reference": "Patient/p1"},
    "period": {"start": "2026-05-04T09:00:00Z", "end": "2026-05-04T12:00:00Z"},
    "text": {"status": "generated", "div": "<div>free text</div>"},
    "participant": [{"individual": {"reference": "Practitioner/d1"}}],
}


def _line(resource: dict[str, Any]) -> bytes:
    return orjson.dumps(resource)


def _error(resource: dict[str, Any]) -> ProjectionError:
    with pytest.raises(ProjectionError) as caught:
        project_line(_line(resource), str(resource["resourceType"]))
    return caught.value


def test_projection_keeps_only_the_fields_the_mappers_read() -> None:
    projected = project_line(_line(ENCOUNTER), "Encounter")
    assert "text" not in projected
    assert "participant" not in projected
    assert projected["period"] == ENCOUNTER["period"]
    assert projected["class"] == ENCOUNTER["class"]
    assert projected["type"] == ENCOUNTER["type"]
    assert project(ENCOUNTER) == projected


def test_a_wrong_type_names_the_resource_the_field_path_and_the_problem() -> None:
    error = _error({**ENCOUNTER, "period": {"start": 20260504}})
    assert (error.resource_type, error.id) == ("Encounter", "e1")
    assert str(error) == (
        "Encounter/e1: $.period.start: JSON number where a string belongs"
        " (number-as-string, not tolerated for this EHR)"
    )
    nested = _error({**ENCOUNTER, "diagnosis": [{"condition": {"reference": "Condition/c"}, "rank": "1"}]})
    assert nested.reason == (
        "$.diagnosis[0].rank: JSON string holding a number where a number belongs"
        " (string-as-number, not tolerated for this EHR)"
    )
    listed = _error({**ENCOUNTER, "type": {"coding": []}})
    assert listed.reason == "$.type: expected `array`, got `object`"


def test_an_unreadable_id_is_named_as_missing() -> None:
    error = _error({**ENCOUNTER, "id": 7})
    assert error.id is None
    reason = "$.id: JSON number where a string belongs (number-as-string, not tolerated for this EHR)"
    assert str(error) == f"Encounter/(no id): {reason}"
    with pytest.raises(ProjectionError) as caught:
        project({**ENCOUNTER, "id": 7})
    assert caught.value.reason == reason


def test_bad_json_and_a_type_other_than_the_files_are_rejected() -> None:
    with pytest.raises(ProjectionError, match="not valid JSON"):
        project_line(b'{"resourceType": "Encounter", "id": ', "Encounter")
    with pytest.raises(ProjectionError, match="resourceType differs"):
        project_line(_line(ENCOUNTER), "Condition")
    assert resource_type_of(_line(ENCOUNTER)) == "Encounter"
    assert resource_type_of(b"[1, 2]") is None
    assert resource_type_of(b"{not json") is None


def test_null_is_read_as_absent_and_unknown_types_keep_their_identity() -> None:
    assert project_line(_line({**ENCOUNTER, "partOf": None}), "Encounter")["partOf"] is None
    practitioner = {"resourceType": "Practitioner", "id": "d1", "name": [{"family": "X"}], "active": True}
    assert project(practitioner) == {"resourceType": "Practitioner", "id": "d1"}


def _journeys() -> list[dict[str, Any]]:
    book = parse_book(yaml.safe_load((ROOT / "examples" / "journeys.yaml").read_text("utf-8")))
    return [dict(r) for r in build_resources(book, anchor=AS_OF.date())]


def _lean(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [project_line(_line(r), str(r["resourceType"])) for r in resources]


def _same_mapping(resources: list[dict[str, Any]], **options: Any) -> None:
    rules = default_rules()
    settings = {"ehr": "test", "as_of": AS_OF, "rules": rules, **options}
    full = map_episodes(resources, **settings)
    lean = map_episodes(_lean(resources), **settings)
    assert full.episodes == lean.episodes
    assert full.rejects == lean.rejects
    assert full.encounter_levels == lean.encounter_levels
    referral_options = {k: v for k, v in options.items() if k == "timezone"}
    assert map_referrals(resources, ehr="test", rules=rules, **referral_options) == map_referrals(
        _lean(resources), ehr="test", rules=rules, **referral_options
    )


def test_the_projection_maps_the_journeys_as_the_whole_resources_do() -> None:
    resources = _journeys()
    assert {str(r["resourceType"]) for r in resources} & set(LEAN_TYPES) >= {"Encounter", "Condition"}
    _same_mapping(resources)


@pytest.mark.parametrize("name", case_names())
def test_the_projection_maps_each_golden_case_as_the_whole_resources_do(name: str) -> None:
    case = load_case(name)
    readable = []
    for resource in case.resources:
        try:
            project(resource)
        except ProjectionError:
            continue  # a case about malformed values: the lean reader rejects those before mapping
        readable.append(resource)
    _same_mapping(
        readable, timezone=case.timezone, previous_anchors=case.previous_anchors or None, explain=True
    )


def _run(folder: Path, *options: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out = folder / "out.ndjson"
    argv = ["map", str(folder / "in"), "--out", str(out), "--as-of", AS_OF.isoformat(), *options]
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    rejects = out.with_name(out.name + ".rejects.ndjson")
    records = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    return records, [json.loads(line) for line in rejects.read_text("utf-8").splitlines()]


@pytest.fixture
def system(tmp_path: Path) -> Path:
    """The journeys as a bulk-export folder, plus two Encounters: one valid FHIR but for a field the
    mappers never read, one with a wrong type in a field they do read."""
    folder = tmp_path / "in"
    folder.mkdir()
    by_type: dict[str, list[bytes]] = {}
    for resource in _journeys():
        by_type.setdefault(str(resource["resourceType"]), []).append(_line(resource))
    odd = {**ENCOUNTER, "id": "odd-unread", "priority": "urgent"}  # FHIR: priority is a CodeableConcept
    bad = {**ENCOUNTER, "id": "bad-read", "period": {"start": True}}
    by_type["Encounter"] += [_line(odd), _line(bad)]
    for kind, lines in by_type.items():
        (folder / f"{kind}.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    return tmp_path


@pytest.mark.parametrize("split", [[], ["--workers", "2", "--partitions", "3"]])
def test_lean_rejects_a_wrong_type_and_strict_also_what_lean_does_not_read(
    system: Path, split: list[str]
) -> None:
    lean, lean_rejects = _run(system, *split)
    strict, strict_rejects = _run(system, "--strict", *split)
    encounters = system / "in" / "Encounter.ndjson"
    last = len(encounters.read_bytes().splitlines())
    assert lean_rejects == [
        {
            "source": str(encounters),
            "line": last,
            "reason": "Encounter/bad-read: $.period.start: expected `str`, got `bool`",
        }
    ]
    assert strict_rejects[1] == {
        "source": str(encounters),
        "line": last,
        "reason": "Encounter/bad-read: period.start: Input should be a valid datetime",
    }
    assert len(strict_rejects) == 2
    assert strict_rejects[0]["source"] == str(encounters)
    assert strict_rejects[0]["line"] == last - 1
    assert strict_rejects[0]["reason"].startswith("Encounter/odd-unread: priority: ")
    # The Encounter only strict rejects is an IOP session of its own patient; everyone else is the same.
    assert [r["sessions"][0]["reference"] for r in lean if r["patient"]["reference"] == "Patient/p1"] == [
        "Encounter/odd-unread"
    ]
    assert len(lean) > 5
    assert [r for r in lean if r["patient"]["reference"] != "Patient/p1"] == strict


class _Recording(dict[str, Any]):
    """A resource (or an element of one) that notes every key the mappers read which it holds."""

    def __init__(self, data: dict[str, Any], path: tuple[str, ...], seen: set[tuple[str, ...]]) -> None:
        super().__init__({key: _record(value, (*path, key), seen) for key, value in data.items()})
        self._path = path
        self._seen = seen

    def _note(self, key: object) -> None:
        if isinstance(key, str) and dict.__contains__(self, key):
            self._seen.add((*self._path, key))

    def get(self, key: str, default: Any = None) -> Any:
        self._note(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self._note(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._note(key)
        return super().__contains__(key)


def _record(value: Any, path: tuple[str, ...], seen: set[tuple[str, ...]]) -> Any:
    if isinstance(value, dict):
        return _Recording(value, path, seen)
    if isinstance(value, list):
        return [_record(item, path, seen) for item in value]
    return value


def _declared(path: tuple[str, ...]) -> bool:
    """The projection of ``path[0]`` (a resource type) declares the element ``path[1:]``."""
    kind: Any = LEAN_TYPES.get(path[0], Other)
    for name in path[1:]:
        while True:  # unwrap ``X | None`` and ``list[X]``
            args = [a for a in get_args(kind) if a is not type(None)]
            if get_origin(kind) is list or (args and get_origin(kind) is not dict and len(args) == 1):
                kind = args[0]
                continue
            break
        if get_origin(kind) is dict:
            return True  # kept whole (contained resources)
        hints = get_type_hints(kind) if is_typeddict(kind) else {}
        if name not in hints:
            return False
        kind = hints[name]
    return True


def test_every_element_the_mappers_read_is_in_the_projection() -> None:
    """Guards the projection against drift: a field the engine starts reading must be added to it, or
    lean mapping would silently differ from mapping whole resources."""
    seen: set[tuple[str, ...]] = set()
    systems = [_journeys(), *(load_case(name).resources for name in case_names())]
    rules = default_rules()
    for resources in systems:
        wrapped = [_record(r, (str(r.get("resourceType")),), seen) for r in resources if isinstance(r, dict)]
        map_episodes(wrapped, ehr="test", as_of=AS_OF, rules=rules, explain=True)
        map_referrals(wrapped, ehr="test", rules=rules)
    assert len(seen) > 40
    assert sorted(".".join(path) for path in seen if not _declared(path)) == []

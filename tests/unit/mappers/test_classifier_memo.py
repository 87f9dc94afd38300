"""``levels.Classifier``: the memoised classification gives what ``classify_encounter`` gives, Encounter by
Encounter, whatever came before it (same codes with and without a qualifier, other patients, other days)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from mappers import classify_encounter, default_rules, map_episodes
from mappers.index import collect
from mappers.levels import Classifier, service_codes
from schemas.contracts import errors
from sync.journeys import build_resources, parse_book
from tests.unit.mappers.golden import case_names, load_case

ROOT = Path(__file__).resolve().parents[3]
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"


def _inpatient(identifier: str, diagnosis: str | None) -> dict[str, Any]:
    encounter: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": identifier,
        "status": "finished",
        "class": {"system": ACT, "code": "IMP"},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2026-03-01T08:00:00Z", "end": "2026-03-04T08:00:00Z"},
    }
    if diagnosis is not None:
        encounter["reasonCode"] = [{"coding": [{"system": ICD, "code": diagnosis}]}]
    return encounter


@pytest.mark.parametrize("first", ["F32.1", None, "M17.0"])
def test_the_same_codes_with_and_without_a_qualifier_keep_their_own_level(first: str | None) -> None:
    rules = default_rules()
    classifier = Classifier({}, rules)
    order = [first, *(d for d in ("F32.1", None, "M17.0") if d != first)]
    for number, diagnosis in enumerate(order * 2):
        encounter = _inpatient(f"e{number}", diagnosis)
        got = classifier.classify(encounter, service_codes(encounter))
        assert got == classify_encounter(encounter, {}, rules)
        assert got.level == ("inpatient" if diagnosis == "F32.1" else None)


def test_a_location_type_is_read_from_the_classifiers_context() -> None:
    rules = default_rules()
    pos = "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set"
    context = {
        "Location/l1": {
            "resourceType": "Location",
            "id": "l1",
            "type": [{"coding": [{"system": pos, "code": "52"}]}],
        }
    }
    encounter = {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"system": ACT, "code": "AMB"},
        "location": [{"location": {"reference": "Location/l1"}}],
    }
    assert Classifier(context, rules).classify(encounter, []).level == "php"
    assert Classifier({}, rules).classify(encounter, []).level is None


def _all_encounters() -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    book = parse_book(yaml.safe_load((ROOT / "examples" / "journeys.yaml").read_text("utf-8")))
    systems = [[dict(r) for r in build_resources(book, anchor=datetime(2026, 6, 1, tzinfo=UTC).date())]]
    systems.extend(load_case(name).resources for name in case_names())
    found = []
    for resources in systems:
        for resource in resources:
            if isinstance(resource, dict) and resource.get("resourceType") == "Encounter":
                found.append((resources, resource))
    return found


def test_memoised_and_fresh_classification_agree_on_every_known_encounter() -> None:
    rules = default_rules()
    encounters = _all_encounters()
    assert len(encounters) > 200
    by_system: dict[int, Classifier] = {}
    for resources, encounter in encounters:
        shared = collect(resources).shared
        classifier = by_system.setdefault(id(resources), Classifier(shared, rules))
        codes = service_codes(encounter)
        assert classifier.classify(encounter, codes) == classify_encounter(encounter, shared, rules)


def test_two_patients_sessions_with_the_same_codes_keep_their_own_days() -> None:
    session: dict[str, Any] = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": ACT, "code": "AMB"},
        "type": [{"coding": [{"system": HCPCS, "code": "S9480"}]}],
    }
    resources = []
    for patient, day in (("a", "2026-05-04"), ("b", "2026-05-11")):
        encounter = copy.deepcopy(session)
        encounter.update(
            id=f"s-{patient}",
            subject={"reference": f"Patient/{patient}"},
            period={"start": f"{day}T09:00:00Z", "end": f"{day}T12:00:00Z"},
        )
        resources.append(encounter)
    result = map_episodes(resources, ehr="t", as_of=datetime(2026, 5, 12, tzinfo=UTC), rules=default_rules())
    assert [(e["patient"]["reference"], e["level"], e["start"]) for e in result.episodes] == [
        ("Patient/a", "iop", "2026-05-04"),
        ("Patient/b", "iop", "2026-05-11"),
    ]


def test_a_discharge_disposition_code_that_is_not_text_is_not_carried() -> None:
    session: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": "s1",
        "status": "finished",
        "class": {"system": ACT, "code": "AMB"},
        "type": [{"coding": [{"system": HCPCS, "code": "S9480"}]}],
        "subject": {"reference": "Patient/a"},
        "period": {"start": "2026-05-04T09:00:00Z", "end": "2026-05-04T12:00:00Z"},
        "hospitalization": {"dischargeDisposition": {"coding": [{"system": "urn:x", "code": 1}]}},
    }
    result = map_episodes([session], ehr="t", as_of=datetime(2026, 5, 5, tzinfo=UTC), rules=default_rules())
    [episode] = result.episodes
    assert episode["exit"]["reason"] == "discharged"
    assert episode["exit"]["disposition"] is None
    assert errors("episode", 1, episode) == []

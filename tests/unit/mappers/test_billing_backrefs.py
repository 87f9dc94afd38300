"""Diagnoses recorded only as ``Condition.encounter`` back-references (US Core encounter-diagnosis) reach
``billing.diagnoses`` of the episode, not only the level qualifier."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from mappers.episodes import map_episodes
from mappers.rules import default_rules

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED = "http://snomed.info/sct"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
AS_OF = datetime(2025, 6, 1, tzinfo=UTC)
STAY = datetime(2025, 3, 1, tzinfo=UTC)


def encounter(eid: str, cls: str, start: datetime, hours: int, hcpcs: str | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": ACT, "code": cls},
        "subject": {"reference": "Patient/p"},
        "period": {"start": start.isoformat(), "end": (start + timedelta(hours=hours)).isoformat()},
    }
    if hcpcs:
        resource["type"] = [{"coding": [{"system": HCPCS, "code": hcpcs}]}]
    return resource


def condition(cid: str, encounter_id: str, icd: str, *, refuted: bool = False) -> dict[str, Any]:
    """US Core Condition Encounter Diagnosis: category, SNOMED + ICD-10-CM coding, encounter reference."""
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": cid,
        "meta": {
            "profile": [
                "http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition-encounter-diagnosis"
            ]
        },
        "clinicalStatus": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
            ]
        },
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                        "code": "encounter-diagnosis",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": SNOMED, "code": "370143000"}, {"system": ICD, "code": icd}]},
        "subject": {"reference": "Patient/p"},
        "encounter": {"reference": f"Encounter/{encounter_id}"},
    }
    if refuted:
        resource["verificationStatus"] = {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "refuted"}
            ]
        }
    return resource


def course(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    resources = [encounter("stay", "IMP", STAY, 24 * 5), condition("dx-stay", "stay", "F33.2"), *extra]
    resources += [encounter(f"s{n}", "AMB", STAY + timedelta(days=7 + 2 * n), 3, "S9480") for n in range(5)]
    return resources


def test_a_session_diagnosis_only_in_condition_encounter_reaches_billing() -> None:
    result = map_episodes(
        course(condition("dx-iop", "s0", "F10.20")), ehr="h", as_of=AS_OF, rules=default_rules()
    )
    (episode,) = result.episodes
    assert episode["entry"]["direction"] == "step_down"
    diagnoses = episode["billing"]["diagnoses"]
    assert [d["code"] for d in diagnoses] == ["F10.20"]
    assert diagnoses[0]["principal"] is True
    assert diagnoses[0]["condition"] == {"reference": "Condition/dx-iop"}
    # F10 principal: substance-use IOP, hence Part 2
    assert episode["part2"] is True


def test_a_refuted_back_reference_does_not_reach_billing() -> None:
    result = map_episodes(
        course(condition("dx-iop", "s0", "F10.20", refuted=True)), ehr="h", as_of=AS_OF, rules=default_rules()
    )
    (episode,) = result.episodes
    assert episode["billing"]["diagnoses"] == []


def test_encounter_diagnosis_and_back_reference_of_the_same_code_count_once() -> None:
    first = encounter("s0", "AMB", STAY + timedelta(days=7), 3, "S9480")
    first["diagnosis"] = [{"condition": {"reference": "Condition/dx-iop"}, "rank": 1}]
    resources = [r for r in course(condition("dx-iop", "s0", "F32.1")) if r.get("id") != "s0"] + [first]
    (episode,) = map_episodes(resources, ehr="h", as_of=AS_OF, rules=default_rules()).episodes
    assert [d["code"] for d in episode["billing"]["diagnoses"]] == ["F32.1"]


def test_a_snomed_only_sud_condition_pointing_at_a_session_makes_the_episode_part2() -> None:
    sud = condition("dx-sud", "s1", "F10.20")
    sud["code"] = {"coding": [{"system": SNOMED, "code": "7200002"}]}  # Alcoholism, no ICD-10-CM
    (episode,) = map_episodes(course(sud), ehr="h", as_of=AS_OF, rules=default_rules()).episodes
    assert episode["billing"]["diagnoses"] == []
    assert episode["part2"] is True

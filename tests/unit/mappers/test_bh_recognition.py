"""A US Core-shaped psychiatric stay whose diagnosis is only a Condition.encounter back-reference, a
check-up that merely records a BH diagnosis, and a hospital value set file."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from mappers.episodes import map_episodes
from mappers.rules import default_rules, load_rules

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED = "http://snomed.info/sct"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
AS_OF = datetime(2025, 6, 1, tzinfo=UTC)


def encounter(
    eid: str, cls: str, start: datetime, hours: int, code: tuple[str, str] | None = None
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": ACT, "code": cls},
        "subject": {"reference": "Patient/p"},
        "period": {"start": start.isoformat(), "end": (start + timedelta(hours=hours)).isoformat()},
    }
    if code:
        resource["type"] = [{"coding": [{"system": code[0], "code": code[1]}]}]
    return resource


def condition(cid: str, encounter_id: str, code: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "category": [{"coding": [{"code": "encounter-diagnosis"}]}],
        "code": {"coding": [{"system": ICD, "code": code}]},
        "subject": {"reference": "Patient/p"},
        "encounter": {"reference": f"Encounter/{encounter_id}"},
    }


def test_a_stay_diagnosed_only_by_condition_encounter_is_inpatient_and_the_iop_steps_down() -> None:
    stay_start = datetime(2025, 3, 1, tzinfo=UTC)
    resources = [encounter("stay", "IMP", stay_start, 24 * 5), condition("dx", "stay", "F33.2")]
    resources += [
        encounter(f"s{n}", "AMB", stay_start + timedelta(days=7 + 2 * n), 3, (HCPCS, "S9480"))
        for n in range(5)
    ]
    result = map_episodes(resources, ehr="h", as_of=AS_OF, rules=default_rules())
    assert result.encounter_levels == {"inpatient": 1, "iop": 5}
    (episode,) = result.episodes
    assert episode["entry"]["direction"] == "step_down"
    assert episode["entry"]["from_level"] == "inpatient"


def test_a_check_up_that_merely_records_a_bh_diagnosis_stays_none() -> None:
    checkup = encounter("c", "AMB", datetime(2025, 3, 1, tzinfo=UTC), 1, (SNOMED, "185349003"))
    result = map_episodes(
        [checkup, condition("dx", "c", "F32.9")], ehr="h", as_of=AS_OF, rules=default_rules()
    )
    assert result.encounter_levels == {"none": 1}
    with_reason = {**checkup, "reasonCode": [{"coding": [{"system": ICD, "code": "F32.9"}]}]}
    assert map_episodes([with_reason], ehr="h", as_of=AS_OF, rules=default_rules()).encounter_levels == {
        "outpatient": 1
    }


def test_a_rule_can_name_a_value_set_file() -> None:
    value_set = {
        "resourceType": "ValueSet",
        "expansion": {"contains": [{"system": "https://ehr.example/dept", "code": "BH-IOP"}]},
    }
    files = {"iop-depts.json": json.dumps(value_set)}
    text = """
version = "h-1"
[[rule]]
id = "iop-local"
level = "iop"
on = "code"
value_set = "iop-depts.json"
source = "the hospital's IOP service types"
"""
    rules = load_rules(text, value_sets=files.__getitem__)
    resource = encounter(
        "e", "AMB", datetime(2025, 3, 1, tzinfo=UTC), 3, ("https://ehr.example/dept", "bh-iop")
    )
    assert map_episodes([resource], ehr="h", as_of=AS_OF, rules=rules).encounter_levels == {"iop": 1}

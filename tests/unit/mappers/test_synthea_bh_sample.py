"""SMART's Synthea R4 sample (tests/data/external/synthea-bh-sample): behavioral-health care coded in
SNOMED CT the way Synthea and many EHRs code it is recognised by the default rules, the controls are not,
and an IOP course spliced after each kind of care gets the entry the episode model says."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mappers.episodes import map_episodes
from mappers.index import collect
from mappers.levels import Classifier, service_codes
from mappers.rules import default_rules
from sync.inputs import load_resources

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "external" / "synthea-bh-sample"
SNOMED = "http://snomed.info/sct"
DETOX = "56876005"
OVERDOSE = "55680006"
BH_REASONS = {"47505003", "192127007", "36923009", "370143000"}
PSYCHIATRIC_INTERVIEW = "79094001"


def snomed(value: Any) -> set[str]:
    concepts = value if isinstance(value, list) else [value] if value else []
    return {c["code"] for cc in concepts for c in cc.get("coding", []) if c.get("system") == SNOMED}


@pytest.fixture(scope="module")
def resources() -> list[dict[str, Any]]:
    loaded = load_resources([SAMPLE])
    assert loaded.rejects == []
    return loaded.resources


def kind(encounter: dict[str, Any]) -> str | None:
    types, reasons = snomed(encounter.get("type")), snomed(encounter.get("reasonCode"))
    if DETOX in types:
        return "detox"
    if encounter["class"]["code"] == "EMER" and OVERDOSE in reasons:
        return "overdose"
    if (reasons | types) & (BH_REASONS | {PSYCHIATRIC_INTERVIEW}):
        return "bh_visit"
    return None


def test_every_bh_encounter_gets_its_level_and_the_controls_none(resources: list[dict[str, Any]]) -> None:
    collected = collect(resources)
    classifier = Classifier(collected.shared, default_rules(), collected.by_encounter)
    levels: Counter[tuple[str | None, str | None]] = Counter()
    bh_patients: set[str] = set()
    for patient_id, holder in collected.patients.items():
        for encounter in holder.of("Encounter"):
            found = kind(dict(encounter))
            if found:
                bh_patients.add(patient_id)
            levels[(found, classifier.classify(encounter, service_codes(encounter)).level)] += 1
    assert levels[("detox", "inpatient")] == 39  # every detox stay (class IMP)
    assert levels[("overdose", "emergency")] == 71  # every ED visit for a drug overdose
    assert levels[("bh_visit", "outpatient")] == 160  # PTSD, ADHD, depression visits, psychiatric interviews
    assert {k: v for k, v in levels.items() if k[0] is not None and k[1] is None} == {}
    # Nothing else is behavioral-health care: check-ups, ED visits for injuries, other inpatient stays.
    assert {k: v for k, v in levels.items() if k[0] is None and k[1] is not None} == {}
    assert len(bh_patients) == 24
    assert len(collected.patients) == 50


def iop_course(patient: str, start: datetime, prefix: str) -> list[dict[str, Any]]:
    sessions = []
    for n in range(6):
        day = start + timedelta(days=2 * n)
        sessions.append(
            {
                "resourceType": "Encounter",
                "id": f"{prefix}-{n}",
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "type": [
                    {
                        "coding": [
                            {
                                "system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
                                "code": "S9480",
                            }
                        ]
                    }
                ],
                "subject": {"reference": f"Patient/{patient}"},
                "period": {"start": day.isoformat(), "end": (day + timedelta(hours=3)).isoformat()},
            }
        )
    return sessions


def test_an_iop_spliced_after_each_kind_of_care_steps_down_or_up(resources: list[dict[str, Any]]) -> None:
    collected = collect(resources)
    last: dict[str, tuple[datetime, str]] = {}  # kind -> (end of the latest such encounter, patient)
    for patient_id, holder in collected.patients.items():
        for encounter in holder.of("Encounter"):
            found = kind(dict(encounter))
            if found:
                end = datetime.fromisoformat(encounter["period"].get("end") or encounter["period"]["start"])
                if found not in last or end > last[found][0]:
                    last[found] = (end, patient_id)
    spliced = list(resources)
    for found, (end, patient_id) in last.items():
        spliced += iop_course(patient_id, end + timedelta(days=3), f"iop-{found}")
    as_of = max(end for end, _ in last.values()) + timedelta(days=200)
    result = map_episodes(spliced, ehr="smart", as_of=as_of.astimezone(UTC), rules=default_rules())
    entries = {
        e["sessions"][0]["reference"].split("/")[1].rsplit("-", 1)[0]: (
            e["entry"]["direction"],
            e["entry"]["from_level"],
        )
        for e in result.episodes
    }
    assert entries == {
        "iop-detox": ("step_down", "inpatient"),
        "iop-overdose": ("step_down", "emergency"),
        "iop-bh_visit": ("step_up", "outpatient"),
    }

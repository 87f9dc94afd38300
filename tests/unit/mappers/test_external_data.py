"""The external FHIR data copied into ``tests/data/external`` (each folder's SOURCE.md says whence) maps
without a crash and without an unexplained reject; the level counts are asserted and explained from the
data itself.

Neither dataset holds IOP care: the HL7 R4 examples are general-medicine samples, and Synthea codes its
encounters and conditions in SNOMED CT only (no CPT psychotherapy codes, no ICD-10-CM F codes), so no
inpatient stay or ED visit carries a behavioral-health qualifier and every Encounter is level ``none``.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.episodeofcare import EpisodeOfCare

from mappers.episodes import map_episodes
from mappers.referrals import map_referrals
from mappers.rules import default_rules
from schemas.contracts import validate
from sync.cli import main
from sync.inputs import load_resources

DATA = Path(__file__).resolve().parents[2] / "data" / "external"
HL7 = DATA / "hl7-r4-examples"
SYNTHEA = DATA / "synthea-bulk-10"
AS_OF = datetime(2026, 11, 1, tzinfo=UTC)


def codes_in(value: Any, system_part: str) -> list[str]:
    """Every code of a coding whose system contains ``system_part``, anywhere in a resource."""
    found: list[str] = []
    if isinstance(value, dict):
        if isinstance(value.get("system"), str) and system_part in value["system"] and "code" in value:
            found.append(str(value["code"]))
        for item in value.values():
            found.extend(codes_in(item, system_part))
    elif isinstance(value, list):
        for item in value:
            found.extend(codes_in(item, system_part))
    return found


@pytest.fixture(scope="module")
def hl7() -> list[dict[str, Any]]:
    loaded = load_resources([HL7])
    assert loaded.rejects == []
    assert loaded.files == len(list(HL7.glob("*.json")))
    return loaded.resources


@pytest.fixture(scope="module")
def synthea() -> list[dict[str, Any]]:
    loaded = load_resources([SYNTHEA])
    assert loaded.rejects == []
    return loaded.resources


def test_hl7_examples_classify_as_none_without_a_reject(hl7: list[dict[str, Any]]) -> None:
    result = map_episodes(hl7, ehr="hl7", as_of=AS_OF, rules=default_rules(), explain=True)
    encounters = {r["id"]: r for r in hl7 if r["resourceType"] == "Encounter"}
    assert len(encounters) == 10
    without_start = sorted(i for i, r in encounters.items() if not (r.get("period") or {}).get("start"))
    assert without_start == ["example", "f001", "f002", "f003", "f201", "f202", "xcda"]
    # Seven Encounters have no period.start. The engine rejects only an *attended level-of-care* Encounter
    # without a start (it cannot be placed in an episode); these are general-medicine visits (level none),
    # so they are counted, not rejected.
    assert result.rejects == []
    # Every Encounter is "none": emerg and f203 are inpatient stays (class IMP) for non-behavioral problems
    # (no ICD-10 F code, no psychiatric location or admit source), home is a home-health visit, the rest
    # are general ambulatory visits without a behavioral-health code.
    assert result.encounter_levels == {"none": 10}
    assert not [c for r in hl7 for c in codes_in(r, "icd-10") if c.upper().startswith("F")]
    assert result.episodes == []


def test_hl7_examples_hold_one_referral_the_myringotomy_request(hl7: list[dict[str, Any]]) -> None:
    result = map_referrals(hl7, ehr="hl7", rules=default_rules())
    assert result.rejects == []
    assert [r["service_request"]["reference"] for r in result.referrals] == ["ServiceRequest/myringotomy"]
    referral = result.referrals[0]
    validate("referral", 1, referral)
    # Category SNOMED 103696004 "Patient referral to specialist", a descendant of 3457005.
    assert referral["referral_type"] == [{"system": "http://snomed.info/sct", "code": "103696004"}]
    assert referral["authored"] == "2014-02-14"
    assert referral["priority"] == "routine"
    # No Task focuses on it (the example Tasks point at the lipid panel order and a medication request).
    assert referral["task"] is None
    assert referral["state"] == "sent"
    assert referral["part2"] is False
    # Every other ServiceRequest is an order (lab, imaging, procedure), not a referral.
    others = {r["id"] for r in hl7 if r["resourceType"] == "ServiceRequest"} - {"myringotomy"}
    assert len(others) == 19


def test_synthea_bulk_export_maps_every_encounter_to_none_without_a_reject(
    synthea: list[dict[str, Any]],
) -> None:
    encounters = [r for r in synthea if r["resourceType"] == "Encounter"]
    assert Counter(r["class"]["code"] for r in encounters) == {
        "AMB": 1133,
        "IMP": 49,
        "EMER": 23,
        "HH": 9,
        "VR": 1,
    }
    result = map_episodes(synthea, ehr="synthea", as_of=AS_OF, rules=default_rules())
    assert result.rejects == []
    assert result.patients == 13
    assert result.encounter_levels == {"none": 1215}
    assert result.episodes == []
    # Why none: no Encounter carries a CPT, HCPCS or revenue code (types are SNOMED only), and no resource
    # has an ICD-10-CM code at all, so IMP/EMER stays lack the behavioral-health qualifier the rules need.
    assert {
        s for r in encounters for t in r.get("type") or [] for s in {c["system"] for c in t["coding"]}
    } == {"http://snomed.info/sct"}
    assert not [c for r in synthea for c in codes_in(r, "icd-10")]
    assert map_referrals(synthea, ehr="synthea", rules=default_rules()).referrals == []


def test_both_datasets_through_the_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "episodes.ndjson"
    code = main(
        ["--log-level", "WARNING", "map", str(SYNTHEA), str(HL7), "--as-of", "2026-11-01", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 0
    # 1,215 Synthea + 10 HL7 Encounters, all level none; nothing rejected (see the tests above).
    assert "encounters by level: none 1,225" in err
    assert "rejects: 0 (input 0, episodes 0, referrals 0)" in err
    assert out.with_name("episodes.ndjson.rejects.ndjson").read_text("utf-8") == ""
    assert "patients: 21" in err
    assert "referrals: 1" in err
    assert out.read_text("utf-8") == ""


def test_the_hl7_episode_of_care_example_is_valid_r4b_and_not_a_program_episode(
    hl7: list[dict[str, Any]],
) -> None:
    example = next(r for r in hl7 if r["resourceType"] == "EpisodeOfCare")
    EpisodeOfCare.model_validate(example)
    result = map_episodes([example], ehr="hl7", as_of=AS_OF, rules=default_rules())
    assert result.episodes == []
    assert result.rejects == []

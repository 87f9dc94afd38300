"""EpisodeOfCare resources built from episode.v1 records: content, FHIR R4 validity, clear errors."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from fhir.resources.R4B.episodeofcare import EpisodeOfCare

from mappers.episode_of_care import EpisodeOfCareError, episode_of_care
from mappers.episodes import map_episodes
from mappers.rules import default_rules
from schemas.contracts import validate
from sync.journeys import build_resources, parse_book

ROOT = Path(__file__).resolve().parents[3]
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
EPISODE_ID = "07d59e21-2e32-5f30-a3c0-08b60a3bb238"
PART2_LABELS = [
    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "ETH"},
    {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"},
    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActUSPrivacyLaw", "code": "42CFRPart2"},
]


def finished_episode(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "episode_id": EPISODE_ID,
        "ehr": "north",
        "patient": {"reference": "Patient/p1", "identifier": [{"system": "urn:mrn", "value": "M1"}]},
        "level": "iop",
        "status": "finished",
        "start": "2026-03-02",
        "end": "2026-04-10",
        "anchor": {"reference": "Encounter/e1"},
        "entry": {"direction": "step_down", "from_level": "inpatient", "at": "2026-02-27", "encounter": None},
        "exit": {
            "reason": "discharged",
            "direction": "step_down",
            "to_level": "outpatient",
            "at": "2026-04-10",
            "encounter": None,
            "disposition": None,
        },
        "sessions": [],
        "attendance": {"sessions_attended": 0, "hours_attended": 0, "weeks": []},
        "billing": {
            "condition_code": "92",
            "revenue_code": "0906",
            "hcpcs": "H0015",
            "units": 0,
            "lines": [],
            "diagnoses": [
                {
                    "system": ICD10,
                    "code": "F10.20",
                    "principal": True,
                    "condition": {"reference": "Condition/c1"},
                },
                {"system": ICD10, "code": "F32.1", "principal": False, "condition": None},
                {"system": ICD10, "code": "F41.1", "principal": False, "condition": None},
            ],
            "payer": None,
        },
        "part2": True,
        "security": PART2_LABELS,
        "referral": {"reference": "ServiceRequest/sr1"},
        "care_plans": [],
        "superseded_by": None,
        "rules_version": "2026.11.1",
    }
    record.update(changes)
    validate("episode", 1, record)
    return record


def test_a_finished_episode_becomes_a_valid_episode_of_care() -> None:
    resource = episode_of_care(finished_episode())
    EpisodeOfCare.model_validate(resource)  # the proof: fhir.resources R4B accepts it as is
    assert resource["resourceType"] == "EpisodeOfCare"
    assert resource["id"] == EPISODE_ID
    assert resource["identifier"] == [{"system": "urn:iop-bridge:episode-id", "value": EPISODE_ID}]
    assert resource["status"] == "finished"
    assert resource["statusHistory"] == [
        {"status": "active", "period": {"start": "2026-03-02", "end": "2026-04-10"}},
        {"status": "finished", "period": {"start": "2026-04-10"}},
    ]
    assert resource["type"][0]["coding"][0]["system"] == "urn:iop-bridge:level-of-care"
    assert resource["type"][0]["coding"][0]["code"] == "iop"
    assert resource["type"][0]["text"] == "Intensive outpatient program"
    assert resource["period"] == {"start": "2026-03-02", "end": "2026-04-10"}
    assert resource["patient"] == {"reference": "Patient/p1"}
    assert resource["referralRequest"] == [{"reference": "ServiceRequest/sr1"}]
    assert resource["meta"]["security"] == PART2_LABELS
    assert resource["meta"]["tag"] == [{"system": "urn:iop-bridge:exit-reason", "code": "discharged"}]
    assert "managingOrganization" not in resource


@pytest.mark.parametrize("reason", ["lost_to_follow_up", "stepped_up", "stepped_down"])
def test_a_finished_episode_tags_how_it_ended(reason: str) -> None:
    record = finished_episode()
    record["exit"] = {**record["exit"], "reason": reason}
    assert episode_of_care(record)["meta"]["tag"] == [
        {"system": "urn:iop-bridge:exit-reason", "code": reason}
    ]


def test_diagnoses_reference_conditions_and_contain_the_code_only_ones() -> None:
    resource = episode_of_care(finished_episode())
    assert [(d["condition"]["reference"], d["rank"]) for d in resource["diagnosis"]] == [
        ("Condition/c1", 1),
        ("#dx1", 2),
        ("#dx2", 3),
    ]
    assert resource["contained"] == [
        {"resourceType": "Condition", "id": "dx1", "subject": {"reference": "Patient/p1"},
         "code": {"coding": [{"system": ICD10, "code": "F32.1"}]}},
        {"resourceType": "Condition", "id": "dx2", "subject": {"reference": "Patient/p1"},
         "code": {"coding": [{"system": ICD10, "code": "F41.1"}]}},
    ]  # fmt: skip


def test_an_active_episode_has_an_open_period_and_no_security_when_not_part2() -> None:
    record = finished_episode(status="active", end=None, exit=None, part2=False, security=[], referral=None)
    record["billing"]["diagnoses"] = []
    resource = episode_of_care(record)
    assert resource["status"] == "active"
    assert resource["period"] == {"start": "2026-03-02"}
    assert resource["statusHistory"] == [{"status": "active", "period": {"start": "2026-03-02"}}]
    for absent in ("meta", "contained", "diagnosis", "referralRequest"):
        assert absent not in resource


def test_a_cancelled_episode_is_cancelled_without_a_history() -> None:
    record = finished_episode(
        status="cancelled", end=None, exit=None, superseded_by="5a0c1d7e-2f31-5b8e-9a44-0c1f2e3d4b5a"
    )
    resource = episode_of_care(record)
    assert resource["status"] == "cancelled"
    assert "statusHistory" not in resource


def test_managing_organization_when_known() -> None:
    resource = episode_of_care(finished_episode(), managing_organization="Organization/iop-north")
    assert resource["managingOrganization"] == {"reference": "Organization/iop-north"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"status": "planned"}, "status 'planned' is not one of active, finished, cancelled"),
        ({"patient": {"identifier": []}}, "the episode has no patient reference"),
        ({"start": "2026-02-30"}, "period"),
        ({"level": "outpatient"}, "level 'outpatient' is not one of iop, php, residential"),
        ({"billing": {"diagnoses": [{"code": "F32.9"}]}}, "malformed episode record"),
    ],
)
def test_a_record_that_cannot_be_an_episode_of_care_raises_a_clear_error(
    changes: dict[str, Any], message: str
) -> None:
    record = copy.deepcopy(finished_episode())
    record.update(changes)
    with pytest.raises(EpisodeOfCareError, match=f"EpisodeOfCare for episode {EPISODE_ID}: .*({message})"):
        episode_of_care(record)


def test_episodes_of_the_example_journeys_all_make_valid_resources_that_map_back_to_themselves() -> None:
    book = parse_book(yaml.safe_load((ROOT / "examples" / "journeys.yaml").read_text(encoding="utf-8")))
    resources = list(build_resources(book, anchor=date(2026, 9, 1), timezone="America/New_York", seed=7))
    as_of = datetime(2026, 11, 1, tzinfo=UTC)
    options: dict[str, Any] = {
        "ehr": "demo",
        "as_of": as_of,
        "rules": default_rules(),
        "timezone": "America/New_York",
    }
    first = map_episodes(resources, **options)
    assert first.episodes
    ours = [episode_of_care(record) for record in first.episodes]
    for resource in ours:
        EpisodeOfCare.model_validate(resource)
    assert any(r.get("contained") or r.get("diagnosis") for r in ours)
    # Our EpisodeOfCare resources come back on the next pull: recognised as ours, they never anchor a new
    # episode nor change an id, a status or the sessions. (Known gap, engine side: a finished EpisodeOfCare
    # of ours reads back as a discharge, so a derived exit reason such as lost_to_follow_up turns into
    # "discharged" on the next pull.)
    again = map_episodes([*resources, *ours], **options)
    kept = ("episode_id", "status", "level", "start", "end", "anchor", "sessions", "attendance", "billing")
    assert [{k: e[k] for k in kept} for e in again.episodes] == [
        {k: e[k] for k in kept} for e in first.episodes
    ]

"""The attendance.v1 and discharge.v1 contracts: what IOP programs may send us, and what they may not."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from schemas import ContractError, errors, validate

EPISODE_ID = "6f1c8f4e-2b1d-5c3a-9e7f-0a1b2c3d4e5f"


def attendance(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": "prog-7:evt-0001",
        "occurred_at": "2026-03-02T18:05:00-05:00",
        "ehr": "general-hospital",
        "episode_id": EPISODE_ID,
        "patient": {"reference": "Patient/123"},
        "session": {
            "id": "sess-2026-03-02-a",
            "start": "2026-03-02T09:00:00-05:00",
            "end": "2026-03-02T12:00:00-05:00",
            "status": "attended",
            "services": [
                {"system": "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "S9480"}
            ],
            "modality": "in-person",
        },
    }
    event.update(changes)
    return event


def discharge(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": "01J9ZQ3K7V8X2D4B6N0M1P5R7T",
        "occurred_at": "2026-04-10T16:30:00Z",
        "ehr": "general-hospital",
        "episode_id": EPISODE_ID,
        "patient": {
            "reference": "Patient/123",
            "identifier": [{"system": "urn:oid:1.2.3.4", "value": "MRN-1"}],
        },
        "discharge": {
            "date": "2026-04-10",
            "reason": "stepped_down",
            "to_level": "outpatient",
            "disposition": {
                "system": "http://terminology.hl7.org/CodeSystem/discharge-disposition",
                "code": "home",
            },
            "summary": "Completed the program goals.",
        },
    }
    event.update(changes)
    return event


def with_session(**changes: Any) -> dict[str, Any]:
    event = attendance()
    event["session"].update(changes)
    return event


def with_discharge(**changes: Any) -> dict[str, Any]:
    event = discharge()
    event["discharge"].update(changes)
    return event


def without(event: dict[str, Any], *path: str) -> dict[str, Any]:
    result = copy.deepcopy(event)
    target = result
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return result


@pytest.mark.parametrize(
    "event",
    [
        attendance(),
        attendance(patient={"identifier": [{"system": "urn:oid:1.2.3.4", "value": "MRN-1"}]}),
        attendance(occurred_at="2026-03-02T23:05:00.123456+00:00"),
        with_session(status="absent", modality="telehealth"),
        with_session(status="cancelled"),
        without(with_session(status="cancelled"), "session", "start"),
        without(attendance(), "session", "services"),
        without(attendance(), "session", "modality"),
    ],
)
def test_valid_attendance(event: dict[str, Any]) -> None:
    assert errors("attendance", 1, event) == []
    validate("attendance", 1, event)


@pytest.mark.parametrize(
    ("event", "where"),
    [
        (without(attendance(), "event_id"), "(root)"),
        (without(attendance(), "occurred_at"), "(root)"),
        (without(attendance(), "ehr"), "(root)"),
        (without(attendance(), "episode_id"), "(root)"),
        (without(attendance(), "patient"), "(root)"),
        (without(attendance(), "session"), "(root)"),
        (without(attendance(), "session", "id"), "session"),
        (without(attendance(), "session", "status"), "session"),
        (without(attendance(), "session", "end"), "session"),
        (without(with_session(status="absent"), "session", "start"), "session"),
        (with_session(status="present"), "session/status"),
        (with_session(modality="video"), "session/modality"),
        (with_session(start="2026-03-02T09:00:00"), "session/start"),
        (with_session(start="2026-03-02"), "session/start"),
        (with_session(services=[]), "session/services"),
        (with_session(services=[{"system": "x"}]), "session/services/0"),
        (with_session(id="a|b"), "session/id"),
        (with_session(room="B"), "session"),
        (attendance(event_id="has space"), "event_id"),
        (attendance(event_id=""), "event_id"),
        (attendance(occurred_at="yesterday"), "occurred_at"),
        (attendance(ehr="a|b"), "ehr"),
        (attendance(episode_id="not-a-uuid"), "episode_id"),
        (attendance(patient={}), "patient"),
        (attendance(patient={"reference": "Practitioner/1"}), "patient/reference"),
        (attendance(patient={"identifier": []}), "patient/identifier"),
        (attendance(patinet={"reference": "Patient/1"}), "(root)"),
    ],
)
def test_invalid_attendance_names_the_field(event: dict[str, Any], where: str) -> None:
    problems = errors("attendance", 1, event)
    assert problems
    assert any(p.startswith(f"{where}:") for p in problems), problems
    with pytest.raises(ContractError) as caught:
        validate("attendance", 1, event)
    assert caught.value.contract == "attendance.v1"


@pytest.mark.parametrize(
    "event",
    [
        discharge(),
        without(discharge(), "discharge", "to_level"),
        without(discharge(), "discharge", "disposition"),
        without(discharge(), "discharge", "summary"),
        with_discharge(reason="left_against_advice"),
        discharge(patient={"reference": "Patient/a-b.c"}),
    ],
)
def test_valid_discharge(event: dict[str, Any]) -> None:
    assert errors("discharge", 1, event) == []


@pytest.mark.parametrize(
    ("event", "where"),
    [
        (without(discharge(), "discharge"), "(root)"),
        (without(discharge(), "discharge", "date"), "discharge"),
        (without(discharge(), "discharge", "reason"), "discharge"),
        (without(discharge(), "event_id"), "(root)"),
        (with_discharge(reason="died"), "discharge/reason"),
        (with_discharge(date="2026-04-10T16:30:00Z"), "discharge/date"),
        (with_discharge(date="2026-02-30"), "discharge/date"),
        (with_discharge(to_level="detox"), "discharge/to_level"),
        (with_discharge(disposition={"system": "x"}), "discharge/disposition"),
        (with_discharge(summary=7), "discharge/summary"),
        (discharge(session={"id": "x", "status": "attended"}), "(root)"),
    ],
)
def test_invalid_discharge_names_the_field(event: dict[str, Any], where: str) -> None:
    problems = errors("discharge", 1, event)
    assert any(p.startswith(f"{where}:") for p in problems), problems
    with pytest.raises(ContractError, match=r"^discharge\.v1: "):
        validate("discharge", 1, event)

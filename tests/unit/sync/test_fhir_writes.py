"""What we write back to the EHR is valid FHIR R4 and carries the keys that make writes idempotent."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import given
from hypothesis import strategies as st

from schemas.identifiers import EPISODE_ID_SYSTEM, EVENT_ID_SYSTEM, SESSION_ID_SYSTEM
from sync import fhir_writes

PART2 = [
    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "ETH"},
    {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"},
    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActUSPrivacyLaw", "code": "42CFRPart2"},
]


def _attendance(status: str = "attended", modality: str = "in-person") -> dict[str, Any]:
    return {
        "event_id": "evt-1",
        "occurred_at": "2026-03-02T18:00:00-06:00",
        "ehr": "general",
        "episode_id": "7d2b8f7e-0000-5000-8000-000000000001",
        "patient": {"reference": "Patient/p1"},
        "session": {
            "id": "S-100",
            "start": "2026-03-02T09:00:00-06:00",
            "end": "2026-03-02T12:00:00-06:00",
            "status": status,
            "modality": modality,
            "services": [
                {"system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "S9480"}
            ],
        },
    }


def _valid(resource: dict[str, Any]) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


@pytest.mark.parametrize(("modality", "klass"), [("in-person", "AMB"), ("telehealth", "VR")])
def test_attended_session_is_a_finished_encounter_keyed_by_session(modality: str, klass: str) -> None:
    encounter = fhir_writes.attendance_encounter(
        _attendance(modality=modality),
        patient_reference="Patient/p1",
        episode_id="7d2b8f7e-0000-5000-8000-000000000001",
        episode_fhir_id="eoc-9",
    )
    _valid(encounter)
    assert encounter["status"] == "finished"
    assert encounter["class"]["code"] == klass
    assert encounter["identifier"] == [{"system": SESSION_ID_SYSTEM, "value": "S-100"}]
    assert encounter["episodeOfCare"] == [{"reference": "EpisodeOfCare/eoc-9"}]
    assert encounter["period"] == {"start": "2026-03-02T09:00:00-06:00", "end": "2026-03-02T12:00:00-06:00"}
    assert encounter["type"][0]["coding"][0]["code"] == "S9480"
    assert "meta" not in encounter


def test_episode_without_server_id_is_referenced_by_identifier() -> None:
    encounter = fhir_writes.attendance_encounter(
        _attendance(), patient_reference="Patient/p1", episode_id="7d2b8f7e-0000-5000-8000-000000000001"
    )
    _valid(encounter)
    assert encounter["episodeOfCare"] == [
        {"identifier": {"system": EPISODE_ID_SYSTEM, "value": "7d2b8f7e-0000-5000-8000-000000000001"}}
    ]


def test_absent_session_is_a_noshow_appointment_with_part2_labels() -> None:
    appointment = fhir_writes.noshow_appointment(
        _attendance("absent"), patient_reference="Patient/p1", security=PART2
    )
    _valid(appointment)
    assert appointment["status"] == "noshow"
    assert appointment["participant"][0]["actor"] == {"reference": "Patient/p1"}
    assert [s["code"] for s in appointment["meta"]["security"]] == ["ETH", "R", "42CFRPart2"]


def test_voiding_keeps_everything_but_the_status() -> None:
    encounter = fhir_writes.attendance_encounter(
        _attendance(), patient_reference="Patient/p1", episode_id="7d2b8f7e-0000-5000-8000-000000000001"
    )
    encounter["id"] = "e1"
    cancelled = fhir_writes.voided(encounter)
    _valid(cancelled)
    assert cancelled["status"] == "cancelled"
    assert {k: v for k, v in cancelled.items() if k != "status"} == {
        k: v for k, v in encounter.items() if k != "status"
    }
    assert encounter["status"] == "finished"  # the input is not changed


def test_finishing_an_episode_keeps_its_history() -> None:
    existing = {
        "resourceType": "EpisodeOfCare",
        "id": "eoc-9",
        "status": "active",
        "patient": {"reference": "Patient/p1"},
        "period": {"start": "2026-02-02"},
    }
    finished = fhir_writes.finished_episode_of_care(existing, end_date="2026-03-20")
    _valid(finished)
    assert finished["status"] == "finished"
    assert finished["period"] == {"start": "2026-02-02", "end": "2026-03-20"}
    assert finished["statusHistory"] == [
        {"status": "active", "period": {"start": "2026-02-02", "end": "2026-03-20"}}
    ]
    again = fhir_writes.finished_episode_of_care(finished, end_date="2026-03-20")
    assert again["statusHistory"] == finished["statusHistory"]


def test_discharge_summary_document_carries_the_text_and_event_key() -> None:
    event = {
        "event_id": "evt-d1",
        "occurred_at": "2026-03-20T17:00:00-05:00",
        "ehr": "general",
        "episode_id": "e",
        "patient": {"reference": "Patient/p1"},
        "discharge": {
            "date": "2026-03-20",
            "reason": "stepped_down",
            "to_level": "outpatient",
            "disposition": {
                "system": "http://terminology.hl7.org/CodeSystem/discharge-disposition",
                "code": "home",
            },
            "summary": "Completed the program; weekly therapy next.",
        },
    }
    document = fhir_writes.discharge_document(
        event, patient_reference="Patient/p1", episode_start="2026-02-02", episode_fhir_id="eoc-9"
    )
    _valid(document)
    assert document["identifier"] == [{"system": EVENT_ID_SYSTEM, "value": "evt-d1"}]
    text = base64.b64decode(document["content"][0]["attachment"]["data"]).decode()
    assert "stepped_down" in text
    assert "Completed the program; weekly therapy next." in text
    assert document["context"]["period"] == {"start": "2026-02-02", "end": "2026-03-20"}
    assert document["context"]["related"] == [{"reference": "EpisodeOfCare/eoc-9"}]


@pytest.mark.parametrize(
    ("reason", "status", "code"),
    [
        ("completed", "completed", "7.0"),
        ("left_against_advice", "cancelled", "6.0"),
        ("bogus", "completed", "7.0"),
    ],
)
def test_referral_task_gets_the_bser_status(reason: str, status: str, code: str) -> None:
    task = {
        "resourceType": "Task",
        "id": "t1",
        "status": "in-progress",
        "intent": "order",
        "focus": {"reference": "ServiceRequest/sr1"},
    }
    updated = fhir_writes.task_after_discharge(task, reason=reason)
    _valid(updated)
    assert updated["status"] == status
    assert updated["businessStatus"]["coding"][0]["code"] == code


@pytest.mark.parametrize(("created", "operation"), [(True, "CREATE"), (False, "UPDATE")])
def test_provenance_names_this_service_as_transmitter(created: bool, operation: str) -> None:
    resource = fhir_writes.provenance(
        "Encounter/e1/_history/1", recorded="2026-03-02T18:00:01+00:00", created=created, security=PART2
    )
    _valid(resource)
    assert resource["activity"]["coding"][0]["code"] == operation
    assert resource["agent"][0]["type"]["coding"][0]["code"] == "transmitter"
    assert resource["target"] == [{"reference": "Encounter/e1/_history/1"}]


@pytest.mark.parametrize(
    ("status", "phrase"), [("attended", "attended"), ("absent", "not attended (no-show)")]
)
def test_attendance_note_is_a_progress_note_keyed_by_session(status: str, phrase: str) -> None:
    note = fhir_writes.attendance_note(
        _attendance(status, modality="telehealth"),
        patient_reference="Patient/p1",
        episode_id="7d2b8f7e-0000-5000-8000-000000000001",
        security=PART2,
    )
    _valid(note)
    assert note["type"]["coding"][0]["code"] == "11506-3"
    assert note["type"]["coding"][0]["system"] == "http://loinc.org"
    assert note["identifier"] == [{"system": SESSION_ID_SYSTEM, "value": "S-100"}]
    assert note["status"] == "current"
    assert note["subject"] == {"reference": "Patient/p1"}
    assert note["context"]["period"]["end"] == "2026-03-02T12:00:00-06:00"
    assert note["meta"]["security"] == PART2
    text = base64.b64decode(note["content"][0]["attachment"]["data"]).decode()
    assert text.startswith(f"IOP session S-100: {phrase}\n")
    assert ("Modality: telehealth" in text) is (status == "attended")
    assert ("S9480" in text) is (status == "attended")


def test_voiding_a_note_marks_it_entered_in_error() -> None:
    note = fhir_writes.attendance_note(
        _attendance(), patient_reference="Patient/p1", episode_id="7d2b8f7e-0000-5000-8000-000000000001"
    )
    voided = fhir_writes.voided(note)
    _valid(voided)
    assert voided["status"] == "entered-in-error"
    assert note["status"] == "current"


def test_json_patch_touches_only_what_we_write() -> None:
    current = {
        "resourceType": "Appointment",
        "id": "ap-1",
        "meta": {"versionId": "4"},
        "text": {"status": "generated", "div": "<div xmlns='http://www.w3.org/1999/xhtml'>x</div>"},
        "status": "booked",
        "minutesDuration": 180,  # set by the server: never removed
        "start": "2026-03-02T09:00:00Z",
    }
    wanted = {
        "resourceType": "Appointment",
        "id": "ap-1",
        "meta": {"security": PART2},
        "status": "noshow",
        "start": "2026-03-02T09:00:00Z",
        "end": "2026-03-02T12:00:00Z",
    }
    assert fhir_writes.json_patch(current, wanted) == [
        {"op": "replace", "path": "/status", "value": "noshow"},
        {"op": "add", "path": "/end", "value": "2026-03-02T12:00:00Z"},
        {"op": "add", "path": "/meta/security", "value": PART2},
    ]
    assert fhir_writes.json_patch(current, {**current, "meta": {}}) == []
    assert fhir_writes.json_patch({"id": "x"}, {"meta": {"security": PART2}}) == [
        {"op": "add", "path": "/meta", "value": {"security": PART2}}
    ]
    assert fhir_writes.json_patch({}, {"a/b~c": 1}) == [{"op": "add", "path": "/a~1b~0c", "value": 1}]


def _apply(resource: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """A small JSON Patch applier for the operations json_patch emits (RFC 6902 add/replace)."""
    result = copy.deepcopy(resource)
    for operation in operations:
        assert operation["op"] in ("add", "replace")
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
        target = result
        for part in parents:
            target = target[part]
        assert (last in target) is (operation["op"] == "replace")
        target[last] = operation["value"]
    return result


_values = st.one_of(st.text(max_size=5), st.integers(), st.lists(st.integers(), max_size=2))
_elements = st.dictionaries(st.sampled_from(["status", "start", "end", "a/b", "x~y", "id", "text"]), _values)


@given(current=_elements, wanted=_elements, security=st.booleans())
def test_applying_the_patch_gives_what_we_want_and_keeps_the_rest(
    current: dict[str, Any], wanted: dict[str, Any], security: bool
) -> None:
    if security:
        wanted = {**wanted, "meta": {"security": PART2}}
    patched = _apply(current, fhir_writes.json_patch(current, wanted))
    for key, value in wanted.items():
        if key not in ("id", "text", "meta"):
            assert patched[key] == value
    for key, value in current.items():
        if key not in wanted or key in ("id", "text"):
            assert patched[key] == value
    assert (patched.get("meta") or {}).get("security") == (PART2 if security else None)
    assert fhir_writes.json_patch(patched, wanted) == []


def test_search_window_is_the_days_of_the_resource() -> None:
    appointment = fhir_writes.noshow_appointment(_attendance("absent"), patient_reference="Patient/p1")
    assert fhir_writes.search_window(appointment) == ("2026-03-02", "2026-03-02")
    encounter = {"resourceType": "Encounter", "period": {"start": "2026-03-01T23:00:00-06:00"}}
    assert fhir_writes.search_window(encounter) == ("2026-03-01", "2026-03-01")
    document = {"resourceType": "DocumentReference", "date": "2026-03-20T17:00:00+00:00"}
    assert fhir_writes.search_window(document) == ("2026-03-20", "2026-03-20")
    assert fhir_writes.search_window({"resourceType": "Appointment"}) is None


def test_has_identifier_matches_system_and_value() -> None:
    resource = {"identifier": [{"system": SESSION_ID_SYSTEM, "value": "S-100"}, {"value": "other"}]}
    assert fhir_writes.has_identifier(resource, SESSION_ID_SYSTEM, "S-100")
    assert not fhir_writes.has_identifier(resource, SESSION_ID_SYSTEM, "S-10")
    assert not fhir_writes.has_identifier(resource, EVENT_ID_SYSTEM, "S-100")
    assert not fhir_writes.has_identifier({}, SESSION_ID_SYSTEM, "S-100")


def test_a_reported_discharge_replaces_our_derived_exit_reason() -> None:
    existing = {
        "resourceType": "EpisodeOfCare",
        "id": "eoc-9",
        "meta": {"tag": [{"system": "urn:iop-bridge:exit-reason", "code": "lost_to_follow_up"}]},
        "status": "finished",
        "patient": {"reference": "Patient/p1"},
        "period": {"start": "2026-02-02", "end": "2026-03-01"},
    }
    finished = fhir_writes.finished_episode_of_care(existing, end_date="2026-03-20")
    _valid(finished)
    assert "tag" not in finished.get("meta", {})
    assert finished["period"]["end"] == "2026-03-20"

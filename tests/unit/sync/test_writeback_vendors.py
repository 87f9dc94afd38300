"""Write-back per vendor, with targets from recorded CapabilityStatements and the EHR faked at the transport.

Epic writes progress notes and updates the referral Task; Oracle creates and patches Encounters and
Appointments; a generic (HAPI) server gets Encounter / Appointment / EpisodeOfCare. Where a statement
lacks what the plan needs, the event is permanent and nothing is written.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from pytest_httpx import HTTPXMock
from sqlalchemy import create_engine

from connectors.config import EhrConfig
from connectors.http import EhrClient
from schemas.identifiers import EPISODE_ID_SYSTEM, EVENT_ID_SYSTEM, SESSION_ID_SYSTEM, session_key
from sync.capabilities import targets_for
from sync.state import Staged, SyncState
from sync.writeback import Outcome, PermanentEventError, WriteBack

BASE = "https://ehr.example.org/fhir"
EPISODE_ID = "5b1a2f44-1111-5222-8333-444455556666"
SESSION_KEY = session_key(EPISODE_ID, None, "S-100")
CAPABILITY = Path(__file__).resolve().parents[2] / "data" / "capability"
CLOCK = "2026-03-02T18:00:05+00:00"


def recorded(name: str) -> dict[str, Any]:
    statement: dict[str, Any] = json.loads((CAPABILITY / f"{name}.json").read_text())
    return statement


def _without(statement: dict[str, Any], resource_type: str, *interactions: str) -> dict[str, Any]:
    result = copy.deepcopy(statement)
    for entry in result["rest"][0]["resource"]:
        if entry["type"] == resource_type:
            entry["interaction"] = [i for i in entry["interaction"] if i["code"] not in interactions]
    return result


def _state(tmp_path: Path, ehr: str, **episode: Any) -> SyncState:
    state = SyncState(create_engine(f"sqlite:///{tmp_path / (ehr + '.db')}"))
    record = {
        "episode_id": EPISODE_ID,
        "ehr": ehr,
        "patient": {"reference": "Patient/p1"},
        "level": "iop",
        "status": "active",
        "start": "2026-02-02",
        "part2": False,
        "security": [],
        "referral": None,
        **episode,
    }
    state.stage_changes(
        ehr,
        [
            Staged(
                kind="episode",
                record_id=EPISODE_ID,
                patient_id="p1",
                record=record,
                topic="iop.episodes.v1",
                message_key=f"{ehr}|Patient/p1",
                schema_name="episode",
                schema_version=1,
            )
        ],
    )
    return state


@pytest.fixture
def client() -> Iterator[EhrClient]:
    with EhrClient(EhrConfig(name="ehr", base_url=BASE), sleep=lambda _: None) as client:
        yield client


def _writeback(
    client: EhrClient, state: SyncState, ehr: str, profile: str, statement: dict[str, Any]
) -> WriteBack:
    targets = targets_for(profile, statement, ehr=ehr)
    return WriteBack(client, state, ehr=ehr, targets=targets, clock=lambda: CLOCK)


def _attendance(
    ehr: str,
    status: str = "attended",
    event_id: str = "evt-1",
    occurred_at: str = "2026-03-02T18:00:00+00:00",
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "occurred_at": occurred_at,
        "ehr": ehr,
        "episode_id": EPISODE_ID,
        "patient": {"reference": "Patient/p1"},
        "session": {
            "id": "S-100",
            "start": "2026-03-02T09:00:00+00:00",
            "end": "2026-03-02T12:00:00+00:00",
            "status": status,
            "modality": "in-person",
            "services": [{"system": "https://www.cms.gov/hcpcs", "code": "S9480"}],
        },
    }


def _discharge(ehr: str) -> dict[str, Any]:
    return {
        "event_id": "evt-d",
        "occurred_at": "2026-03-20T17:00:00+00:00",
        "ehr": ehr,
        "episode_id": EPISODE_ID,
        "patient": {"reference": "Patient/p1"},
        "discharge": {"date": "2026-03-20", "reason": "completed", "summary": "done"},
    }


def _by_identifier(resource_type: str, system: str, value: str) -> str:
    return f"{BASE}/{resource_type}?identifier={quote(system + '|' + value, safe='')}"


def _by_patient_and_day(resource_type: str, day: str) -> str:
    return f"{BASE}/{resource_type}?patient=p1&date=ge{day}&date=le{day}"


def _body(request: httpx.Request) -> Any:
    return json.loads(request.content)


def _calls(httpx_mock: HTTPXMock) -> list[str]:
    return [f"{r.method} {r.url.path.removeprefix('/fhir/')}" for r in httpx_mock.get_requests()]


def _bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


# -- Epic: progress notes, Task update --------------------------------------------------------------


@pytest.mark.parametrize(("status", "phrase"), [("attended", "attended"), ("absent", "not attended")])
def test_epic_session_becomes_one_progress_note_keyed_by_session(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path, status: str, phrase: str
) -> None:
    writeback = _writeback(client, _state(tmp_path, "epic"), "epic", "epic", recorded("epic"))
    httpx_mock.add_response(
        method="GET", url=_by_identifier("DocumentReference", SESSION_ID_SYSTEM, SESSION_KEY), json=_bundle()
    )
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/DocumentReference",
        status_code=201,
        json={"resourceType": "DocumentReference", "id": "note-1", "subject": {"reference": "Patient/p1"}},
    )

    result = writeback.attendance(_attendance("epic", status), topic="iop.attendance.v1")

    assert result.outcome is Outcome.CREATED
    assert result.references == ["DocumentReference/note-1"]
    # no Encounter, no Appointment, no Provenance (read-only at Epic), no conditional create header
    assert _calls(httpx_mock) == ["GET DocumentReference", "POST DocumentReference"]
    post = httpx_mock.get_requests()[1]
    assert "If-None-Exist" not in post.headers
    note = _body(post)
    assert note["type"]["coding"][0]["code"] == "11506-3"
    assert note["identifier"] == [{"system": SESSION_ID_SYSTEM, "value": SESSION_KEY}]
    assert phrase in base64.b64decode(note["content"][0]["attachment"]["data"]).decode()


def test_epic_same_session_twice_is_one_note_updated(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    state = _state(tmp_path, "epic")
    writeback = _writeback(client, state, "epic", "epic", recorded("epic"))
    httpx_mock.add_response(
        method="GET", url=_by_identifier("DocumentReference", SESSION_ID_SYSTEM, SESSION_KEY), json=_bundle()
    )
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/DocumentReference",
        status_code=201,
        json={"resourceType": "DocumentReference", "id": "note-1", "subject": {"reference": "Patient/p1"}},
    )
    writeback.attendance(_attendance("epic"), topic="iop.attendance.v1")
    assert writeback.attendance(_attendance("epic"), topic="iop.attendance.v1").outcome is Outcome.DUPLICATE

    stored = {
        "resourceType": "DocumentReference",
        "id": "note-1",
        "subject": {"reference": "Patient/p1"},
        "status": "current",
    }
    httpx_mock.add_response(
        method="GET", url=f"{BASE}/DocumentReference/note-1", headers={"ETag": 'W/"1"'}, json=stored
    )
    httpx_mock.add_response(
        method="PUT", url=f"{BASE}/DocumentReference/note-1", match_headers={"If-Match": 'W/"1"'}, json=stored
    )
    later = _attendance("epic", "absent", event_id="evt-2", occurred_at="2026-03-02T19:00:00+00:00")
    result = writeback.attendance(later, topic="iop.attendance.v1")

    assert result.outcome is Outcome.UPDATED
    assert result.references == ["DocumentReference/note-1"]
    assert [c for c in _calls(httpx_mock) if c.startswith("POST")] == ["POST DocumentReference"]
    put = _body(httpx_mock.get_requests()[-1])
    assert put["id"] == "note-1"
    assert "not attended" in base64.b64decode(put["content"][0]["attachment"]["data"]).decode()


def test_epic_note_written_before_a_crash_is_found_not_duplicated(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    # the ledger and session table never heard of the first try: the identifier search finds its note
    writeback = _writeback(client, _state(tmp_path, "epic"), "epic", "epic", recorded("epic"))
    existing = {
        "resourceType": "DocumentReference",
        "id": "note-1",
        "identifier": [{"system": SESSION_ID_SYSTEM, "value": SESSION_KEY}],
        "subject": {"reference": "Patient/p1"},
        "status": "current",
    }
    httpx_mock.add_response(
        method="GET",
        url=_by_identifier("DocumentReference", SESSION_ID_SYSTEM, SESSION_KEY),
        json=_bundle(existing),
    )
    httpx_mock.add_response(
        method="GET", url=f"{BASE}/DocumentReference/note-1", headers={"ETag": 'W/"1"'}, json=existing
    )
    httpx_mock.add_response(method="PUT", url=f"{BASE}/DocumentReference/note-1", json=existing)

    result = writeback.attendance(_attendance("epic"), topic="iop.attendance.v1")

    assert result.references == ["DocumentReference/note-1"]
    assert "POST DocumentReference" not in _calls(httpx_mock)


def test_epic_cancelled_session_marks_its_note_entered_in_error(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    writeback = _writeback(client, _state(tmp_path, "epic"), "epic", "epic", recorded("epic"))
    note = {
        "resourceType": "DocumentReference",
        "id": "note-1",
        "identifier": [{"system": SESSION_ID_SYSTEM, "value": SESSION_KEY}],
        "subject": {"reference": "Patient/p1"},
        "status": "current",
    }
    httpx_mock.add_response(
        method="GET",
        url=_by_identifier("DocumentReference", SESSION_ID_SYSTEM, SESSION_KEY),
        json=_bundle(note),
    )
    httpx_mock.add_response(
        method="GET", url=f"{BASE}/DocumentReference/note-1", headers={"ETag": 'W/"2"'}, json=note
    )
    httpx_mock.add_response(
        method="PUT", url=f"{BASE}/DocumentReference/note-1", match_headers={"If-Match": 'W/"2"'}, json=note
    )

    result = writeback.attendance(_attendance("epic", "cancelled"), topic="iop.attendance.v1")

    assert result.outcome is Outcome.VOIDED
    assert _body(httpx_mock.get_requests()[-1])["status"] == "entered-in-error"


def test_epic_discharge_is_a_summary_note_and_the_task_update(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    state = _state(tmp_path, "epic", referral={"reference": "ServiceRequest/sr-1"})
    writeback = _writeback(client, state, "epic", "epic", recorded("epic"))
    task = {"resourceType": "Task", "id": "t-1", "status": "in-progress", "intent": "order"}
    httpx_mock.add_response(
        method="GET",
        url=f"{BASE}/Task?focus={quote('ServiceRequest/sr-1', safe='')}",
        json=_bundle(task),
    )
    httpx_mock.add_response(
        method="GET", url=_by_identifier("DocumentReference", EVENT_ID_SYSTEM, "evt-d"), json=_bundle()
    )
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/DocumentReference",
        status_code=201,
        json={"resourceType": "DocumentReference", "id": "doc-1", "subject": {"reference": "Patient/p1"}},
    )
    httpx_mock.add_response(method="GET", url=f"{BASE}/Task/t-1", headers={"ETag": 'W/"5"'}, json=task)
    httpx_mock.add_response(
        method="PUT", url=f"{BASE}/Task/t-1", match_headers={"If-Match": 'W/"5"'}, json=task
    )

    result = writeback.discharge(_discharge("epic"), topic="iop.discharges.v1")

    assert result.references == ["DocumentReference/doc-1", "Task/t-1"]
    assert not [c for c in _calls(httpx_mock) if "EpisodeOfCare" in c]
    document = _body(next(r for r in httpx_mock.get_requests() if r.method == "POST"))
    assert document["type"]["coding"][0]["code"] == "18842-5"
    assert document["identifier"] == [{"system": EVENT_ID_SYSTEM, "value": "evt-d"}]
    assert _body(httpx_mock.get_requests()[-1])["businessStatus"]["coding"][0]["code"] == "7.0"


# -- Oracle: Encounter / Appointment create and JSON Patch -------------------------------------------


def test_oracle_attended_session_creates_an_encounter_after_an_identifier_search(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    writeback = _writeback(client, _state(tmp_path, "oracle"), "oracle", "oracle", recorded("oracle"))
    httpx_mock.add_response(
        method="GET", url=_by_identifier("Encounter", SESSION_ID_SYSTEM, SESSION_KEY), json=_bundle()
    )
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/Encounter",
        status_code=201,
        headers={"Location": f"{BASE}/Encounter/97953477/_history/1"},
    )
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201)

    result = writeback.attendance(_attendance("oracle"), topic="iop.attendance.v1")

    assert result.outcome is Outcome.CREATED
    assert result.references == ["Encounter/97953477"]
    assert _calls(httpx_mock) == ["GET Encounter", "POST Encounter", "POST Provenance"]
    assert "If-None-Exist" not in httpx_mock.get_requests()[1].headers
    assert _body(httpx_mock.get_requests()[1])["status"] == "finished"
    assert _body(httpx_mock.get_requests()[2])["target"] == [{"reference": "Encounter/97953477/_history/1"}]


def test_oracle_absent_session_creates_a_noshow_appointment_after_a_patient_and_day_search(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    # Oracle cannot search Appointment by identifier: the patient's appointments that day are read and
    # ours is recognised by its identifier (the EHR's own appointment here is not ours)
    writeback = _writeback(client, _state(tmp_path, "oracle"), "oracle", "oracle", recorded("oracle"))
    theirs = {
        "resourceType": "Appointment",
        "id": "ehr-7",
        "participant": [{"actor": {"reference": "Patient/p1"}}],
        "status": "booked",
    }
    httpx_mock.add_response(
        method="GET", url=_by_patient_and_day("Appointment", "2026-03-02"), json=_bundle(theirs)
    )
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/Appointment",
        status_code=201,
        json={
            "resourceType": "Appointment",
            "id": "ap-1",
            "participant": [{"actor": {"reference": "Patient/p1"}}],
        },
    )
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201)

    result = writeback.attendance(_attendance("oracle", "absent"), topic="iop.attendance.v1")

    assert result.references == ["Appointment/ap-1"]
    assert _body(httpx_mock.get_requests()[1])["status"] == "noshow"


def test_oracle_absent_session_patches_the_existing_appointment_with_if_match(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    writeback = _writeback(client, _state(tmp_path, "oracle"), "oracle", "oracle", recorded("oracle"))
    ours = {
        "resourceType": "Appointment",
        "id": "ap-1",
        "identifier": [{"system": SESSION_ID_SYSTEM, "value": SESSION_KEY}],
        "participant": [{"actor": {"reference": "Patient/p1"}}],
        "status": "cancelled",
        "start": "2026-03-02T09:00:00+00:00",
        "end": "2026-03-02T12:00:00+00:00",
        "minutesDuration": 180,
    }
    page2 = f"{BASE}/Appointment?page=2"
    httpx_mock.add_response(
        method="GET",
        url=_by_patient_and_day("Appointment", "2026-03-02"),
        json={**_bundle(), "link": [{"relation": "next", "url": page2}]},
    )
    httpx_mock.add_response(method="GET", url=page2, json=_bundle(ours))
    httpx_mock.add_response(
        method="GET", url=f"{BASE}/Appointment/ap-1", headers={"ETag": 'W/"3"'}, json=ours
    )
    httpx_mock.add_response(
        method="PATCH", url=f"{BASE}/Appointment/ap-1", match_headers={"If-Match": 'W/"3"'}, status_code=412
    )
    httpx_mock.add_response(
        method="GET", url=f"{BASE}/Appointment/ap-1", headers={"ETag": 'W/"4"'}, json=ours
    )
    httpx_mock.add_response(
        method="PATCH",
        url=f"{BASE}/Appointment/ap-1",
        match_headers={"If-Match": 'W/"4"', "Content-Type": "application/json-patch+json"},
        json={**ours, "status": "noshow"},
    )
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201)

    result = writeback.attendance(_attendance("oracle", "absent"), topic="iop.attendance.v1")

    assert result.outcome is Outcome.UPDATED
    assert result.references == ["Appointment/ap-1"]
    assert "POST Appointment" not in _calls(httpx_mock)
    patch = [r for r in httpx_mock.get_requests() if r.method == "PATCH"][-1]
    operations = _body(patch)
    assert {"op": "replace", "path": "/status", "value": "noshow"} in operations
    # only what we write is touched: the server's minutesDuration, id and meta stay as they are
    assert {op["path"] for op in operations} <= {"/status", "/participant", "/serviceType", "/identifier"}
    assert _body(httpx_mock.get_requests()[-1])["activity"]["coding"][0]["code"] == "UPDATE"


def test_oracle_cancelled_session_patches_the_status_only(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    writeback = _writeback(client, _state(tmp_path, "oracle"), "oracle", "oracle", recorded("oracle"))
    httpx_mock.add_response(
        method="GET", url=_by_identifier("Encounter", SESSION_ID_SYSTEM, SESSION_KEY), json=_bundle()
    )
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/Encounter",
        status_code=201,
        json={"resourceType": "Encounter", "id": "e-1", "subject": {"reference": "Patient/p1"}},
    )
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201, is_reusable=True)
    writeback.attendance(_attendance("oracle"), topic="iop.attendance.v1")

    encounter = {
        "resourceType": "Encounter",
        "id": "e-1",
        "subject": {"reference": "Patient/p1"},
        "status": "finished",
        "meta": {"versionId": "1"},
    }
    httpx_mock.add_response(method="GET", url=f"{BASE}/Encounter/e-1", json=encounter)
    httpx_mock.add_response(
        method="PATCH", url=f"{BASE}/Encounter/e-1", match_headers={"If-Match": 'W/"1"'}, json=encounter
    )
    cancel = _attendance("oracle", "cancelled", event_id="evt-2", occurred_at="2026-03-02T19:00:00+00:00")
    result = writeback.attendance(cancel, topic="iop.attendance.v1")

    assert result.outcome is Outcome.VOIDED
    patch = next(r for r in httpx_mock.get_requests() if r.method == "PATCH")
    assert _body(patch) == [{"op": "replace", "path": "/status", "value": "cancelled"}]
    assert not [r for r in httpx_mock.get_requests() if r.method == "PUT"]


def test_oracle_discharge_is_a_summary_document_and_nothing_else(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    # a referral exists, but Oracle has no writable Task and no EpisodeOfCare: neither is asked for
    state = _state(tmp_path, "oracle", referral={"reference": "ServiceRequest/sr-1"})
    writeback = _writeback(client, state, "oracle", "oracle", recorded("oracle"))
    httpx_mock.add_response(
        method="GET", url=_by_patient_and_day("DocumentReference", "2026-03-20"), json=_bundle()
    )
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/DocumentReference",
        status_code=201,
        json={"resourceType": "DocumentReference", "id": "doc-1", "subject": {"reference": "Patient/p1"}},
    )
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201)

    result = writeback.discharge(_discharge("oracle"), topic="iop.discharges.v1")

    assert result.outcome is Outcome.DISCHARGED
    assert result.references == ["DocumentReference/doc-1"]
    assert _calls(httpx_mock) == ["GET DocumentReference", "POST DocumentReference", "POST Provenance"]


def test_oracle_tenant_without_appointment_create_makes_absent_events_permanent(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    state = _state(tmp_path, "oracle")
    statement = _without(recorded("oracle"), "Appointment", "create")
    writeback = _writeback(client, state, "oracle", "oracle", statement)

    with pytest.raises(PermanentEventError, match="EHR 'oracle' does not support create on Appointment"):
        writeback.attendance(_attendance("oracle", "absent"), topic="iop.attendance.v1")
    assert httpx_mock.get_requests() == []
    assert state.event_outcome("evt-1", ehr="oracle") is None


# -- generic servers ---------------------------------------------------------------------------------


def test_hapi_attended_session_is_a_conditional_create(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    writeback = _writeback(client, _state(tmp_path, "hapi"), "hapi", "hapi", recorded("hapi"))
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/Encounter",
        match_headers={"If-None-Exist": f"identifier={SESSION_ID_SYSTEM}|{SESSION_KEY}"},
        status_code=201,
        json={"resourceType": "Encounter", "id": "enc-1", "subject": {"reference": "Patient/p1"}},
    )
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201)

    result = writeback.attendance(_attendance("hapi"), topic="iop.attendance.v1")

    assert result.references == ["Encounter/enc-1"]
    assert _calls(httpx_mock) == ["POST Encounter", "POST Provenance"]


def test_generic_server_without_encounter_create_makes_attendance_permanent(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    writeback = _writeback(client, _state(tmp_path, "x"), "x", "generic", recorded("epic"))
    with pytest.raises(PermanentEventError, match="EHR 'x' does not support create on Encounter"):
        writeback.attendance(_attendance("x"), topic="iop.attendance.v1")
    assert httpx_mock.get_requests() == []


def test_generic_discharge_needing_a_task_update_the_server_lacks_writes_nothing(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    state = _state(tmp_path, "hapi", referral={"reference": "ServiceRequest/sr-1"})
    statement = _without(recorded("hapi"), "Task", "update", "patch")
    writeback = _writeback(client, state, "hapi", "hapi", statement)
    httpx_mock.add_response(
        method="GET", url=_by_identifier("EpisodeOfCare", EPISODE_ID_SYSTEM, EPISODE_ID), json=_bundle()
    )
    httpx_mock.add_response(
        method="GET",
        url=f"{BASE}/Task?focus={quote('ServiceRequest/sr-1', safe='')}",
        json=_bundle({"resourceType": "Task", "id": "t-1", "status": "in-progress", "intent": "order"}),
    )

    with pytest.raises(PermanentEventError, match="EHR 'hapi' does not support update or patch on Task"):
        writeback.discharge(_discharge("hapi"), topic="iop.discharges.v1")
    assert {r.method for r in httpx_mock.get_requests()} == {"GET"}
    assert state.event_outcome("evt-d", ehr="hapi") is None

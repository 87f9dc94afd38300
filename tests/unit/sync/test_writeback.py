"""Write-back of attendance and discharge events, against a FHIR server faked at the transport."""

from __future__ import annotations

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
from connectors.errors import TemporaryEhrError
from connectors.http import EhrClient
from schemas.identifiers import EPISODE_ID_SYSTEM, EVENT_ID_SYSTEM, SESSION_ID_SYSTEM, session_key
from sync.state import Staged, SyncState
from sync.writeback import Outcome, PermanentEventError, Targets, WriteBack

BASE = "https://ehr.example.org/fhir"
EPISODE_ID = "5b1a2f44-1111-5222-8333-444455556666"
SESSION_KEY = session_key(EPISODE_ID, None, "S-100")
PART2 = [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "ETH"}]


def _episode(episode_id: str = EPISODE_ID, **extra: Any) -> dict[str, Any]:
    return {
        "episode_id": episode_id,
        "ehr": "general",
        "patient": {"reference": "Patient/p1"},
        "level": "iop",
        "status": "active",
        "start": "2026-02-02",
        "part2": False,
        "security": [],
        "referral": None,
        **extra,
    }


def _publish(state: SyncState, episode: dict[str, Any]) -> None:
    state.stage_changes(
        "general",
        [
            Staged(
                kind="episode",
                record_id=episode["episode_id"],
                patient_id="p1",
                record=episode,
                topic="iop.episodes.v1",
                message_key="general|Patient/p1",
                schema_name="episode",
                schema_version=1,
            )
        ],
    )


def _attendance(
    event_id: str = "evt-1",
    status: str = "attended",
    occurred_at: str = "2026-03-02T18:00:00+00:00",
    end: str = "2026-03-02T12:00:00+00:00",
    episode_id: str = EPISODE_ID,
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "occurred_at": occurred_at,
        "ehr": "general",
        "episode_id": episode_id,
        "patient": {"reference": "Patient/p1"},
        "session": {
            "id": "S-100",
            "start": "2026-03-02T09:00:00+00:00",
            "end": end,
            "status": status,
            "modality": "in-person",
        },
    }


@pytest.fixture
def state(tmp_path: Path) -> SyncState:
    state = SyncState(create_engine(f"sqlite:///{tmp_path / 'state.db'}"))
    _publish(state, _episode())
    return state


@pytest.fixture
def client() -> Iterator[EhrClient]:
    slept: list[float] = []
    with EhrClient(EhrConfig(name="general", base_url=BASE), sleep=slept.append) as client:
        yield client


@pytest.fixture
def writeback(client: EhrClient, state: SyncState) -> WriteBack:
    return WriteBack(client, state, ehr="general", clock=lambda: "2026-03-02T18:00:05+00:00")


def _body(request: httpx.Request) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(request.content)
    return body


def _search_url(resource_type: str, system: str, value: str) -> str:
    return f"{BASE}/{resource_type}?identifier={quote(system + '|' + value, safe='')}"


def test_attended_session_creates_one_encounter_and_its_provenance(
    httpx_mock: HTTPXMock, writeback: WriteBack
) -> None:
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/Encounter",
        match_headers={"If-None-Exist": f"identifier={SESSION_ID_SYSTEM}|{SESSION_KEY}"},
        status_code=201,
        json={
            "resourceType": "Encounter",
            "id": "enc-1",
            "subject": {"reference": "Patient/p1"},
            "meta": {"versionId": "1"},
        },
    )
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201, json={})

    result = writeback.attendance(_attendance(), topic="iop.attendance.v1")

    assert result.outcome is Outcome.CREATED
    assert result.references == ["Encounter/enc-1"]
    encounter, provenance = (_body(r) for r in httpx_mock.get_requests())
    assert encounter["status"] == "finished"
    assert encounter["subject"] == {"reference": "Patient/p1"}
    assert encounter["episodeOfCare"] == [{"identifier": {"system": EPISODE_ID_SYSTEM, "value": EPISODE_ID}}]
    assert provenance["target"] == [{"reference": "Encounter/enc-1/_history/1"}]  # the version written
    assert provenance["recorded"] == "2026-03-02T18:00:05+00:00"
    assert provenance["activity"]["coding"][0]["code"] == "CREATE"
    assert provenance["agent"][0]["who"] == {"type": "Device", "display": "iop-bridge"}
    assert provenance["entity"] == [
        {"role": "source", "what": {"identifier": {"system": EVENT_ID_SYSTEM, "value": "evt-1"}}}
    ]

    # the same event again (redelivery) writes nothing: pytest-httpx fails on any unexpected request
    again = writeback.attendance(_attendance(), topic="iop.attendance.v1")
    assert again.outcome is Outcome.DUPLICATE


def test_unknown_episode_is_permanent(writeback: WriteBack) -> None:
    with pytest.raises(PermanentEventError, match="unknown episode nope"):
        writeback.attendance(_attendance(episode_id="nope"), topic="iop.attendance.v1")


def test_event_for_another_patient_is_permanent(writeback: WriteBack) -> None:
    event = _attendance()
    event["patient"] = {"reference": "Patient/someone-else"}
    with pytest.raises(PermanentEventError, match="Patient/someone-else"):
        writeback.attendance(event, topic="iop.attendance.v1")


def test_superseded_episode_is_followed(
    httpx_mock: HTTPXMock, state: SyncState, writeback: WriteBack
) -> None:
    _publish(state, _episode("old-id", status="cancelled", superseded_by=EPISODE_ID))
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/Encounter",
        status_code=201,
        json={"resourceType": "Encounter", "id": "enc-1", "subject": {"reference": "Patient/p1"}},
    )
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201, json={})

    result = writeback.attendance(_attendance(episode_id="old-id"), topic="iop.attendance.v1")

    assert result.outcome is Outcome.CREATED
    encounter = _body(httpx_mock.get_requests()[0])
    assert encounter["episodeOfCare"][0]["identifier"]["value"] == EPISODE_ID


def test_later_event_updates_with_if_match_and_rereads_on_conflict(
    httpx_mock: HTTPXMock, writeback: WriteBack
) -> None:
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/Encounter",
        status_code=201,
        json={"resourceType": "Encounter", "id": "enc-1", "subject": {"reference": "Patient/p1"}},
    )
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201, json={})
    writeback.attendance(_attendance(), topic="iop.attendance.v1")

    stored = {
        "resourceType": "Encounter",
        "id": "enc-1",
        "subject": {"reference": "Patient/p1"},
        "status": "finished",
    }
    httpx_mock.add_response(
        method="GET", url=f"{BASE}/Encounter/enc-1", headers={"ETag": 'W/"1"'}, json=stored
    )
    httpx_mock.add_response(
        method="PUT", url=f"{BASE}/Encounter/enc-1", match_headers={"If-Match": 'W/"1"'}, status_code=409
    )
    httpx_mock.add_response(
        method="GET", url=f"{BASE}/Encounter/enc-1", headers={"ETag": 'W/"2"'}, json=stored
    )
    httpx_mock.add_response(
        method="PUT", url=f"{BASE}/Encounter/enc-1", match_headers={"If-Match": 'W/"2"'}, json=stored
    )
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201, json={})

    later = _attendance("evt-2", occurred_at="2026-03-02T19:00:00+00:00", end="2026-03-02T12:30:00+00:00")
    result = writeback.attendance(later, topic="iop.attendance.v1")

    assert result.outcome is Outcome.UPDATED
    put = [r for r in httpx_mock.get_requests() if r.method == "PUT"][-1]
    assert _body(put)["period"]["end"] == "2026-03-02T12:30:00+00:00"
    assert _body(put)["id"] == "enc-1"


def test_older_event_for_a_session_is_stale(httpx_mock: HTTPXMock, writeback: WriteBack) -> None:
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/Encounter",
        status_code=201,
        json={"resourceType": "Encounter", "id": "enc-1", "subject": {"reference": "Patient/p1"}},
    )
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201, json={})
    writeback.attendance(_attendance(occurred_at="2026-03-02T19:00:00+00:00"), topic="iop.attendance.v1")

    result = writeback.attendance(
        _attendance("evt-0", occurred_at="2026-03-02T18:00:00+00:00"), topic="iop.attendance.v1"
    )
    assert result.outcome is Outcome.STALE


def test_cancelled_session_voids_what_an_earlier_try_wrote(
    httpx_mock: HTTPXMock, writeback: WriteBack
) -> None:
    # nothing in our session table (the process died after the write): the server is asked
    httpx_mock.add_response(
        method="GET",
        url=_search_url("Encounter", SESSION_ID_SYSTEM, SESSION_KEY),
        json={
            "resourceType": "Bundle",
            "entry": [
                {
                    "resource": {
                        "resourceType": "Encounter",
                        "id": "enc-1",
                        "subject": {"reference": "Patient/p1"},
                    }
                }
            ],
        },
    )
    httpx_mock.add_response(
        method="GET",
        url=_search_url("Appointment", SESSION_ID_SYSTEM, SESSION_KEY),
        json={"resourceType": "Bundle"},
    )
    httpx_mock.add_response(
        method="GET",
        url=f"{BASE}/Encounter/enc-1",
        headers={"ETag": 'W/"3"'},
        json={
            "resourceType": "Encounter",
            "id": "enc-1",
            "subject": {"reference": "Patient/p1"},
            "status": "finished",
        },
    )
    httpx_mock.add_response(method="PUT", url=f"{BASE}/Encounter/enc-1", match_headers={"If-Match": 'W/"3"'})
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201, json={})

    result = writeback.attendance(_attendance(status="cancelled"), topic="iop.attendance.v1")

    assert result.outcome is Outcome.VOIDED
    put = next(r for r in httpx_mock.get_requests() if r.method == "PUT")
    assert _body(put)["status"] == "cancelled"


def test_cancelling_a_session_never_written_writes_nothing(
    httpx_mock: HTTPXMock, writeback: WriteBack
) -> None:
    for resource_type in ("Encounter", "Appointment"):
        httpx_mock.add_response(
            method="GET",
            url=_search_url(resource_type, SESSION_ID_SYSTEM, SESSION_KEY),
            json={"resourceType": "Bundle"},
        )
    result = writeback.attendance(_attendance(status="cancelled"), topic="iop.attendance.v1")
    assert result.outcome is Outcome.NOTHING_TO_VOID


def test_create_that_matches_an_earlier_write_changes_nothing(
    httpx_mock: HTTPXMock, writeback: WriteBack
) -> None:
    event = _attendance()
    existing = {
        "resourceType": "Encounter",
        "id": "enc-1",
        "meta": {"versionId": "1"},
        "identifier": [{"system": SESSION_ID_SYSTEM, "value": SESSION_KEY}],
        "status": "finished",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "AMB",
            "display": "ambulatory",
        },
        "subject": {"reference": "Patient/p1"},
        "episodeOfCare": [{"identifier": {"system": EPISODE_ID_SYSTEM, "value": EPISODE_ID}}],
        "period": {"start": "2026-03-02T09:00:00+00:00", "end": "2026-03-02T12:00:00+00:00"},
    }
    httpx_mock.add_response(method="POST", url=f"{BASE}/Encounter", status_code=200, json=existing)
    httpx_mock.add_response(method="GET", url=f"{BASE}/Encounter/enc-1", json=existing)

    result = writeback.attendance(event, topic="iop.attendance.v1")

    assert result.outcome is Outcome.UNCHANGED
    assert [r.method for r in httpx_mock.get_requests()] == ["POST", "GET"]


def test_ehr_refusal_is_permanent_and_not_recorded(
    httpx_mock: HTTPXMock, writeback: WriteBack, state: SyncState
) -> None:
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/Encounter",
        status_code=422,
        json={"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]},
    )
    with pytest.raises(PermanentEventError, match=r"refused POST Encounter"):
        writeback.attendance(_attendance(), topic="iop.attendance.v1")
    assert state.event_outcome("evt-1", ehr="general") is None


def test_temporary_failure_propagates_for_a_later_retry(
    httpx_mock: HTTPXMock, writeback: WriteBack, state: SyncState
) -> None:
    httpx_mock.add_response(method="POST", url=f"{BASE}/Encounter", status_code=503, is_reusable=True)
    with pytest.raises(TemporaryEhrError):
        writeback.attendance(_attendance(), topic="iop.attendance.v1")
    assert state.event_outcome("evt-1", ehr="general") is None


def test_absent_session_for_part2_episode_is_a_labelled_noshow(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    state = SyncState(create_engine(f"sqlite:///{tmp_path / 'p2.db'}"))
    _publish(state, _episode(part2=True, security=PART2))
    writeback = WriteBack(client, state, ehr="general", targets=Targets.everything(provenance=False))
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

    result = writeback.attendance(_attendance(status="absent"), topic="iop.attendance.v1")

    assert result.references == ["Appointment/ap-1"]
    appointment = _body(httpx_mock.get_requests()[0])
    assert appointment["status"] == "noshow"
    assert appointment["meta"]["security"] == PART2


def test_discharge_finishes_the_episode_writes_the_summary_and_closes_the_task(
    httpx_mock: HTTPXMock, client: EhrClient, tmp_path: Path
) -> None:
    state = SyncState(create_engine(f"sqlite:///{tmp_path / 'd.db'}"))
    _publish(state, _episode(referral={"reference": "ServiceRequest/sr-1"}))
    writeback = WriteBack(client, state, ehr="general", targets=Targets.everything(provenance=False))
    eoc = {
        "resourceType": "EpisodeOfCare",
        "patient": {"reference": "Patient/p1"},
        "id": "eoc-1",
        "status": "active",
        "period": {"start": "2026-02-02"},
    }
    httpx_mock.add_response(
        method="GET",
        url=_search_url("EpisodeOfCare", EPISODE_ID_SYSTEM, EPISODE_ID),
        json={"resourceType": "Bundle", "entry": [{"resource": eoc}]},
    )
    httpx_mock.add_response(
        method="GET", url=f"{BASE}/EpisodeOfCare/eoc-1", headers={"ETag": 'W/"1"'}, json=eoc
    )
    httpx_mock.add_response(method="PUT", url=f"{BASE}/EpisodeOfCare/eoc-1", json=eoc)
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/DocumentReference",
        match_headers={"If-None-Exist": f"identifier={EVENT_ID_SYSTEM}|evt-d"},
        status_code=201,
        json={"resourceType": "DocumentReference", "id": "doc-1", "subject": {"reference": "Patient/p1"}},
    )
    task = {"resourceType": "Task", "id": "t-1", "status": "in-progress", "intent": "order"}
    httpx_mock.add_response(
        method="GET",
        url=f"{BASE}/Task?focus={quote('ServiceRequest/sr-1', safe='')}",
        json={"resourceType": "Bundle", "entry": [{"resource": task}]},
    )
    httpx_mock.add_response(method="GET", url=f"{BASE}/Task/t-1", json=task)
    httpx_mock.add_response(method="PUT", url=f"{BASE}/Task/t-1", json=task)
    event = {
        "event_id": "evt-d",
        "occurred_at": "2026-03-20T17:00:00+00:00",
        "ehr": "general",
        "episode_id": EPISODE_ID,
        "patient": {"reference": "Patient/p1"},
        "discharge": {"date": "2026-03-20", "reason": "completed", "summary": "done"},
    }

    result = writeback.discharge(event, topic="iop.discharges.v1")

    assert result.outcome is Outcome.DISCHARGED
    assert result.references == ["EpisodeOfCare/eoc-1", "DocumentReference/doc-1", "Task/t-1"]
    puts = {r.url.path: _body(r) for r in httpx_mock.get_requests() if r.method == "PUT"}
    assert puts["/fhir/EpisodeOfCare/eoc-1"]["status"] == "finished"
    assert puts["/fhir/EpisodeOfCare/eoc-1"]["period"]["end"] == "2026-03-20"
    assert puts["/fhir/Task/t-1"]["businessStatus"]["coding"][0]["code"] == "7.0"
    assert state.episode_fhir_id("general", EPISODE_ID) == "eoc-1"


def test_session_cancelled_before_anything_was_written_can_still_be_attended_later(
    httpx_mock: HTTPXMock, writeback: WriteBack
) -> None:
    for resource_type in ("Encounter", "Appointment"):
        httpx_mock.add_response(
            method="GET",
            url=_search_url(resource_type, SESSION_ID_SYSTEM, SESSION_KEY),
            json={"resourceType": "Bundle"},
        )
    writeback.attendance(_attendance("evt-0", status="cancelled"), topic="iop.attendance.v1")
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/Encounter",
        status_code=201,
        json={"resourceType": "Encounter", "id": "enc-1", "subject": {"reference": "Patient/p1"}},
    )
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201, json={})

    result = writeback.attendance(
        _attendance("evt-1", occurred_at="2026-03-02T19:00:00+00:00"), topic="iop.attendance.v1"
    )

    assert result.outcome is Outcome.CREATED
    assert result.references == ["Encounter/enc-1"]

"""Every write to the EHR goes with a Provenance naming this service and the event (or episode) behind
it; a Provenance that fails is sent on the retry, never by writing the resource twice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fhir.resources.R4B.provenance import Provenance
from pytest_httpx import HTTPXMock
from sqlalchemy import create_engine

from connectors.config import EhrConfig
from connectors.errors import TemporaryEhrError
from connectors.http import EhrClient
from schemas.identifiers import EPISODE_ID_SYSTEM, EVENT_ID_SYSTEM
from sync.config import ServiceConfig, Settings, StoreConfig
from sync.service import Service
from sync.state import Staged, SyncState
from sync.writeback import Outcome, Targets, WriteBack
from tests.unit.sync.test_writeback import BASE, EPISODE_ID, _attendance, _episode, _publish

RECORDED = "2026-03-02T18:00:05+00:00"


def _body(request: httpx.Request) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(request.content)
    return body


def _provenances(httpx_mock: HTTPXMock) -> list[dict[str, Any]]:
    found = [
        _body(r)
        for r in httpx_mock.get_requests()
        if r.method == "POST" and r.url.path.endswith("/Provenance")
    ]
    for resource in found:
        Provenance.model_validate(resource)
    return found


def _source(provenance: dict[str, Any]) -> dict[str, Any]:
    identifier: dict[str, Any] = provenance["entity"][0]["what"]["identifier"]
    return identifier


def _encounter(version: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": "enc-1",
        "subject": {"reference": "Patient/p1"},
        "meta": {"versionId": version},
        **extra,
    }


@pytest.fixture
def state(tmp_path: Path) -> SyncState:
    state = SyncState(create_engine(f"sqlite:///{tmp_path / 'state.db'}"))
    _publish(state, _episode(referral={"reference": "ServiceRequest/sr-1"}))
    return state


@pytest.fixture
def writeback(state: SyncState) -> WriteBack:
    client = EhrClient(EhrConfig(name="general", base_url=BASE), sleep=lambda _s: None)
    return WriteBack(client, state, ehr="general", clock=lambda: RECORDED, agent="iop-bridge north")


def test_create_update_and_void_each_send_a_provenance_of_the_event(
    httpx_mock: HTTPXMock, writeback: WriteBack
) -> None:
    httpx_mock.add_response(method="POST", url=f"{BASE}/Encounter", status_code=201, json=_encounter("1"))
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201, is_reusable=True)
    writeback.attendance(_attendance("evt-a"), topic="iop.attendance.v1")
    httpx_mock.add_response(method="GET", url=f"{BASE}/Encounter/enc-1", json=_encounter("1"))
    httpx_mock.add_response(
        method="PUT", url=f"{BASE}/Encounter/enc-1", headers={"ETag": 'W/"2"'}, json=_encounter("2")
    )
    later = _attendance("evt-b", occurred_at="2026-03-02T19:00:00+00:00", end="2026-03-02T12:30:00+00:00")
    assert writeback.attendance(later, topic="iop.attendance.v1").outcome is Outcome.UPDATED
    httpx_mock.add_response(method="GET", url=f"{BASE}/Encounter/enc-1", json=_encounter("2"))
    httpx_mock.add_response(method="PUT", url=f"{BASE}/Encounter/enc-1", json=_encounter("3"))
    cancel = _attendance("evt-c", status="cancelled", occurred_at="2026-03-02T20:00:00+00:00")
    assert writeback.attendance(cancel, topic="iop.attendance.v1").outcome is Outcome.VOIDED

    created, updated, voided = _provenances(httpx_mock)
    assert [p["target"][0]["reference"] for p in (created, updated, voided)] == [
        "Encounter/enc-1/_history/1",
        "Encounter/enc-1/_history/2",
        "Encounter/enc-1/_history/3",
    ]
    assert [p["activity"]["coding"][0]["code"] for p in (created, updated, voided)] == [
        "CREATE",
        "UPDATE",
        "UPDATE",
    ]
    assert [_source(p)["value"] for p in (created, updated, voided)] == ["evt-a", "evt-b", "evt-c"]
    assert {_source(p)["system"] for p in (created, updated, voided)} == {EVENT_ID_SYSTEM}
    for provenance in (created, updated, voided):
        assert provenance["agent"][0]["who"] == {"type": "Device", "display": "iop-bridge north"}
        assert provenance["recorded"] == RECORDED


def test_discharge_sends_a_provenance_for_the_episode_the_summary_and_the_task(
    httpx_mock: HTTPXMock, writeback: WriteBack
) -> None:
    eoc = {"resourceType": "EpisodeOfCare", "id": "eoc-1", "patient": {"reference": "Patient/p1"}}
    httpx_mock.add_response(
        method="GET",
        url=f"{BASE}/EpisodeOfCare?identifier={quote(EPISODE_ID_SYSTEM + '|' + EPISODE_ID, safe='')}",
        json={"resourceType": "Bundle", "entry": [{"resource": eoc}]},
    )
    httpx_mock.add_response(
        method="GET", url=f"{BASE}/EpisodeOfCare/eoc-1", headers={"ETag": 'W/"4"'}, json=eoc
    )
    httpx_mock.add_response(method="PUT", url=f"{BASE}/EpisodeOfCare/eoc-1", headers={"ETag": 'W/"5"'})
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/DocumentReference",
        status_code=201,
        headers={"Location": f"{BASE}/DocumentReference/doc-1/_history/1"},
    )
    task = {"resourceType": "Task", "id": "t-1", "status": "in-progress", "intent": "order"}
    httpx_mock.add_response(
        method="GET",
        url=f"{BASE}/Task?focus={quote('ServiceRequest/sr-1', safe='')}",
        json={"resourceType": "Bundle", "entry": [{"resource": task}]},
    )
    httpx_mock.add_response(method="GET", url=f"{BASE}/Task/t-1", json=task)
    httpx_mock.add_response(method="PUT", url=f"{BASE}/Task/t-1", json={**task, "meta": {"versionId": "7"}})
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201, is_reusable=True)
    event = {
        "event_id": "evt-d",
        "occurred_at": "2026-03-20T17:00:00+00:00",
        "ehr": "general",
        "episode_id": EPISODE_ID,
        "patient": {"reference": "Patient/p1"},
        "discharge": {"date": "2026-03-20", "reason": "completed"},
    }

    writeback.discharge(event, topic="iop.discharges.v1")

    provenances = _provenances(httpx_mock)
    assert [p["target"][0]["reference"] for p in provenances] == [
        "EpisodeOfCare/eoc-1/_history/5",
        "DocumentReference/doc-1/_history/1",
        "Task/t-1/_history/7",
    ]
    assert {_source(p)["value"] for p in provenances} == {"evt-d"}


def test_a_failed_provenance_is_sent_on_the_retry_without_a_second_create(
    httpx_mock: HTTPXMock, writeback: WriteBack
) -> None:
    httpx_mock.add_response(method="POST", url=f"{BASE}/Encounter", status_code=201, json=_encounter("1"))
    httpx_mock.add_exception(httpx.ReadTimeout("no answer"), method="POST", url=f"{BASE}/Provenance")
    with pytest.raises(TemporaryEhrError):
        writeback.attendance(_attendance("evt-a"), topic="iop.attendance.v1")

    # the retry: the conditional create finds the Encounter (200), which already matches
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201)
    httpx_mock.add_response(method="POST", url=f"{BASE}/Encounter", status_code=200, json=_encounter("1"))
    httpx_mock.add_response(method="GET", url=f"{BASE}/Encounter/enc-1", json=_attendance_as_server())
    result = writeback.attendance(_attendance("evt-a"), topic="iop.attendance.v1")

    assert result.outcome is Outcome.UNCHANGED
    calls = [f"{r.method} {r.url.path.rsplit('/fhir/', 1)[1]}" for r in httpx_mock.get_requests()]
    assert calls == [
        "POST Encounter",
        "POST Provenance",  # 503
        "POST Provenance",  # sent first on the retry
        "POST Encounter",  # found, not made again
        "GET Encounter/enc-1",
    ]
    failed, sent = _provenances(httpx_mock)
    assert sent == failed
    assert sent["target"] == [{"reference": "Encounter/enc-1/_history/1"}]
    assert sent["activity"]["coding"][0]["code"] == "CREATE"


def _attendance_as_server() -> dict[str, Any]:
    """The Encounter as the server holds it after the first try (what the event writes, with its id)."""
    from sync import fhir_writes
    from sync.writeback import _session_key

    event = _attendance("evt-a")
    encounter = fhir_writes.attendance_encounter(
        event, patient_reference="Patient/p1", episode_id=EPISODE_ID, session_key=_session_key(event)
    )
    return {**encounter, "id": "enc-1", "meta": {"versionId": "1"}}


def _eoc_record() -> dict[str, Any]:
    return {**_episode(), "level": "iop", "status": "active", "start": "2026-02-02"}


def test_the_cycles_episode_of_care_put_sends_its_provenance(httpx_mock: HTTPXMock, tmp_path: Path) -> None:
    settings = Settings(
        store=StoreConfig(url=f"sqlite:///{tmp_path / 'state.db'}"),
        service=ServiceConfig(out_dir=str(tmp_path / "out")),
        ehr=(EhrConfig(name="general", base_url=BASE, vendor="hapi"),),
    )
    item = Staged(
        kind="episode",
        record_id=EPISODE_ID,
        patient_id="p1",
        record=_eoc_record(),
        topic="iop.episodes.v1",
        message_key="general|Patient/p1",
        schema_name="episode",
        schema_version=1,
    )
    query = quote(EPISODE_ID_SYSTEM + "|" + EPISODE_ID, safe="")
    httpx_mock.add_response(
        method="PUT",
        url=f"{BASE}/EpisodeOfCare?identifier={query}",
        status_code=201,
        json={"resourceType": "EpisodeOfCare", "id": "eoc-9", "meta": {"versionId": "1"}},
    )
    httpx_mock.add_exception(httpx.ReadTimeout("no answer"), method="POST", url=f"{BASE}/Provenance")
    with Service(settings, client_factory=lambda e: EhrClient(e, sleep=lambda _s: None)) as service:
        assert (
            service._write_episodes_of_care(settings.ehr[0], [item]) == 1
        )  # a failed Provenance never stops it
        httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201)
        service._write_episodes_of_care(settings.ehr[0], [])  # the next cycle sends what is owed

    failed, sent = _provenances(httpx_mock)
    assert sent == failed
    assert sent["target"] == [{"reference": "EpisodeOfCare/eoc-9/_history/1"}]
    assert sent["activity"]["coding"][0]["code"] == "CREATE"
    assert _source(sent) == {"system": EPISODE_ID_SYSTEM, "value": EPISODE_ID}
    assert sent["agent"][0]["who"]["display"] == "iop-bridge"


def _discharge_event() -> dict[str, Any]:
    return {
        "event_id": "evt-d",
        "occurred_at": "2026-03-20T17:00:00+00:00",
        "ehr": "general",
        "episode_id": EPISODE_ID,
        "patient": {"reference": "Patient/p1"},
        "discharge": {"date": "2026-03-20", "reason": "completed"},
    }


@pytest.mark.parametrize(("already", "written"), [([], 1), (["evt-d"], 0), (["evt-other"], 1)])
def test_a_summary_an_earlier_try_made_gets_its_provenance_once(
    httpx_mock: HTTPXMock, tmp_path: Path, already: list[str], written: int
) -> None:
    """The process died after the summary was created and before its Provenance: the retry, in a new
    process, finds the summary by its event id and writes the Provenance only if the server has none."""
    state = SyncState(create_engine(f"sqlite:///{tmp_path / 's.db'}"))
    _publish(state, _episode())
    client = EhrClient(EhrConfig(name="general", base_url=BASE), sleep=lambda _s: None)
    targets = Targets.everything(ehr="general")
    writeback = WriteBack(client, state, ehr="general", targets=targets, clock=lambda: RECORDED)
    httpx_mock.add_response(
        method="GET",
        url=f"{BASE}/EpisodeOfCare?identifier={quote(EPISODE_ID_SYSTEM + '|' + EPISODE_ID, safe='')}",
        json={"resourceType": "Bundle"},
    )
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/DocumentReference",
        status_code=200,  # found by the conditional create
        json={"resourceType": "DocumentReference", "id": "doc-1", "subject": {"reference": "Patient/p1"}},
    )
    held = [
        {
            "resource": {
                "resourceType": "Provenance",
                "entity": [
                    {"role": "source", "what": {"identifier": {"system": EVENT_ID_SYSTEM, "value": v}}}
                ],
            }
        }
        for v in already
    ]
    httpx_mock.add_response(
        method="GET",
        url=f"{BASE}/Provenance?target={quote('DocumentReference/doc-1', safe='')}",
        json={"resourceType": "Bundle", "entry": held},
    )
    if written:
        httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201)

    writeback.discharge(_discharge_event(), topic="iop.discharges.v1")

    provenances = _provenances(httpx_mock)
    assert len(provenances) == written
    for provenance in provenances:
        assert provenance["target"] == [{"reference": "DocumentReference/doc-1"}]
        assert provenance["activity"]["coding"][0]["code"] == "CREATE"
        assert _source(provenance) == {"system": EVENT_ID_SYSTEM, "value": "evt-d"}

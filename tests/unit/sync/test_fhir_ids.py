"""Ids from the server (or the state, or an event) reach a URL path only as valid FHIR ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pytest_httpx import HTTPXMock
from sqlalchemy import create_engine

from connectors.config import EhrConfig
from connectors.http import EhrClient
from schemas.identifiers import EPISODE_ID_SYSTEM, InvalidIdError, is_fhir_id, resource_path
from sync.config import ServiceConfig, Settings, StoreConfig
from sync.service import Service
from sync.state import Staged, SyncState
from sync.writeback import PermanentEventError, Targets, WriteBack
from tests.unit.sync.test_writeback import BASE, EPISODE_ID, _attendance, _episode, _publish

BAD_IDS = ["..", ".", "a/b", "p1?x=1", "p1#frag", "a,b", "", "x" * 65, "Jane Doe 1970-01-01", "%2e%2e"]


@pytest.mark.parametrize("value", BAD_IDS)
def test_a_bad_id_is_refused_naming_the_type_and_never_the_value(value: str) -> None:
    assert not is_fhir_id(value)
    with pytest.raises(InvalidIdError) as caught:
        resource_path("Encounter", value)
    message = str(caught.value)
    assert message == f"invalid Encounter id ({len(value)} characters)"


@pytest.mark.parametrize("value", ["enc-1", "97953477", "eM5CWtq15N0WJeuCet5bJlQ3", "a.b", "x" * 64])
def test_a_fhir_id_goes_into_the_path(value: str) -> None:
    assert resource_path("Encounter", value) == f"Encounter/{value}"


def test_a_non_string_id_is_refused() -> None:
    with pytest.raises(InvalidIdError, match="invalid Task id \\(a int, not a string\\)"):
        resource_path("Task", 12)


@pytest.fixture
def writeback(tmp_path: Path) -> WriteBack:
    state = SyncState(create_engine(f"sqlite:///{tmp_path / 'state.db'}"))
    _publish(state, _episode(referral={"reference": "ServiceRequest/sr-1"}))
    client = EhrClient(EhrConfig(name="general", base_url=BASE), sleep=lambda _s: None)
    return WriteBack(client, state, ehr="general", targets=Targets.everything(provenance=False))


def _discharge() -> dict[str, Any]:
    return {
        "event_id": "evt-d",
        "occurred_at": "2026-03-20T17:00:00+00:00",
        "ehr": "general",
        "episode_id": EPISODE_ID,
        "patient": {"reference": "Patient/p1"},
        "discharge": {"date": "2026-03-20", "reason": "completed"},
    }


@pytest.mark.parametrize("bad", ["../Patient/p2", "t-1?_method=DELETE", "..", "t-1#x"])
def test_a_task_id_from_the_server_that_is_no_id_is_permanent_and_nothing_is_written(
    httpx_mock: HTTPXMock, writeback: WriteBack, bad: str
) -> None:
    eoc = {"resourceType": "EpisodeOfCare", "id": "eoc-1", "patient": {"reference": "Patient/p1"}}
    httpx_mock.add_response(
        method="GET",
        url=f"{BASE}/EpisodeOfCare?identifier={quote(EPISODE_ID_SYSTEM + '|' + EPISODE_ID, safe='')}",
        json={"resourceType": "Bundle", "entry": [{"resource": eoc}]},
    )
    httpx_mock.add_response(
        method="GET",
        url=f"{BASE}/Task?focus={quote('ServiceRequest/sr-1', safe='')}",
        json={"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Task", "id": bad}}]},
    )

    with pytest.raises(PermanentEventError) as caught:
        writeback.discharge(_discharge(), topic="iop.discharges.v1")

    assert f"invalid Task id ({len(bad)} characters)" in str(caught.value)
    assert bad not in str(caught.value)
    assert [r.method for r in httpx_mock.get_requests()] == ["GET", "GET"]  # looked up, nothing written


@pytest.mark.parametrize("bad", ["..", "enc/1", "enc-1?x"])
def test_an_encounter_the_server_found_with_no_id_is_permanent(
    httpx_mock: HTTPXMock, tmp_path: Path, bad: str
) -> None:
    state = SyncState(create_engine(f"sqlite:///{tmp_path / 'state.db'}"))
    _publish(state, _episode())
    client = EhrClient(EhrConfig(name="general", base_url=BASE), sleep=lambda _s: None)
    writeback = WriteBack(client, state, ehr="general", targets=Targets.everything(provenance=False))
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/Encounter",
        status_code=200,  # found by the conditional create
        json={"resourceType": "Encounter", "id": bad, "subject": {"reference": "Patient/p1"}},
    )

    with pytest.raises(PermanentEventError, match="invalid Encounter id"):
        writeback.attendance(_attendance(), topic="iop.attendance.v1")

    assert [r.method for r in httpx_mock.get_requests()] == ["POST"]
    assert state.event_entry("general", "iop.attendance.v1", "evt-1") is None


def test_an_episode_of_care_id_that_is_no_id_is_not_kept(httpx_mock: HTTPXMock, tmp_path: Path) -> None:
    settings = Settings(
        store=StoreConfig(url=f"sqlite:///{tmp_path / 'state.db'}"),
        service=ServiceConfig(out_dir=str(tmp_path / "out")),
        ehr=(EhrConfig(name="general", base_url=BASE, vendor="hapi"),),
    )
    item = Staged(
        kind="episode",
        record_id=EPISODE_ID,
        patient_id="p1",
        record=_episode(),
        topic="iop.episodes.v1",
        message_key="general|Patient/p1",
        schema_name="episode",
        schema_version=1,
    )
    httpx_mock.add_response(
        method="PUT",
        url=f"{BASE}/EpisodeOfCare?identifier={quote(EPISODE_ID_SYSTEM + '|' + EPISODE_ID, safe='')}",
        json={"resourceType": "EpisodeOfCare", "id": "../Patient/p2"},
    )
    with Service(settings, client_factory=lambda e: EhrClient(e, sleep=lambda _s: None)) as service:
        assert service._write_episodes_of_care(settings.ehr[0], [item]) == 0
        assert service.state.episode_fhir_id("general", EPISODE_ID) is None

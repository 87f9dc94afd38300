"""Write-back keeps each program's sessions, events and patients apart (issue 10, items 1-3).

The EHR is an in-memory FHIR server (conditional create, read, search by identifier, PUT): what it
holds at the end shows which patient each write landed on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine

from connectors.errors import EhrError
from sync.state import Staged, SyncState
from sync.writeback import Outcome, PermanentEventError, WriteBack

EHR = "general"
EPISODE_A = "5b1a2f44-1111-5222-8333-00000000000a"
EPISODE_B = "5b1a2f44-1111-5222-8333-00000000000b"


class MemoryFhir:
    """Just enough of a FHIR server for write-back: ids per type, versions, identifier search."""

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Any]] = {}
        self.writes: list[tuple[str, str]] = []
        self._next = 0

    def _matches(self, resource: Mapping[str, Any], token: str) -> bool:
        system, _, value = token.partition("|")
        return any(
            i.get("system") == system and i.get("value") == value for i in resource.get("identifier") or []
        )

    def _search(self, resource_type: str, token: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.resources.values()
            if r["resourceType"] == resource_type and self._matches(r, token)
        ]

    def _response(self, status: int, body: Mapping[str, Any]) -> httpx.Response:
        headers = {"ETag": f'W/"{body["meta"]["versionId"]}"'} if "meta" in body else {}
        return httpx.Response(status, json=dict(body), headers=headers)

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Any = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        content: Any = None,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        headers = headers or {}
        if method == "GET" and "/" in url:
            return self._response(200, self.resources[url])
        if method == "GET":
            found = self._search(url, dict(params)["identifier"])
            return httpx.Response(
                200, json={"resourceType": "Bundle", "entry": [{"resource": r} for r in found]}
            )
        if method == "POST":
            condition = headers.get("If-None-Exist", "")
            if condition:
                existing = self._search(url, condition.removeprefix("identifier="))
                if existing:
                    return self._response(200, existing[0])
            self._next += 1
            resource = {**json, "id": f"{url.lower()}-{self._next}", "meta": {"versionId": "1"}}
            self.resources[f"{url}/{resource['id']}"] = resource
            self.writes.append((method, f"{url}/{resource['id']}"))
            return self._response(201, resource)
        if method == "PUT":
            current = self.resources[url]
            version = str(int(current["meta"]["versionId"]) + 1)
            if headers.get("If-Match") not in (None, f'W/"{current["meta"]["versionId"]}"'):
                raise EhrError("version conflict", status=412)
            self.resources[url] = {**json, "meta": {"versionId": version}}
            self.writes.append((method, url))
            return self._response(200, self.resources[url])
        raise AssertionError(f"unexpected {method} {url}")

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return [r for r in self.resources.values() if r["resourceType"] == resource_type]


def _episode(episode_id: str, patient: str) -> dict[str, Any]:
    return {
        "episode_id": episode_id,
        "ehr": EHR,
        "patient": {
            "reference": f"Patient/{patient}",
            "identifier": [{"system": "urn:mrn", "value": f"MRN-{patient}"}],
        },
        "level": "iop",
        "status": "active",
        "start": "2026-02-02",
        "part2": False,
        "security": [],
        "referral": None,
    }


def _publish(state: SyncState, episode: dict[str, Any]) -> None:
    patient = episode["patient"]["reference"].removeprefix("Patient/")
    state.stage_changes(
        EHR,
        [
            Staged(
                kind="episode",
                record_id=episode["episode_id"],
                patient_id=patient,
                record=episode,
                topic="iop.episodes.v1",
                message_key=f"{EHR}|Patient/{patient}",
                schema_name="episode",
                schema_version=1,
            )
        ],
    )


def _attendance(
    event_id: str,
    *,
    episode_id: str,
    patient: str,
    program: str | None = None,
    session: str = "1",
    status: str = "attended",
    occurred_at: str = "2026-03-02T18:00:00+00:00",
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": event_id,
        "occurred_at": occurred_at,
        "ehr": EHR,
        "episode_id": episode_id,
        "patient": {"reference": f"Patient/{patient}"},
        "session": {
            "id": session,
            "start": "2026-03-02T09:00:00+00:00",
            "end": "2026-03-02T12:00:00+00:00",
            "status": status,
        },
    }
    if program is not None:
        event["program"] = program
    return event


@pytest.fixture
def state(tmp_path: Path) -> SyncState:
    state = SyncState(create_engine(f"sqlite:///{tmp_path / 'state.db'}"))
    _publish(state, _episode(EPISODE_A, "pa"))
    _publish(state, _episode(EPISODE_B, "pb"))
    return state


@pytest.fixture
def fhir() -> MemoryFhir:
    return MemoryFhir()


@pytest.fixture
def writeback(fhir: MemoryFhir, state: SyncState) -> WriteBack:
    return WriteBack(fhir, state, ehr=EHR, clock=lambda: "2026-03-02T18:00:05+00:00")


def _subjects(fhir: MemoryFhir) -> dict[str, str]:
    return {str(e["id"]): str(e["subject"]["reference"]) for e in fhir.of_type("Encounter")}


# -- item 1: a session's identity is the EHR, the episode and the program ----------------------------


def test_two_programs_numbering_sessions_alike_write_each_patients_own_encounter(
    writeback: WriteBack, fhir: MemoryFhir
) -> None:
    first = writeback.attendance(
        _attendance("a-1", episode_id=EPISODE_A, patient="pa", program="north"), topic="iop.attendance.v1"
    )
    second = writeback.attendance(
        _attendance(
            "b-1",
            episode_id=EPISODE_B,
            patient="pb",
            program="south",
            occurred_at="2026-03-02T19:00:00+00:00",
        ),
        topic="iop.attendance.v1",
    )

    assert first.outcome is Outcome.CREATED
    assert second.outcome is Outcome.CREATED
    assert sorted(_subjects(fhir).values()) == ["Patient/pa", "Patient/pb"]


def test_a_later_cancel_of_the_other_programs_session_leaves_the_first_patient_alone(
    writeback: WriteBack, fhir: MemoryFhir
) -> None:
    writeback.attendance(_attendance("a-1", episode_id=EPISODE_A, patient="pa"), topic="iop.attendance.v1")
    result = writeback.attendance(
        _attendance(
            "b-1",
            episode_id=EPISODE_B,
            patient="pb",
            status="cancelled",
            occurred_at="2026-03-03T10:00:00+00:00",
        ),
        topic="iop.attendance.v1",
    )

    assert result.outcome is Outcome.NOTHING_TO_VOID
    (encounter,) = fhir.of_type("Encounter")
    assert encounter["status"] == "finished"
    assert encounter["subject"] == {"reference": "Patient/pa"}


def test_the_same_programs_later_event_still_updates_its_session(
    writeback: WriteBack, fhir: MemoryFhir
) -> None:
    writeback.attendance(_attendance("a-1", episode_id=EPISODE_A, patient="pa", program="north"), topic="t")
    result = writeback.attendance(
        _attendance(
            "a-2",
            episode_id=EPISODE_A,
            patient="pa",
            program="north",
            status="cancelled",
            occurred_at="2026-03-03T10:00:00+00:00",
        ),
        topic="t",
    )

    assert result.outcome is Outcome.VOIDED
    (encounter,) = fhir.of_type("Encounter")
    assert encounter["status"] == "cancelled"


def test_a_session_resource_on_another_patient_is_dead_lettered_and_nothing_written(
    writeback: WriteBack, fhir: MemoryFhir, state: SyncState
) -> None:
    writeback.attendance(_attendance("a-1", episode_id=EPISODE_A, patient="pa"), topic="t")
    (key,) = [k for k in fhir.resources if k.startswith("Encounter/")]
    fhir.resources[key]["subject"] = {"reference": "Patient/someone-else"}  # changed on the server
    writes = list(fhir.writes)

    with pytest.raises(PermanentEventError) as raised:
        writeback.attendance(
            _attendance(
                "a-2",
                episode_id=EPISODE_A,
                patient="pa",
                status="cancelled",
                occurred_at="2026-03-03T10:00:00+00:00",
            ),
            topic="t",
        )

    assert "a-2" in str(raised.value)
    assert "not the episode's patient" in str(raised.value)
    assert "someone-else" not in str(raised.value)
    assert fhir.writes == writes
    assert fhir.resources[key]["status"] == "finished"


# -- item 2: the ledger is the EHR's and the topic's; a differing "duplicate" is a conflict ---------


def test_an_event_id_reused_on_another_topic_is_no_duplicate(writeback: WriteBack, fhir: MemoryFhir) -> None:
    writeback.attendance(
        _attendance("shared-1", episode_id=EPISODE_A, patient="pa"), topic="iop.attendance.v1"
    )
    result = writeback.attendance(
        _attendance("shared-1", episode_id=EPISODE_B, patient="pb"), topic="other.attendance.v1"
    )

    assert result.outcome is Outcome.CREATED
    assert sorted(_subjects(fhir).values()) == ["Patient/pa", "Patient/pb"]


def test_an_event_id_reused_at_another_ehr_is_no_duplicate(
    writeback: WriteBack, fhir: MemoryFhir, state: SyncState
) -> None:
    other = {**_episode(EPISODE_B, "pb"), "ehr": "other"}
    state.stage_changes(
        "other",
        [
            Staged(
                kind="episode",
                record_id=EPISODE_B,
                patient_id="pb",
                record=other,
                topic="iop.episodes.v1",
                message_key="other|Patient/pb",
                schema_name="episode",
                schema_version=1,
            )
        ],
    )
    other_fhir = MemoryFhir()
    other_writeback = WriteBack(other_fhir, state, ehr="other", clock=lambda: "2026-03-02T18:00:05+00:00")
    writeback.attendance(_attendance("shared-1", episode_id=EPISODE_A, patient="pa"), topic="t")
    result = other_writeback.attendance(
        {**_attendance("shared-1", episode_id=EPISODE_B, patient="pb"), "ehr": "other"}, topic="t"
    )

    assert result.outcome is Outcome.CREATED
    assert list(_subjects(other_fhir).values()) == ["Patient/pb"]


def test_the_same_event_again_is_a_duplicate(writeback: WriteBack) -> None:
    event = _attendance("a-1", episode_id=EPISODE_A, patient="pa")
    writeback.attendance(event, topic="t")

    assert writeback.attendance(dict(event), topic="t").outcome is Outcome.DUPLICATE


def test_a_duplicate_id_with_other_content_is_a_conflict_not_dropped(
    writeback: WriteBack, fhir: MemoryFhir
) -> None:
    writeback.attendance(_attendance("a-1", episode_id=EPISODE_A, patient="pa"), topic="t")
    writes = list(fhir.writes)

    with pytest.raises(PermanentEventError, match=r"event a-1 .*conflict"):
        writeback.attendance(_attendance("a-1", episode_id=EPISODE_B, patient="pb"), topic="t")
    assert fhir.writes == writes

"""An event speaks only for its episode's own patient, and its message key agrees (issue 10, item 3).

The EHR is the in-memory FHIR server of ``test_writeback_scope``: what it holds at the end shows that a
refused event wrote nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from pytest_httpx import HTTPXMock
from sqlalchemy import create_engine

from sync.service import Service
from sync.state import SyncState
from sync.writeback import Outcome, PermanentEventError, WriteBack
from tests.unit.sync import test_service_writeback as service_writeback
from tests.unit.sync.test_writeback_scope import (
    EHR,
    EPISODE_A,
    EPISODE_B,
    MemoryFhir,
    _attendance,
    _episode,
    _publish,
)

TOPIC = "iop.attendance.v1"
EPISODE_C = "5b1a2f44-1111-5222-8333-00000000000c"
MRN_A = {"system": "urn:mrn", "value": "MRN-pa"}
MRN_B = {"system": "urn:mrn", "value": "MRN-pb"}


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


def _by_identifier(*identifiers: dict[str, str], reference: str | None = None, **kw: Any) -> dict[str, Any]:
    event = _attendance("a-1", episode_id=EPISODE_A, patient="pa", **kw)
    event["patient"] = {"identifier": [dict(i) for i in identifiers]}
    if reference is not None:
        event["patient"]["reference"] = reference
    return event


def _discharge(patient: dict[str, Any]) -> dict[str, Any]:
    return {
        "event_id": "d-1",
        "occurred_at": "2026-03-20T18:00:00+00:00",
        "ehr": EHR,
        "episode_id": EPISODE_A,
        "patient": patient,
        "discharge": {"date": "2026-03-20", "reason": "completed"},
    }


def _refused(writeback: WriteBack, fhir: MemoryFhir, event: dict[str, Any], **kw: Any) -> str:
    topic = "iop.discharges.v1" if "discharge" in event else TOPIC
    write = writeback.discharge if "discharge" in event else writeback.attendance
    with pytest.raises(PermanentEventError) as raised:
        write(event, topic=topic, **kw)
    assert fhir.writes == []
    assert writeback.state.event_entry(EHR, topic, str(event["event_id"])) is None
    reason = str(raised.value)
    assert "MRN-" not in reason  # identifier values are PHI: never in a reason
    return reason


# -- the patient given as an identifier ----------------------------------------------------------------


def test_an_identifier_of_the_episodes_own_patient_is_written_to_that_patient(
    writeback: WriteBack, fhir: MemoryFhir
) -> None:
    result = writeback.attendance(_by_identifier(MRN_A), topic=TOPIC)

    assert result.outcome is Outcome.CREATED
    (encounter,) = fhir.of_type("Encounter")
    assert encounter["subject"] == {"reference": "Patient/pa"}


def test_an_identifier_of_another_patient_is_refused_and_nothing_written(
    writeback: WriteBack, fhir: MemoryFhir
) -> None:
    reason = _refused(writeback, fhir, _by_identifier(MRN_B))

    assert reason.startswith("patient_mismatch:")
    assert "a-1" in reason
    assert EPISODE_A in reason
    assert "urn:mrn" in reason


def test_an_identifier_that_cannot_be_tied_to_the_episodes_patient_is_refused(
    writeback: WriteBack, fhir: MemoryFhir
) -> None:
    reason = _refused(writeback, fhir, _by_identifier({"system": "urn:program:north", "value": "N-77"}))

    assert reason.startswith("patient_unverified:")
    assert "N-77" not in reason


def test_an_identifier_without_a_system_is_refused(writeback: WriteBack, fhir: MemoryFhir) -> None:
    reason = _refused(writeback, fhir, _by_identifier({"value": "MRN-pa"}))

    assert reason.startswith("patient_unverified:")


def test_the_right_reference_with_another_patients_identifier_is_refused(
    writeback: WriteBack, fhir: MemoryFhir
) -> None:
    reason = _refused(writeback, fhir, _by_identifier(MRN_A, MRN_B, reference="Patient/pa"))

    assert reason.startswith("patient_mismatch:")


def test_another_patients_reference_is_refused(writeback: WriteBack, fhir: MemoryFhir) -> None:
    event = _attendance("a-1", episode_id=EPISODE_A, patient="pb")

    assert _refused(writeback, fhir, event).startswith("patient_mismatch:")


def test_an_identifier_when_the_episode_carries_none_cannot_be_tied(
    writeback: WriteBack, fhir: MemoryFhir, state: SyncState
) -> None:
    episode = _episode(EPISODE_C, "pc")
    episode["patient"]["identifier"] = []
    _publish(state, episode)
    event = _by_identifier({"system": "urn:mrn", "value": "MRN-pc"})
    event["episode_id"] = EPISODE_C

    assert _refused(writeback, fhir, event).startswith("patient_unverified:")


def test_a_discharge_naming_another_patients_identifier_is_refused(
    writeback: WriteBack, fhir: MemoryFhir
) -> None:
    reason = _refused(writeback, fhir, _discharge({"identifier": [MRN_B]}))

    assert reason.startswith("patient_mismatch:")
    assert fhir.of_type("DocumentReference") == []


def test_a_refused_event_is_refused_again_on_redelivery(writeback: WriteBack, fhir: MemoryFhir) -> None:
    _refused(writeback, fhir, _by_identifier(MRN_B))

    assert _refused(writeback, fhir, _by_identifier(MRN_B)).startswith("patient_mismatch:")


# -- the message key -----------------------------------------------------------------------------------


def test_a_key_agreeing_with_body_and_episode_is_written(writeback: WriteBack, fhir: MemoryFhir) -> None:
    event = _attendance("a-1", episode_id=EPISODE_A, patient="pa")

    result = writeback.attendance(event, topic=TOPIC, key=f"{EHR}|Patient/pa")

    assert result.outcome is Outcome.CREATED


def test_a_key_naming_another_patient_than_the_body_is_refused(
    writeback: WriteBack, fhir: MemoryFhir
) -> None:
    event = _attendance("a-1", episode_id=EPISODE_A, patient="pa")

    reason = _refused(writeback, fhir, event, key=f"{EHR}|Patient/pb")

    assert reason.startswith("key_mismatch:")
    assert "a-1" in reason


def test_a_key_naming_another_ehr_than_the_body_is_refused(writeback: WriteBack, fhir: MemoryFhir) -> None:
    event = _attendance("a-1", episode_id=EPISODE_A, patient="pa")

    assert _refused(writeback, fhir, event, key="other|Patient/pa").startswith("key_mismatch:")


def test_a_key_naming_another_patient_than_an_identifier_only_body_is_refused(
    writeback: WriteBack, fhir: MemoryFhir
) -> None:
    """The body names its patient only by identifier: the key is checked against the patient the
    identifier resolves to (the episode's)."""
    reason = _refused(writeback, fhir, _by_identifier(MRN_A), key=f"{EHR}|Patient/pb")

    assert reason.startswith("key_mismatch:")


def test_a_malformed_key_is_refused(writeback: WriteBack, fhir: MemoryFhir) -> None:
    event = _attendance("a-1", episode_id=EPISODE_A, patient="pa")

    reason = _refused(writeback, fhir, event, key="Jane Doe 1970-01-01")

    assert reason.startswith("key_invalid:")
    assert "Jane" not in reason


def test_a_duplicate_under_another_key_is_refused_not_dropped(writeback: WriteBack, fhir: MemoryFhir) -> None:
    event = _attendance("a-1", episode_id=EPISODE_A, patient="pa")
    writeback.attendance(event, topic=TOPIC, key=f"{EHR}|Patient/pa")
    writes = list(fhir.writes)

    with pytest.raises(PermanentEventError, match=r"^key_mismatch:"):
        writeback.attendance(dict(event), topic=TOPIC, key=f"{EHR}|Patient/pb")
    assert fhir.writes == writes


# -- the service: the key is the record's, checked before the EHR is asked anything ----------------------


@pytest.mark.parametrize(
    ("key", "code"),
    [
        (None, "key_missing:"),
        ("", "key_invalid:"),
        ("general|Patient/p1", "key_mismatch:"),  # another patient than the body's Patient/p0
        ("other|Patient/p0", "key_mismatch:"),  # another EHR than the body's
    ],
)
def test_the_service_refuses_a_record_whose_key_is_missing_or_disagrees(
    tmp_path: Path, httpx_mock: HTTPXMock, key: str | None, code: str
) -> None:
    event = dataclasses.replace(service_writeback._event(0), key=key)
    with Service(
        service_writeback._settings(tmp_path, 1), client_factory=service_writeback.Factory()
    ) as service:
        service_writeback._publish(service, 1)

        with pytest.raises(PermanentEventError) as raised:
            service.handle_event(event)

        assert str(raised.value).startswith(code)
        assert "evt-0" in str(raised.value)
        assert service.state.event_outcome("evt-0", ehr=service_writeback.EHR) is None
    assert httpx_mock.get_requests() == []

"""The service's tables: publish only what changed, an outbox that survives a crash, an event ledger."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from connectors.store import StateStore
from sync.state import PublishedEntry, SessionResource, SessionWrite, Staged, SyncState, content_hash


@pytest.fixture
def state(tmp_path: Path) -> SyncState:
    return SyncState(create_engine(f"sqlite:///{tmp_path / 'state.db'}"))


def _episode(episode_id: str, status: str = "active", **extra: Any) -> Staged:
    record = {"episode_id": episode_id, "status": status, "patient": {"reference": "Patient/p1"}, **extra}
    return Staged(
        kind="episode",
        record_id=episode_id,
        patient_id="p1",
        record=record,
        topic="iop.episodes.v1",
        message_key="general|Patient/p1",
        schema_name="episode",
        schema_version=1,
    )


def test_content_hash_ignores_key_order() -> None:
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})


def test_only_changed_records_are_staged(state: SyncState) -> None:
    assert len(state.stage_changes("general", [_episode("e1"), _episode("e2")])) == 2
    assert state.stage_changes("general", [_episode("e1"), _episode("e2")]) == []
    changed = state.stage_changes("general", [_episode("e1", status="finished"), _episode("e2")])
    assert [c.record_id for c in changed] == ["e1"]
    messages = state.outbox_batch()
    assert [(m.value["episode_id"], m.value["status"]) for m in messages] == [
        ("e1", "active"),
        ("e2", "active"),
        ("e1", "finished"),
    ]
    assert len({m.event_id for m in messages}) == 3


def test_outbox_survives_a_restart_until_acknowledged(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    first = SyncState(create_engine(url))
    first.stage_changes("general", [_episode("e1"), _episode("e2")])
    first.engine.dispose()  # the process dies before producing

    second = SyncState(create_engine(url))
    pending = second.outbox_batch()
    assert [m.value["episode_id"] for m in pending] == ["e1", "e2"]
    second.outbox_done([pending[0].seq])
    assert [m.value["episode_id"] for m in second.outbox_batch()] == ["e2"]
    assert second.outbox_size() == 1


def test_published_records_and_fhir_ids(state: SyncState) -> None:
    state.stage_changes("general", [_episode("e1")])
    assert state.published_record("general", "episode", "e1") == {
        "episode_id": "e1",
        "status": "active",
        "patient": {"reference": "Patient/p1"},
    }
    assert state.published_record("other-ehr", "episode", "e1") is None
    assert set(state.published_ids("general", "episode", "p1")) == {"e1"}
    assert state.episode_fhir_id("general", "e1") is None
    state.set_episode_fhir_id("general", "e1", "eoc-7")
    # a new version of the episode keeps the server id we learnt
    state.stage_changes("general", [_episode("e1", status="finished")])
    assert state.episode_fhir_id("general", "e1") == "eoc-7"


def test_ledger_and_sessions(state: SyncState) -> None:
    assert state.event_outcome("evt-1") is None
    state.record_event("evt-1", topic="iop.attendance.v1", outcome="written", detail={"ref": "Encounter/1"})
    assert state.event_outcome("evt-1") == "written"
    state.record_event("evt-1", topic="iop.attendance.v1", outcome="duplicate", detail={})
    assert state.event_outcome("evt-1") == "duplicate"

    assert state.session_resource("general", "S-1") is None
    state.put_session_resource(
        "general", "S-1", SessionResource("Encounter", "e1", "2026-01-01T10:00:00Z", "attended")
    )
    state.put_session_resource(
        "general", "S-1", SessionResource("Encounter", "e1", "2026-01-02T10:00:00Z", "cancelled")
    )
    assert state.session_resource("general", "S-1") == SessionResource(
        "Encounter", "e1", "2026-01-02T10:00:00Z", "cancelled"
    )
    assert state.session_resource("other", "S-1") is None


def test_patients_whose_gap_deadline_passed_are_due(state: SyncState) -> None:
    def due(episode_id: str, patient: str, review_after: str | None) -> Staged:
        return Staged(
            kind="episode",
            record_id=episode_id,
            patient_id=patient,
            record={
                "episode_id": episode_id,
                "patient": {"reference": f"Patient/{patient}"},
                "status": "active" if review_after else "finished",
            },
            topic="iop.episodes.v1",
            message_key=f"general|Patient/{patient}",
            schema_name="episode",
            schema_version=1,
            review_after=review_after,
        )

    state.stage_changes(
        "general", [due("a", "p1", "2026-03-10"), due("b", "p2", "2026-03-20"), due("c", "p3", None)]
    )
    assert state.patients_due("general", "2026-03-09") == []
    assert state.patients_due("general", "2026-03-10") == ["p1"]
    assert state.patients_due("general", "2026-04-01") == ["p1", "p2"]
    assert state.patients_due("other", "2026-04-01") == []
    # the episode finished by time: re-published without a deadline, the patient is no longer due
    state.stage_changes("general", [due("a", "p1", None)])
    assert state.patients_due("general", "2026-04-01") == ["p2"]


def test_published_entry_holds_the_record_and_its_ehr_id(state: SyncState) -> None:
    state.stage_changes("general", [_episode("e1")])
    entry = state.published_entry("general", "episode", "e1")
    assert entry is not None
    assert (entry.record["episode_id"], entry.fhir_id) == ("e1", None)
    state.set_episode_fhir_id("general", "e1", "eoc-7")
    assert state.published_entry("general", "episode", "e1") == PublishedEntry(entry.record, "eoc-7")
    assert state.published_entry("general", "referral", "e1") is None


def test_an_events_ledger_entry_and_session_row_are_written_together(state: SyncState) -> None:
    row = SessionWrite(
        "general", "S-1", SessionResource("Encounter", "enc-1", "2026-03-02T18:00:00Z", "attended")
    )
    with pytest.raises(TypeError):  # the ledger entry cannot be written: neither is the session's row
        state.record_event("evt-1", topic="t", outcome="created", detail={"bad": {1, 2}}, session=row)
    assert state.session_resource("general", "S-1") is None
    assert state.event_outcome("evt-1") is None

    state.record_event("evt-1", topic="t", outcome="created", detail={}, session=row)
    assert state.session_resource("general", "S-1") == row.resource
    assert state.event_outcome("evt-1") == "created"


def test_write_back_workers_and_a_cycle_share_the_store_without_locking_errors(tmp_path: Path) -> None:
    """The service's own SQLite set-up (WAL, busy timeout): eight workers record events while the
    cycle stages changes (a read-then-write transaction) on the same database."""
    with StateStore(f"sqlite:///{tmp_path / 'state.db'}") as store:
        shared = SyncState(store.engine)
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                for i in range(40):
                    event_id = f"evt-{n}-{i}"
                    assert shared.event_outcome(event_id) is None
                    resource = SessionResource(
                        "Encounter", f"enc-{n}-{i}", "2026-03-02T18:00:00Z", "attended"
                    )
                    shared.record_event(
                        event_id,
                        topic="t",
                        outcome="created",
                        detail={"references": [f"Encounter/enc-{n}-{i}"]},
                        session=SessionWrite("general", f"S-{n}-{i}", resource),
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for version in range(20):  # meanwhile, the cycle
            shared.stage_changes("general", [_episode(f"e{k}", status=f"s{version}") for k in range(5)])
        for thread in threads:
            thread.join()

        assert errors == []
        assert all(shared.event_outcome(f"evt-{n}-{i}") == "created" for n in range(8) for i in range(40))
        assert shared.session_resource("general", "S-7-39") == SessionResource(
            "Encounter", "enc-7-39", "2026-03-02T18:00:00Z", "attended"
        )
        assert shared.outbox_size() == 100

"""The state store on a real PostgreSQL server (the multi-instance option): the same behaviour as on
SQLite — cursors move with the replica, the newest version wins even between concurrent writers, the
patient index, entered-in-error and deletions — plus the service's tables (published, outbox, ledger,
sessions) and the dead-letter replay table. Each test gets a database of its own."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, insert, inspect, select
from sqlalchemy.exc import DBAPIError

from connectors.store import Deletion, Increment, StateStore, create_tables, version_token
from sync.commands.dlq import replayed
from sync.state import SessionResource, SessionWrite, Staged, SyncState

pytestmark = pytest.mark.integration

EHR = "general"
T0 = datetime(2026, 3, 1, tzinfo=UTC)
_EXAMPLES = itertools.count()


def _enc(rid: str, version: str | int | None, updated: str | None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if version is not None:
        meta["versionId"] = version
    if updated is not None:
        meta["lastUpdated"] = updated
    resource: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": rid,
        "subject": {"reference": "Patient/p1"},
    }
    if meta:
        resource["meta"] = meta
    resource.update(extra)
    return resource


def _at(minutes: int) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat()


@pytest.fixture
def store(postgres_database: str) -> Iterator[StateStore]:
    with StateStore(postgres_database) as s:
        yield s


@pytest.fixture
def state(store: StateStore) -> SyncState:
    return SyncState(store.engine)


def _run_together(*jobs: Callable[[], None]) -> None:
    """Run the jobs in threads released at the same moment; re-raise the first failure."""
    barrier = threading.Barrier(len(jobs))
    failures: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            barrier.wait()
            job()
        except BaseException as exc:  # handed to the test thread below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


# -- connectors' store ---------------------------------------------------------------------------


def test_the_tables_are_created_on_postgresql(store: StateStore) -> None:
    assert store.dialect == "postgresql"
    tables = set(inspect(store.engine).get_table_names())
    assert {"connector_cursors", "connector_replica", "connector_panel"} <= tables
    types = {c["name"]: c["type"] for c in inspect(store.engine).get_columns("connector_replica")}
    assert type(types["pulled_at"]).__name__ == "TIMESTAMP"
    assert types["pulled_at"].timezone  # type: ignore[attr-defined]
    assert type(types["deleted"]).__name__ == "BOOLEAN"


def test_cursor_and_replica_move_together(store: StateStore) -> None:
    assert store.get_cursor(EHR, "Encounter") is None
    store.commit_increment(
        EHR, "Encounter", [_enc("e1", "1", "2026-03-01T10:00:00Z")], "2026-03-01T10:00:00Z"
    )
    store.commit_increment(EHR, "Encounter", [], "2026-03-02T10:00:00Z")
    assert store.get_cursor(EHR, "Encounter") == "2026-03-02T10:00:00Z"
    assert store.cursors(EHR) == {"Encounter": "2026-03-02T10:00:00Z"}
    assert store.get_cursor("other-ehr", "Encounter") is None
    row = store.replica_row(EHR, "Encounter", "e1")
    assert row is not None
    assert (row.version_id, row.patient_id, row.deleted) == ("1", "p1", False)
    assert row.resource == _enc("e1", "1", "2026-03-01T10:00:00Z")


def test_failed_transaction_leaves_neither_cursor_nor_replica(store: StateStore) -> None:
    def broken() -> Iterator[dict[str, Any]]:
        yield _enc("e1", "1", "2026-03-01T10:00:00Z")
        raise RuntimeError("killed mid-commit")

    with pytest.raises(RuntimeError):
        store.commit_increments(
            EHR,
            [
                Increment("Patient", [{"resourceType": "Patient", "id": "p1"}], "2026-03-01T09:00:00Z"),
                Increment("Encounter", broken(), "2026-03-01T10:00:00Z"),
            ],
            panel_added=["p1"],
        )
    assert store.cursors(EHR) == {}
    assert store.replica_count(EHR) == 0
    assert store.panel_known(EHR, ["p1"]) == set()


def test_newer_version_replaces_older_never_does(store: StateStore) -> None:
    store.commit_increment(
        EHR, "Encounter", [_enc("e1", "2", "2026-03-02T10:00:00Z", status="in-progress")], None
    )
    store.commit_increment(
        EHR, "Encounter", [_enc("e1", "1", "2026-03-01T10:00:00Z", status="planned")], None
    )
    row = store.replica_row(EHR, "Encounter", "e1")
    assert row is not None
    assert (row.version_id, row.status) == ("2", "in-progress")
    store.commit_increment(
        EHR, "Encounter", [_enc("e1", "3", "2026-03-03T10:00:00Z", status="finished")], None
    )
    row = store.replica_row(EHR, "Encounter", "e1")
    assert row is not None
    assert (row.version_id, row.status) == ("3", "finished")


def test_offsets_compare_as_instants_and_numeric_versions_break_ties(store: StateStore) -> None:
    store.commit_increment(EHR, "Encounter", [_enc("e1", "5", "2026-03-01T10:00:00Z")], None)
    store.commit_increment(EHR, "Encounter", [_enc("e1", "4", "2026-03-01T11:00:00+02:00")], None)
    assert store.seen_versions(EHR, "Encounter", ["e1"]) == {"e1": "v:5"}
    store.commit_increment(EHR, "Encounter", [_enc("e2", "9", "2026-03-01T10:00:00Z")], None)
    store.commit_increment(EHR, "Encounter", [_enc("e2", "10", "2026-03-01T10:00:00Z")], None)
    assert store.seen_versions(EHR, "Encounter", ["e2"]) == {"e2": "v:10"}


def test_same_id_twice_in_one_batch_keeps_the_newest(store: StateStore) -> None:
    # PostgreSQL refuses an INSERT … ON CONFLICT that touches one row twice: the store must fold them.
    batch = [_enc("e1", "2", "2026-03-02T00:00:00Z"), _enc("e1", "1", "2026-03-01T00:00:00Z")]
    store.commit_increment(EHR, "Encounter", batch, None)
    assert store.seen_versions(EHR, "Encounter", ["e1", "missing"]) == {"e1": "v:2"}


def test_without_meta_the_newest_pull_wins(store: StateStore) -> None:
    store.commit_increment(EHR, "Encounter", [_enc("e1", None, None, status="planned")], None)
    store.commit_increment(EHR, "Encounter", [_enc("e1", None, None, status="finished")], None)
    row = store.replica_row(EHR, "Encounter", "e1")
    assert row is not None
    assert row.status == "finished"
    assert store.seen_versions(EHR, "Encounter", ["e1"]) == {
        "e1": version_token(_enc("e1", None, None, status="finished"))
    }


def test_entered_in_error_and_deletions_are_recorded(store: StateStore) -> None:
    store.commit_increment(
        EHR,
        "Encounter",
        [
            _enc("e1", "1", "2026-03-01T10:00:00Z"),
            _enc("e2", "1", "2026-03-01T10:00:00Z"),
            _enc("e3", "2", "2026-03-01T10:00:00Z", status="entered-in-error "),
        ],
        None,
    )
    store.commit_increment(
        EHR, "Encounter", [], None, deletions=[Deletion("Encounter", "e2", "2026-03-02T10:00:00Z")]
    )
    erroneous = store.replica_row(EHR, "Encounter", "e3")
    deleted = store.replica_row(EHR, "Encounter", "e2")
    assert erroneous is not None
    assert erroneous.status == "entered-in-error"
    assert deleted is not None
    assert deleted.deleted is True
    assert deleted.patient_id == "p1"
    assert {r["id"] for r in store.patient_resources(EHR, "p1")} == {"e1", "e3"}
    assert {r["id"] for r in store.patient_resources(EHR, "p1", include_deleted=True)} == {"e1", "e2", "e3"}
    store.commit_increment(EHR, "Encounter", [_enc("e2", "1", "2026-03-01T10:00:00Z")], None)
    again = store.replica_row(EHR, "Encounter", "e2")
    assert again is not None
    assert again.deleted is True
    # A deletion of a resource never seen is kept as a row of its own.
    store.commit_increment(EHR, "Encounter", [], None, deletions=[Deletion("Encounter", "gone", None)])
    unseen = store.replica_row(EHR, "Encounter", "gone")
    assert unseen is not None
    assert (unseen.deleted, unseen.resource, unseen.patient_id) == (True, None, None)


def test_patient_index_and_touched_with_time_zones(store: StateStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": "p1"},
        {"resourceType": "Coverage", "id": "c1", "beneficiary": {"reference": "Patient/p1"}},
        {"resourceType": "Task", "id": "t1", "for": {"reference": "https://ehr.example/r4/Patient/p2"}},
        {
            "resourceType": "Appointment",
            "id": "a1",
            "participant": [
                {"actor": {"reference": "Practitioner/d1"}},
                {"actor": {"reference": "Patient/p2"}},
            ],
        },
        {"resourceType": "Organization", "id": "o1"},
    ]
    for resource in resources:
        store.commit_increment(EHR, resource["resourceType"], [resource], None)
    assert [r["id"] for r in store.patient_resources(EHR, "p1")] == ["c1", "p1"]
    assert sorted(r["id"] for r in store.patient_resources(EHR, "p2")) == ["a1", "t1"]
    assert store.patient_resources("other", "p1") == []
    assert store.patients_touched(EHR, before) == ["p1", "p2"]
    # The same instant in another zone: timestamps with time zone compare as instants.
    assert store.patients_touched(EHR, before.astimezone(timezone(timedelta(hours=-5)))) == ["p1", "p2"]
    assert store.patients_touched(EHR, datetime.now(UTC) + timedelta(hours=1)) == []


def test_panel_membership(store: StateStore) -> None:
    store.commit_increments(EHR, [], panel_added=["p1", "p2", "p1"])
    assert store.panel_known(EHR, ["p1", "p2", "p3"]) == {"p1", "p2"}
    store.commit_increments(EHR, [], panel_added=["p2"], panel_removed=["p1"])
    assert store.panel_known(EHR, ["p1", "p2", "p3"]) == {"p2"}
    assert store.panel_known("other", ["p2"]) == set()


def test_many_rows_are_written_and_read_in_batches(store: StateStore) -> None:
    ids = [f"e{i}" for i in range(1500)]
    offered = store.commit_increment(EHR, "Encounter", (_enc(i, "1", _at(1)) for i in ids), None)
    assert offered == 1500
    assert store.replica_count(EHR, "Encounter") == 1500
    seen = store.seen_versions(EHR, "Encounter", [*ids, "missing"])
    assert len(seen) == 1500
    assert set(seen.values()) == {"v:1"}


def test_long_ids_versions_and_unicode_survive(store: StateStore) -> None:
    # Epic ids exceed FHIR's 64 characters; some servers use long opaque version ids; text is Unicode.
    long_id = "eVd" + "x" * 250
    long_version = "W/" + "a" * 150
    patient = "P" * 200
    resource = {
        "resourceType": "Encounter",
        "id": long_id,
        "meta": {"versionId": long_version, "lastUpdated": "2026-03-01T10:00:00.123456+05:30"},
        "subject": {"reference": f"Patient/{patient}"},
        "status": "finished",
        "serviceType": {"text": "Thérapie de groupe — 集団療法"},
    }
    store.commit_increment("an-ehr-with-a-long-name-" + "n" * 150, "Encounter", [resource], "c" * 200)
    row = store.replica_row("an-ehr-with-a-long-name-" + "n" * 150, "Encounter", long_id)
    assert row is not None
    assert (row.version_id, row.patient_id, row.resource) == (long_version, patient, resource)
    assert store.get_cursor("an-ehr-with-a-long-name-" + "n" * 150, "Encounter") == "c" * 200


def test_two_pulls_racing_keep_the_newest_version(postgres_database: str) -> None:
    # Two service instances (two engines) write overlapping resources at once, in opposite orders and
    # across several batches; each id must end at its newest version, whoever committed last.
    ids = [f"e{i}" for i in range(900)]
    with StateStore(postgres_database) as first, StateStore(postgres_database) as second:

        def old_forwards() -> None:
            for _ in range(3):
                first.commit_increment(EHR, "Encounter", [_enc(i, "1", _at(1)) for i in ids], _at(1))

        def new_backwards() -> None:
            for _ in range(3):
                second.commit_increment(
                    EHR, "Encounter", [_enc(i, "2", _at(2)) for i in reversed(ids)], _at(2)
                )

        _run_together(old_forwards, new_backwards)
        assert set(first.seen_versions(EHR, "Encounter", ids).values()) == {"v:2"}
        assert first.replica_count(EHR, "Encounter") == len(ids)


def test_instances_starting_together_create_the_schema_once(postgres_database: str) -> None:
    stores: list[StateStore] = []

    def start() -> None:
        store = StateStore(postgres_database)
        stores.append(store)
        SyncState(store.engine)
        create_tables(store.engine, replayed.metadata)  # as `iop-bridge dlq` does

    try:
        _run_together(start, start, start)
    finally:
        for store in stores:
            store.close()
    with StateStore(postgres_database) as store:
        tables = set(inspect(store.engine).get_table_names())
    assert {"connector_replica", "sync_outbox", "sync_ledger_v2", "sync_dlq_replayed"} <= tables


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.sampled_from(["e1", "e2", "e3"]), st.integers(1, 30), st.sampled_from([0, -11, 5, 14])),
        min_size=1,
        max_size=20,
    ),
    st.integers(min_value=1, max_value=5),
)
def test_any_arrival_order_leaves_the_latest_version(
    store: StateStore, arrivals: list[tuple[str, int, int]], batch: int
) -> None:
    # The guard compares rank strings inside PostgreSQL, under the database's collation (ICU en-US
    # here, as on most production servers): the order must still be instant, then numeric version.
    ehr = f"prop-{next(_EXAMPLES)}"  # the database is the test's, shared by its examples
    for i in range(0, len(arrivals), batch):
        resources = [
            _enc(
                rid,
                str(v),
                (T0 + timedelta(seconds=v)).astimezone(timezone(timedelta(hours=zone))).isoformat(),
            )
            for rid, v, zone in arrivals[i : i + batch]
        ]
        store.commit_increment(ehr, "Encounter", resources, None)
    latest = {rid: f"v:{max(v for r, v, _ in arrivals if r == rid)}" for rid, _, _ in arrivals}
    assert store.seen_versions(ehr, "Encounter", ["e1", "e2", "e3"]) == latest


# -- the service's tables ------------------------------------------------------------------------


def _episode(
    episode_id: str, status: str = "active", patient: str = "p1", review_after: str | None = None
) -> Staged:
    return Staged(
        kind="episode",
        record_id=episode_id,
        patient_id=patient,
        record={"episode_id": episode_id, "status": status, "patient": {"reference": f"Patient/{patient}"}},
        topic="iop.episodes.v1",
        message_key=f"general|Patient/{patient}",
        schema_name="episode",
        schema_version=1,
        review_after=review_after,
    )


def test_only_changed_records_are_staged_in_order(state: SyncState) -> None:
    assert len(state.stage_changes(EHR, [_episode("e1"), _episode("e2")])) == 2
    assert state.stage_changes(EHR, [_episode("e1"), _episode("e2")]) == []
    changed = state.stage_changes(EHR, [_episode("e1", status="finished"), _episode("e2")])
    assert [c.record_id for c in changed] == ["e1"]
    messages = state.outbox_batch()
    assert [(m.value["episode_id"], m.value["status"]) for m in messages] == [
        ("e1", "active"),
        ("e2", "active"),
        ("e1", "finished"),
    ]
    assert [m.seq for m in messages] == sorted(m.seq for m in messages)
    assert len({m.event_id for m in messages}) == 3
    assert [m.value["episode_id"] for m in state.outbox_batch(limit=1)] == ["e1"]


def test_outbox_survives_a_restart_until_acknowledged(postgres_database: str) -> None:
    first = SyncState(create_engine(postgres_database))
    first.stage_changes(EHR, [_episode("e1"), _episode("e2")])
    first.engine.dispose()
    second = SyncState(create_engine(postgres_database))
    try:
        pending = second.outbox_batch()
        assert [m.value["episode_id"] for m in pending] == ["e1", "e2"]
        second.outbox_done([pending[0].seq])
        second.outbox_done([])
        assert [m.value["episode_id"] for m in second.outbox_batch()] == ["e2"]
        assert second.outbox_size() == 1
    finally:
        second.engine.dispose()


def test_published_records_and_fhir_ids(state: SyncState) -> None:
    state.stage_changes(EHR, [_episode("e1")])
    assert state.published_record(EHR, "episode", "e1") == {
        "episode_id": "e1",
        "status": "active",
        "patient": {"reference": "Patient/p1"},
    }
    assert state.published_record("other-ehr", "episode", "e1") is None
    assert set(state.published_ids(EHR, "episode", "p1")) == {"e1"}
    assert state.episode_fhir_id(EHR, "e1") is None
    state.set_episode_fhir_id(EHR, "e1", "eoc-7")
    state.stage_changes(EHR, [_episode("e1", status="finished")])
    assert state.episode_fhir_id(EHR, "e1") == "eoc-7"


def test_ledger_and_sessions_upsert(state: SyncState) -> None:
    assert state.event_outcome("evt-1") is None
    state.record_event("evt-1", topic="iop.attendance.v1", outcome="written", detail={"ref": "Encounter/1"})
    state.record_event("evt-1", topic="iop.attendance.v1", outcome="duplicate", detail={})
    assert state.event_outcome("evt-1") == "duplicate"
    # Event ids are the producer's: a long one is kept whole.
    long_event = "program-x:" + "9" * 300
    state.record_event(long_event, topic="iop.discharges.v1", outcome="written", detail={"n": 1})
    assert state.event_outcome(long_event) == "written"

    assert state.session_resource(EHR, "S-1") is None
    state.put_session_resource(
        EHR, "S-1", SessionResource("Encounter", "e1", "2026-01-01T10:00:00Z", "attended")
    )
    state.put_session_resource(
        EHR, "S-1", SessionResource("Encounter", "e1", "2026-01-02T10:00:00Z", "cancelled")
    )
    assert state.session_resource(EHR, "S-1") == SessionResource(
        "Encounter", "e1", "2026-01-02T10:00:00Z", "cancelled"
    )
    assert state.session_resource("other", "S-1") is None


def test_write_back_workers_record_events_at_once(state: SyncState) -> None:
    """The write-back consumer's workers: each event's session row and ledger entry in one transaction,
    several workers at once, the episode and its EpisodeOfCare id read together."""
    state.stage_changes(EHR, [_episode("e1")])
    state.set_episode_fhir_id(EHR, "e1", "eoc-1")
    entry = state.published_entry(EHR, "episode", "e1")
    assert entry is not None
    assert (entry.record["episode_id"], entry.fhir_id) == ("e1", "eoc-1")

    def worker(n: int) -> Callable[[], None]:
        def record() -> None:
            for i in range(20):
                resource = SessionResource("Encounter", f"enc-{n}-{i}", "2026-01-01T10:00:00Z", "attended")
                state.record_event(
                    f"evt-{n}-{i}",
                    topic="iop.attendance.v1",
                    outcome="created",
                    detail={},
                    session=SessionWrite(EHR, f"S-{n}-{i}", resource),
                )

        return record

    _run_together(*(worker(n) for n in range(6)))
    assert all(state.event_outcome(f"evt-{n}-{i}") == "created" for n in range(6) for i in range(20))
    assert state.session_resource(EHR, "S-5-19") == SessionResource(
        "Encounter", "enc-5-19", "2026-01-01T10:00:00Z", "attended"
    )

    broken = SessionWrite(EHR, "S-x", SessionResource("Encounter", "x", "2026-01-01T10:00:00Z", "attended"))
    with pytest.raises(TypeError):  # no ledger entry: no session row either
        state.record_event("evt-x", topic="t", outcome="created", detail={"bad": {1}}, session=broken)
    assert state.session_resource(EHR, "S-x") is None


def test_patients_whose_gap_deadline_passed_are_due(state: SyncState) -> None:
    state.stage_changes(
        EHR,
        [
            _episode("a", patient="p1", review_after="2026-03-10"),
            _episode("b", patient="p2", review_after="2026-03-20"),
            _episode("c", status="finished", patient="p3"),
        ],
    )
    assert state.patients_due(EHR, "2026-03-09") == []
    assert state.patients_due(EHR, "2026-03-10") == ["p1"]
    assert state.patients_due(EHR, "2026-04-01") == ["p1", "p2"]
    assert state.patients_due("other", "2026-04-01") == []
    state.stage_changes(EHR, [_episode("a", status="finished", patient="p1")])
    assert state.patients_due(EHR, "2026-04-01") == ["p2"]


def test_dlq_replayed_table_holds_kafka_offsets(store: StateStore) -> None:
    create_tables(store.engine, replayed.metadata)
    create_tables(store.engine, replayed.metadata)  # idempotent: every `iop-bridge dlq` run calls it
    # Kafka offsets are 64-bit: a long-lived topic passes 2**31.
    big = 2**40 + 7
    with store.engine.begin() as conn:
        conn.execute(
            insert(replayed).values(topic="iop.deadletter.v1", partition=0, offset=big, replayed_at=T0)
        )
    with store.engine.connect() as conn:
        row = conn.execute(select(replayed)).one()
    assert (row.topic, row.partition, row.offset) == ("iop.deadletter.v1", 0, big)
    assert row.replayed_at == T0


def test_a_failing_statement_does_not_echo_the_resource(store: StateStore) -> None:
    # PostgreSQL refuses NUL in text (SQLite does not): the error must name no patient data, since the
    # CLI prints it and the service logs it.
    resource = _enc(
        "e1", "1", _at(1), status="fini\x00shed", serviceType={"text": "Jane Roe, born 1970-01-01"}
    )
    with pytest.raises(DBAPIError) as caught:
        store.commit_increment(EHR, "Encounter", [resource], _at(1))
    assert "Jane Roe" not in str(caught.value)
    assert "parameters hidden" in str(caught.value)
    assert store.cursors(EHR) == {}


def test_a_missing_driver_is_a_clear_configuration_error() -> None:
    # pg8000 is not installed: the message says what to install instead of an ImportError trace.
    with pytest.raises(
        ValueError, match=r"needs its driver \(pg8000\): pip install 'iop-bridge\[postgres\]'"
    ):
        StateStore("postgresql+pg8000://postgres@127.0.0.1:1/nowhere")

"""State store: cursors, the latest-version replica, patient index, entered-in-error and deletions."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.engine import make_url

from connectors.store import (
    Deletion,
    Increment,
    StateStore,
    cursor_upsert,
    patient_of,
    rank_of,
    replica_upsert,
    version_token,
)

EHR = "general"


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


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(f"sqlite:///{tmp_path / 'nested' / 'dir' / 'state.db'}") as s:
        yield s


def test_creates_parent_dirs_and_uses_wal(store: StateStore, tmp_path: Path) -> None:
    assert (tmp_path / "nested" / "dir" / "state.db").exists()
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000


def test_rejects_unknown_database() -> None:
    with pytest.raises(ValueError, match="unsupported state store"):
        StateStore("mysql://x/y")


def test_cursor_and_replica_move_together(store: StateStore) -> None:
    assert store.get_cursor(EHR, "Encounter") is None
    store.commit_increment(
        EHR, "Encounter", [_enc("e1", "1", "2026-03-01T10:00:00Z")], "2026-03-01T10:00:00Z"
    )
    assert store.get_cursor(EHR, "Encounter") == "2026-03-01T10:00:00Z"
    assert store.cursors(EHR) == {"Encounter": "2026-03-01T10:00:00Z"}
    assert store.get_cursor("other-ehr", "Encounter") is None
    row = store.replica_row(EHR, "Encounter", "e1")
    assert row is not None
    assert row.version_id == "1"
    assert row.patient_id == "p1"


def test_failed_transaction_leaves_neither_cursor_nor_replica(store: StateStore) -> None:
    def broken() -> Any:
        yield _enc("e1", "1", "2026-03-01T10:00:00Z")
        raise RuntimeError("killed mid-commit")

    with pytest.raises(RuntimeError):
        store.commit_increments(
            EHR,
            [
                Increment("Patient", [{"resourceType": "Patient", "id": "p1"}], "2026-03-01T09:00:00Z"),
                Increment("Encounter", broken(), "2026-03-01T10:00:00Z"),
            ],
        )
    assert store.cursors(EHR) == {}
    assert store.replica_count(EHR) == 0


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
    # 11:00+02:00 is 09:00Z: older than 10:00Z although it sorts later as text.
    store.commit_increment(EHR, "Encounter", [_enc("e1", "5", "2026-03-01T10:00:00Z")], None)
    store.commit_increment(EHR, "Encounter", [_enc("e1", "4", "2026-03-01T11:00:00+02:00")], None)
    assert store.seen_versions(EHR, "Encounter", ["e1"]) == {"e1": "v:5"}
    # Same instant: version 10 is newer than 9 (numerically, not as text).
    store.commit_increment(EHR, "Encounter", [_enc("e2", "9", "2026-03-01T10:00:00Z")], None)
    store.commit_increment(EHR, "Encounter", [_enc("e2", "10", "2026-03-01T10:00:00Z")], None)
    assert store.seen_versions(EHR, "Encounter", ["e2"]) == {"e2": "v:10"}


def test_same_id_twice_in_one_batch_keeps_the_newest(store: StateStore) -> None:
    batch = [_enc("e1", "2", "2026-03-02T00:00:00Z"), _enc("e1", "1", "2026-03-01T00:00:00Z")]
    store.commit_increment(EHR, "Encounter", batch, None)
    assert store.seen_versions(EHR, "Encounter", ["e1", "missing"]) == {"e1": "v:2"}


def test_without_meta_the_newest_pull_wins(store: StateStore) -> None:
    store.commit_increment(EHR, "Encounter", [_enc("e1", None, None, status="planned")], None)
    store.commit_increment(EHR, "Encounter", [_enc("e1", None, None, status="finished")], None)
    row = store.replica_row(EHR, "Encounter", "e1")
    assert row is not None
    assert row.status == "finished"
    # Without versionId or lastUpdated the content identifies the version.
    assert store.seen_versions(EHR, "Encounter", ["e1"]) == {
        "e1": version_token(_enc("e1", None, None, status="finished"))
    }
    assert version_token(_enc("e1", None, None, status="finished")).startswith("h:")
    assert version_token(_enc("e1", None, None, status="finished")) != version_token(_enc("e1", None, None))
    assert version_token(_enc("e1", None, "2026-03-01T10:00:00Z")) == "t:2026-03-01T10:00:00Z"


def test_entered_in_error_and_deletions_are_recorded(store: StateStore) -> None:
    store.commit_increment(
        EHR,
        "Encounter",
        [
            _enc("e1", "1", "2026-03-01T10:00:00Z"),
            _enc("e2", "1", "2026-03-01T10:00:00Z"),
            _enc("e3", "2", "2026-03-01T10:00:00Z", status="entered-in-error"),
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
    assert deleted.deleted
    assert deleted.patient_id == "p1"  # the deletion keeps the patient link and last content
    visible = {r["id"] for r in store.patient_resources(EHR, "p1")}
    assert visible == {"e1", "e3"}
    assert {r["id"] for r in store.patient_resources(EHR, "p1", include_deleted=True)} == {"e1", "e2", "e3"}
    # An older version arriving after the deletion does not resurrect it.
    store.commit_increment(EHR, "Encounter", [_enc("e2", "1", "2026-03-01T10:00:00Z")], None)
    again = store.replica_row(EHR, "Encounter", "e2")
    assert again is not None
    assert again.deleted


def test_patient_index_and_touched(store: StateStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
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
    assert store.patients_touched(EHR, datetime.now(UTC) + timedelta(hours=1)) == []
    with pytest.raises(ValueError, match="timezone-aware"):
        store.patients_touched(EHR, datetime(2026, 1, 1))  # naive on purpose


def test_resource_without_id_is_refused(store: StateStore) -> None:
    with pytest.raises(ValueError, match="without an id"):
        store.commit_increment(EHR, "Encounter", [{"resourceType": "Encounter"}], None)


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ({"resourceType": "Patient", "id": "p9"}, "p9"),
        ({"resourceType": "Encounter", "subject": {"reference": "Patient/p9"}}, "p9"),
        ({"resourceType": "Encounter", "subject": {"reference": "Patient/p9/_history/3"}}, "p9"),
        ({"resourceType": "EpisodeOfCare", "patient": {"reference": "Patient/p9"}}, "p9"),
        ({"resourceType": "Encounter", "subject": {"reference": "Group/g1"}}, None),
        ({"resourceType": "Encounter", "subject": {"display": "someone"}}, None),
        ({"resourceType": "Location", "id": "l1"}, None),
    ],
)
def test_patient_of(resource: dict[str, Any], expected: str | None) -> None:
    assert patient_of(resource) == expected


@settings(max_examples=50, deadline=None)
@given(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
    st.integers(min_value=-14 * 60, max_value=14 * 60),
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=1, max_value=10**6),
)
def test_rank_orders_like_instant_then_version(
    moment: datetime, offset: int, version: int, step: int
) -> None:
    shown = moment.astimezone(timezone(timedelta(minutes=offset))).isoformat()
    later = (moment + timedelta(microseconds=step)).isoformat()
    assert rank_of(version, shown) < rank_of(version, later)
    assert rank_of(version, shown) < rank_of(version + step, shown)
    assert rank_of(version, shown) == rank_of(version, moment.isoformat())
    assert rank_of(version, "not a date") == ""


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["e1", "e2", "e3"]), st.integers(1, 30)), min_size=1, max_size=25),
    st.integers(min_value=1, max_value=5),
)
def test_any_arrival_order_leaves_the_latest_version(
    tmp_path_factory: pytest.TempPathFactory, arrivals: list[tuple[str, int]], batch: int
) -> None:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    with StateStore(f"sqlite:///{tmp_path_factory.mktemp('prop') / 'state.db'}") as store:
        for i in range(0, len(arrivals), batch):
            resources = [
                _enc(rid, str(v), (start + timedelta(minutes=v)).isoformat())
                for rid, v in arrivals[i : i + batch]
            ]
            store.commit_increment(EHR, "Encounter", resources, None)
        latest = {rid: f"v:{max(v for r, v in arrivals if r == rid)}" for rid, _ in arrivals}
        assert store.seen_versions(EHR, "Encounter", ["e1", "e2", "e3"]) == latest


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_upserts_compile_for_both_databases(dialect: str) -> None:
    # PostgreSQL itself runs in no unit test (left for the integration tier): the statements must at
    # least be the guarded upserts on both dialects.
    engine_dialect = make_url(f"{dialect}://").get_dialect()()
    replica_sql = " ".join(str(replica_upsert(dialect).compile(dialect=engine_dialect)).split())
    assert "ON CONFLICT (ehr, resource_type, id) DO UPDATE SET" in replica_sql
    assert "WHERE excluded.rank = " in replica_sql
    assert "excluded.rank >= connector_replica.rank" in replica_sql
    cursor_sql = " ".join(str(cursor_upsert(dialect).compile(dialect=engine_dialect)).split())
    assert "ON CONFLICT (ehr, resource_type) DO UPDATE SET value = excluded.value" in cursor_sql
    with pytest.raises(ValueError, match="unsupported"):
        replica_upsert("mysql")


def test_resources_of_type_gives_the_shared_context(tmp_path: Path) -> None:
    with StateStore(f"sqlite:///{tmp_path / 'shared.db'}") as store:
        location = {"resourceType": "Location", "id": "l1", "meta": {"versionId": "1"}}
        organization = {"resourceType": "Organization", "id": "o1", "meta": {"versionId": "1"}}
        patient = {"resourceType": "Patient", "id": "p1", "meta": {"versionId": "1"}}
        store.commit_increment("general", "Location", [location], "2026-01-01T00:00:00Z")
        store.commit_increment("general", "Organization", [organization], "2026-01-01T00:00:00Z")
        store.commit_increment("general", "Patient", [patient], "2026-01-01T00:00:00Z")
        shared = store.resources_of_type("general", ("Location", "Organization"))
        assert [(r["resourceType"], r["id"]) for r in shared] == [("Location", "l1"), ("Organization", "o1")]
        assert store.resources_of_type("other", ("Location",)) == []

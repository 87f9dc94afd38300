"""The replica feed: rows go in while the pull runs, but become visible only with the commit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import connectors.store
from connectors.replica_feed import ReplicaFeed
from connectors.store import StateStore

STAMP = "2026-03-01T10:00:00.000Z"


def _lines(kind: str, ids: range) -> list[bytes]:
    return [
        orjson.dumps(
            {"resourceType": kind, "id": f"{kind[0]}{i}", "meta": {"versionId": "1", "lastUpdated": STAMP}}
        )
        for i in ids
    ]


class _Files:
    """Stands for the run's published output (what a store the thread cannot share reads back)."""

    def __init__(self, by_type: dict[str, list[bytes]]) -> None:
        self.by_type = by_type
        self.read_types: list[str] = []

    def read(self, resource_type: str) -> Iterator[dict[str, Any]]:
        self.read_types.append(resource_type)
        for line in self.by_type.get(resource_type, []):
            yield orjson.loads(line)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(f"sqlite:///{tmp_path / 'state.db'}") as s:
        yield s


def test_a_large_pull_streams_rows_that_stay_invisible_until_finish(store: StateStore) -> None:
    feed = ReplicaFeed(store, "ehr", stream_after=100)
    for start in range(0, 1000, 250):
        feed.add("Encounter", _lines("Encounter", range(start, start + 250)))
    assert feed.streaming
    assert store.replica_count("ehr") == 0  # written inside the open transaction, not committed
    assert store.get_cursor("ehr", "Encounter") is None
    feed.finish(_Files({}), {"Encounter": STAMP, "Patient": None})
    assert store.replica_count("ehr") == 1000
    assert store.get_cursor("ehr", "Encounter") == STAMP
    assert store.get_cursor("ehr", "Patient") is None


def test_a_small_pull_is_written_at_finish_in_one_transaction(store: StateStore) -> None:
    feed = ReplicaFeed(store, "ehr", stream_after=2000)
    feed.add("Patient", _lines("Patient", range(3)))
    feed.add("Encounter", _lines("Encounter", range(5)))
    assert not feed.streaming
    assert store.replica_count("ehr") == 0
    feed.finish(_Files({}), {"Encounter": STAMP, "Patient": STAMP}, panel_added=["p1"])
    assert store.replica_count("ehr") == 8
    assert store.cursors("ehr") == {"Encounter": STAMP, "Patient": STAMP}
    assert store.panel_known("ehr", ["p1", "p2"]) == {"p1"}


def test_abort_rolls_back_and_leaves_the_store_usable(store: StateStore) -> None:
    feed = ReplicaFeed(store, "ehr", stream_after=0)
    feed.add("Encounter", _lines("Encounter", range(300)))
    assert feed.streaming
    feed.abort()
    assert store.replica_count("ehr") == 0
    assert store.get_cursor("ehr", "Encounter") is None
    # The write lock was released with the rollback: the next pull commits.
    again = ReplicaFeed(store, "ehr", stream_after=0)
    again.add("Encounter", _lines("Encounter", range(10)))
    again.finish(_Files({}), {"Encounter": STAMP})
    assert store.replica_count("ehr") == 10


def test_a_failure_in_the_thread_reaches_the_caller_and_commits_nothing(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = connectors.store._row
    calls = [0]

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 500:
            raise ValueError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(connectors.store, "_row", broken)
    feed = ReplicaFeed(store, "ehr", stream_after=0)

    def pull_everything() -> None:
        for start in range(0, 5000, 250):
            feed.add("Encounter", _lines("Encounter", range(start, start + 250)))
        feed.finish(_Files({}), {"Encounter": STAMP})

    with pytest.raises(ValueError, match="disk full"):
        pull_everything()
    feed.abort()
    assert store.replica_count("ehr") == 0
    assert store.get_cursor("ehr", "Encounter") is None


def test_a_store_in_memory_never_streams_and_reads_the_published_files() -> None:
    with StateStore("sqlite:///:memory:") as memory:
        feed = ReplicaFeed(memory, "ehr", stream_after=0)
        feed.add("Encounter", _lines("Encounter", range(300)))
        assert not feed.streaming
        files = _Files({"Encounter": _lines("Encounter", range(300))})
        feed.finish(files, {"Encounter": STAMP})
        assert files.read_types == ["Encounter"]
        assert memory.replica_count("ehr") == 300
        assert memory.get_cursor("ehr", "Encounter") == STAMP

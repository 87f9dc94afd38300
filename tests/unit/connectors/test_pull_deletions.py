"""Deletions the server reports: type-level ``_history`` in search mode, the manifest's ``deleted`` array
in bulk mode; both land in the replica with the cursors, de-duplicated, and touch the patient."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pytest_httpx import HTTPXMock

from connectors.config import EhrConfig
from connectors.deletions import history_deletions
from connectors.store import Deletion, StateStore
from tests.unit.connectors.conftest import BASE
from tests.unit.connectors.test_pull import (
    FakeFhirServer,
    _client,
    _encounter,
    _instant,
    _patient,
    _run,
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(f"sqlite:///{tmp_path / 'state.db'}") as s:
        yield s


def _capability(history: bool) -> dict[str, Any]:
    codes = ["read", "search-type", *(["history-type"] if history else [])]
    return {
        "resourceType": "CapabilityStatement",
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {"type": t, "interaction": [{"code": c} for c in codes]} for t in ("Patient", "Encounter")
                ],
            }
        ],
    }


class HistoryServer(FakeFhirServer):
    """The fake server plus ``/metadata`` and ``Type/_history`` answering the deletions made by ``delete``."""

    history: bool = True
    deleted: list[tuple[str, str, str]]  # (type, id, when)

    def delete(self, kind: str, resource_id: str) -> None:
        self.resources.pop((kind, resource_id))
        self.clock += timedelta(seconds=1)
        self.deleted.append((kind, resource_id, _instant(self.clock)))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix(httpx.URL(BASE).path).strip("/")
        if path == "metadata":
            self.requests.append(request)
            return httpx.Response(200, json=_capability(self.history))
        if path.endswith("/_history"):
            self.requests.append(request)
            kind = path.split("/")[0]
            entries = [
                {
                    "request": {"method": "DELETE", "url": f"{k}/{i}/_history/9"},
                    "response": {"status": "204", "lastModified": when},
                }
                for k, i, when in self.deleted
                if k == kind and when > request.url.params["_since"]
            ]
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "history", "entry": entries})
        return super().__call__(request)


def _history_server(httpx_mock: HTTPXMock, *, history: bool = True) -> HistoryServer:
    fake = HistoryServer()
    fake.history = history
    fake.deleted = []
    httpx_mock.add_callback(fake, is_reusable=True, is_optional=True)
    fake.put(_patient("p0"))
    fake.put(_encounter("e0", "p0"))
    fake.put(_encounter("e1", "p0"))
    return fake


def test_a_deletion_in_history_marks_the_replica_row_deleted_once_and_touches_the_patient(
    httpx_mock: HTTPXMock, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    ehr = make_ehr(resource_types=("Patient", "Encounter"), overlap_seconds=60)
    server = _history_server(httpx_mock)
    _run(ehr, store, tmp_path / "out")
    server.delete("Encounter", "e1")

    second = _run(ehr, store, tmp_path / "out")

    row = store.replica_row(ehr.name, "Encounter", "e1")
    assert row is not None
    assert row.deleted
    assert second.deleted == 1
    assert {r["id"] for r in store.patient_resources(ehr.name, "p0")} == {"p0", "e0"}
    assert store.patients_touched(ehr.name, second.started_at) == ["p0"]
    history = [r for r in server.requests if r.url.path.endswith("/Encounter/_history")]
    assert history
    assert "_since" in history[-1].url.params
    third = _run(ehr, store, tmp_path / "out")  # the overlap re-reads the deletion: nothing changes
    assert third.deleted == 0
    assert store.patients_touched(ehr.name, third.started_at) == []


def test_no_history_is_read_where_the_server_does_not_offer_history_type(
    httpx_mock: HTTPXMock, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    ehr = make_ehr(resource_types=("Patient", "Encounter"), overlap_seconds=60)
    server = _history_server(httpx_mock, history=False)
    _run(ehr, store, tmp_path / "out")
    server.delete("Encounter", "e1")
    second = _run(ehr, store, tmp_path / "out")
    assert second.deleted == 0
    assert not any("_history" in r.url.path for r in server.requests)


def test_the_manifests_deleted_files_mark_resources_deleted_unless_the_export_brought_them_back(
    httpx_mock: HTTPXMock, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    ehr = make_ehr(resource_types=("Encounter",), mode="bulk")
    stamp = {"versionId": "1", "lastUpdated": "2026-03-01T10:00:00Z"}
    store.commit_increment(
        ehr.name,
        "Encounter",
        [{**_encounter(e, "p1"), "meta": stamp} for e in ("e1", "e2", "e3")],
        "2026-03-01T11:00:00Z",
    )
    status = f"{BASE}/status/d"
    files = "https://files.example.net/job-d"
    httpx_mock.add_response(
        url=f"{BASE}/$export?_type=Encounter&_since=2026-03-01T11%3A00%3A00Z",
        status_code=202,
        headers={"Content-Location": status},
    )
    httpx_mock.add_response(
        url=status,
        method="GET",
        json={
            "transactionTime": "2026-03-02T11:00:00Z",
            "request": f"{BASE}/$export",
            "requiresAccessToken": False,
            "output": [{"type": "Encounter", "url": f"{files}/Encounter.ndjson"}],
            "deleted": [{"type": "Bundle", "url": f"{files}/del.ndjson"}],
            "error": [],
        },
    )
    recreated = {**_encounter("e3", "p1"), "meta": {"versionId": "3", "lastUpdated": "2026-03-02T09:00:00Z"}}
    httpx_mock.add_response(url=f"{files}/Encounter.ndjson", content=orjson.dumps(recreated))
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": f"Encounter/{e}"}} for e in ("e1", "e3", "e404")],
    }
    httpx_mock.add_response(url=f"{files}/del.ndjson", content=orjson.dumps(bundle) + b"\n")
    httpx_mock.add_response(url=status, method="DELETE", status_code=202)

    summary = _run(ehr, store, tmp_path / "out")

    assert summary.deleted == 1  # e1; e3 came back in this export; e404 was never held
    assert store.replica_row(ehr.name, "Encounter", "e1").deleted  # type: ignore[union-attr]
    assert not store.replica_row(ehr.name, "Encounter", "e2").deleted  # type: ignore[union-attr]
    assert not store.replica_row(ehr.name, "Encounter", "e3").deleted  # type: ignore[union-attr]
    assert store.replica_row(ehr.name, "Encounter", "e404") is None
    assert store.get_cursor(ehr.name, "Encounter") == "2026-03-02T11:00:00Z"


def test_history_counts_only_each_ids_newest_entry_as_hapi_lists_them(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig]
) -> None:
    def entry(method: str, rid: str, version: int) -> dict[str, Any]:
        item: dict[str, Any] = {
            "fullUrl": f"{BASE}/Encounter/{rid}",
            "request": {"method": method, "url": f"Encounter/{rid}/_history/{version}"},
            "response": {"status": "200 OK", "etag": f'W/"{version}"'},
        }
        if method != "DELETE":
            item["resource"] = {**_encounter(rid, "p1"), "meta": {"versionId": str(version)}}
        return item

    page2 = f"{BASE}/Encounter/_history?page=2"
    httpx_mock.add_response(
        url=f"{BASE}/Encounter/_history?_since=2026-03-01T00%3A00%3A00Z&_count=200",
        json={
            "resourceType": "Bundle",
            "type": "history",
            "link": [{"relation": "next", "url": page2}],
            # newest first, no lastModified (HAPI): gone deleted; back deleted, then re-created
            "entry": [entry("DELETE", "gone", 2), entry("POST", "gone", 1), entry("PUT", "back", 3)],
        },
    )
    httpx_mock.add_response(
        url=page2,
        json={"resourceType": "Bundle", "type": "history", "entry": [entry("DELETE", "back", 2)]},
    )
    with _client(make_ehr()) as client:
        found = history_deletions(client, "Encounter", "2026-03-01T00:00:00Z")
    assert found == [Deletion("Encounter", "gone", None)]

"""Incremental pull: cursors, overlap de-duplication, crash safety at each step, panel fan-out, validation."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pytest_httpx import HTTPXMock

import connectors.output
import connectors.store
from connectors.config import EhrConfig
from connectors.errors import EhrError, TemporaryEhrError
from connectors.http import EhrClient
from connectors.output import RunOutput
from connectors.pull import PullError, PullSummary, pull
from connectors.store import StateStore
from tests.unit.connectors.conftest import BASE

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def _instant(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class FakeFhirServer:
    """A small FHIR R4 server at ``BASE``: search with ``_lastUpdated=gt``, ``patient``, paging by offset.

    Every change gets a new ``meta.versionId`` and a ``meta.lastUpdated`` one second after the last one,
    like a real server's clock. ``fail`` lets a test break a chosen request (a crash mid-download).
    """

    page_size_cap: int = 3
    clock: datetime = T0
    resources: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    fail: Callable[[httpx.Request], httpx.Response | None] | None = None

    def put(self, resource: dict[str, Any], *, stamp: datetime | None = None) -> dict[str, Any]:
        key = (resource["resourceType"], resource["id"])
        previous = self.resources.get(key)
        version = int(previous["meta"]["versionId"]) + 1 if previous else 1
        self.clock += timedelta(seconds=1)
        stored = {
            **resource,
            "meta": {"versionId": str(version), "lastUpdated": _instant(stamp or self.clock)},
        }
        self.resources[key] = stored
        return stored

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.fail is not None and (failure := self.fail(request)) is not None:
            return failure
        path = request.url.path.removeprefix(httpx.URL(BASE).path).strip("/")
        params = request.url.params
        if path.startswith("Group/"):
            members = [{"entity": {"reference": f"Patient/{p}"}} for p in self.groups[path.split("/")[1]]]
            return httpx.Response(
                200, json={"resourceType": "Group", "id": path.split("/")[1], "member": members}
            )
        matches = sorted(
            (r for (kind, _), r in self.resources.items() if kind == path and self._matches(r, params)),
            key=lambda r: (r["meta"]["lastUpdated"], r["id"]),
        )
        count = min(int(params.get("_count", "100")), self.page_size_cap)
        offset = int(params.get("_offset", "0"))
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "link": [{"relation": "self", "url": str(request.url)}],
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in matches[offset : offset + count]],
        }
        if offset + count < len(matches):
            bundle["link"].append(
                {"relation": "next", "url": str(request.url.copy_set_param("_offset", str(offset + count)))}
            )
        return httpx.Response(200, json=bundle)

    def _matches(self, resource: dict[str, Any], params: httpx.QueryParams) -> bool:
        for bound in params.get_list("_lastUpdated"):
            assert bound.startswith("gt"), bound
            stamp = datetime.fromisoformat(resource["meta"]["lastUpdated"])
            if not stamp > datetime.fromisoformat(bound[2:]):
                return False
        ids = params.get("_id")
        if ids is not None and resource["id"] not in ids.split(","):
            return False
        patient = params.get("patient")
        if patient is not None:
            return bool((resource.get("subject") or {}).get("reference") == f"Patient/{patient}")
        return True

    def searches(self, resource_type: str) -> list[httpx.Request]:
        return [
            r
            for r in self.requests
            if r.url.path.endswith(f"/{resource_type}") and "_offset" not in r.url.params
        ]


@pytest.fixture
def server(httpx_mock: HTTPXMock) -> FakeFhirServer:
    fake = FakeFhirServer()
    httpx_mock.add_callback(fake, is_reusable=True, is_optional=True)
    return fake


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(f"sqlite:///{tmp_path / 'state.db'}") as s:
        yield s


@pytest.fixture
def ehr(make_ehr: Callable[..., EhrConfig]) -> EhrConfig:
    return make_ehr(resource_types=("Patient", "Encounter"), overlap_seconds=60)


def _patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "active": True}


def _encounter(eid: str, pid: str, status: str = "in-progress") -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{pid}"},
    }


def _read(out: Path, resource_type: str) -> list[dict[str, Any]]:
    path = out / f"{resource_type}.ndjson"
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _versions(out: Path, *types: str) -> list[tuple[str, str, str]]:
    return sorted(
        (r["resourceType"], r["id"], r["meta"]["versionId"]) for kind in types for r in _read(out, kind)
    )


def _run(ehr: EhrConfig, store: StateStore, out: Path, **kwargs: Any) -> PullSummary:
    return pull(ehr, store, out, client_factory=_client, workers=0, **kwargs)


def _client(ehr: EhrConfig) -> EhrClient:
    return EhrClient(ehr, sleep=lambda _: None)


def _seed(server: FakeFhirServer, patients: int = 2, encounters: int = 5) -> None:
    for p in range(patients):
        server.put(_patient(f"p{p}"))
    for e in range(encounters):
        server.put(_encounter(f"e{e}", f"p{e % patients}"))


# -- cursors and overlap ----------------------------------------------------------------------------


def test_first_pull_writes_everything_and_sets_the_cursor(
    server: FakeFhirServer, store: StateStore, ehr: EhrConfig, tmp_path: Path
) -> None:
    _seed(server)
    arrived: Counter[str] = Counter()
    summary = _run(ehr, store, tmp_path / "out", progress=lambda kind, n: arrived.update({kind: n}))
    assert summary.counts == {"Encounter": 5, "Patient": 2}
    assert arrived == Counter(summary.counts)
    assert store.patients_touched(ehr.name, summary.started_at) == ["p0", "p1"]
    assert summary.pages == 1 + 2  # Patient: one page; Encounter: 3 + 2
    assert summary.rejected == 0
    assert [r["id"] for r in _read(tmp_path / "out", "Encounter")] == ["e0", "e1", "e2", "e3", "e4"]
    newest = max(
        r["meta"]["lastUpdated"] for r in server.resources.values() if r["resourceType"] == "Encounter"
    )
    assert store.get_cursor(ehr.name, "Encounter") == newest
    assert "_lastUpdated" not in server.searches("Encounter")[0].url.params
    assert [r["id"] for r in store.patient_resources(ehr.name, "p0")] == ["e0", "e2", "e4", "p0"]
    assert (tmp_path / "out" / "_rejected.ndjson").read_bytes() == b""


def test_next_pull_starts_at_cursor_minus_overlap_and_skips_what_it_already_has(
    server: FakeFhirServer, store: StateStore, ehr: EhrConfig, tmp_path: Path
) -> None:
    _seed(server)
    _run(ehr, store, tmp_path / "out")
    cursor = datetime.fromisoformat(store.get_cursor(ehr.name, "Encounter") or "")
    server.put(_encounter("e1", "p1", status="finished"))  # a new version
    server.put(_encounter("e9", "p0"))  # a new resource
    summary = _run(ehr, store, tmp_path / "out")
    query = server.searches("Encounter")[-1].url.params
    bound = query.get("_lastUpdated") or ""
    assert bound.startswith("gt")
    assert datetime.fromisoformat(bound[2:]) == cursor - timedelta(seconds=60)
    # The server sent back e2..e4 from the overlap too: they are skipped, not written again.
    assert summary.duplicates >= 3
    assert _versions(tmp_path / "out", "Encounter") == [("Encounter", "e1", "2"), ("Encounter", "e9", "1")]
    assert _read(tmp_path / "out", "Patient") == []  # nothing changed: an empty increment
    row = store.replica_row(ehr.name, "Encounter", "e1")
    assert row is not None
    assert (row.version_id, row.status) == ("2", "finished")


def test_without_meta_only_changed_content_is_written_again(
    httpx_mock: HTTPXMock, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    # Epic often sends neither versionId nor lastUpdated: no cursor, every pull sees everything.
    ehr = make_ehr(vendor="epic", resource_types=("Location",))

    def serve(*locations: dict[str, Any]) -> None:
        entries = [{"resource": loc} for loc in locations]
        httpx_mock.add_response(
            url=f"{BASE}/Location?_count=200", json={"resourceType": "Bundle", "entry": entries}
        )

    first = {"resourceType": "Location", "id": "l1", "name": "IOP suite"}
    second = {"resourceType": "Location", "id": "l2", "name": "Day hospital"}
    serve(first, second)
    assert _run(ehr, store, tmp_path / "out").counts == {"Location": 2}
    serve(first, {**second, "status": "inactive"})
    summary = _run(ehr, store, tmp_path / "out")
    assert summary.duplicates == 1
    assert _read(tmp_path / "out", "Location") == [{**second, "status": "inactive"}]
    assert store.get_cursor(ehr.name, "Location") is None
    assert "_lastUpdated" not in httpx_mock.get_requests()[-1].url.params


def test_since_overrides_the_cursor_and_skips_nothing(
    server: FakeFhirServer, store: StateStore, ehr: EhrConfig, tmp_path: Path
) -> None:
    _seed(server)
    _run(ehr, store, tmp_path / "out")
    summary = _run(ehr, store, tmp_path / "out", since="2026-01-01T00:00:00Z")
    assert server.searches("Encounter")[-1].url.params.get("_lastUpdated") == "gt2026-01-01T00:00:00Z"
    assert summary.counts == {"Encounter": 5, "Patient": 2}
    assert summary.duplicates == 0
    with pytest.raises(PullError, match="needs a zone"):
        _run(ehr, store, tmp_path / "out", since="2026-01-01T00:00:00")
    with pytest.raises(PullError, match="ISO date"):
        _run(ehr, store, tmp_path / "out", since="yesterday")
    with pytest.raises(PullError, match="not resource types: 'Encounter;x'"):
        _run(ehr, store, tmp_path / "out", resource_types=["Encounter;x"])


def test_a_future_stamp_does_not_push_the_cursor_past_now(
    server: FakeFhirServer, store: StateStore, ehr: EhrConfig, tmp_path: Path
) -> None:
    server.put(_encounter("e1", "p1"), stamp=datetime.now(UTC) + timedelta(days=30))
    before = datetime.now(UTC)
    _run(ehr, store, tmp_path / "out", resource_types=["Encounter"])
    cursor = datetime.fromisoformat(store.get_cursor(ehr.name, "Encounter") or "")
    assert before < cursor <= datetime.now(UTC) + timedelta(seconds=ehr.overlap_seconds)


def test_cursor_never_moves_backwards_and_stays_when_nothing_came(
    server: FakeFhirServer, store: StateStore, ehr: EhrConfig, tmp_path: Path
) -> None:
    _seed(server)
    _run(ehr, store, tmp_path / "out")
    cursor = store.get_cursor(ehr.name, "Encounter")
    summary = _run(ehr, store, tmp_path / "out", since="2026-01-01T00:00:00Z")
    assert summary.cursors["Encounter"] == cursor
    _run(ehr, store, tmp_path / "out")
    assert store.get_cursor(ehr.name, "Encounter") == cursor


# -- crash safety -----------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands for the process being killed (not an Exception: nothing may catch and carry on)."""


def _kill_on_call(n: int, real: Callable[..., Any]) -> Callable[..., Any]:
    calls = Counter[str]()

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed
        return real(*args, **kwargs)

    return wrapper


CRASH_POINTS = ["mid-download", "mid-validation", "mid-publish", "before-commit", "mid-commit"]


def _arm(point: str, monkeypatch: pytest.MonkeyPatch, server: FakeFhirServer) -> None:
    if point == "mid-download":  # the second page of the Encounter search never comes
        server.fail = lambda r: (_ for _ in ()).throw(Killed) if "_offset" in r.url.params else None
    elif point == "mid-validation":
        monkeypatch.setattr(
            "connectors.pull.validate_lines", _kill_on_call(1, connectors.pull.validate_lines)
        )
    elif point == "mid-publish":  # one file renamed into place, the others not
        monkeypatch.setattr("connectors.output.os.replace", _kill_on_call(2, os.replace))
    elif point == "before-commit":
        monkeypatch.setattr(StateStore, "commit_increments", _kill_on_call(1, StateStore.commit_increments))
    elif point == "mid-commit":  # some replica rows written inside the transaction, then killed
        monkeypatch.setattr(connectors.store, "_row", _kill_on_call(4, connectors.store._row))


@pytest.mark.parametrize("streamed", [False, True], ids=["replica-at-end", "replica-streamed"])
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_pull_killed_at_any_step_and_rerun_leaves_no_gap_and_no_duplicate(
    point: str,
    streamed: bool,
    server: FakeFhirServer,
    store: StateStore,
    ehr: EhrConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    # streamed: the replica rows go in from the first validated chunk on, in a transaction kept open
    # while the pull runs; else all of them after the files are published.
    limit = {"inline_limit": 0} if streamed else {}
    _seed(server, patients=2, encounters=4)
    delivered: list[tuple[str, str, str]] = []
    _run(ehr, store, out, **limit)
    delivered += _versions(out, "Patient", "Encounter")
    cursors_before = store.cursors(ehr.name)
    # Changes between the runs: new versions and new resources of both types.
    server.put(_encounter("e0", "p0", status="finished"))
    for e in range(4, 12):
        server.put(_encounter(f"e{e}", f"p{e % 2}"))
    server.put(_patient("p7"))
    with monkeypatch.context() as patch:
        _arm(point, patch, server)
        with pytest.raises(Killed):
            _run(ehr, store, out, **limit)
    server.fail = None
    assert store.cursors(ehr.name) == cursors_before  # nothing committed
    assert not list(out.glob(".*.part"))  # the killed run's partial files are gone (or removed on re-run)
    _run(ehr, store, out, **limit)
    delivered += _versions(out, "Patient", "Encounter")
    # Each resource changed at most once between the runs, so every version it had is delivered once.
    expected = sorted(
        (kind, rid, str(version))
        for (kind, rid), resource in server.resources.items()
        for version in range(1, int(resource["meta"]["versionId"]) + 1)
    )
    assert sorted(delivered) == expected  # every version once: no gap, no duplicate
    assert len(set(delivered)) == len(delivered)
    assert store.replica_count(ehr.name) == len(server.resources)


def test_a_killed_run_leaves_the_previous_output_untouched(
    server: FakeFhirServer, store: StateStore, ehr: EhrConfig, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    _seed(server)
    _run(ehr, store, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    server.put(_encounter("e0", "p0", status="finished"))
    server.fail = lambda r: httpx.Response(400, json={"resourceType": "OperationOutcome"})
    with pytest.raises(EhrError):
        _run(ehr, store, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_second_pull_into_the_same_folder_is_refused_while_one_runs(
    server: FakeFhirServer, store: StateStore, ehr: EhrConfig, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    _seed(server)
    busy = RunOutput(out)  # another pull holding the folder
    with pytest.raises(PullError, match="another pull is writing into"):
        _run(ehr, store, out)
    busy.close()
    assert _run(ehr, store, out).counts == {"Encounter": 5, "Patient": 2}


# -- panel fan-out ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["group", "file"])
def test_patient_scoped_types_fan_out_over_the_panel(
    source: str,
    server: FakeFhirServer,
    store: StateStore,
    make_ehr: Callable[..., EhrConfig],
    tmp_path: Path,
) -> None:
    for e in range(9):
        server.put(_encounter(f"e{e}", f"p{e % 3}"))
    for p in range(3):
        server.put(_patient(f"p{p}"))
    server.groups["ward-7"] = ["p0", "p1"]
    ids_file = tmp_path / "panel.txt"
    ids_file.write_text("# IOP panel\np0\n\nPatient/p1\np0\n", encoding="utf-8")
    panel = {"group_id": "ward-7"} if source == "group" else {"patients_file": str(ids_file)}
    ehr = make_ehr(vendor="epic", resource_types=("Patient", "Encounter"), panel={**panel, "concurrency": 2})
    summary = _run(ehr, store, tmp_path / "out")
    assert summary.patients == 2
    # Epic refuses an open Patient search too: the panel is read by _id.
    assert [r.url.params["_id"] for r in server.searches("Patient")] == ["p0,p1"]
    assert sorted(r["id"] for r in _read(tmp_path / "out", "Patient")) == ["p0", "p1"]
    searched = sorted(r.url.params["patient"] for r in server.searches("Encounter"))
    assert searched == ["p0", "p1"]
    assert sorted(r["id"] for r in _read(tmp_path / "out", "Encounter")) == [
        "e0",
        "e1",
        "e3",
        "e4",
        "e6",
        "e7",
    ]
    assert store.patient_resources(ehr.name, "p2") == []


def test_a_patient_who_joins_the_panel_gets_their_whole_history(
    server: FakeFhirServer, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    server.put(_encounter("old-of-p1", "p1"))  # long before p1 joins the IOP panel
    server.put(_encounter("e0", "p0"))
    server.groups["iop"] = ["p0"]
    ehr = make_ehr(vendor="epic", resource_types=("Encounter",), panel={"group_id": "iop"})
    _run(ehr, store, tmp_path / "out")
    server.groups["iop"] = ["p0", "p1"]
    server.put(_encounter("e1", "p0"))
    _run(ehr, store, tmp_path / "out")
    last = {r.url.params["patient"]: r.url.params for r in server.searches("Encounter")[-2:]}
    assert "_lastUpdated" in last["p0"]
    assert "_lastUpdated" not in last["p1"]
    assert sorted(r["id"] for r in _read(tmp_path / "out", "Encounter")) == ["e1", "old-of-p1"]
    assert store.panel_known(ehr.name, ["p0", "p1", "p2"]) == {"p0", "p1"}


def test_a_patient_the_ehr_refuses_is_skipped_and_fetched_whole_later(
    server: FakeFhirServer, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    for p in range(3):
        server.put(_encounter(f"e{p}", f"p{p}"))
    server.groups["iop"] = ["p0", "p1", "p2"]
    ehr = make_ehr(vendor="oracle", resource_types=("Encounter",), panel={"group_id": "iop"})
    _run(ehr, store, tmp_path / "out")
    server.put(_encounter("e1b", "p1"))
    refused = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "forbidden"}]}
    server.fail = lambda r: httpx.Response(403, json=refused) if r.url.params.get("patient") == "p1" else None
    summary = _run(ehr, store, tmp_path / "out")
    assert summary.patients_failed == 1
    assert store.panel_known(ehr.name, ["p0", "p1", "p2"]) == {"p0", "p2"}
    server.fail = None
    _run(ehr, store, tmp_path / "out")
    last = {r.url.params["patient"]: r.url.params for r in server.searches("Encounter")[-3:]}
    assert "_lastUpdated" not in last["p1"]  # whole history: nothing of p1 is lost
    assert sorted(r["id"] for r in _read(tmp_path / "out", "Encounter")) == ["e1b"]
    # A temporary failure is not a refusal: after its retries it stops the pull, and the cursor stays.
    cursor = store.get_cursor(ehr.name, "Encounter")
    server.fail = lambda r: httpx.Response(503) if r.url.params.get("patient") == "p1" else None
    with pytest.raises(TemporaryEhrError):
        _run(ehr, store, tmp_path / "out")
    assert store.get_cursor(ehr.name, "Encounter") == cursor
    assert store.panel_known(ehr.name, ["p1"]) == {"p1"}


def test_an_unreadable_panel_file_is_a_clear_error(
    server: FakeFhirServer, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    ehr = make_ehr(
        vendor="oracle", resource_types=("Encounter",), panel={"patients_file": str(tmp_path / "no")}
    )
    with pytest.raises(PullError, match="cannot read the panel file"):
        _run(ehr, store, tmp_path / "out")
    (tmp_path / "bad").write_text("p1\nnot an id!\n", encoding="utf-8")
    ehr = make_ehr(
        vendor="oracle", resource_types=("Encounter",), panel={"patients_file": str(tmp_path / "bad")}
    )
    with pytest.raises(PullError, match="line 2: not a patient id"):
        _run(ehr, store, tmp_path / "out")


# -- validation on the way in -----------------------------------------------------------------------


def test_bad_resources_are_rejected_with_their_reason_and_the_pull_goes_on(
    server: FakeFhirServer, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    server.put(_encounter("good", "p1"))
    server.put({**_encounter("bad-date", "p1"), "period": {"start": "2026-13-45"}})
    server.resources[("Encounter", "no-type")] = {"id": "no-type", "meta": {"lastUpdated": _instant(T0)}}
    server.resources[("Encounter", "fruit")] = {
        "resourceType": "Banana",
        "id": "fruit",
        "meta": {"lastUpdated": _instant(T0)},
    }
    server.put({**_encounter("odd_id", "p1"), "status": "finished "})  # Oracle-style deviations
    ehr = make_ehr(vendor="oracle", resource_types=("Encounter",))
    summary = _run(ehr, store, tmp_path / "out")
    assert [r["id"] for r in _read(tmp_path / "out", "Encounter")] == ["good", "odd_id"]
    kept = _read(tmp_path / "out", "Encounter")[1]
    assert kept["status"] == "finished"  # normalised
    assert summary.warnings == 1
    assert summary.deviations == Counter({"code-whitespace": 1, "id-format": 1})
    rejected = _read(tmp_path / "out", "_rejected")
    assert summary.rejected == len(rejected) == 3
    reasons = {r["resource"]["id"]: r["error"] for r in rejected}
    assert "resourceType is missing" in reasons["no-type"]
    assert reasons["fruit"] == "unknown resourceType 'Banana'"
    assert reasons["bad-date"].startswith("Encounter/bad-date: period.start")
    assert store.replica_count(ehr.name) == 2


def test_a_strict_profile_rejects_what_oracle_tolerates(
    server: FakeFhirServer, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    server.put({**_encounter("odd_id", "p1")})
    summary = _run(make_ehr(resource_types=("Encounter",)), store, tmp_path / "out")
    assert summary.rejected == 1
    assert "id-format" in _read(tmp_path / "out", "_rejected")[0]["error"]


def test_the_process_pool_gives_the_same_output_as_inline_validation(
    server: FakeFhirServer, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    server.page_size_cap = 200
    for e in range(600):
        server.put(_encounter(f"e{e}", f"p{e % 7}"))
    server.put({**_encounter("bad", "p1"), "period": {"start": "nope"}})
    ehr = make_ehr(resource_types=("Encounter",))
    pooled = pull(ehr, store, tmp_path / "pooled", client_factory=_client, workers=2, inline_limit=0)
    with StateStore(f"sqlite:///{tmp_path / 'other.db'}") as other:
        inline = _run(ehr, other, tmp_path / "inline")
    assert (tmp_path / "pooled" / "Encounter.ndjson").read_bytes() == (
        tmp_path / "inline" / "Encounter.ndjson"
    ).read_bytes()
    assert pooled.counts == inline.counts == {"Encounter": 600}
    assert pooled.rejected == inline.rejected == 1


def test_the_same_id_twice_in_one_pull_is_written_once_at_its_newest_version(
    httpx_mock: HTTPXMock, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    # The resource changed while we paged: page 1 has version 1, page 2 version 2.
    v1 = {**_encounter("e1", "p1"), "meta": {"versionId": "1", "lastUpdated": "2026-03-01T10:00:00Z"}}
    v2 = {
        **_encounter("e1", "p1", "finished"),
        "meta": {"versionId": "2", "lastUpdated": "2026-03-01T10:05:00Z"},
    }
    page2 = f"{BASE}/Encounter?page=2"
    httpx_mock.add_response(
        url=f"{BASE}/Encounter?_count=200",
        json={
            "resourceType": "Bundle",
            "entry": [{"resource": v1}],
            "link": [{"relation": "next", "url": page2}],
        },
    )
    httpx_mock.add_response(url=page2, json={"resourceType": "Bundle", "entry": [{"resource": v2}]})
    summary = _run(make_ehr(resource_types=("Encounter",)), store, tmp_path / "out")
    assert summary.counts == {"Encounter": 1}
    assert [r["meta"]["versionId"] for r in _read(tmp_path / "out", "Encounter")] == ["2"]


# -- bulk mode --------------------------------------------------------------------------------------


def test_bulk_mode_uses_the_cursor_as_since_and_the_transaction_time_as_the_next_one(
    httpx_mock: HTTPXMock, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    ehr = make_ehr(resource_types=("Encounter",), mode="bulk")
    status = f"{BASE}/status/1"
    files = "https://files.example.net/job-1/Encounter.ndjson"
    lines = b"\n".join(
        [
            orjson.dumps(
                {**_encounter("e1", "p1"), "meta": {"versionId": "1", "lastUpdated": "2026-03-01T10:00:00Z"}}
            ),
            b"this is not json",
            orjson.dumps({"resourceType": "Encounter", "id": "e2", "status": "in-progress"}),
        ]
    )

    def export_once(since: str | None, transaction_time: str) -> None:
        query = "?_type=Encounter" + (f"&_since={since.replace(':', '%3A')}" if since else "")
        httpx_mock.add_response(
            url=f"{BASE}/$export{query}", status_code=202, headers={"Content-Location": status}
        )
        httpx_mock.add_response(
            url=status,
            method="GET",
            json={
                "transactionTime": transaction_time,
                "request": f"{BASE}/$export",
                "requiresAccessToken": False,
                "output": [{"type": "Encounter", "url": files}],
                "error": [],
            },
        )
        httpx_mock.add_response(url=files, content=lines)
        httpx_mock.add_response(url=status, method="DELETE", status_code=202)

    export_once(None, "2026-03-01T11:00:00Z")
    first = _run(ehr, store, tmp_path / "out")
    assert first.counts == {"Encounter": 1}
    assert first.rejected == 2  # a line that is not JSON; an Encounter without its required class
    rejected = _read(tmp_path / "out", "_rejected")
    assert rejected[0] == {"resource": "this is not json", "error": rejected[0]["error"]}
    assert rejected[0]["error"].startswith("not JSON")
    assert "class" in rejected[1]["error"]
    assert store.get_cursor(ehr.name, "Encounter") == "2026-03-01T11:00:00Z"
    assert not (tmp_path / "out" / ".bulk-staging").exists()
    export_once("2026-03-01T11:00:00Z", "2026-03-02T11:00:00Z")
    second = _run(ehr, store, tmp_path / "out")
    assert second.duplicates == 1  # e1 version 1 is already in the replica
    assert second.counts == {"Encounter": 0}
    assert store.get_cursor(ehr.name, "Encounter") == "2026-03-02T11:00:00Z"


def _bulk_export_of(httpx_mock: HTTPXMock, files: dict[str, bytes], *, broken: str | None = None) -> None:
    """One export whose manifest lists ``files`` (name -> NDJSON); ``broken`` answers 404 for good."""
    status = f"{BASE}/status/many"
    httpx_mock.add_response(
        url=f"{BASE}/$export?_type=Encounter", status_code=202, headers={"Content-Location": status}
    )
    output = [{"type": "Encounter", "url": f"https://files.example.net/{name}"} for name in files]
    httpx_mock.add_response(
        url=status,
        method="GET",
        json={"transactionTime": "2026-03-01T11:00:00Z", "requiresAccessToken": False, "output": output},
    )
    for name, content in files.items():
        if name == broken:
            httpx_mock.add_response(url=f"https://files.example.net/{name}", status_code=404)
        else:
            httpx_mock.add_response(url=f"https://files.example.net/{name}", content=content)
    httpx_mock.add_response(url=status, method="DELETE", status_code=202)


def _encounter_lines(ids: range) -> bytes:
    stamp = {"versionId": "1", "lastUpdated": "2026-03-01T10:00:00Z"}
    return b"".join(orjson.dumps({**_encounter(f"e{i}", f"p{i % 5}"), "meta": stamp}) + b"\n" for i in ids)


def test_a_bulk_pull_of_several_files_validates_them_all_on_every_worker(
    httpx_mock: HTTPXMock, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    files = {f"part-{n}.ndjson": _encounter_lines(range(n * 300, n * 300 + 300)) for n in range(4)}
    _bulk_export_of(httpx_mock, files)
    ehr = make_ehr(resource_types=("Encounter",), mode="bulk")
    summary = pull(ehr, store, tmp_path / "out", client_factory=_client, workers=2, inline_limit=0)
    assert summary.counts == {"Encounter": 1200}
    assert summary.validated == 1200
    assert summary.validation_workers == 2
    assert summary.validation_seconds > 0
    assert sorted(r["id"] for r in _read(tmp_path / "out", "Encounter")) == sorted(
        f"e{i}" for i in range(1200)
    )
    assert store.replica_count(ehr.name) == 1200
    assert store.get_cursor(ehr.name, "Encounter") == "2026-03-01T11:00:00Z"
    assert not (tmp_path / "out" / ".bulk-staging").exists()


def test_a_bulk_line_over_max_line_bytes_is_a_reject_and_the_rest_of_the_pull_goes_on(
    httpx_mock: HTTPXMock, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    huge = orjson.dumps({**_encounter("big", "p1"), "note": "x" * 5000})
    files = {"part-0.ndjson": _encounter_lines(range(0, 3)) + huge + b"\n" + _encounter_lines(range(3, 5))}
    _bulk_export_of(httpx_mock, files)
    ehr = make_ehr(resource_types=("Encounter",), mode="bulk", max_line_bytes=4096)
    summary = pull(ehr, store, tmp_path / "out", client_factory=_client, workers=0, inline_limit=0)
    assert summary.counts == {"Encounter": 5}
    assert summary.rejected == 1
    [reject] = _read(tmp_path / "out", "_rejected")
    assert reject["resource"] == {
        "resourceType": "Encounter", "file": "Encounter.000.ndjson", "line": 4, "bytes": len(huge)
    }  # fmt: skip
    assert reject["error"] == (
        f"line 4 of Encounter.000.ndjson (Encounter) is {len(huge)} bytes, over max_line_bytes (4096)"
    )
    assert store.get_cursor(ehr.name, "Encounter") == "2026-03-01T11:00:00Z"


def test_a_bulk_file_that_cannot_be_downloaded_fails_the_pull_and_commits_nothing(
    httpx_mock: HTTPXMock, store: StateStore, make_ehr: Callable[..., EhrConfig], tmp_path: Path
) -> None:
    files = {f"part-{n}.ndjson": _encounter_lines(range(n * 300, n * 300 + 300)) for n in range(3)}
    _bulk_export_of(httpx_mock, files, broken="part-2.ndjson")
    ehr = make_ehr(resource_types=("Encounter",), mode="bulk")
    with pytest.raises(EhrError, match=r"part-2|Encounter\.002"):
        pull(ehr, store, tmp_path / "out", client_factory=_client, workers=0, inline_limit=0)
    assert store.replica_count(ehr.name) == 0  # the other files' rows were rolled back
    assert store.get_cursor(ehr.name, "Encounter") is None
    assert not (tmp_path / "out" / "Encounter.ndjson").exists()
    assert not list((tmp_path / "out").glob(".*.part"))
    assert not (tmp_path / "out" / ".bulk-staging").exists()
    assert httpx_mock.get_requests()[-1].method == "DELETE"

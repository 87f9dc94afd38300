"""bench.seeding: dependency order, PUT for referenced types, POST for leaves, resume by server counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import orjson
from pytest_httpx import HTTPXMock

from bench.generate import INFO
from bench.seeding import load_order, seed, seeded

BASE = "http://fhir.test/fhir"


def _folder(tmp_path: Path) -> Path:
    rows: dict[str, list[dict[str, Any]]] = {
        "Organization": [
            {"resourceType": "Organization", "id": "o1"},
            {"resourceType": "Organization", "id": "o2", "partOf": {"reference": "Organization/o1"}},
        ],
        "Patient": [{"resourceType": "Patient", "id": f"p{i}"} for i in range(3)],
        "Encounter": [
            {
                "resourceType": "Encounter",
                "id": f"e{i}",
                "subject": {"reference": f"Patient/p{i % 3}"},
                "serviceProvider": {"reference": "Organization/o1"},
            }
            for i in range(5)
        ],
    }
    for kind, resources in rows.items():
        (tmp_path / f"{kind}.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    counts = {kind: len(resources) for kind, resources in rows.items()}
    (tmp_path / INFO).write_text(json.dumps({"encounters": 5, "patients": 3, "resources": counts}))
    return tmp_path


def _counts(httpx_mock: HTTPXMock, held: dict[str, int]) -> None:
    for kind, total in held.items():
        httpx_mock.add_response(
            url=f"{BASE}/{kind}?_summary=count", json={"resourceType": "Bundle", "total": total}
        )


def test_types_load_after_what_they_reference(tmp_path: Path) -> None:
    order = load_order(_folder(tmp_path))
    kinds = [kind for kind, _, _ in order]
    assert kinds.index("Organization") < kinds.index("Encounter")
    assert kinds.index("Patient") < kinds.index("Encounter")
    assert ("Organization", True, True) in order  # references itself: loaded one bundle at a time
    assert ("Encounter", False, False) in order  # nothing refers to it: created, not PUT


def test_referenced_types_are_put_at_their_ids_and_leaves_are_created(
    httpx_mock: HTTPXMock, tmp_path: Path
) -> None:
    folder = _folder(tmp_path)
    _counts(httpx_mock, {"Organization": 0, "Patient": 0, "Encounter": 2})  # 2 Encounters already there
    bundles: list[dict[str, Any]] = []

    def accept(request: httpx.Request) -> httpx.Response:
        bundles.append(orjson.loads(request.content))
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "transaction-response"})

    httpx_mock.add_callback(accept, url=BASE, method="POST", is_reusable=True)
    report = seed(BASE, folder, batch=2, concurrency=2)
    requests = [
        (entry["request"]["method"], entry["request"]["url"], entry["resource"].get("id"))
        for bundle in bundles
        for entry in bundle["entry"]
    ]
    assert all(b["type"] == "transaction" for b in bundles)
    assert [r for r in requests if r[1].startswith("Organization")] == [
        ("PUT", "Organization/o1", "o1"),
        ("PUT", "Organization/o2", "o2"),
    ]
    assert sorted(r for r in requests if r[1].startswith("Patient")) == [
        ("PUT", f"Patient/p{i}", f"p{i}") for i in range(3)
    ]
    # The server held 2 Encounters: the other 3 are created, without the file's ids.
    assert [r for r in requests if r[1] == "Encounter"] == [("POST", "Encounter", None)] * 3
    assert report.resources == 2 + 3 + 3


def test_seeded_compares_every_type(httpx_mock: HTTPXMock, tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    _counts(httpx_mock, {"Encounter": 5, "Organization": 2, "Patient": 2})
    assert not seeded(BASE, folder)
    _counts(httpx_mock, {"Encounter": 7, "Organization": 2, "Patient": 3})
    assert seeded(BASE, folder)

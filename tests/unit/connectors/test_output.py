"""A pull's output folder: de-duplication within a run by id hash, settled exactly at publish."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors import output as output_module
from connectors.output import RunOutput


def _encounter(resource_id: str, version: str | None = None, updated: str | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Encounter", "id": resource_id, "status": "finished"}
    if updated is not None:
        resource["meta"] = {"versionId": version, "lastUpdated": updated}
    return resource


@pytest.fixture
def out(tmp_path: Path) -> Iterator[RunOutput]:
    run = RunOutput(tmp_path)
    yield run
    run.close()


def _write(out: RunOutput, resources: list[dict[str, Any]]) -> None:
    for resource in resources:
        out.write("Encounter", resource["id"], orjson.dumps(resource))


def _published(folder: Path) -> list[tuple[str, str | None]]:
    lines = (folder / "Encounter.ndjson").read_bytes().splitlines()
    return [(r["id"], (r.get("meta") or {}).get("versionId")) for r in map(orjson.loads, lines)]


def test_a_repeated_id_keeps_its_newest_version_wherever_it_came(out: RunOutput, tmp_path: Path) -> None:
    _write(
        out,
        [
            _encounter("a", "2", "2026-03-01T10:05:00Z"),
            _encounter("b", "1", "2026-03-01T09:00:00Z"),
            _encounter("a", "1", "2026-03-01T10:00:00Z"),  # older, later in the file
            _encounter("c", "1", "2026-03-01T09:00:00Z"),
            _encounter("a", "2", "2026-03-01T10:05:00Z"),  # the newest again: kept once
        ],
    )
    out.publish()
    assert _published(tmp_path) == [("a", "2"), ("b", "1"), ("c", "1")]
    assert out.counts() == {"Encounter": 3}


def test_a_line_without_last_updated_replaces_what_was_held(out: RunOutput, tmp_path: Path) -> None:
    dated = {**_encounter("a", "3", "2026-03-01T10:00:00Z"), "status": "in-progress"}
    undated = {**_encounter("a"), "status": "finished"}
    _write(out, [dated, undated])
    out.publish()
    lines = (tmp_path / "Encounter.ndjson").read_bytes().splitlines()
    assert [orjson.loads(line)["status"] for line in lines] == ["finished"]


def test_ids_sharing_a_hash_are_all_kept_and_counted(
    out: RunOutput, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every id hashes alike: the run suspects repeats everywhere, and publish settles them by id.
    monkeypatch.setattr(output_module, "hash", lambda _value: 7, raising=False)
    _write(
        out,
        [
            _encounter("a", "1", "2026-03-01T10:00:00Z"),
            _encounter("b", "1", "2026-03-01T10:00:00Z"),
            _encounter("a", "2", "2026-03-01T11:00:00Z"),
            _encounter("c", "1", "2026-03-01T10:00:00Z"),
        ],
    )
    assert out.counts() == {"Encounter": 1}  # before publish: one hash
    out.publish()
    assert _published(tmp_path) == [("b", "1"), ("a", "2"), ("c", "1")]
    assert out.counts() == {"Encounter": 3}  # exact once settled


def test_a_run_without_repeats_is_published_as_written(out: RunOutput, tmp_path: Path) -> None:
    resources = [_encounter(f"e{n}", "1", "2026-03-01T10:00:00Z") for n in range(50)]
    _write(out, resources)
    out.publish()
    assert _published(tmp_path) == [(f"e{n}", "1") for n in range(50)]
    assert out.counts() == {"Encounter": 50}

"""``sync.inputs``: every input shape the map command accepts, and bad input that never stops a run."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.errors import ConfigError
from sync.inputs import InputError, InputReject, iter_resources, load_resources


def patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid}


def encounter(eid: str, subject: str = "Patient/p1") -> dict[str, Any]:
    return {"resourceType": "Encounter", "id": eid, "status": "finished", "subject": {"reference": subject}}


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), "utf-8")
    return path


def keys(resources: list[dict[str, Any]]) -> list[str]:
    return [f"{r['resourceType']}/{r['id']}" for r in resources]


def test_an_ndjson_file_may_mix_resource_types(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "mixed.ndjson", [patient("p1"), encounter("e1"), encounter("e2")])
    loaded = load_resources([path])
    assert keys(loaded.resources) == ["Patient/p1", "Encounter/e1", "Encounter/e2"]
    assert loaded.rejects == []
    assert loaded.files == 1


def test_bad_lines_are_rejects_with_file_and_line_and_the_rest_is_read(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "Encounter.ndjson",
        [encounter("e1"), "{not json", "", "[1, 2]", {"id": "x"}, encounter("e2"), '"text"'],
    )
    loaded = load_resources([path])
    assert keys(loaded.resources) == ["Encounter/e1", "Encounter/e2"]
    assert [(r.source, r.line) for r in loaded.rejects] == [(str(path), 2), (str(path), 4), (str(path), 5),
                                                           (str(path), 7)]  # fmt: skip
    reasons = [r.reason for r in loaded.rejects]
    assert reasons[0].startswith("not valid JSON")
    assert reasons[1:] == [
        "not a FHIR resource (a JSON array)",
        "not a FHIR resource (no resourceType)",
        "not a FHIR resource (a JSON string)",
    ]
    assert loaded.rejects[0].to_dict() == {"source": str(path), "line": 2, "reason": reasons[0]}


def test_a_bulk_export_folder_reads_every_type_file_in_name_order_and_skips_the_rest(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    write_lines(folder / "Patient.000.ndjson", [patient("p1")])
    write_lines(folder / "Encounter.000.ndjson", [encounter("e1")])
    write_lines(folder / "Encounter.001.ndjson", [encounter("e2")])
    with gzip.open(folder / "Condition.ndjson.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"resourceType": "Condition", "id": "c1"}) + "\n")
    (folder / "manifest.json").write_text(
        json.dumps({"transactionTime": "2026-01-01T00:00:00Z", "request": "x", "output": []}), "utf-8"
    )
    (folder / "README.txt").write_text("not data", "utf-8")
    loaded = load_resources([folder])
    assert keys(loaded.resources) == ["Condition/c1", "Encounter/e1", "Encounter/e2", "Patient/p1"]
    assert loaded.rejects == []
    assert loaded.files == 5  # the manifest is read, recognised and skipped; the README is not read


@pytest.mark.parametrize("bundle_type", ["searchset", "collection", "transaction", "batch"])
def test_a_bundle_file_gives_its_entry_resources(tmp_path: Path, bundle_type: str) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": bundle_type,
        "entry": [
            {
                "fullUrl": "urn:uuid:0b7c",
                "resource": {"resourceType": "Patient"},
                "request": {"method": "POST"},
            },
            {"fullUrl": "https://ehr.example/fhir/Encounter/e9", "resource": {**encounter("x"), "id": None}},
            {"resource": encounter("e1", subject="urn:uuid:0b7c")},
            {"request": {"method": "DELETE", "url": "Encounter/old"}},
            {"resource": {"resourceType": "OperationOutcome", "issue": []}, "search": {"mode": "outcome"}},
            {"resource": {"resourceType": "Bundle", "entry": [{"resource": patient("nested")}]}},
        ],
    }
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle), "utf-8")
    loaded = load_resources([path])
    assert keys(loaded.resources) == ["Patient/0b7c", "Encounter/e9", "Encounter/e1", "Patient/nested"]
    assert loaded.rejects == []


def test_single_resources_json_arrays_and_ndjson_named_json(tmp_path: Path) -> None:
    single = tmp_path / "Patient-p1.json"
    single.write_text(json.dumps(patient("p1"), indent=2), "utf-8")
    array = tmp_path / "list.json"
    array.write_text(json.dumps([encounter("e1"), 5]), "utf-8")
    lines = write_lines(tmp_path / "export.json", [encounter("e2"), encounter("e3")])
    loaded = load_resources([single, array, lines])
    assert keys(loaded.resources) == ["Patient/p1", "Encounter/e1", "Encounter/e2", "Encounter/e3"]
    assert loaded.rejects == [InputReject(str(array), 2, "not a FHIR resource (a JSON number)")]


def test_a_broken_json_file_is_one_reject(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"resourceType": "Patient", ', "utf-8")
    loaded = load_resources([path])
    assert loaded.resources == []
    assert len(loaded.rejects) == 1
    assert loaded.rejects[0].source == str(path)
    assert loaded.rejects[0].reason.startswith("not valid JSON")


def test_a_truncated_gzip_file_keeps_what_was_read(tmp_path: Path) -> None:
    whole = gzip.compress("".join(json.dumps(encounter(f"e{i}")) + "\n" for i in range(2000)).encode())
    path = tmp_path / "Encounter.ndjson.gz"
    path.write_bytes(whole[: len(whole) // 2])
    loaded = load_resources([path])
    assert 0 < len(loaded.resources) < 2000
    assert len(loaded.rejects) == 1
    assert loaded.rejects[0].reason.startswith("cannot read further")


def test_streaming_reads_lazily(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "Encounter.ndjson", [encounter("e1"), "oops", encounter("e2")])
    rejects: list[InputReject] = []
    stream = iter_resources([path], rejects)
    assert next(stream)["id"] == "e1"
    assert rejects == []
    assert next(stream)["id"] == "e2"
    assert [r.line for r in rejects] == [2]


@pytest.mark.parametrize("name", ["missing.ndjson", "empty-folder"])
def test_missing_inputs_and_empty_folders_cannot_run(tmp_path: Path, name: str) -> None:
    if name == "empty-folder":
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("x", "utf-8")
    with pytest.raises(InputError, match=str(tmp_path / name)) as caught:
        load_resources([tmp_path / name])
    assert isinstance(caught.value, ConfigError)
    assert caught.value.exit_code == 2


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=40) | st.sampled_from([b'{"resourceType": "Patient", "id": "p"}', b"[]"]),
                max_size=8))  # fmt: skip
def test_any_bytes_in_an_ndjson_file_load_without_raising(tmp_path: Path, lines: list[bytes]) -> None:
    path = tmp_path / "fuzz.ndjson"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    loaded = load_resources([path])
    assert all(isinstance(r.get("resourceType"), str) for r in loaded.resources)
    assert all(r.source == str(path) and r.line is not None for r in loaded.rejects)

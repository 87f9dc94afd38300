"""``iop-bridge map`` on inputs real exports bring: each gets a clear message, nothing is lost silently."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from sync.cli import main
from sync.inputs import load_resources

PATIENT = {"resourceType": "Patient", "id": "p1"}
ENCOUNTER = {"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/p1"}}


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def test_out_naming_a_folder_is_a_usage_error(tmp_path: Path) -> None:
    source = tmp_path / "in.ndjson"
    source.write_text(json.dumps(PATIENT) + "\n", encoding="utf-8")
    folder = tmp_path / "results"
    folder.mkdir()
    code, err = _run(["map", str(source), "--out", str(folder)])
    assert code == 2
    assert "--out" in err
    assert "folder" in err
    assert "Traceback" not in err


def test_bulk_manifest_naming_a_missing_file_is_reported(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "Patient.ndjson").write_text(json.dumps(PATIENT) + "\n", encoding="utf-8")
    manifest = {
        "transactionTime": "2026-06-01T00:00:00Z",
        "request": "https://ehr.example.org/$export",
        "requiresAccessToken": True,
        "output": [
            {"type": "Patient", "url": "https://files.example.org/Patient.ndjson"},
            {"type": "Encounter", "url": "https://files.example.org/Encounter.ndjson"},
        ],
        "error": [],
    }
    (export / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    loaded = load_resources([export], mode="lean")
    assert [r["id"] for r in loaded.resources] == ["p1"]
    reasons = [r.reason for r in loaded.rejects]
    assert any("Encounter.ndjson" in reason and "missing" in reason for reason in reasons), reasons


@pytest.mark.parametrize("name", ["bom.ndjson", "bom.json"])
def test_a_utf8_bom_is_skipped(tmp_path: Path, name: str) -> None:
    source = tmp_path / name
    text = "\n".join(json.dumps(r) for r in (PATIENT, ENCOUNTER)) + "\n"
    source.write_bytes(b"\xef\xbb\xbf" + text.encode())
    loaded = load_resources([source], mode="lean")
    assert loaded.rejects == []
    assert sorted(r["id"] for r in loaded.resources) == ["e1", "p1"]


def test_a_utf8_bom_before_a_bundle_is_skipped(tmp_path: Path) -> None:
    source = tmp_path / "bundle.json"
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": PATIENT}]}
    source.write_bytes(b"\xef\xbb\xbf" + json.dumps(bundle).encode())
    loaded = load_resources([source], mode="lean")
    assert loaded.rejects == []
    assert [r["id"] for r in loaded.resources] == ["p1"]


def test_bundle_entry_rejects_name_the_entry(tmp_path: Path) -> None:
    bad = {"resourceType": "Coverage", "id": "c1", "order": "first"}
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": PATIENT}, {"resource": ENCOUNTER}, {"resource": bad}, "junk"],
    }
    source = tmp_path / "bundle.json"
    source.write_text(json.dumps(bundle), encoding="utf-8")
    loaded = load_resources([source], mode="lean")
    reasons = sorted(r.reason for r in loaded.rejects)
    assert len(reasons) == 2
    assert reasons[0].startswith("Bundle entry 2: ")
    assert "Coverage/c1" in reasons[0]
    assert reasons[1].startswith("Bundle entry 3")
    assert "not an object" in reasons[1]

"""A rules file naming a FHIR ValueSet file (``value_set = ...``) works through ``map --rules`` and the
service: the file is read beside the rules file (the mappers get a reader and do no I/O)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sync.cli import main
from sync.rules_files import load_rules_file

LOCAL = "https://ehr.example.org/fhir/CodeSystem/service-type"
RULES = """
version = "h-1"
[[rule]]
id = "iop-local-service"
level = "iop"
on = "code"
value_set = "{name}"
source = "the hospital's IOP service types (its own ValueSet expansion)"
"""


def _write_value_set(path: Path) -> None:
    path.write_text(
        json.dumps(
            {
                "resourceType": "ValueSet",
                "expansion": {"contains": [{"system": LOCAL, "code": "IOP-ADULT"}]},
            }
        ),
        encoding="utf-8",
    )


def _encounters(path: Path) -> None:
    lines = [
        {
            "resourceType": "Encounter",
            "id": f"e{n}",
            "status": "finished",
            "class": {"code": "AMB"},
            "serviceType": {"coding": [{"system": LOCAL, "code": "IOP-ADULT"}]},
            "subject": {"reference": "Patient/p"},
            "period": {"start": f"2025-03-0{n + 1}T09:00:00Z", "end": f"2025-03-0{n + 1}T12:00:00Z"},
        }
        for n in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")


@pytest.mark.parametrize("split", [[], ["--partitions", "2", "--workers", "1"]])
def test_map_rules_reads_the_value_set_beside_the_rules_file(
    split: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital = tmp_path / "hospital"
    hospital.mkdir()
    _write_value_set(hospital / "iop-services.json")
    (hospital / "rules.toml").write_text(RULES.format(name="iop-services.json"), encoding="utf-8")
    data = tmp_path / "in.ndjson"
    _encounters(data)
    monkeypatch.chdir(tmp_path)  # not the rules folder: the name resolves against the rules file
    out = tmp_path / "episodes.ndjson"
    code = main(
        [
            "map",
            str(data),
            "--rules",
            "hospital/rules.toml",
            "--out",
            str(out),
            "--as-of",
            "2025-04-01",
            *split,
        ]
    )
    assert code == 0
    assert "encounters by level: iop 3" in capsys.readouterr().err
    (episode,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert episode["level"] == "iop"


def test_map_rules_names_a_missing_value_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rules.toml").write_text(RULES.format(name="absent.json"), encoding="utf-8")
    data = tmp_path / "in.ndjson"
    _encounters(data)
    assert main(["map", str(data), "--rules", str(tmp_path / "rules.toml")]) == 2
    err = capsys.readouterr().err
    assert "iop-local-service" in err
    assert "absent.json" in err


def test_the_service_loader_reads_value_sets_beside_the_rules_file(tmp_path: Path) -> None:
    _write_value_set(tmp_path / "vs.json")
    (tmp_path / "rules.toml").write_text(RULES.format(name="vs.json"), encoding="utf-8")
    rules = load_rules_file(tmp_path / "rules.toml")
    assert rules.rule("iop-local-service") is not None
    assert rules.version.endswith("+h-1")

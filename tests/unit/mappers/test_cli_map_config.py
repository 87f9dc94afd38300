"""``iop-bridge map --config FILE --ehr NAME`` maps as the service would for that EHR: its
``patient_identifier_systems`` decide which patient identifiers episodes and referrals carry (minimum
necessary, issue 10 item 10), in-process and partitioned alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sync.cli import main
from tests.unit.mappers.test_cli_map import run
from tests.unit.mappers.test_episodes import session
from tests.unit.mappers.test_patient_identifiers import MRN_SYSTEM, PATIENT
from tests.unit.mappers.test_referrals import request

OTHER = "urn:oid:9.9.other"


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    path = tmp_path / "input.ndjson"
    resources: list[dict[str, Any]] = [
        PATIENT,
        session("a", "2025-01-06"),
        session("b", "2025-01-08"),
        request(subject={"reference": "Patient/p"}),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in resources), "utf-8")
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[[ehr]]
name = "north"
base_url = "https://ehr.example.org/fhir"
patient_identifier_systems = ["{OTHER}"]
"""
    )
    return path


@pytest.mark.parametrize("kind", ["episodes", "referrals"])
@pytest.mark.parametrize("split", [[], ["--partitions", "2", "--workers", "1"]])
def test_the_configured_ehrs_identifier_systems_are_the_only_ones_carried(
    capsys: pytest.CaptureFixture[str], inputs: Path, config: Path, kind: str, split: list[str]
) -> None:
    code, records, err = run(
        capsys, str(inputs), "--config", str(config), "--ehr", "north", "--format", kind, *split
    )

    assert code == 0, err
    assert records
    assert all(r["patient"]["identifier"] == [{"system": OTHER, "value": "O1"}] for r in records)
    assert all(r["ehr"] == "north" for r in records)


@pytest.mark.parametrize("kind", ["episodes", "referrals"])
def test_without_a_config_only_the_mr_type_is_carried(
    capsys: pytest.CaptureFixture[str], inputs: Path, kind: str
) -> None:
    code, records, err = run(capsys, str(inputs), "--format", kind)

    assert code == 0, err
    assert records
    assert all(r["patient"]["identifier"] == [{"system": MRN_SYSTEM, "value": "M1"}] for r in records)


def test_an_ehr_the_config_does_not_have_is_refused_naming_those_it_has(
    capsys: pytest.CaptureFixture[str], inputs: Path, config: Path
) -> None:
    code = main(["--log-level", "WARNING", "map", str(inputs), "--config", str(config), "--ehr", "south"])

    assert code == 2
    assert "north" in capsys.readouterr().err


def test_a_config_with_one_ehr_needs_no_ehr_flag(
    capsys: pytest.CaptureFixture[str], inputs: Path, config: Path
) -> None:
    code, records, err = run(capsys, str(inputs), "--config", str(config), "--format", "referrals")

    assert code == 0, err
    assert [r["ehr"] for r in records] == ["north"]
    assert records[0]["patient"]["identifier"] == [{"system": OTHER, "value": "O1"}]


@pytest.mark.parametrize("split", [[], ["--partitions", "2", "--workers", "1"]])
def test_the_configured_ehrs_episode_settings_and_rules_file_are_used(
    capsys: pytest.CaptureFixture[str], inputs: Path, tmp_path: Path, split: list[str]
) -> None:
    rules = tmp_path / "south-rules.toml"
    rules.write_text('version = "south-7"\n', encoding="utf-8")
    path = tmp_path / "episodes.toml"
    path.write_text(
        f"""
[episode]
iop_revenue_code = "0907"

[[ehr]]
name = "south"
base_url = "https://ehr.example.org/fhir"

[ehr.episode]
rules = "{rules}"
"""
    )
    code, records, err = run(capsys, str(inputs), "--config", str(path), *split)

    assert code == 0, err
    assert [r["billing"]["revenue_code"] for r in records] == ["0907"]
    assert {r["rules_version"] for r in records} == {"2026.12.1+south-7"}

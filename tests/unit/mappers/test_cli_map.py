"""``iop-bridge map`` end to end through ``sync.cli.main``: outputs, summary, rejects, exit codes."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from fhir.resources.R4B.episodeofcare import EpisodeOfCare

from mappers.episodes import map_episodes
from mappers.referrals import map_referrals
from mappers.rules import default_rules
from schemas.contracts import validate
from sync.cli import main
from sync.journeys import build_resources, parse_book

ROOT = Path(__file__).resolve().parents[3]
ZONE = "America/New_York"
AS_OF = "2026-09-02T08:00:00-04:00"


@pytest.fixture(scope="module")
def journey_resources() -> list[dict[str, Any]]:
    book = parse_book(yaml.safe_load((ROOT / "examples" / "journeys.yaml").read_text(encoding="utf-8")))
    return list(build_resources(book, anchor=date(2026, 9, 1), timezone=ZONE, seed=7))


@pytest.fixture
def export(tmp_path: Path, journey_resources: list[dict[str, Any]]) -> Path:
    """The journeys as a bulk-export folder, one ``<Type>.ndjson`` per type."""
    folder = tmp_path / "export"
    folder.mkdir()
    by_type: dict[str, list[str]] = {}
    for resource in journey_resources:
        by_type.setdefault(resource["resourceType"], []).append(json.dumps(resource))
    for kind, lines in by_type.items():
        (folder / f"{kind}.ndjson").write_text("\n".join(lines) + "\n", "utf-8")
    return folder


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]], str]:
    code = main(["--log-level", "WARNING", "map", *args])
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines() if line.strip()]
    return code, records, captured.err


def expected_episodes(resources: list[dict[str, Any]], ehr: str = "default") -> list[dict[str, Any]]:
    as_of = datetime.fromisoformat(AS_OF)
    return map_episodes(resources, ehr=ehr, as_of=as_of, rules=default_rules(), timezone=ZONE).episodes


def test_episodes_to_stdout_with_a_summary_on_stderr(
    capsys: pytest.CaptureFixture[str], export: Path, journey_resources: list[dict[str, Any]]
) -> None:
    code, records, err = run(capsys, str(export), "--as-of", AS_OF, "--timezone", ZONE)
    assert code == 0
    assert records == expected_episodes(journey_resources)
    for record in records:
        validate("episode", 1, record)
    assert f"as-of: {AS_OF}" in err
    patients = sum(1 for r in journey_resources if r["resourceType"] == "Patient")
    assert f"patients: {patients}" in err
    levels = map_episodes(
        journey_resources,
        ehr="default",
        as_of=datetime.fromisoformat(AS_OF),
        rules=default_rules(),
        timezone=ZONE,
    ).encounter_levels
    assert "encounters by level: " + ", ".join(f"{k} {v}" for k, v in sorted(levels.items())) in err
    statuses = {(r["level"], r["status"]) for r in records}
    for level, status in statuses:
        count = sum(1 for r in records if (r["level"], r["status"]) == (level, status))
        assert f"{level} {status} {count}" in err
    assert "referrals: 4" in err
    assert "rejects: 0 (input 0, episodes 0, referrals 0)" in err
    assert "MRN" not in err  # counts and codes only
    assert "pt-" not in err


def test_out_file_and_rejects_file_beside_it(
    capsys: pytest.CaptureFixture[str], export: Path, tmp_path: Path, journey_resources: list[dict[str, Any]]
) -> None:
    encounters = sum(1 for r in journey_resources if r["resourceType"] == "Encounter")
    episodes = len(expected_episodes(journey_resources))
    with (export / "Encounter.ndjson").open("a", encoding="utf-8") as handle:
        handle.write("{broken\n")
        handle.write(json.dumps({"resourceType": "Encounter", "id": "nosubject", "status": "finished",
                                 "period": {"start": "2026-08-01"}}) + "\n")  # fmt: skip
    out = tmp_path / "results" / "episodes.ndjson"
    code, stdout_records, err = run(
        capsys, str(export), "--as-of", AS_OF, "--timezone", ZONE, "--out", str(out)
    )
    assert code == 0
    assert stdout_records == []
    written = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert len(written) == episodes
    rejects_file = tmp_path / "results" / "episodes.ndjson.rejects.ndjson"
    rejects = [json.loads(line) for line in rejects_file.read_text("utf-8").splitlines()]
    assert rejects[0]["source"] == str(export / "Encounter.ndjson")
    assert rejects[0]["line"] == encounters + 1
    assert rejects[0]["reason"].startswith("not valid JSON")
    assert rejects[1] == {"resourceType": "Encounter", "id": "nosubject", "reason": "no subject"}
    assert "rejects: 2 (input 1, episodes 1, referrals 0)" in err
    assert f"reject: {export / 'Encounter.ndjson'}:{encounters + 1}: not valid JSON" in err
    assert "reject: Encounter/nosubject: no subject" in err
    assert f"output: {episodes} episodes records -> {out}" in err


def test_fhir_format_prints_valid_episode_of_care_resources(
    capsys: pytest.CaptureFixture[str], export: Path, journey_resources: list[dict[str, Any]]
) -> None:
    code, records, _ = run(capsys, str(export), "--as-of", AS_OF, "--timezone", ZONE, "--format", "fhir")
    assert code == 0
    assert len(records) == len(expected_episodes(journey_resources))
    for resource in records:
        EpisodeOfCare.model_validate(resource)
        assert resource["identifier"][0]["system"] == "urn:iop-bridge:episode-id"


def test_referrals_format(
    capsys: pytest.CaptureFixture[str], export: Path, journey_resources: list[dict[str, Any]]
) -> None:
    options = ["--as-of", AS_OF, "--timezone", ZONE, "--format", "referrals", "--ehr", "north"]
    code, records, err = run(capsys, str(export), *options)
    assert code == 0
    expected = map_referrals(journey_resources, ehr="north", rules=default_rules(), timezone=ZONE)
    assert records == expected.referrals
    assert len(records) == 4
    for record in records:
        validate("referral", 1, record)
    assert any(r["part2"] for r in records)
    assert "referrals: 4" in err


def test_explain_adds_why_to_each_episode(capsys: pytest.CaptureFixture[str], export: Path) -> None:
    code, records, _ = run(capsys, str(export), "--as-of", AS_OF, "--timezone", ZONE, "--explain")
    assert code == 0
    for record in records:
        lines = record.pop("explain")
        validate("episode", 1, record)  # the rest is the plain record
        assert any(line.startswith("entry ") for line in lines)
        assert any(line.startswith("status ") for line in lines)
        assert any("(rule " in line or "which groups it" in line for line in lines)
    finished = [r for r in records if r["status"] == "finished"]
    assert finished


def test_explain_with_another_format_says_it_has_no_effect(
    capsys: pytest.CaptureFixture[str], export: Path
) -> None:
    code, records, err = run(capsys, str(export), "--as-of", AS_OF, "--format", "referrals", "--explain")
    assert code == 0
    assert all("explain" not in r for r in records)
    assert "note: --explain adds to episode records only; --format referrals has no room for it" in err


def test_the_ehr_name_is_part_of_every_id(
    capsys: pytest.CaptureFixture[str], export: Path, journey_resources: list[dict[str, Any]]
) -> None:
    _, default, _ = run(capsys, str(export), "--as-of", AS_OF, "--timezone", ZONE)
    _, south, _ = run(capsys, str(export), "--as-of", AS_OF, "--timezone", ZONE, "--ehr", "south")
    assert {r["ehr"] for r in default} == {"default"}
    assert south == expected_episodes(journey_resources, ehr="south")
    assert not {r["episode_id"] for r in default} & {r["episode_id"] for r in south}


def test_a_date_only_as_of_is_midnight_in_the_ehr_zone(
    capsys: pytest.CaptureFixture[str], export: Path
) -> None:
    code, _, err = run(capsys, str(export), "--as-of", "2026-09-02", "--timezone", ZONE)
    assert code == 0
    assert "as-of: 2026-09-02T00:00:00-04:00" in err


def test_a_hospital_rules_file_extends_the_defaults(
    capsys: pytest.CaptureFixture[str], export: Path, tmp_path: Path
) -> None:
    rules = tmp_path / "hospital.toml"
    rules.write_text('version = "north-1"\n[[rule]]\nid = "iop-hcpcs-per-diem"\ndisabled = true\n', "utf-8")
    code, records, err = run(capsys, str(export), "--as-of", AS_OF, "--timezone", ZONE, "--rules", str(rules))
    assert code == 0
    assert {r["rules_version"] for r in records} <= {f"{default_rules().version}+north-1"}
    assert f"rules: {default_rules().version}+north-1" in err
    assert "iop 160" not in err  # S9480 sessions are no longer classified iop by code


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--rules", "missing.toml", "cannot read rules file"),
        ("--rules", "bad.toml", "rules file .*bad.toml: rules file is not valid TOML"),
        ("--as-of", "yesterday", "--as-of must be an ISO 8601 date or date-time"),
        ("--timezone", "Mars/Olympus", "unknown IANA time zone"),
        ("--ehr", "north|south", "--ehr must be"),
    ],
)
def test_a_run_that_cannot_start_exits_2_with_one_clear_line(
    capsys: pytest.CaptureFixture[str], export: Path, tmp_path: Path, option: str, value: str, message: str
) -> None:
    (tmp_path / "bad.toml").write_text("version = [\n", "utf-8")
    if option == "--rules":
        value = str(tmp_path / value)
    code, records, err = run(capsys, str(export), option, value)
    assert code == 2
    assert records == []
    lines = [line for line in err.splitlines() if line.startswith("iop-bridge: error:")]
    assert len(lines) == 1
    assert re.search(message, lines[0])


def test_an_unreadable_input_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, str(tmp_path / "nowhere.ndjson"))
    assert code == 2
    assert f"input {tmp_path / 'nowhere.ndjson'} does not exist" in err


def test_as_of_defaults_to_now_in_utc(capsys: pytest.CaptureFixture[str], export: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    code, _, err = run(capsys, str(export))
    after = datetime.now(UTC)
    assert code == 0
    echoed = datetime.fromisoformat(err.split("as-of: ")[1].split(" ")[0])
    assert echoed.utcoffset() is not None
    assert before <= echoed <= after

"""``mappers.coverage`` and ``iop-bridge coverage``: unclassified Encounter signatures, counted and ordered,
from files and from the service's replica."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from connectors.store import StateStore
from mappers.coverage import encounter_coverage
from mappers.rules import default_rules, load_rules
from sync.cli import main
from sync.commands import coverage as command

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SNOMED = "http://snomed.info/sct"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
LOCAL_LOC = "https://ehr.example.org/fhir/CodeSystem/location-type"


def enc(
    eid: str, patient: str, cls: str, code: tuple[str, str] | None = None, **extra: Any
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": ACT, "code": cls},
        "subject": {"reference": f"Patient/{patient}"},
        "period": {"start": "2025-03-01T09:00:00Z", "end": "2025-03-01T10:00:00Z"},
        **extra,
    }
    if code:
        resource["type"] = [{"coding": [{"system": code[0], "code": code[1]}]}]
    return resource


def fixture() -> list[dict[str, Any]]:
    """3 check-ups (AMB 185349003), 2 on a local-typed ward (IMP), 1 AMB recording a BH diagnosis,
    classified: 2 IOP sessions, 1 detox stay; plus an entered-in-error Encounter (not counted)."""
    ward = {
        "resourceType": "Location",
        "id": "ward-7",
        "type": [{"coding": [{"system": LOCAL_LOC, "code": "BHU"}]}],
    }
    dx = {
        "resourceType": "Condition",
        "id": "dx",
        "code": {"coding": [{"system": ICD, "code": "F32.1"}]},
        "subject": {"reference": "Patient/b"},
        "encounter": {"reference": "Encounter/rec-1"},
    }
    on_ward = {"location": [{"location": {"reference": "Location/ward-7"}}]}
    return [
        ward,
        dx,
        enc("chk-3", "a", "AMB", (SNOMED, "185349003")),
        enc("chk-1", "b", "AMB", (SNOMED, "185349003")),
        enc("chk-2", "c", "AMB", (SNOMED, "185349003")),
        enc("ward-2", "a", "IMP", **on_ward),
        enc("ward-1", "c", "IMP", **on_ward),
        enc("rec-1", "b", "AMB", (SNOMED, "390906007")),
        enc("iop-1", "a", "AMB", (HCPCS, "S9480")),
        enc("iop-2", "a", "AMB", (HCPCS, "S9480")),
        enc("detox", "b", "IMP", (SNOMED, "56876005")),
        {**enc("gone", "c", "AMB"), "status": "entered-in-error"},
    ]


def test_counts_and_orders_the_unclassified_signatures() -> None:
    report = encounter_coverage(fixture(), default_rules())
    assert report.encounters == 9
    assert dict(report.classified) == {"inpatient": 1, "iop": 2}
    assert report.unclassified == 6
    local = "ehr.example.org/fhir/codesystem/location-type BHU"
    rows = [
        (s.count, s.signature.classes, s.signature.codes, s.signature.location_types, s.signature.qualifier,
         s.example)
        for s in report.signatures
    ]  # fmt: skip
    assert rows == [
        (3, ("actcode AMB",), ("snomed 185349003",), (), "none", "chk-1"),
        (2, ("actcode IMP",), (), (local,), "none", "ward-1"),
        (1, ("actcode AMB",), ("snomed 390906007",), (), "recorded", "rec-1"),
    ]
    assert "needs a behavioral-health qualifier of purpose" in report.signatures[2].reason


def test_a_rule_written_from_the_report_classifies_that_signature() -> None:
    rules = load_rules(
        f"""
version = "h-1"
[[rule]]
id = "inpatient-local-bhu"
level = "inpatient"
on = "location_type"
system = "{LOCAL_LOC}"
codes = ["BHU"]
source = "our behavioral health unit's local Location type"
"""
    )
    report = encounter_coverage(fixture(), rules)
    assert dict(report.classified) == {"inpatient": 3, "iop": 2}
    assert [s.count for s in report.signatures] == [3, 1]


def test_by_location_splits_signatures_by_department_and_limit_cuts_the_list() -> None:
    report = encounter_coverage(fixture(), default_rules(), by_location=True, limit=2)
    assert report.unclassified == 6
    assert [(s.count, s.signature.locations) for s in report.signatures] == [
        (3, ()),
        (2, ("Location/ward-7",)),
    ]


def _write(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in fixture()), encoding="utf-8")
    return path


def test_cli_prints_the_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write(tmp_path / "all.ndjson")
    assert main(["coverage", str(data)]) == 0
    text = capsys.readouterr().out
    assert "encounters: 9 read; classified: inpatient 1, iop 2; unclassified: 6" in text
    rows = [line.split() for line in text.splitlines() if line[:1].isdigit()]
    assert [(row[0], row[-1]) for row in rows] == [("3", "chk-1"), ("2", "ward-1"), ("1", "rec-1")]
    assert main(["coverage", str(data), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["encounters"] == 9
    assert [s["count"] for s in document["signatures"]] == [3, 2, 1]


def test_cli_reads_the_services_replica(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = StateStore(url)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for resource in fixture():
        by_type.setdefault(resource["resourceType"], []).append(resource)
    for resource_type, resources in by_type.items():
        store.commit_increment("general", resource_type, resources, None)
    store.close()
    config = tmp_path / "iop.toml"
    config.write_text(
        f'[store]\nurl = "{url}"\n\n[[ehr]]\nname = "general"\nbase_url = "https://ehr.example.org/fhir"\n',
        encoding="utf-8",
    )
    assert main(["coverage", "--config", str(config), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["encounters"], document["unclassified"]) == (9, 6)
    assert [(s["count"], s["example"]) for s in document["signatures"]] == [
        (3, "chk-1"),
        (2, "ward-1"),
        (1, "rec-1"),
    ]


def test_cli_without_inputs_or_store_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["coverage"]) == 2
    assert "INPUT" in capsys.readouterr().err


ORACLE_222 = "https://fhir.cerner.com/ec2458f2-1e24-41c8-b71b-0e701af7583d/codeSet/222"


def test_oracle_location_types_in_physical_type_show_and_take_a_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle Health sends Millennium location types (code set 222, tenant-specific numeric codes) in
    Location.physicalType: coverage shows them through the lean reader, and a rule on that system works."""
    unit = {
        "resourceType": "Location",
        "id": "4048128",
        "physicalType": {"coding": [{"system": ORACLE_222, "code": "794", "userSelected": True}]},
    }
    stays = [
        enc(f"st{n}", "p", "IMP", location=[{"location": {"reference": "Location/4048128"}}])
        for n in range(2)
    ]
    data = tmp_path / "oracle.ndjson"
    data.write_text("".join(json.dumps(r) + "\n" for r in [unit, *stays]), encoding="utf-8")
    assert main(["coverage", str(data), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["signatures"]
    assert row["location_types"] == [f"{ORACLE_222.removeprefix('https://').lower()} 794"]
    rules = tmp_path / "rules.toml"
    rules.write_text(
        f'version = "h-1"\n[[rule]]\nid = "inpatient-bhu"\nlevel = "inpatient"\non = "location_type"\n'
        f'system = "{ORACLE_222}"\ncodes = ["794"]\nsource = "our BH unit (code set 222 value 794)"\n',
        encoding="utf-8",
    )
    assert main(["coverage", str(data), "--rules", str(rules), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["classified"], document["unclassified"]) == ({"inpatient": 2}, 0)


def test_a_large_input_is_read_in_patient_partitions_with_the_same_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write(tmp_path / "all.ndjson")
    assert main(["coverage", str(data), "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(command, "PARTITION_BYTES", 500)  # a few patients per partition
    assert main(["coverage", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == whole

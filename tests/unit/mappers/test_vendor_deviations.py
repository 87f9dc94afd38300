"""Lean and strict readers tolerate the same named deviations, and lose nothing silently.

Each case is a deviation real vendors send, applied to one resource of a small IOP course (a patient,
seven attended S9480 sessions, a Coverage, a CarePlan). Read through the lean projection and through
``fhir.resources`` with the same tolerated set, both readers must agree: kept with the deviation named
(and the episode intact), or rejected with a reason naming the resource type, id and field.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.vendors import profile_named
from mappers import default_rules, map_episodes
from sync.inputs import Loaded, ReadMode, load_resources

AS_OF = datetime(2026, 6, 1, tzinfo=UTC)
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
REVENUE = "https://www.nubc.org/CodeSystem/RevenueCodes"
DAYS = (4, 5, 6, 7, 8, 11, 12)
GENERIC = profile_named("generic").tolerated_deviations
NOTHING: frozenset[str] = frozenset()


def _session(number: int, day: int) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": f"e{number}",
        "meta": {"versionId": "1"},
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"coding": [{"system": HCPCS, "code": "S9480"}]}],
        "subject": {"reference": "Patient/p1"},
        "period": {"start": f"2026-05-{day:02d}T09:00:00Z", "end": f"2026-05-{day:02d}T12:00:00Z"},
    }


def _course() -> list[dict[str, Any]]:
    return [
        {"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:mrn", "value": "123"}]},
        *(_session(number, day) for number, day in enumerate(DAYS, start=1)),
        {
            "resourceType": "Coverage",
            "id": "cov1",
            "status": "active",
            "beneficiary": {"reference": "Patient/p1"},
            "payor": [{"reference": "Organization/o1"}],
            "order": 1,
        },
        {
            "resourceType": "CarePlan",
            "id": "cp1",
            "status": "active",
            "intent": "plan",
            "subject": {"reference": "Patient/p1"},
            "activity": [
                {
                    "detail": {
                        "status": "in-progress",
                        "scheduledTiming": {"repeat": {"frequency": 3, "period": 1, "periodUnit": "wk"}},
                    }
                }
            ],
        },
    ]


def _by_id(resources: list[dict[str, Any]], rid: str) -> dict[str, Any]:
    return next(r for r in resources if r["id"] == rid)


Change = Callable[[list[dict[str, Any]]], None]
Read = Callable[[dict[str, Any]], Any]


def _status(rs: list[dict[str, Any]]) -> None:
    _by_id(rs, "e1")["status"] = "finished "


def _version(rs: list[dict[str, Any]]) -> None:
    _by_id(rs, "e1")["meta"]["versionId"] = 2


def _identifier(rs: list[dict[str, Any]]) -> None:
    _by_id(rs, "p1")["identifier"][0]["value"] = 123


def _revenue(rs: list[dict[str, Any]]) -> None:
    _by_id(rs, "e1")["type"].append({"coding": [{"system": REVENUE, "code": 906}]})


def _rank(rank: Any) -> Change:
    def change(rs: list[dict[str, Any]]) -> None:
        _by_id(rs, "e1")["diagnosis"] = [{"condition": {"reference": "Condition/c1"}, "rank": rank}]

    return change


def _order(rs: list[dict[str, Any]]) -> None:
    _by_id(rs, "cov1")["order"] = "1"


def _frequency(rs: list[dict[str, Any]]) -> None:
    _by_id(rs, "cp1")["activity"][0]["detail"]["scheduledTiming"]["repeat"]["frequency"] = "3"


def _repeat(plan: dict[str, Any]) -> Any:
    return plan["activity"][0]["detail"]["scheduledTiming"]["repeat"]["frequency"]


# (case, change, resource changed, deviation, field path, the kept value read back, what it must be)
CASES: list[tuple[str, Change, str, str, str, Read, Any]] = [
    ("status-space", _status, "Encounter/e1", "code-whitespace", "status", lambda r: r["status"], "finished"),
    ("numeric-versionId", _version, "Encounter/e1", "number-as-string", "meta.versionId",
     lambda r: r["meta"]["versionId"], "2"),
    ("numeric-identifier", _identifier, "Patient/p1", "number-as-string", "identifier[0].value",
     lambda r: r["identifier"][0]["value"], "123"),
    ("numeric-revenue", _revenue, "Encounter/e1", "number-as-string", "type[1].coding[0].code",
     lambda r: r["type"][1]["coding"][0]["code"], "906"),
    ("string-rank", _rank("1"), "Encounter/e1", "string-as-number", "diagnosis[0].rank",
     lambda r: r["diagnosis"][0]["rank"], 1),
    ("string-order", _order, "Coverage/cov1", "string-as-number", "order", lambda r: r["order"], 1),
    ("string-frequency", _frequency, "CarePlan/cp1", "string-as-number",
     "activity[0].detail.scheduledTiming.repeat.frequency", _repeat, 3),
]  # fmt: skip


def _read(tmp_path: Path, change: Change, mode: ReadMode, tolerate: frozenset[str]) -> Loaded:
    resources = _course()
    change(resources)
    path = tmp_path / f"{mode}.ndjson"
    path.write_text("".join(json.dumps(r) + "\n" for r in resources), "utf-8")
    return load_resources([path], mode=mode, tolerate=tolerate)


def _sessions(loaded: Loaded) -> int:
    mapped = map_episodes(loaded.resources, ehr="t", as_of=AS_OF, rules=default_rules())
    assert len(mapped.episodes) == 1
    return len(mapped.episodes[0]["sessions"])


@pytest.mark.parametrize(("name", "change", "key", "deviation", "path", "read", "value"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_lean_and_strict_keep_a_tolerated_deviation_and_name_it(
    tmp_path: Path, name: str, change: Change, key: str, deviation: str, path: str, read: Read, value: Any
) -> None:
    assert deviation in GENERIC
    for mode in ("lean", "strict"):
        loaded = _read(tmp_path, change, mode, GENERIC)
        assert loaded.rejects == [], mode
        assert loaded.deviations == {deviation: 1}, mode
        kept = _by_id(loaded.resources, key.split("/")[1])
        assert read(kept) == value, mode
        assert _sessions(loaded) == len(DAYS), mode


@pytest.mark.parametrize(("name", "change", "key", "deviation", "path", "read", "value"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_lean_and_strict_reject_an_untolerated_deviation_naming_type_id_and_field(
    tmp_path: Path, name: str, change: Change, key: str, deviation: str, path: str, read: Read, value: Any
) -> None:
    for mode in ("lean", "strict"):
        loaded = _read(tmp_path, change, mode, NOTHING)
        assert len(loaded.rejects) == 1, mode
        reason = loaded.rejects[0].reason
        assert reason.startswith(f"{key}: "), (mode, reason)
        assert path in reason, (mode, reason)
        assert f"({deviation}, not tolerated" in reason, (mode, reason)
        assert key not in {f"{r['resourceType']}/{r['id']}" for r in loaded.resources}
        assert loaded.deviations == {}


@pytest.mark.parametrize("mode", ["lean", "strict"])
def test_a_string_that_holds_no_number_is_a_reject_in_both_readers(tmp_path: Path, mode: ReadMode) -> None:
    loaded = _read(tmp_path, _rank("first"), mode, GENERIC)
    assert [r.reason.split(": ", 1)[0] for r in loaded.rejects] == ["Encounter/e1"]
    assert "diagnosis[0].rank" in loaded.rejects[0].reason
    assert "first" not in loaded.rejects[0].reason


def test_a_session_with_a_spaced_status_is_never_dropped_without_a_reject(tmp_path: Path) -> None:
    """Before: lean kept ``"finished "``, the mapper saw no attended status and the session vanished."""
    loaded = _read(tmp_path, _status, "lean", NOTHING)
    kept = len([r for r in loaded.resources if r["resourceType"] == "Encounter"])
    assert kept + len(loaded.rejects) == len(DAYS)
    assert _sessions(loaded) + len(loaded.rejects) == len(DAYS)


@pytest.mark.parametrize("vendor", ["generic", "hapi", "epic", "oracle"])
def test_every_profile_tolerates_the_lossless_deviations(vendor: str) -> None:
    assert {"code-whitespace", "number-as-string", "string-as-number"} <= profile_named(
        vendor
    ).tolerated_deviations


def test_a_partitioned_lean_read_counts_the_same_deviations(tmp_path: Path) -> None:
    from collections import Counter

    from sync.inputs import partition_resources, read_partition

    resources = _course()
    for change in (_status, _version, _order, _frequency):
        change(resources)
    path = tmp_path / "in.ndjson"
    path.write_text("".join(json.dumps(r) + "\n" for r in copy.deepcopy(resources)), "utf-8")
    (tmp_path / "parts").mkdir()
    parts = partition_resources([path], tmp_path / "parts", 2)
    counted: Counter[str] = Counter()
    read = read_partition([*parts.parts, parts.shared], mode="lean", tolerate=GENERIC, deviations=counted)
    assert len(read) == len(resources)
    assert counted == load_resources([path], mode="lean", tolerate=GENERIC).deviations
    assert counted == {"code-whitespace": 1, "number-as-string": 1, "string-as-number": 2}


@pytest.mark.parametrize("partitions", ["1", "3"])
@pytest.mark.parametrize("strict", [[], ["--strict"]])
def test_map_counts_the_kept_deviations_in_its_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], partitions: str, strict: list[str]
) -> None:
    from sync.cli import main

    resources = _course()
    for change in (_status, _order):
        change(resources)
    path = tmp_path / "in.ndjson"
    path.write_text("".join(json.dumps(r) + "\n" for r in resources), "utf-8")
    out = tmp_path / "out.ndjson"
    common = [str(path), "--out", str(out), "--as-of", "2026-06-01", "--workers", "1"]
    assert main(["map", *common, "--partitions", partitions, *strict]) == 0
    summary = capsys.readouterr().err
    assert "deviations kept: code-whitespace 1, string-as-number 1" in summary
    assert "rejects: 0 " in summary
    assert main(["map", *common, "--partitions", partitions, "--vendor", "epic", *strict]) == 0
    assert "deviations kept: code-whitespace 1, string-as-number 1" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["lean", "strict"])
def test_the_vendor_profile_decides_an_id_deviation_the_same_way_in_both_readers(
    tmp_path: Path, mode: ReadMode
) -> None:
    def odd_id(rs: list[dict[str, Any]]) -> None:
        _by_id(rs, "e1")["id"] = "E1_" + "9" * 70

    epic = _read(tmp_path, odd_id, mode, profile_named("epic").tolerated_deviations)
    assert epic.rejects == []
    assert epic.deviations == {"id-format": 1}
    assert "E1_" + "9" * 70 in {r["id"] for r in epic.resources}  # kept as sent
    assert _sessions(epic) == len(DAYS)
    generic = _read(tmp_path, odd_id, mode, GENERIC)
    assert [r.reason.split(": ", 1)[1].split(":")[0] for r in generic.rejects] in (["id"], ["$.id"])
    assert "(id-format, not tolerated" in generic.rejects[0].reason


def test_map_takes_the_vendor_of_the_ehr_from_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sync.cli import main

    for name in [n for n in __import__("os").environ if n.startswith("IOP_BRIDGE_")]:
        monkeypatch.delenv(name)
    resources = _course()
    _by_id(resources, "e1")["id"] = "E1_" + "9" * 70  # Epic tolerates long ids, generic does not
    path = tmp_path / "in.ndjson"
    path.write_text("".join(json.dumps(r) + "\n" for r in resources), "utf-8")
    config = tmp_path / "iop.toml"
    config.write_text('[[ehr]]\nname = "mercy"\nbase_url = "https://ehr.example.org/r4/"\nvendor = "epic"\n')
    common = [
        "map",
        str(path),
        "--out",
        str(tmp_path / "out.ndjson"),
        "--as-of",
        "2026-06-01",
        "--workers",
        "1",
    ]
    assert main([*common, "--ehr", "mercy", "--config", str(config)]) == 0
    assert "deviations kept: id-format 1" in capsys.readouterr().err
    assert main([*common, "--ehr", "mercy"]) == 0
    err = capsys.readouterr().err
    assert "deviations kept: none" in err
    assert "(id-format, not tolerated for this EHR)" in err

"""``iop-bridge map`` split by patient and mapped by worker processes gives what one process gives."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest

from sync.cli import main
from sync.inputs import partition_resources, patient_key, read_partition

AS_OF = "2026-06-01T23:59:00Z"


@pytest.fixture(scope="module")
def health_system(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated health system of a few hundred patients, plus resources of no patient that reject."""
    folder = tmp_path_factory.mktemp("system")
    assert main(["seed", "--patients", "300", "--anchor", "2026-06-01", "--out", str(folder)]) == 0
    extra = [
        {"resourceType": "Encounter", "id": "no-subject", "status": "finished", "class": {"code": "AMB"}},
        {"resourceType": "Encounter", "status": "finished", "subject": {"reference": "Patient/x"}},
        {"resourceType": "Location", "id": "spare", "name": "Annex"},
    ]
    lines = [json.dumps(r) for r in extra] + ["{not json"]
    (folder / "Extra.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _map(inputs: list[Path], out: Path, *options: str) -> tuple[bytes, bytes, list[str]]:
    """Output, rejects file and summary lines (the output path line left out) of one map run."""
    summary = out.with_suffix(".summary")
    argv = ["map", *map(str, inputs), "--out", str(out), "--as-of", AS_OF, "--timezone", "UTC", *options]

    with summary.open("w", encoding="utf-8") as sink, contextlib.redirect_stderr(sink):
        assert main(argv) == 0
    rejects = out.with_name(out.name + ".rejects.ndjson")
    shown = [
        line
        for line in summary.read_text(encoding="utf-8").splitlines()
        if not line.startswith(("output:", "rejects file:", "{"))
    ]
    return out.read_bytes(), rejects.read_bytes(), shown


@pytest.mark.parametrize("output", [[], ["--format", "referrals"], ["--explain"]])
def test_parallel_partitions_give_the_bytes_of_one_process(
    health_system: Path, tmp_path: Path, output: list[str]
) -> None:
    whole = _map([health_system], tmp_path / "whole.ndjson", "--workers", "1", "--partitions", "1", *output)
    parallel = _map([health_system], tmp_path / "par.ndjson", "--workers", "2", "--partitions", "5", *output)
    serial = _map([health_system], tmp_path / "ser.ndjson", "--workers", "1", "--partitions", "3", *output)
    assert whole[0].count(b"\n") > 50
    assert parallel == whole
    assert serial == whole


def test_rejects_of_resources_of_no_patient_are_reported_once(health_system: Path, tmp_path: Path) -> None:
    _, rejects, _ = _map([health_system], tmp_path / "out.ndjson", "--workers", "1", "--partitions", "4")
    reasons = [json.loads(line) for line in rejects.splitlines()]
    assert sum(1 for r in reasons if r.get("id") == "no-subject") == 1
    assert sum(1 for r in reasons if r.get("reason") == "no id") == 1
    assert sum(1 for r in reasons if "not valid JSON" in str(r.get("reason"))) == 1


def test_input_order_does_not_change_the_output(health_system: Path, tmp_path: Path) -> None:
    lines = [
        line
        for path in sorted(health_system.glob("*.ndjson"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and line != "{not json"
    ]
    random.Random(11).shuffle(lines)
    shuffled = tmp_path / "shuffled.ndjson"
    shuffled.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ordered = tmp_path / "ordered.ndjson"
    ordered.write_text("\n".join(sorted(lines)) + "\n", encoding="utf-8")
    one = _map([ordered], tmp_path / "a.ndjson", "--workers", "1", "--partitions", "1")
    other = _map([shuffled], tmp_path / "b.ndjson", "--workers", "2", "--partitions", "3")
    assert one[0] == other[0]
    assert one[1] == other[1]


def test_every_resource_lands_in_its_patients_partition_or_the_shared_file(
    health_system: Path, tmp_path: Path
) -> None:
    partitions = partition_resources([health_system], tmp_path, 4)
    seen: dict[str, int] = {}
    for index, part in enumerate(partitions.parts):
        for resource in read_partition([part]):
            patient = patient_key(resource)
            assert patient is not None
            assert seen.setdefault(patient, index) == index  # one patient, one partition
    shared = read_partition([partitions.shared])
    assert {r["resourceType"] for r in shared} >= {"Location", "Organization"}
    assert all(patient_key(r) is None for r in shared)
    total = sum(len(read_partition([p])) for p in partitions.parts) + len(shared)
    assert total == partitions.resources
    assert len(partitions.rejects) == 1  # the line that is not JSON


def test_patient_key_reads_the_element_the_mappers_group_by() -> None:
    assert patient_key({"resourceType": "Patient", "id": "p1"}) == "p1"
    assert patient_key({"resourceType": "Coverage", "beneficiary": {"reference": "Patient/p2"}}) == "p2"
    assert patient_key({"resourceType": "Task", "for": {"reference": "urn:uuid:abc"}}) == "abc"
    assert patient_key({"resourceType": "Encounter", "patient": {"reference": "Patient/p3"}}) is None
    assert patient_key({"resourceType": "Location", "id": "l1"}) is None


def _hostile_lines() -> list[bytes]:
    subject = b'"subject":{"reference":"Patient/h1"}'
    depth = 100_000
    return [
        b'{"resourceType":"Patient","id":"h1"}',
        b'{"resourceType":"Encounter","id":"deep",' + subject + b',"extension":'
        + b"[" * depth + b"]" * depth + b"}",
        b'{"resourceType":"Enc\\tounter","id":"tab",' + subject + b"}",
        b'{"resourceType":"Encounter","id":"inf",' + subject + b',"length":{"value":1e400}}',
        b'{"resourceType":"Coverage","id":"big","beneficiary":{"reference":"Patient/h1"},"order":'
        + str(2**100).encode() + b"}",
        b'{"resourceType":"Encounter","id":"ok","status":"finished",' + subject
        + b',"class":{"code":"AMB"},"period":{"start":"2026-05-01T10:00:00Z","end":"2026-05-01T13:00:00Z"}}',
    ]  # fmt: skip


@pytest.mark.parametrize("strict", [[], ["--strict"]])
def test_hostile_lines_give_the_same_rejects_in_both_modes(tmp_path: Path, strict: list[str]) -> None:
    """A 100k-deep object, a resourceType with an escaped tab, 1e400 and 2**100: the partitioned run
    rejects (or keeps) exactly what the in-process run does, and neither stops at them."""
    source = tmp_path / "hostile.ndjson"
    source.write_bytes(b"\n".join(_hostile_lines()) + b"\n")
    here = _map([source], tmp_path / "here.ndjson", "--workers", "1", "--partitions", "1", *strict)
    split = _map([source], tmp_path / "split.ndjson", "--workers", "1", "--partitions", "3", *strict)
    assert split == here
    lines = {json.loads(r)["line"] for r in here[1].splitlines()}
    assert {2, 4} <= lines  # too deep; 1e400 is infinite
    assert 6 not in lines  # the good Encounter after them is read

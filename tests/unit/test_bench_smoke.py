"""The benchmark harness at its smallest size, in-process: a check of the harness, not of any speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import generate, mapping, run
from bench.harness import Row, Runner

SIZE = 150


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(generate, "DATA", tmp_path / "data")
    return tmp_path / "data"


def test_generated_health_system_is_cached_and_patient_complete(data_dir: Path) -> None:
    folder = generate.dataset(SIZE)
    info = generate.manifest(folder)
    assert folder == data_dir / "150"
    assert info["encounters"] >= SIZE
    lines = {p.stem: len(p.read_bytes().splitlines()) for p in folder.glob("*.ndjson")}
    assert lines == info["resources"]
    assert lines["Patient"] == info["patients"]
    stamp = (folder / generate.INFO).stat().st_mtime_ns
    assert generate.dataset(SIZE) == folder
    assert (folder / generate.INFO).stat().st_mtime_ns == stamp  # reused, not rebuilt


@pytest.mark.parametrize(
    ("text", "value"), [("10k", 10_000), ("1M", 1_000_000), ("2500", 2500), ("1.5k", 1500)]
)
def test_sizes_parse(text: str, value: int) -> None:
    assert generate.parse_size(text) == value
    assert generate.parse_size(generate.size_label(value)) == value


def test_bad_size_is_refused() -> None:
    with pytest.raises(ValueError, match="not a size"):
        generate.parse_size("lots")


def test_every_bench_gives_rows_of_the_table_shape(data_dir: Path) -> None:
    rows = run.run_benches(
        run.BENCHES,
        [SIZE],
        runner=Runner(isolated=False),
        fhir_url=None,
        validate_limit=5,
        min_cpu=0.0,
    )
    by_bench: dict[str, list[Row]] = {}
    for row in rows:
        by_bench.setdefault(row.bench, []).append(row)
    assert list(by_bench) == list(run.BENCHES)

    types = generate.manifest(data_dir / "150")["resources"]
    validate_rows = by_bench["validate"]
    assert len(validate_rows) == len(types) + 1
    for row in validate_rows:
        assert row.ours is not None
        assert row.ours > 0
        assert row.floor is not None
        assert row.floor > 0
        assert row.ratio == pytest.approx(row.ours / row.floor)
        assert row.extra["rejected"] == 0

    for row in by_bench["map"]:
        assert row.floor is not None or "not available yet" in row.note
        assert (row.ours is not None) or "not available yet" in row.note
    assert all(r.ours is None and "no FHIR sandbox" in r.note for r in by_bench["pull"])
    first, broker = by_bench["writeback"]
    assert "no FHIR sandbox" in first.note
    assert "no broker" in broker.note

    lines = run.table_lines(rows)
    assert len(lines) == len(rows) + 1
    assert lines[0].split(" | ")[0].strip() == "bench"
    assert all(len(line.split(" | ")) >= len(run.HEADER) - 1 for line in lines)  # an empty note is trimmed

    document = json.loads(json.dumps(run.report(rows, 0.0, [SIZE])))
    assert len(document["rows"]) == len(rows)
    assert set(document["rows"][0]) >= {"bench", "size", "metric", "ours", "floor", "ratio", "rss_ours_mb"}


def test_map_batches_hold_each_patient_whole(data_dir: Path) -> None:
    folder = generate.dataset(SIZE)
    info = generate.manifest(folder)
    seen: dict[str, int] = {}
    total = 0
    for resources in mapping.patient_batches(folder, batch=7):
        patients = {r["id"] for r in resources if r["resourceType"] == "Patient"}
        assert len(patients) <= 7
        for resource in resources:
            owner = mapping.patient_of(resource)
            if owner is None:
                assert resource["resourceType"] in mapping.SHARED_TYPES
            else:
                assert owner in patients  # never split from its patient's batch
                seen[resource["resourceType"]] = seen.get(resource["resourceType"], 0) + 1
        total += 1
    expected = {k: v for k, v in info["resources"].items() if k not in mapping.SHARED_TYPES}
    assert seen == expected
    assert total == -(-info["patients"] // 7)

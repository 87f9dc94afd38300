"""Caps on what ``map`` reads (issue 10 item 16, issue 11): lines, Bundle entries, documents, gzip."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import orjson
import pytest

from sync.inputs import InputLimits, load_resources, partition_resources

LIMITS = InputLimits(line_bytes=2048, document_bytes=64 * 1024, stream_bytes=4096)


def _encounter(eid: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Encounter", "id": eid, "status": "finished", **extra}


def _bundle(*resources: dict[str, Any]) -> bytes:
    entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]
    return orjson.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries})


def _reasons(loaded: Any) -> list[tuple[int | None, str]]:
    return [(r.line, r.reason) for r in loaded.rejects]


def test_an_ndjson_line_over_the_cap_is_a_reject_and_the_rest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "e.ndjson"
    big = orjson.dumps(_encounter("big", note="x" * 5000))
    path.write_bytes(
        orjson.dumps(_encounter("a")) + b"\n" + big + b"\n" + orjson.dumps(_encounter("b")) + b"\n"
    )
    loaded = load_resources([path], limits=LIMITS)
    assert [r["id"] for r in loaded.resources] == ["a", "b"]
    assert _reasons(loaded) == [(2, f"line 2 is {len(big)} bytes, over max_line_bytes (2048)")]
    assert loaded.rejects[0].source == str(path)


def test_a_gzip_bomb_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "bomb.ndjson.gz"
    with gzip.open(path, "wb") as sink:
        sink.write(orjson.dumps(_encounter("a")) + b"\n")
        for _ in range(64):
            sink.write(b"x" * (1 << 20))  # one 64 MiB line
        sink.write(b"\n" + orjson.dumps(_encounter("b")) + b"\n")
    loaded = load_resources([path], limits=LIMITS)
    assert [r["id"] for r in loaded.resources] == ["a", "b"]
    assert _reasons(loaded) == [(2, f"line 2 is {64 << 20} bytes, over max_line_bytes (2048)")]


@pytest.mark.parametrize("name", ["big.json", "big.json.gz"])
def test_a_document_over_the_cap_is_a_reject_naming_file_and_cap(tmp_path: Path, name: str) -> None:
    body = _bundle(*(_encounter(f"e{i}", note="x" * 1000) for i in range(100)))
    path = tmp_path / name
    path.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    loaded = load_resources([path], limits=LIMITS)
    assert loaded.resources == []
    assert _reasons(loaded) == [
        (
            None,
            f"the document is over max_document_bytes ({64 * 1024} bytes"
            + (", decompressed)" if name.endswith(".gz") else ")"),
        )
    ]


def test_a_big_bundle_is_read_entry_by_entry_with_the_same_resources(tmp_path: Path) -> None:
    resources = [_encounter(f"e{i}", note="y" * 200) for i in range(60)]
    small = tmp_path / "small.json"
    small.write_bytes(_bundle(*resources))
    whole = load_resources([small], limits=InputLimits(line_bytes=2048, document_bytes=1 << 20))
    streamed = load_resources([small], limits=LIMITS)
    assert streamed.resources == whole.resources
    assert len(streamed.resources) == 60
    assert streamed.rejects == []


def test_a_streamed_bundle_rejects_one_bad_entry_by_position_and_keeps_the_others(tmp_path: Path) -> None:
    entries = [orjson.dumps({"resource": _encounter(f"e{i}", note="z" * 300)}) for i in range(20)]
    entries[3] = b'{"resource":{"resourceType":"Encounter","id":"e3","length":{"value":1e400}}}'
    entries[5] = orjson.dumps({"resource": _encounter("e5", note="w" * 3000)})
    path = tmp_path / "b.json"
    path.write_bytes(b'{"resourceType":"Bundle","type":"collection","entry":[' + b",".join(entries) + b"]}")
    loaded = load_resources([path], limits=LIMITS)
    assert [r["id"] for r in loaded.resources] == [f"e{i}" for i in range(20) if i not in (3, 5)]
    [(_, bad), (_, big)] = _reasons(loaded)
    assert bad.startswith("Bundle entry 3: not valid JSON")
    assert big == f"Bundle entry 5: {len(entries[5])} bytes, over max_line_bytes (2048)"


def test_a_big_bundle_on_an_ndjson_line_is_streamed_too(tmp_path: Path) -> None:
    path = tmp_path / "b.ndjson"
    resources = [_encounter(f"e{i}", note="v" * 100) for i in range(40)]
    path.write_bytes(_bundle(*resources) + b"\n")
    limits = InputLimits(line_bytes=1 << 20, document_bytes=1 << 20, stream_bytes=1024)
    loaded = load_resources([path], limits=limits)
    assert [r["id"] for r in loaded.resources] == [f"e{i}" for i in range(40)]


def test_partitioning_applies_the_same_caps(tmp_path: Path) -> None:
    path = tmp_path / "e.ndjson"
    big = orjson.dumps(_encounter("big", note="x" * 5000))
    path.write_bytes(orjson.dumps(_encounter("a")) + b"\n" + big + b"\n")
    folder = tmp_path / "parts"
    folder.mkdir()
    parts = partition_resources([path], folder, 2, limits=LIMITS)
    assert parts.resources == 1
    assert [(r.line, r.reason) for r in parts.rejects] == [
        (2, f"line 2 is {len(big)} bytes, over max_line_bytes (2048)")
    ]


@pytest.mark.parametrize("partitions", ["1", "2"])
def test_map_takes_the_caps_from_its_flags_in_either_mode(tmp_path: Path, partitions: str) -> None:
    import contextlib
    import io

    from sync.cli import main

    path = tmp_path / "e.ndjson"
    big = orjson.dumps(_encounter("big", note="x" * 5000))
    patient = {"resourceType": "Patient", "id": "p1"}
    path.write_bytes(orjson.dumps(patient) + b"\n" + big + b"\n")
    out = tmp_path / "out.ndjson"
    argv = ["map", str(path), "--out", str(out), "--max-line-bytes", "2048"]
    with contextlib.redirect_stderr(io.StringIO()):
        assert main([*argv, "--partitions", partitions, "--workers", "1"]) == 0
    rejects = [orjson.loads(line) for line in Path(f"{out}.rejects.ndjson").read_bytes().splitlines()]
    assert [r["reason"] for r in rejects] == [f"line 2 is {len(big)} bytes, over max_line_bytes (2048)"]

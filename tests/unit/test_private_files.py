"""Files holding PHI are created 0600 in 0700 folders, under a permissive umask (0o022)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.output import RunOutput
from connectors.store import StateStore
from sync.cli import main


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_pull_output_and_rejects_are_private(tmp_path: Path) -> None:
    out = tmp_path / "pulls" / "ehr-a"
    run = RunOutput(out)
    try:
        run.write("Encounter", "e1", b'{"resourceType":"Encounter","id":"e1"}')
        run.reject({"resourceType": "Patient", "id": "p1"}, "bad")
        run.publish()
    finally:
        run.close()
    assert _mode(tmp_path / "pulls") == 0o700
    assert _mode(out) == 0o700
    files = list(out.iterdir())
    assert {p.name for p in files} >= {"Encounter.ndjson", "_rejected.ndjson"}
    assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}


def test_sqlite_replica_is_private(tmp_path: Path) -> None:
    database = tmp_path / "state" / "iop-bridge.db"
    with StateStore(f"sqlite:///{database}"):
        pass
    assert _mode(database.parent) == 0o700
    assert _mode(database) == 0o600


def test_existing_sqlite_file_is_made_private(tmp_path: Path) -> None:
    database = tmp_path / "iop-bridge.db"
    database.touch(mode=0o644)
    with StateStore(f"sqlite:///{database}"):
        pass
    assert _mode(database) == 0o600


def test_map_output_and_rejects_are_private(tmp_path: Path) -> None:
    source = tmp_path / "in.ndjson"
    source.write_bytes(b'{"resourceType":"Patient","id":"p1"}\nnot json\n')
    out = tmp_path / "mapped" / "deep" / "episodes.ndjson"
    assert main(["map", str(source), "--out", str(out)]) == 0
    assert _mode(tmp_path / "mapped") == 0o700
    assert _mode(out.parent) == 0o700
    assert _mode(out) == 0o600
    assert _mode(out.with_name(out.name + ".rejects.ndjson")) == 0o600


def test_partition_files_are_private(tmp_path: Path) -> None:
    from sync.inputs import partition_resources

    source = tmp_path / "in.ndjson"
    source.write_bytes(b'{"resourceType":"Patient","id":"p1"}\n{"resourceType":"Location","id":"l1"}\n')
    folder = tmp_path / "parts"
    folder.mkdir(mode=0o700)
    partitions = partition_resources([source], folder, 2)
    for path in [*partitions.parts, partitions.shared]:
        assert _mode(path) == 0o600

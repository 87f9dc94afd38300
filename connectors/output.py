"""A pull's output folder: ``<out>/<ResourceType>.ndjson`` and ``<out>/_rejected.ndjson``.

Every file of a run is first written as ``.<name>.part`` beside its final name, and only ``publish()``
fsyncs it and renames it into place (``os.replace`` is atomic within one file system), then fsyncs the
folder so the renames themselves survive a power cut. A run killed before ``publish()`` leaves the
previous files untouched; the ``.part`` leftovers are removed by the next run.

Each file holds one run's increment and REPLACES the previous run's file: never appended to, so a
re-run after a crash cannot duplicate lines. Within a run a resource id appears once per file: when a
search brings the same id twice (e.g. it changed while we paged), the highest version is kept.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from connectors.store import rank_of

__all__ = ["REJECTED_FILE", "OutputBusyError", "RunOutput"]

REJECTED_FILE = "_rejected.ndjson"
_PART = ".part"
_LOCK = ".pull.lock"


class OutputBusyError(RuntimeError):
    """Another pull is writing into the same output folder."""


class _TypeFile:
    def __init__(self, final: Path) -> None:
        self.final = final
        self.part = final.with_name(f".{final.name}{_PART}")
        self.handle: IO[bytes] = self.part.open("wb")
        self.ranks: dict[str, str] = {}
        self.repeated: set[str] = set()
        self.lines = 0


class RunOutput:
    """The files one run writes, published all at once at the end."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        # One pull per folder at a time: a second one would delete our part files as stale ones.
        self._lock = (out_dir / _LOCK).open("a")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock.close()
            raise OutputBusyError(f"another pull is writing into {out_dir}") from exc
        for stale in out_dir.glob(f".*{_PART}"):
            stale.unlink(missing_ok=True)
        self._files: dict[str, _TypeFile] = {}
        self._rejected = _TypeFile(out_dir / REJECTED_FILE)
        self.rejected = 0

    def open_type(self, resource_type: str) -> None:
        """Make sure ``<type>.ndjson`` is written by this run, even empty (nothing changed)."""
        self._file(resource_type)

    def has(self, resource_type: str, resource_id: str) -> bool:
        return resource_id in self._file(resource_type).ranks

    def write(self, resource_type: str, resource_id: str, rank: str, line: bytes) -> None:
        """Append one resource (its JSON, without newline) to the type's file."""
        file = self._file(resource_type)
        if resource_id in file.ranks:
            file.repeated.add(resource_id)
            held = file.ranks[resource_id]
            if held == "" or rank == "" or rank >= held:
                file.ranks[resource_id] = rank
        else:
            file.ranks[resource_id] = rank
        file.handle.write(line + b"\n")
        file.lines += 1

    def reject(self, resource: object, error: str) -> None:
        self._rejected.handle.write(orjson.dumps({"resource": resource, "error": error}) + b"\n")
        self._rejected.lines += 1
        self.rejected += 1

    def counts(self) -> dict[str, int]:
        """Resources per type in this run's output (after de-duplication within the run)."""
        return {kind: len(file.ranks) for kind, file in sorted(self._files.items())}

    def types(self) -> list[str]:
        return sorted(self._files)

    def publish(self) -> dict[str, Path]:
        """Make every file of the run durable and move it into place; returns the final paths by type."""
        for file in [*self._files.values(), self._rejected]:
            file.handle.flush()
            os.fsync(file.handle.fileno())
            file.handle.close()
            if file.repeated:
                _keep_latest(file)
        for file in [*self._files.values(), self._rejected]:
            os.replace(file.part, file.final)
        _fsync_dir(self.out_dir)
        return {kind: file.final for kind, file in sorted(self._files.items())}

    def discard(self) -> None:
        """Drop the run's partial files (a published one is already in place and stays)."""
        for file in [*self._files.values(), self._rejected]:
            if not file.handle.closed:
                file.handle.close()
            file.part.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the folder (after the run's transaction committed, or after a failure).

        Files not yet published are discarded.
        """
        self.discard()
        if not self._lock.closed:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()

    def read(self, resource_type: str) -> Iterator[dict[str, Any]]:
        """The resources of one published type file, one at a time."""
        with (self.out_dir / f"{resource_type}.ndjson").open("rb") as lines:
            for line in lines:
                if line.strip():
                    yield orjson.loads(line)

    def _file(self, resource_type: str) -> _TypeFile:
        file = self._files.get(resource_type)
        if file is None:
            if not resource_type.isalnum():
                raise ValueError(f"not a resource type: {resource_type[:64]!r}")
            file = _TypeFile(self.out_dir / f"{resource_type}.ndjson")
            self._files[resource_type] = file
        return file


def _keep_latest(file: _TypeFile) -> None:
    """Rewrite a part file keeping, for each repeated id, only the line of its highest version."""
    kept_once: set[str] = set()
    rewritten = file.part.with_name(file.part.name + ".dedup")
    with file.part.open("rb") as source, rewritten.open("wb") as sink:
        for line in source:
            resource = orjson.loads(line)
            resource_id = resource.get("id")
            if resource_id in file.repeated:
                if resource_id in kept_once or _rank_of(resource) != file.ranks[resource_id]:
                    continue
                kept_once.add(resource_id)
            sink.write(line)
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(rewritten, file.part)


def _rank_of(resource: dict[str, Any]) -> str:
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        return rank_of(None, None)
    return rank_of(meta.get("versionId"), meta.get("lastUpdated"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""A pull's output folder: ``<out>/<ResourceType>.ndjson`` and ``<out>/_rejected.ndjson``.

Every file of a run is first written as ``.<name>.part`` beside its final name, and only ``publish()``
fsyncs it and renames it into place (``os.replace`` is atomic within one file system), then fsyncs the
folder so the renames themselves survive a power cut. A run killed before ``publish()`` leaves the
previous files untouched; the ``.part`` leftovers are removed by the next run.

Each file holds one run's increment and REPLACES the previous run's file: never appended to, so a
re-run after a crash cannot duplicate lines. Within a run a resource id appears once per file: when a
search brings the same id twice (e.g. it changed while we paged), the highest version is kept.

What a run holds in memory per resource is one 64-bit hash of its id in a flat table (``HashSet``, 16
bytes per resource; no id, no version), so a bulk file of millions of resources streams through in
little memory. Ids whose hash was seen twice (a real repeat,
or very rarely two ids with one hash) are settled exactly at ``publish()`` by re-reading the file.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from connectors.hashset import HashSet
from connectors.private import make_private_dir, open_private
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
        self.handle: IO[bytes] = open_private(self.part)
        self.seen = HashSet()  # hash(id) of every resource written
        self.repeated: set[int] = set()  # those hashes seen more than once
        self.lines = 0
        self.kept: int | None = None  # lines left once the repeats are settled (publish)


class RunOutput:
    """The files one run writes, published all at once at the end."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        make_private_dir(out_dir)  # the files hold PHI: folders 0700, files 0600
        # One pull per folder at a time: a second one would delete our part files as stale ones.
        self._lock = open_private(out_dir / _LOCK, "ab")
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

    def write(self, resource_type: str, resource_id: str, line: bytes) -> None:
        """Append one resource (its JSON, without newline) to the type's file."""
        file = self._file(resource_type)
        key = hash(resource_id)
        if not file.seen.add(key):
            file.repeated.add(key)
        file.handle.write(line + b"\n")
        file.lines += 1

    def reject(self, resource: object, error: str) -> None:
        self._rejected.handle.write(orjson.dumps({"resource": resource, "error": error}) + b"\n")
        self._rejected.lines += 1
        self.rejected += 1

    def counts(self) -> dict[str, int]:
        """Resources per type in this run's output, after de-duplication within the run (exact once
        published; before, an id hash shared by two ids would count them once)."""
        return {
            kind: file.kept if file.kept is not None else len(file.seen)
            for kind, file in sorted(self._files.items())
        }

    def holds(self, resource_type: str, resource_id: str) -> bool:
        """Whether this run wrote ``resource_type/resource_id`` (by its id hash: a false yes is ~2^-64)."""
        file = self._files.get(resource_type)
        return file is not None and hash(resource_id) in file.seen

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
    """Rewrite a part file keeping, for each repeated id, only the first line of its highest version
    (a line without ``lastUpdated`` ranks "" and takes the place of whatever was held before it)."""
    best: dict[str, str] = {}
    with file.part.open("rb") as source:
        for resource in _suspects(source, file.repeated):
            resource_id, rank = resource["id"], _rank_of(resource)
            held = best.get(resource_id)
            if held is None or held == "" or rank == "" or rank >= held:
                best[resource_id] = rank
    kept_once: set[str] = set()
    kept = 0
    rewritten = file.part.with_name(file.part.name + ".dedup")
    with file.part.open("rb") as source, open_private(rewritten) as sink:
        for line in source:
            resource = orjson.loads(line)
            resource_id = resource.get("id")
            if resource_id in best:
                if resource_id in kept_once or _rank_of(resource) != best[resource_id]:
                    continue
                kept_once.add(resource_id)
            sink.write(line)
            kept += 1
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(rewritten, file.part)
    file.kept = kept


def _suspects(lines: IO[bytes], repeated: set[int]) -> Iterator[dict[str, Any]]:
    """The resources whose id hash is among ``repeated``."""
    for line in lines:
        resource = orjson.loads(line)
        if hash(resource.get("id")) in repeated:
            yield resource


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

"""map: generated NDJSON to episode records, against the floor of parsing the same files with orjson.

Floor: every line of every ``<Type>.ndjson`` file through ``orjson.loads``, nothing else.

Ours (``map_episodes``): the same files read patient by patient (the generated files are in patient
order, so a batch of patients is gathered from all files at once without holding the rest), each batch
of ``batch`` patients plus the shared Organizations/Locations/Practitioners given to
``mappers.episodes.map_episodes`` with the default rules, in one process. Reading and parsing are part
of ours, as they are part of any real map run; like ``iop-bridge map``, it pauses the cyclic GC while a
batch is read and mapped (with the collector on, its passes over the batch's parsed resources made the
reading ~4x dearer: 3.6 vs 0.9 CPU-s for the 100k folder).

Ours (``iop-bridge map``), when the command exists: the CLI on the whole folder, output to a file; its
interpreter start-up and imports (about half a second) are included. Its RSS column is the measuring
process's tree (the bench child, ~70 MB of imports, plus the CLI's); the note gives the CLI's own tree.

Lean decode alone: every line of every file through ``mappers.projection.project_line`` (the projection
``iop-bridge map`` reads by default: only the fields the mappers use, type-checked), nothing else; beside
the same orjson floor, it says what reading costs before any mapping.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from bench.generate import ANCHOR, dataset, manifest, size_label
from bench.harness import ROOT, Measurement, PeakSampler, Row, Runner, timed, unavailable

BENCH = "map"
METRIC = "Encounters/s per core"
#: The as-of time of every mapping: the end of the generated data's day 0.
AS_OF = datetime(ANCHOR.year, ANCHOR.month, ANCHOR.day, 23, 59, tzinfo=UTC)
SHARED_TYPES = frozenset(
    {"Organization", "Location", "Practitioner", "PractitionerRole", "HealthcareService"}
)
DEFAULT_BATCH = 500
FLOOR_MIN_CPU = 1.0  # CPU-seconds the floor runs at least (whole passes): 10k parses in ~0.05 s


def rows(
    runner: Runner, sizes: list[int], *, batch: int = DEFAULT_BATCH, floor_min_cpu: float = FLOOR_MIN_CPU
) -> list[Row]:
    out = []
    missing = mapper_missing()
    cli = (ROOT / "sync" / "commands" / "map.py").exists()
    for size in sizes:
        label = size_label(size)
        folder = str(dataset(size))
        floor = runner.run("mapping", "floor", folder=folder, min_cpu=floor_min_cpu)
        load = os.getloadavg()[0]
        if lean_missing() is None:
            lean = runner.run("mapping", "lean_decode", folder=folder, min_cpu=floor_min_cpu)
            per_line = [1e6 * m.cpu / max(1, m.extra.get("lines", 0)) for m in (lean, floor)]
            note = f"{per_line[0]:.2f} vs {per_line[1]:.2f} µs per line (lean projection vs orjson.loads)"
            out.append(_row(label, "lean decode alone", lean, floor, note, load))
        if missing:
            out.append(_row(label, "map_episodes", None, floor, f"not available yet: {missing}", load))
        else:
            ours = runner.run("mapping", "ours", folder=folder, batch=batch)
            alone = ours.items / ours.extra["mapper_cpu_s"] if ours.extra.get("mapper_cpu_s") else 0.0
            note = (
                f"{ours.extra['episodes']:.0f} episodes, {ours.extra['rejects']:.0f} rejects; "
                f"map_episodes alone {alone:,.0f}/s per core"
            )
            out.append(_row(label, "map_episodes", ours, floor, note, load))
        if cli:
            ours = runner.run("mapping", "ours_cli", folder=folder, in_process=not runner.isolated)
            note = f"{ours.extra['episodes']} episodes, {ours.extra['rejects']} rejects; start-up included"
            if ours.extra.get("cli_rss_mb"):
                note += f"; the CLI's own process tree peaked at {ours.extra['cli_rss_mb']:.0f} MB"
            out.append(_row(label, "iop-bridge map", ours, floor, note, load))
        elif size == sizes[0]:
            out.append(
                unavailable(BENCH, label, f"{METRIC} (iop-bridge map)", "not available yet: no map command")
            )
    return out


def _row(label: str, what: str, ours: Measurement | None, floor: Measurement, note: str, load: float) -> Row:
    return Row(
        bench=BENCH,
        size=label,
        metric=f"{METRIC} ({what})",
        ours=ours.per_core if ours else None,
        floor=floor.per_core,
        rss_ours_mb=ours.peak_rss_mb if ours else None,
        rss_floor_mb=floor.peak_rss_mb,
        note=note,
        load=load,
        extra={
            "encounters": ours.items if ours else None,
            "ours_wall_s": ours.wall if ours else None,
            "ours_cpu_s": ours.cpu if ours else None,
            "floor_wall_s": floor.wall,
            "floor_cpu_s": floor.cpu,
        },
    )


def mapper_missing() -> str | None:
    """Why ``map_episodes`` cannot be benchmarked yet, or None when it can."""
    try:
        episodes = importlib.import_module("mappers.episodes")
        rules = importlib.import_module("mappers.rules")
    except Exception as exc:  # an absent module, or one still being written
        return f"{type(exc).__name__}: {exc}"
    for module, name in ((episodes, "map_episodes"), (rules, "default_rules")):
        if not hasattr(module, name):
            return f"{module.__name__}.{name} is missing"
    return None


def lean_missing() -> str | None:
    """Why the lean projection cannot be benchmarked yet, or None when it can."""
    try:
        importlib.import_module("mappers.projection")
    except Exception as exc:  # an absent module, or one still being written
        return f"{type(exc).__name__}: {exc}"
    return None


def floor(folder: str, min_cpu: float = FLOOR_MIN_CPU) -> Measurement:
    """Parse every line of every file; small folders are parsed again until the CPU clock can tell."""
    return _every_line(folder, min_cpu, lambda _: orjson.loads)


def lean_decode(folder: str, min_cpu: float = FLOOR_MIN_CPU) -> Measurement:
    """Every line of every file decoded into the lean projection of its file's type, nothing else."""
    from mappers.projection import project_line

    def decoder(kind: str) -> Callable[[bytes], Any]:
        return lambda line: project_line(line, kind)

    return _every_line(folder, min_cpu, decoder)


def _every_line(folder: str, min_cpu: float, decoder: Callable[[str], Callable[[bytes], Any]]) -> Measurement:
    """``decoder(<file's type>)`` over every line of every file, whole passes until ``min_cpu``."""
    encounters = int(manifest(Path(folder))["encounters"])
    lines = [0]

    def work() -> int:
        done = 0
        until = time.process_time() + min_cpu
        while True:
            for path in sorted(Path(folder).glob("*.ndjson")):
                decode = decoder(path.stem)
                with path.open("rb") as handle:
                    for line in handle:
                        decode(line)
                        lines[0] += 1
            done += encounters
            if time.process_time() >= until:
                return done

    measurement = timed(work)
    measurement.extra["lines"] = lines[0]
    return measurement


def ours(folder: str, batch: int) -> Measurement:
    from mappers.episodes import map_episodes
    from mappers.rules import default_rules

    rules = default_rules()
    totals: dict[str, float] = {"episodes": 0, "rejects": 0, "mapper_cpu_s": 0.0}

    def work() -> int:
        encounters = 0
        gc.disable()  # as iop-bridge map does while it reads and maps a partition (see its docstring)
        try:
            for resources in patient_batches(Path(folder), batch):
                encounters += sum(1 for r in resources if r.get("resourceType") == "Encounter")
                cpu = time.process_time()
                result = map_episodes(resources, ehr="bench", as_of=AS_OF, rules=rules)
                totals["mapper_cpu_s"] += time.process_time() - cpu  # the mapper alone, without the reading
                totals["episodes"] += len(getattr(result, "episodes", ()))
                totals["rejects"] += len(getattr(result, "rejects", ()))
                del resources, result
                gc.collect(0)  # what the batch left is all in the youngest generation
        finally:
            gc.enable()
        return encounters

    measurement = timed(work)
    measurement.extra.update(totals)
    return measurement


def ours_cli(folder: str, in_process: bool = False) -> Measurement:
    """``iop-bridge map FOLDER --out FILE``: a subprocess (start-up included), or ``sync.cli.main`` here."""
    encounters = int(manifest(Path(folder))["encounters"])
    with tempfile.TemporaryDirectory(prefix="bench-map-") as tmp:
        out = Path(tmp) / "episodes.ndjson"
        argv = ["map", folder, "--out", str(out), "--as-of", AS_OF.isoformat()]
        if in_process:
            from sync.cli import main as cli

            with contextlib.redirect_stderr(io.StringIO()):
                measurement = timed(lambda: encounters if cli(argv) == 0 else 0)
        else:
            command = ROOT / ".venv" / "bin" / "iop-bridge"
            program = [str(command)] if command.exists() else [sys.executable, "-m", "sync.cli"]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            with subprocess.Popen(
                [*program, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            ) as command_run:
                peak = _tree_peak_rss(command_run)
            if command_run.returncode != 0:
                raise subprocess.CalledProcessError(command_run.returncode, [*program, *argv])
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            measurement = Measurement(items=encounters, wall=wall, cpu=cpu, extra={"cli_rss_mb": peak})
        rejects_file = out.with_name(out.name + ".rejects.ndjson")
        # Counted line by line: the 1M output is ~200 MB, which read whole would be the bench's own peak.
        measurement.extra["episodes"] = _lines(out)
        measurement.extra["rejects"] = _lines(rejects_file) if rejects_file.exists() else 0
    return measurement


def _lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def _tree_peak_rss(process: subprocess.Popen[bytes]) -> float:
    """Wait for ``process``; the peak of its process tree's summed RSS (MB)."""
    sampler = PeakSampler(process.pid)
    sampler.start()
    try:
        process.wait()
    finally:
        sampler.stop()
    return sampler.peak / (1024 * 1024)


def patient_of(resource: dict[str, Any]) -> str | None:
    """The id of the patient a resource belongs to (None for shared resources)."""
    kind = resource.get("resourceType")
    if kind == "Patient":
        return str(resource.get("id"))
    for key in ("subject", "patient", "beneficiary", "for"):
        ref = resource.get(key)
        if isinstance(ref, dict) and str(ref.get("reference", "")).startswith("Patient/"):
            return str(ref["reference"])[len("Patient/") :]
    for participant in resource.get("participant") or ():
        ref = str((participant.get("actor") or {}).get("reference", ""))
        if ref.startswith("Patient/"):
            return ref[len("Patient/") :]
    return None


class _Cursor:
    """One type's file, read one resource ahead."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.pending: dict[str, Any] | None = None
        self.advance()

    def advance(self) -> None:
        line = self.handle.readline()
        self.pending = orjson.loads(line) if line else None


def patient_batches(folder: Path, batch: int) -> Iterator[list[dict[str, Any]]]:
    """Lists of the resources of ``batch`` patients each (plus the shared resources), in file order."""
    shared: list[dict[str, Any]] = []
    cursors: list[_Cursor] = []
    handles = []
    try:
        for path in sorted(folder.glob("*.ndjson")):
            if path.stem in SHARED_TYPES:
                shared.extend(orjson.loads(line) for line in path.read_bytes().splitlines() if line)
            elif path.stem != "Patient":
                handles.append(path.open("rb"))
                cursors.append(_Cursor(handles[-1]))
        patients = folder / "Patient.ndjson"
        with patients.open("rb") as handle:
            while True:
                group = [orjson.loads(line) for _, line in zip(range(batch), handle, strict=False)]
                if not group:
                    break
                ids = {str(p.get("id")) for p in group}
                resources = [*shared, *group]
                for cursor in cursors:
                    while cursor.pending is not None and patient_of(cursor.pending) in ids:
                        resources.append(cursor.pending)
                        cursor.advance()
                yield resources
        leftovers = []  # resources of patients not in Patient.ndjson: mapped last, never dropped
        for cursor in cursors:
            while cursor.pending is not None:
                leftovers.append(cursor.pending)
                cursor.advance()
        if leftovers:
            yield [*shared, *leftovers]
    finally:
        for handle in handles:
            handle.close()

"""validate: what full ``fhir.resources.R4B`` validation costs per resource, against an orjson parse.

Ours is the pull's own check (``connectors.validation.check_resource``: parse, then ``model_validate``
of the resource's R4B class, nothing tolerated); the floor is ``orjson.loads`` of the same lines. Both
run over the first ``limit`` lines of each resource type's file of a generated health system, one core.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson

from bench.generate import dataset, manifest, size_label
from bench.harness import Measurement, Row, Runner, timed

BENCH = "validate"
DEFAULT_LIMIT = 2000
ROUNDS = 3
MIN_CPU = 0.25  # CPU-seconds per type and side, at least: enough for the clock's resolution


def rows(
    runner: Runner, sizes: list[int], *, limit: int = DEFAULT_LIMIT, min_cpu: float = MIN_CPU
) -> list[Row]:
    """One row per resource type, plus one for all of them, on the smallest size's data."""
    folder = dataset(min(sizes))
    ours = runner.run("validate", "ours", folder=str(folder), limit=limit, min_cpu=min_cpu)
    floor = runner.run("validate", "floor", folder=str(folder), limit=limit, min_cpu=min_cpu)
    load = os.getloadavg()[0]
    out = []
    for kind, (items, _wall, cpu, sample) in sorted(ours.extra["types"].items()):
        f_items, _f_wall, f_cpu, _ = floor.extra["types"][kind]
        out.append(
            Row(
                bench=BENCH,
                size=f"{sample}",
                metric=f"{kind}/s per core",
                ours=items / cpu if cpu else None,
                floor=f_items / f_cpu if f_cpu else None,
                rss_ours_mb=ours.peak_rss_mb,
                rss_floor_mb=floor.peak_rss_mb,
                note=f"{1e6 * cpu / items:.0f} µs vs {1e6 * f_cpu / f_items:.1f} µs per resource",
                load=load,
                extra={"rejected": ours.extra["rejected"].get(kind, 0)},
            )
        )
    rejected = sum(ours.extra["rejected"].values())
    mix = manifest(folder)["resources"]  # weigh each type's cost by its share of a real health system
    out.append(
        Row(
            bench=BENCH,
            size=str(sum(mix.values())),
            metric="resources/s per core (the data's mix)",
            ours=_mixed_rate(ours, mix),
            floor=_mixed_rate(floor, mix),
            rss_ours_mb=ours.peak_rss_mb,
            rss_floor_mb=floor.peak_rss_mb,
            note=f"from the {size_label(min(sizes))} data; {rejected} rejected",
            load=load,
            extra={"rejected": rejected},
        )
    )
    return out


def _mixed_rate(measurement: Measurement, mix: dict[str, int]) -> float:
    seconds = 0.0
    for kind, (items, _wall, cpu, _sample) in measurement.extra["types"].items():
        seconds += mix.get(kind, 0) * cpu / items if items else 0.0
    return sum(mix.values()) / seconds if seconds else 0.0


def _samples(folder: str, limit: int) -> dict[str, list[bytes]]:
    samples = {}
    for path in sorted(Path(folder).glob("*.ndjson")):
        with path.open("rb") as handle:
            lines = [line for _, line in zip(range(limit), handle, strict=False)]
        samples[path.stem] = lines
    return samples


def _per_type(samples: dict[str, list[bytes]], check: Any, min_cpu: float) -> Measurement:
    types: dict[str, tuple[int, float, float, int]] = {}
    rejected: dict[str, int] = {}
    for kind, lines in samples.items():
        # One untimed pass: imports and builds each model class, and counts the rejects.
        rejected[kind] = sum(1 for line in lines if not check(line))

        def work(lines: list[bytes] = lines) -> int:
            done = 0
            until = time.process_time() + min_cpu
            while True:  # small samples are repeated until the CPU clock has enough to measure
                for line in lines:
                    check(line)
                done += len(lines)
                if time.process_time() >= until or not lines:
                    return done

        # Best of ROUNDS: on a shared machine, the least disturbed round is the closest to the true cost.
        rounds = [timed(work) for _ in range(ROUNDS if min_cpu > 0 else 1)]
        one = min(rounds, key=lambda m: m.cpu / max(1, m.items))
        types[kind] = (one.items, one.wall, one.cpu, len(lines))
    items = sum(t[0] for t in types.values())
    return Measurement(
        items=items,
        wall=sum(t[1] for t in types.values()),
        cpu=sum(t[2] for t in types.values()),
        extra={"types": types, "rejected": rejected},
    )


def ours(folder: str, limit: int, min_cpu: float = MIN_CPU) -> Measurement:
    from connectors.validation import check_resource

    nothing: frozenset[str] = frozenset()
    return _per_type(
        _samples(folder, limit), lambda line: check_resource(orjson.loads(line), tolerate=nothing).ok, min_cpu
    )


def floor(folder: str, limit: int, min_cpu: float = MIN_CPU) -> Measurement:
    return _per_type(_samples(folder, limit), lambda line: orjson.loads(line) is not None, min_cpu)

"""Profile the map path (``bench.mapping.ours``) with cProfile on a generated health system.

    .venv/bin/python bench/profiling.py [--size 100k] [--top 30] [--path episodes|cli]

Prints the functions taking the most time of their own (tottime) and the most time including callees
(cumtime), each as a share of the whole run, and saves the raw profile to
``bench/results/profile-map-<path>-<size>.prof`` (open it with ``python -m pstats`` or snakeviz).
cProfile roughly doubles the cost of Python-heavy code: read the shares, not the absolute times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import ``bench.*`` from the repository root, and let
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # no bench/ module shadow a library's

from bench import mapping
from bench.generate import dataset, parse_size, size_label
from bench.harness import ROOT


def shares(stats: pstats.Stats, key: str, top: int) -> list[str]:
    """The ``top`` functions by ``key`` ("tottime" or "cumtime"), with their share of the total."""
    total = max(stats.total_tt, 1e-9)  # type: ignore[attr-defined]
    entries = []
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{_short(filename)}:{line}({name})"
        entries.append((tottime if key == "tottime" else cumtime, tottime, cumtime, calls, where))
    entries.sort(reverse=True)
    lines = [f"{'own %':>6} {'incl %':>7} {'calls':>10}  function"]
    for _, tottime, cumtime, calls, where in entries[:top]:
        lines.append(f"{100 * tottime / total:6.1f} {100 * cumtime / total:7.1f} {calls:10d}  {where}")
    return lines


def _short(filename: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def main() -> int:
    parser = argparse.ArgumentParser(description="cProfile of the map path")
    parser.add_argument("--size", default="100k")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--batch", type=int, default=mapping.DEFAULT_BATCH)
    parser.add_argument(
        "--path",
        choices=("episodes", "cli"),
        default="episodes",
        help="episodes: the bench's batched map_episodes; cli: `iop-bridge map` in-process",
    )
    args = parser.parse_args()
    missing = mapping.mapper_missing()
    if missing:
        print(f"map_episodes not available yet: {missing}", file=sys.stderr)
        return 1
    size = parse_size(args.size)
    folder = str(dataset(size))
    profiler = cProfile.Profile()
    if args.path == "cli":
        profiler.enable()
        measurement = mapping.ours_cli(folder, in_process=True)
        profiler.disable()
    else:
        profiler.enable()
        measurement = mapping.ours(folder=folder, batch=args.batch)
        profiler.disable()
    out = ROOT / "bench" / "results" / f"profile-map-{args.path}-{size_label(size)}.prof"
    out.parent.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(out)
    stats = pstats.Stats(profiler, stream=io.StringIO())
    print(f"{args.path} on {size_label(size)}: {measurement.items} Encounters, {measurement.cpu:.1f} CPU-s")
    print("\nby own time:")
    print("\n".join(shares(stats, "tottime", args.top)))
    print("\nby time including callees:")
    print("\n".join(shares(stats, "cumtime", args.top)))
    print(f"\nraw profile: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

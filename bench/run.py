"""Run the benchmarks, each against its floor, and print and save the result table.

    .venv/bin/python bench/run.py [--sizes 10k,100k,1M] [--only map,validate,pull,writeback]
                                  [--json out.json] [--fhir URL | --start-sandbox] [--pull-size 10k]
                                  [--kafka HOST:PORT | --start-broker]

Each measurement runs in a fresh process (see bench/harness.py); rates are per core (per CPU-second).
The table also goes to ``bench/results/latest.json`` (git-ignored) and to ``--json`` when given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import ``bench.*`` from the repository root, and let
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # no bench/ module shadow a library's

from bench import mapping, pull, validate, writeback
from bench.generate import parse_size
from bench.harness import ROOT, Row, Runner

BENCHES = ("validate", "map", "pull", "writeback")
RESULTS = ROOT / "bench" / "results" / "latest.json"
SANDBOX_PORT = 18090  # not the tests' 8080: a private sandbox never meets a test run's
BROKER_PORT = 19092  # and 19093 for its controller: not the tests' 9092/9093


def run_benches(
    only: Sequence[str],
    sizes: list[int],
    *,
    runner: Runner,
    fhir_url: str | None = None,
    pull_size: int | None = None,
    kafka: str | None = None,
    validate_limit: int = validate.DEFAULT_LIMIT,
    min_cpu: float | None = None,
    on_rows: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Every selected benchmark's rows, in table order.

    ``min_cpu`` overrides how long the small measurements repeat (0: one pass, for the smoke test).
    """
    plan: dict[str, Callable[[], list[Row]]] = {
        "validate": lambda: validate.rows(
            runner, sizes, limit=validate_limit, min_cpu=validate.MIN_CPU if min_cpu is None else min_cpu
        ),
        "map": lambda: mapping.rows(
            runner, sizes, floor_min_cpu=mapping.FLOOR_MIN_CPU if min_cpu is None else min_cpu
        ),
        "pull": lambda: pull.rows(runner, [pull_size] if pull_size else sizes, fhir_url=fhir_url),
        "writeback": lambda: writeback.rows(
            runner, [pull_size] if pull_size else sizes, fhir_url=fhir_url, kafka=kafka
        ),
    }
    rows: list[Row] = []
    for name in BENCHES:
        if name in only:
            new = plan[name]()
            rows.extend(new)
            if on_rows is not None:
                on_rows(new)
    return rows


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _ratio(row: Row) -> str:
    ratio = row.ratio
    return "-" if ratio is None else f"{ratio:.3f}x"


HEADER = ("bench", "size", "metric", "ours", "floor", "ratio", "RSS ours MB", "RSS floor MB", "load", "note")


def table_lines(rows: Sequence[Row]) -> list[str]:
    cells = [
        (
            r.bench,
            r.size,
            r.metric,
            _number(r.ours),
            _number(r.floor),
            _ratio(r),
            _number(r.rss_ours_mb),
            _number(r.rss_floor_mb),
            "-" if r.load is None else f"{r.load:.2f}",
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [HEADER, *cells]) for i in range(len(HEADER))]
    return [
        " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [HEADER, *cells]
    ]


def markdown_lines(rows: Sequence[Row]) -> list[str]:
    """The table as Markdown (for bench/README.md)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for line in table_lines(rows)[1:]:
        cells = [c.strip() for c in line.split(" | ")]
        cells += [""] * (len(HEADER) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(rows: Sequence[Row], started: float, sizes: list[int]) -> dict[str, object]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "taken_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "commit": commit,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_at_end": os.getloadavg(),
        },
        "sizes": sizes,
        "columns": "ours and floor are rates (higher is better); ratio = ours / floor; RSS is peak, MB",
        "rows": [r.as_dict() for r in rows],
    }


@contextlib.contextmanager
def private_service(name: str, port: int) -> Iterator[str]:
    """Our own FHIR sandbox or Kafka broker (own port, state in .run/bench/), stopped when the block ends."""
    script = ROOT / "deploy" / name / "run"
    if not script.exists():
        raise SystemExit(f"deploy/{name}/run does not exist yet")
    prefix = "IOP_BRIDGE_FHIR" if name == "fhir-sandbox" else "IOP_BRIDGE_KAFKA"
    state = ROOT / ".run" / "bench" / name
    env = {**os.environ, f"{prefix}_PORT": str(port), f"{prefix}_STATE_DIR": str(state)}
    if name == "kafka":
        env["IOP_BRIDGE_KAFKA_CONTROLLER_PORT"] = str(port + 1)
    print(f"starting a private {name} on port {port} (state in {state})", file=sys.stderr)
    try:
        started = subprocess.run(
            [str(script), "start"], env=env, stdout=subprocess.PIPE, text=True, check=True
        )
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(script), "stop"], env=env, check=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="iop-bridge benchmarks, each against its floor")
    parser.add_argument("--sizes", default="10k,100k", help="Encounters per health system (default 10k,100k)")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"subset of {','.join(BENCHES)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--fhir", help="FHIR sandbox base URL for pull (default: $IOP_BRIDGE_TEST_FHIR)")
    parser.add_argument(
        "--start-sandbox",
        type=int,
        nargs="?",
        const=SANDBOX_PORT,
        metavar="PORT",
        help=f"start a private FHIR sandbox for pull on PORT (default {SANDBOX_PORT}), stop it at the end",
    )
    parser.add_argument("--kafka", help="Kafka bootstrap for write-back (default: $IOP_BRIDGE_TEST_KAFKA)")
    parser.add_argument(
        "--start-broker",
        type=int,
        nargs="?",
        const=BROKER_PORT,
        metavar="PORT",
        help=f"start a private Kafka broker for write-back on PORT (default {BROKER_PORT}), stop it after",
    )
    parser.add_argument("--pull-size", help="Encounters seeded into the sandbox (default: the smallest size)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown as well")
    parser.add_argument("--validate-limit", type=int, default=validate.DEFAULT_LIMIT, help="lines per type")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    try:
        sizes = sorted({parse_size(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError as exc:
        parser.error(str(exc))
    started = time.time()

    def show(new: list[Row]) -> None:  # progress on stderr; the table comes at the end
        for row in new:
            ours = "-" if row.ours is None else _number(row.ours)
            print(
                f"  {row.bench} {row.size} {row.metric}: {ours} ({_ratio(row)})", file=sys.stderr, flush=True
            )

    with contextlib.ExitStack() as stack:
        fhir_url = args.fhir or os.environ.get("IOP_BRIDGE_TEST_FHIR")
        if args.start_sandbox and {"pull", "writeback"} & set(only):
            fhir_url = stack.enter_context(private_service("fhir-sandbox", args.start_sandbox))
        kafka = args.kafka or os.environ.get("IOP_BRIDGE_TEST_KAFKA")
        if args.start_broker and "writeback" in only:
            kafka = stack.enter_context(private_service("kafka", args.start_broker))
        rows = run_benches(
            only,
            sizes,
            runner=Runner(),
            fhir_url=fhir_url,
            kafka=kafka,
            pull_size=parse_size(args.pull_size) if args.pull_size else None,
            validate_limit=args.validate_limit,
            on_rows=show,
        )
    print("\n".join(table_lines(rows)))
    if args.markdown:
        print("\n" + "\n".join(markdown_lines(rows)))
    data = json.dumps(report(rows, started, sizes), indent=2)
    for target in [RESULTS, *([args.json] if args.json else [])]:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(data + "\n", encoding="utf-8")
    print(f"\nresults: {RESULTS}" + (f" and {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""pull: search-mode and bulk-mode pulls of Encounters from the FHIR sandbox, against a bare httpx loop.

Needs a running sandbox: ``--fhir URL`` or ``IOP_BRIDGE_TEST_FHIR`` (``deploy/fhir-sandbox/run start``
prints it). The sandbox is seeded once with the 100k health system when the sizes include 100k (else the
smallest size) by ``bench.seeding`` (parallel transaction bundles), unless it already holds that data.

search floor: ``httpx.Client`` GETs ``Encounter?_count=…``, ``orjson.loads`` each page, follows the
next link; nothing else. search ours: ``connectors.pull.pull`` (paging, validation, durable files,
replica, cursors) into a fresh folder and SQLite store.

bulk floor: kick-off ``$export?_type=Encounter``, poll the status URL every <= 2 s, stream each file to
disk, DELETE the job. bulk ours: ``connectors.pull.pull(mode="bulk")``; its validation rate (resources
per second of the validation's wall time, on a pool of every core) gets a row of its own. Both pull the
size's Encounters as one export file from ``bench.bulkserver`` (a local static Bulk Data server): the
HAPI sandbox's own ``$export`` on H2 expands ~80 Encounters/s once it holds 100k, so against it both
would mostly wait ~20 minutes for the server; the rows measure what the pull adds to a download.

big file: a pull in bulk mode of one NDJSON file of ``IOP_BRIDGE_BENCH_BIG_MB`` MiB (default 512; the
100k Encounters repeated with fresh ids) served by ``bench.bulkserver`` in a process of its own, beside a
bare httpx stream of the same file to disk: the row's point is the peak RSS (streamed, never loaded).

Rates are Encounters per wall-clock second (the server's time is in both); the note gives our CPU use.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.generate import dataset, manifest, size_label
from bench.harness import ROOT, Measurement, Row, Runner, timed, unavailable

BENCH = "pull"
PAGE = 500
PREFERRED_SIZE = 100_000  # the "sandbox of 100k"
BIG_MB = int(os.environ.get("IOP_BRIDGE_BENCH_BIG_MB", "512"))
_FHIR_JSON = "application/fhir+json"
_METRICS = ("search Encounters/s", "bulk Encounters/s", "bulk validation resources/s", "big-file bulk pull")


def rows(runner: Runner, sizes: list[int], *, fhir_url: str | None) -> list[Row]:
    size = PREFERRED_SIZE if PREFERRED_SIZE in sizes else min(sizes)
    label = size_label(size)
    if not fhir_url:
        why = "no FHIR sandbox: set IOP_BRIDGE_TEST_FHIR or pass --fhir URL"
        return [unavailable(BENCH, label, metric, why) for metric in _METRICS]
    base = fhir_url.rstrip("/")
    try:
        expected, seed_note = seed_sandbox(base, size)
    except httpx.HTTPError as exc:
        why = f"sandbox at {base} not usable: {type(exc).__name__}"
        return [unavailable(BENCH, label, metric, why) for metric in _METRICS]
    out = []
    floor = runner.run("pull", "search_floor", base=base)
    ours = runner.run("pull", "search_ours", base=base)
    out.append(_row(label, "search Encounters/s (connectors.pull)", ours, floor, expected, seed_note))
    # HAPI's own $export on H2 expands ~80 Encounters/s once it holds 100k (a 20-minute wait for ours and
    # the floor alike): the bulk rows pull the same Encounters as an export file from bench.bulkserver.
    with _bulk_server(dataset(size) / "Encounter.ndjson") as bulk_base:
        floor = runner.run("pull", "bulk_floor", base=bulk_base)
        try:
            ours = runner.run("pull", "bulk_ours", base=bulk_base)
        except RuntimeError as exc:
            out.append(unavailable(BENCH, label, "bulk Encounters/s", f"bulk pull failed: {exc}"[:200]))
        else:
            metric = "bulk Encounters/s (connectors.pull --mode bulk, export file from bench.bulkserver)"
            out.append(_row(label, metric, ours, floor, int(manifest(dataset(size))["encounters"])))
            out.append(_validation_row(label, ours))
    out.append(_big_file_row(runner))
    return out


@contextlib.contextmanager
def _bulk_server(path: Path) -> Iterator[str]:
    """``bench.bulkserver`` serving ``path`` in a process of its own (not in the measured tree)."""
    with subprocess.Popen(
        [sys.executable, "-m", "bench.bulkserver", str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as server:
        try:
            assert server.stdout is not None
            yield server.stdout.readline().strip()
        finally:
            server.terminate()
            server.wait(timeout=30)


def _row(
    label: str, metric: str, ours: Measurement, floor: Measurement, expected: int, extra_note: str = ""
) -> Row:
    note = (
        f"{ours.items} Encounters pulled (server holds >= {expected}); "
        f"our CPU {ours.cpu:.1f}s in {ours.wall:.1f}s, floor {floor.wall:.1f}s" + extra_note
    )
    return Row(
        bench=BENCH,
        size=label,
        metric=metric,
        ours=ours.per_second,
        floor=floor.per_second,
        rss_ours_mb=ours.peak_rss_mb,
        rss_floor_mb=floor.peak_rss_mb,
        note=note,
        load=os.getloadavg()[0],
        extra={"ours": ours.extra, "floor": floor.extra, "ours_cpu_s": ours.cpu, "floor_cpu_s": floor.cpu},
    )


def _validation_row(label: str, ours: Measurement) -> Row:
    validated = int(ours.extra.get("validated", 0))
    seconds = float(ours.extra.get("validation_seconds", 0.0))
    workers = int(ours.extra.get("validation_workers", 0))
    return Row(
        bench=BENCH,
        size=label,
        metric=f"bulk validation resources/s ({workers} worker processes, {os.cpu_count()} cores)",
        ours=validated / seconds if seconds > 0 else None,
        rss_ours_mb=ours.peak_rss_mb,
        note=(
            f"{validated} resources validated in {seconds:.1f}s wall (first file on disk to last verdict), "
            f"overlapping the download; pull CPU {ours.cpu:.1f}s incl. workers; no floor (rate, not a ratio)"
        ),
        load=os.getloadavg()[0],
        extra=dict(ours.extra),
    )


def _big_file_row(runner: Runner) -> Row:
    from bench.bulkserver import big_file

    metric = f"big-file bulk pull Encounters/s ({BIG_MB} MiB NDJSON)"
    path = big_file(BIG_MB)
    size_mb = path.stat().st_size / (1 << 20)
    with _bulk_server(path) as base:
        floor = runner.run("pull", "big_floor", base=base)
        try:
            ours = runner.run("pull", "bulk_ours", base=base)
        except RuntimeError as exc:
            return unavailable(BENCH, f"{size_mb:.0f} MB", metric, f"bulk pull failed: {exc}"[:200])
    return Row(
        bench=BENCH,
        size=f"{size_mb:.0f} MB",
        metric=metric,
        ours=ours.per_second,
        floor=floor.per_second,
        rss_ours_mb=ours.peak_rss_mb,
        rss_floor_mb=floor.peak_rss_mb,
        note=(
            f"{ours.items} Encounters from one {size_mb:.0f} MB file (local static server), validated on "
            f"{ours.extra.get('validation_workers')} processes, into files + SQLite replica; peak RSS "
            f"{ours.peak_rss_mb:.0f} MB = {ours.peak_rss_mb / size_mb:.2f}x the file; "
            f"CPU {ours.cpu:.0f}s in {ours.wall:.0f}s; floor streams it to disk"
        ),
        load=os.getloadavg()[0],
        extra={"ours": ours.extra, "floor": floor.extra, "file_mb": size_mb},
    )


def seed_sandbox(base: str, size: int) -> tuple[int, str]:
    """Load the size's health system into the sandbox unless it already holds it; (Encounters, note)."""
    from bench.seeding import seed, seeded

    folder = dataset(size)
    info = manifest(folder)
    note = ""
    if not seeded(base, folder):
        print(f"seeding {base} with the {size_label(size)} health system", file=sys.stderr)
        report = seed(base, folder)
        note = f"; seeded {report.resources} resources in {report.seconds:.0f}s ({report.per_second:.0f}/s)"
    return int(info["encounters"]), note


# -- search -------------------------------------------------------------------------------------------


def search_floor(base: str) -> Measurement:
    def work() -> int:
        count = 0
        with httpx.Client(timeout=120) as client:
            url: str | None = f"{base}/Encounter?_count={PAGE}"
            while url:
                bundle = orjson.loads(
                    client.get(url, headers={"Accept": _FHIR_JSON}).raise_for_status().content
                )
                count += sum(
                    1
                    for e in bundle.get("entry") or ()
                    if e.get("resource", {}).get("resourceType") == "Encounter"
                )
                url = next(
                    (link["url"] for link in bundle.get("link") or () if link.get("relation") == "next"), None
                )
        return count

    return timed(work)


def search_ours(base: str) -> Measurement:
    return _pull_ours(base)


def _pull_ours(base: str, mode: str = "search") -> Measurement:
    """``connectors.pull.pull`` of all Encounters into a fresh folder and a fresh SQLite store.

    Everything a first full pull does is in the timed section: paging or the export, validation (its
    process pool across the cores), the ``.part`` files made durable, and the replica upsert.
    """
    from connectors.config import EhrConfig
    from connectors.pull import pull
    from connectors.store import StateStore

    ehr = EhrConfig(name="bench", base_url=base, page_size=PAGE, timeout_seconds=120, mode=mode)
    summary: Any = None

    def work() -> int:
        nonlocal summary
        with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp:
            with StateStore(f"sqlite:///{tmp}/state.db") as store:
                summary = pull(ehr, store, Path(tmp) / "out", resource_types=["Encounter"])
            return int(summary.counts.get("Encounter", 0))

    measurement = timed(work)
    measurement.extra.update(
        rejected=summary.rejected,
        pages=summary.pages,
        requests=summary.requests,
        retries=summary.retries,
        validated=summary.validated,
        validation_seconds=summary.validation_seconds,
        validation_workers=summary.validation_workers,
    )
    return measurement


# -- bulk ---------------------------------------------------------------------------------------------


def bulk_floor(base: str) -> Measurement:
    def work() -> int:
        lines = 0
        with httpx.Client(timeout=300) as client, tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
            kickoff = client.get(
                f"{base}/$export",
                params={"_type": "Encounter"},
                headers={"Prefer": "respond-async", "Accept": _FHIR_JSON},
            ).raise_for_status()
            status = kickoff.headers["Content-Location"]
            while True:
                polled = client.get(status, headers={"Accept": "application/json"})
                if polled.status_code == 200:
                    break
                polled.raise_for_status()
                time.sleep(min(float(polled.headers.get("Retry-After", "1") or 1), 2.0))
            for number, item in enumerate(orjson.loads(polled.content).get("output") or ()):
                path = Path(tmp) / f"{number}.ndjson"
                with client.stream("GET", item["url"]) as response, path.open("wb") as sink:
                    for chunk in response.raise_for_status().iter_bytes():
                        sink.write(chunk)
                        lines += chunk.count(b"\n")
            client.delete(status)
        return lines

    return timed(work)


def bulk_ours(base: str) -> Measurement:
    return _pull_ours(base, mode="bulk")


def big_floor(base: str) -> Measurement:
    """The bare loop against the big-file server (its export is ready at once)."""
    return bulk_floor(base)

"""pull: search-mode and bulk-mode pulls of Encounters from the FHIR sandbox, against a bare httpx loop.

Needs a running sandbox: ``--fhir URL`` or ``IOP_BRIDGE_TEST_FHIR`` (``deploy/fhir-sandbox/run start``
prints it). The sandbox is seeded once with the smallest size's health system
(``iop-bridge seed --fhir-url URL --patients N --anchor …``) unless it already holds that many Encounters.

search floor: ``httpx.Client`` GETs ``Encounter?_count=…``, ``orjson.loads`` each page, follows the
next link; nothing else. search ours: ``connectors.pull.pull`` when it exists; until then the pieces it
is made of: ``search_pages`` on an ``EhrClient`` (retries, paging checks) plus ``check_resource`` on
every Encounter (full R4B validation, inline on one core).

bulk floor: kick-off ``$export?_type=Encounter``, poll the status URL, stream each file to disk, DELETE
the job. bulk ours: ``connectors.bulk.bulk_export`` plus ``check_resource`` on every downloaded line.

Rates are Encounters per wall-clock second (the server's time is in both); the note gives our CPU use.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.generate import ANCHOR, SEED, dataset, manifest, size_label
from bench.harness import ROOT, Measurement, Row, Runner, timed, unavailable

BENCH = "pull"
PAGE = 500
_FHIR_JSON = "application/fhir+json"


def rows(runner: Runner, sizes: list[int], *, fhir_url: str | None) -> list[Row]:
    label = size_label(min(sizes))
    if not fhir_url:
        why = "no FHIR sandbox: set IOP_BRIDGE_TEST_FHIR or pass --fhir URL"
        return [
            unavailable(BENCH, label, "search Encounters/s", why),
            unavailable(BENCH, label, "bulk Encounters/s", why),
        ]
    base = fhir_url.rstrip("/")
    try:
        expected = seed_sandbox(base, min(sizes))
    except (httpx.HTTPError, subprocess.CalledProcessError) as exc:
        why = f"sandbox at {base} not usable: {type(exc).__name__}"
        return [
            unavailable(BENCH, label, "search Encounters/s", why),
            unavailable(BENCH, label, "bulk Encounters/s", why),
        ]
    pull_available = importlib.util.find_spec("connectors.pull") is not None
    what = "connectors.pull" if pull_available else "search_pages + check_resource"
    bulk_what = "connectors.pull --mode bulk" if pull_available else "bulk_export + check_resource"
    out = []
    floor = runner.run("pull", "search_floor", base=base)
    ours = runner.run("pull", "search_ours", base=base)
    out.append(_row(label, f"search Encounters/s ({what})", ours, floor, expected))
    floor = runner.run("pull", "bulk_floor", base=base)
    try:
        ours = runner.run("pull", "bulk_ours", base=base)
    except RuntimeError as exc:
        out.append(unavailable(BENCH, label, "bulk Encounters/s", f"bulk_export failed: {exc}"[:200]))
    else:
        out.append(_row(label, f"bulk Encounters/s ({bulk_what})", ours, floor, expected))
    if not pull_available:
        out.append(unavailable(BENCH, label, "search Encounters/s (connectors.pull)", "not available yet"))
    return out


def _row(label: str, metric: str, ours: Measurement, floor: Measurement, expected: int) -> Row:
    note = (
        f"{ours.items} Encounters pulled (server holds >= {expected}); "
        f"our CPU {ours.cpu:.1f}s in {ours.wall:.1f}s"
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


def _encounters_on(base: str) -> int:
    response = httpx.get(f"{base}/Encounter", params={"_summary": "count"}, timeout=60)
    response.raise_for_status()
    return int(orjson.loads(response.content).get("total", 0))


def seed_sandbox(base: str, size: int) -> int:
    """Load the size's health system into the sandbox unless it already holds that many Encounters."""
    folder = dataset(size)
    info = manifest(folder)
    if _encounters_on(base) < info["encounters"]:
        command = ROOT / ".venv" / "bin" / "iop-bridge"
        program = [str(command)] if command.exists() else [sys.executable, "-m", "sync.cli"]
        anchored = ["--anchor", ANCHOR.isoformat(), "--seed", str(SEED)]
        subprocess.run(
            [*program, "seed", "--fhir-url", base, "--patients", str(info["patients"]), *anchored],
            check=True,
            capture_output=True,  # the seed's own log lines would bury the table
        )
    return int(info["encounters"])


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


def _client(base: str) -> Any:
    from connectors.config import EhrConfig
    from connectors.http import EhrClient

    return EhrClient(EhrConfig(name="bench", base_url=base, page_size=PAGE, timeout_seconds=120))


def search_ours(base: str) -> Measurement:
    if importlib.util.find_spec("connectors.pull") is not None:
        return _pull_ours(base)
    from connectors.search import SearchQuery, search_pages
    from connectors.validation import check_resource

    rejected = 0

    def work() -> int:
        nonlocal rejected
        count = 0
        with _client(base) as client:
            for page in search_pages(client, SearchQuery("Encounter")):
                for resource in page.resources:
                    rejected += not check_resource(resource, tolerate=frozenset()).ok
                    count += 1
        return count

    measurement = timed(work)
    measurement.extra["rejected"] = rejected
    return measurement


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
        rejected=summary.rejected, pages=summary.pages, requests=summary.requests, retries=summary.retries
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
    if importlib.util.find_spec("connectors.pull") is not None:
        return _pull_ours(base, mode="bulk")
    from connectors.bulk import bulk_export
    from connectors.validation import check_resource

    rejected = 0

    def work() -> int:
        nonlocal rejected
        count = 0
        with _client(base) as client, tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
            result = bulk_export(client, resource_types=["Encounter"], since=None, out_dir=Path(tmp))
            for paths in result.files.values():
                for path in paths:
                    with path.open("rb") as handle:
                        for line in handle:
                            rejected += not check_resource(orjson.loads(line), tolerate=frozenset()).ok
                            count += 1
        return count

    measurement = timed(work)
    measurement.extra["rejected"] = rejected
    return measurement

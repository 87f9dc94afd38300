"""A generated health system of N Encounters, as a bulk-export-shaped folder of ``<Type>.ndjson`` files.

The journeys of ``examples/journeys.yaml`` are repeated over as many patients as it takes (each shifted
by up to a year, see ``sync.journeys.scaled``) and written resource by resource, so no more than one
patient's resources are ever in memory. The folder is cached under ``.run/bench/data/<n>/`` and reused;
``bench-data.info`` (JSON: counts, anchor, seed) is written last, so a folder without it (an interrupted
run) is rebuilt; its name ends in neither ``.json`` nor ``.ndjson``, so ``iop-bridge map DIR`` skips it.

The files are in patient order (each patient's resources follow the previous patient's in every file),
as the generator emits them. ``python bench/generate.py 100k`` builds one by hand.
"""

from __future__ import annotations

import argparse
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import IO, Any

import orjson
import yaml

from sync.journeys import JourneyBook, build_resources, parse_book, scaled

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".run" / "bench" / "data"
JOURNEYS = ROOT / "examples" / "journeys.yaml"
#: Day 0 of every journey: fixed, so the cached data and the mapping's as-of time never drift.
ANCHOR = date(2026, 6, 1)
SEED = 7
INFO = "bench-data.info"  # what a folder holds; not a FHIR file name, so map and pull readers skip it
_PILOT = 500  # patients generated once to learn how many Encounters a patient has on average


def parse_size(text: str) -> int:
    """``10k`` -> 10_000, ``1M`` -> 1_000_000, ``2500`` -> 2500."""
    text = text.strip()
    factor = {"k": 1_000, "K": 1_000, "m": 1_000_000, "M": 1_000_000}.get(text[-1:], 1)
    number = text[:-1] if factor != 1 else text
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 10k, 100k, 1M)") from None
    if value < 1:
        raise ValueError(f"size must be at least 1, got {text!r}")
    return value


def size_label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def load_book() -> JourneyBook:
    return parse_book(yaml.safe_load(JOURNEYS.read_text(encoding="utf-8")) or {})


def dataset(encounters: int) -> Path:
    """The folder holding a health system of at least ``encounters`` Encounters (built when missing)."""
    folder = DATA / size_label(encounters)
    if (folder / INFO).exists():
        return folder
    return write_dataset(encounters, folder)


def manifest(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((folder / INFO).read_bytes())
    return data


def write_dataset(encounters: int, folder: Path) -> Path:
    book = load_book()
    patients = _patients_needed(book, encounters)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    counts: Counter[str] = Counter()
    handles: dict[str, IO[bytes]] = {}
    try:
        for resource in _until(
            build_resources(scaled(book, patients, seed=SEED), anchor=ANCHOR, seed=SEED), encounters
        ):
            kind = resource["resourceType"]
            handle = handles.get(kind)
            if handle is None:
                handle = handles[kind] = (partial / f"{kind}.ndjson").open("wb", buffering=1 << 20)
            handle.write(orjson.dumps(resource, option=orjson.OPT_APPEND_NEWLINE))
            counts[kind] += 1
    finally:
        for handle in handles.values():
            handle.close()
    info = {
        "encounters": counts["Encounter"],
        "patients": counts["Patient"],
        "resources": dict(sorted(counts.items())),
        "anchor": ANCHOR.isoformat(),
        "seed": SEED,
        "bytes": sum(p.stat().st_size for p in partial.glob("*.ndjson")),
    }
    (partial / INFO).write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def _patients_needed(book: JourneyBook, encounters: int) -> int:
    """An upper bound on the patients it takes: the pilot's average plus a margin."""
    pilot = sum(
        1
        for r in build_resources(scaled(book, _PILOT, seed=SEED), anchor=ANCHOR, seed=SEED)
        if r["resourceType"] == "Encounter"
    )
    return int(encounters / (pilot / _PILOT) * 1.2) + len(book.journeys)


def _until(resources: Iterator[dict[str, Any]], encounters: int) -> Iterator[dict[str, Any]]:
    """The resources up to the first patient boundary after ``encounters`` Encounters."""
    seen = 0
    for resource in resources:
        kind = resource["resourceType"]
        if kind == "Patient" and seen >= encounters:
            return
        seen += kind == "Encounter"
        yield resource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="+", help="Encounters per health system, e.g. 10k 100k 1M")
    args = parser.parse_args()
    for text in args.sizes:
        folder = dataset(parse_size(text))
        print(folder, orjson.dumps(manifest(folder)).decode())


if __name__ == "__main__":
    main()

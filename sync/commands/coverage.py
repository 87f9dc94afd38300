"""``iop-bridge coverage``: the Encounter signatures no level-of-care rule classifies, most frequent first.

    iop-bridge coverage INPUT... [--rules FILE] [--config FILE] [--json] [--limit N] [--by-location]
                                 [--strict]
    iop-bridge coverage --config FILE [--ehr NAME] [--rules FILE] ...   (the running service's replica)
    iop-bridge coverage --store URL --ehr NAME [--rules FILE] ...

INPUT is what ``map`` reads (NDJSON files, bulk-export folders, Bundles: ``sync.inputs``). Without INPUT
the resources come from the state store's replica (``--config``: the service's ``store.url`` and its
rules file; ``--store``: a store URL), one EHR at a time, a batch of patients at a time. The rules are
``--rules``, else the config's ``rules``, else the defaults. The computation is
``mappers.coverage``; this module reads the inputs and prints: a text table (``--json``: one JSON
object) on stdout with counts, codes and Encounter ids only.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from mappers.coverage import CoverageReport, CoverageTally, Unclassified
from mappers.rules import Rules
from sync.config import Settings, load_settings, open_store
from sync.errors import ConfigError
from sync.inputs import ReadMode, input_bytes, load_resources, partition_resources, read_partition
from sync.rules_files import load_rules_file

#: Input JSON per partition when the files are large (as ``map``): memory stays bounded.
PARTITION_BYTES: Final = 6 * 1024 * 1024
#: Patients read from the store at once.
STORE_BATCH: Final = 200
#: Types of no patient that give patients' Encounters their meaning (location types).
SHARED_TYPES: Final = ("Location", "Organization")
#: Signatures the text table shows unless ``--limit`` says otherwise.
TEXT_LIMIT: Final = 25
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "coverage",
        help="list the Encounter signatures no level-of-care rule classifies",
        description="Which Encounters no rule classifies (by class, type/serviceType, location type and "
        "behavioral-health qualifier), most frequent first, from files or the service's store.",
    )
    add_source_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the text table")
    parser.add_argument(
        "--limit", type=int, default=None, help=f"signatures to list (text default {TEXT_LIMIT}, JSON all)"
    )
    parser.add_argument(
        "--by-location",
        action="store_true",
        help="add the Location / department references to the signature (department-based rules)",
    )
    parser.set_defaults(handler=run)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """INPUT..., --rules, --config, --store, --ehr, --strict (shared with ``explain-encounter``)."""
    parser.add_argument("inputs", nargs="*", type=Path, metavar="INPUT", help="file or folder (as map)")
    parser.add_argument("--rules", type=Path, help="a hospital's level-of-care rules file (TOML)")
    parser.add_argument(
        "--config", type=Path, help="the service's config: its rules, and its store when no INPUT is given"
    )
    parser.add_argument("--store", help="a state store URL to read the replica from (no INPUT)")
    parser.add_argument("--ehr", help="which EHR's replica to read (default: the config's only one)")
    parser.add_argument(
        "--strict", action="store_true", help="validate every whole resource first (as map --strict)"
    )


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise ConfigError("--limit must be 0 or more")
    rules, settings = rules_and_settings(args)
    tally = CoverageTally(rules, by_location=args.by_location)
    for batch in resource_batches(args, settings):
        tally.add(batch)
    limit = args.limit if args.limit is not None else (None if args.json else TEXT_LIMIT)
    report = tally.report(limit)
    if args.json:
        sys.stdout.write(orjson.dumps(report.to_dict()).decode() + "\n")
    else:
        sys.stdout.write(render(report, by_location=args.by_location))
    return 0


def rules_and_settings(args: argparse.Namespace) -> tuple[Rules, Settings | None]:
    settings = load_settings(args.config) if args.config is not None else None
    if args.rules is not None:
        return load_rules_file(args.rules), settings
    return load_rules_file(settings.rules if settings is not None else None), settings


def resource_batches(args: argparse.Namespace, settings: Settings | None) -> Iterator[list[dict[str, Any]]]:
    """The resources to look at, in batches of whole patients (each with the shared resources)."""
    mode: ReadMode = "strict" if args.strict else "lean"
    if args.inputs:
        if args.store is not None:
            raise ConfigError("give INPUT files or --store, not both")
        yield from _file_batches(args.inputs, mode)
        return
    if args.store is None and settings is None:
        raise ConfigError("give INPUT files, or --config / --store to read the service's replica")
    url = args.store if args.store is not None else settings.store.url  # type: ignore[union-attr]
    yield from _store_batches(url, ehr_name(args, settings))


def _file_batches(paths: Sequence[Path], mode: ReadMode) -> Iterator[list[dict[str, Any]]]:
    parts = math.ceil(input_bytes(paths) / PARTITION_BYTES)
    if parts <= 1:
        yield load_resources(paths, mode=mode).resources
        return
    with tempfile.TemporaryDirectory(prefix="iop-bridge-coverage-") as folder:
        partitions = partition_resources(paths, Path(folder), parts)
        shared = read_partition([partitions.shared], mode=mode, sources=partitions.sources)
        for part in partitions.parts:
            yield [*read_partition([part], mode=mode, sources=partitions.sources), *shared]


def ehr_name(args: argparse.Namespace, settings: Settings | None) -> str:
    if args.ehr:
        return str(args.ehr)
    names = [ehr.name for ehr in settings.ehr] if settings is not None else []
    if len(names) != 1:
        raise ConfigError("--ehr NAME: which EHR's replica to read")
    return names[0]


def _store_batches(url: str, ehr: str) -> Iterator[list[dict[str, Any]]]:
    store = open_store(url)
    try:
        shared = store.resources_of_type(ehr, SHARED_TYPES)
        patients = store.patients_touched(ehr, _EPOCH)  # every patient the replica holds
        for start in range(0, len(patients), STORE_BATCH):
            batch: list[dict[str, Any]] = list(shared)
            for patient_id in patients[start : start + STORE_BATCH]:
                batch.extend(store.patient_resources(ehr, patient_id))
            yield batch
    finally:
        store.close()


def render(report: CoverageReport, *, by_location: bool = False) -> str:
    """The text table: a summary line, then one row per signature."""
    classified = ", ".join(f"{level} {count:,}" for level, count in report.classified.items()) or "none"
    lines = [
        f"rules: {report.rules_version}",
        f"encounters: {report.encounters:,} read; classified: {classified}; "
        f"unclassified: {report.unclassified:,}",
    ]
    if not report.signatures:
        lines.append("every Encounter is classified by a rule")
        return "\n".join(lines) + "\n"
    header = ["count", "class", "type/serviceType", "location types", "qualifier"]
    if by_location:
        header.append("locations")
    header.append("example")
    rows = [header, *(_row(s, by_location) for s in report.signatures)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines.append("")
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    shown = sum(s.count for s in report.signatures)
    if shown < report.unclassified:
        lines.append(f"… {report.unclassified - shown:,} more Encounters in less frequent signatures")
    lines.append("")
    lines.append(
        "qualifier: purpose = a BH reason/type/service/place; recorded = only a BH diagnosis it records"
    )
    lines.append("explain one: iop-bridge explain-encounter INPUT... --encounter <example>")
    return "\n".join(lines) + "\n"


def _row(item: Unclassified, by_location: bool) -> list[str]:
    signature = item.signature
    row = [
        f"{item.count:,}",
        ", ".join(signature.classes) or "-",
        ", ".join(signature.codes) or "-",
        ", ".join(signature.location_types) or "-",
        signature.qualifier,
    ]
    if by_location:
        row.append(", ".join(signature.locations) or "-")
    row.append(item.example)
    return row

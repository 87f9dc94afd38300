"""``iop-bridge map``: FHIR files in, IOP episodes (or EpisodeOfCare resources, or referrals) out.

    iop-bridge map INPUT... [--out FILE] [--as-of ISO] [--rules FILE] [--format episodes|fhir|referrals]
                            [--explain] [--ehr NAME] [--timezone TZ] [--workers N] [--partitions N]
                            [--strict] [--vendor NAME] [--config FILE]

INPUT is any mix of NDJSON files, bulk-export folders and Bundle / resource JSON files (``sync.inputs``).
Output is NDJSON, one record per line, to ``--out`` (written whole, then renamed into place) or stdout.
A summary goes to stderr; with ``--out``, every reject is also written to ``<out>.rejects.ndjson``.
Exit status 0 when the run completed, rejects included; 2 when it could not run (bad rules file,
unreadable input, bad option).

With ``--config FILE`` the EHR (``--ehr NAME``, or the only one configured) is mapped as the service maps
it: its ``patient_identifier_systems`` decide which patient identifiers the records carry, and its
``timezone`` is the default of ``--timezone``. Without a config: the MR-typed identifier only, UTC.

Reading: by default each resource is read as the mappers' lean projection (``mappers.projection``: only
the fields they use, each type-checked, since ``pull`` validated every resource with ``fhir.resources``);
a field of the wrong type rejects that resource with its path. ``--strict`` validates every whole
resource with ``fhir.resources.R4B`` first and rejects what fails, with the reasons. Both tolerate the
named deviations of the vendor profile (``--vendor``, default generic; with ``--config``, the ``--ehr``'s
``vendor``): a kept resource's deviations are counted in the summary, an untolerated one is a reject.

Memory and cores: a small input is read whole and mapped in this process. A larger one is first streamed
into partition files by patient (patients are independent) plus one file of shared resources (those of
no patient: Locations, Organizations…) that every partition reads too; the partitions are mapped by
``--workers`` processes (default: every core), each writing its sorted records to a file, and the files
are merged into the one sorted output. Memory then grows with the largest partition, not the input.
Records a partition made from the shared resources alone (their rejects, say) are kept once.
Assumption: a resource refers only to its own patient's resources and to shared ones.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import heapq
import math
import multiprocessing
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, tzinfo
from operator import itemgetter
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import structlog

from connectors.private import make_private_dir, open_private
from connectors.vendors import VENDOR_NAMES, profile_named
from mappers.episode_of_care import episode_of_care
from mappers.episodes import map_episodes, sort_key
from mappers.referrals import map_referrals
from mappers.rules import Rules, RulesError
from mappers.settings import EpisodeSettings
from schemas.patient_identifiers import DEFAULT_PATIENT_IDENTIFIER_SYSTEMS
from sync import rules_files
from sync.config import load_settings
from sync.errors import ConfigError
from sync.inputs import (
    DEFAULT_LIMITS,
    InputLimits,
    InputReject,
    ReadMode,
    input_bytes,
    load_resources,
    partition_resources,
    read_partition,
)
from sync.rules_files import rules_folder, rules_from_text

log = structlog.get_logger()

FORMATS: Final = ("episodes", "fhir", "referrals")
_EHR_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
#: At most this many rejects are listed on stderr (all of them go to the rejects file with --out).
SHOWN_REJECTS: Final = 20
#: Input JSON per partition: a partition's resources as Python dicts take several times this much memory.
PARTITION_BYTES: Final = 6 * 1024 * 1024
#: More partitions than this would hold too many files open at the merge.
MAX_PARTITIONS: Final = 512


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "map",
        help="map FHIR files to IOP episodes, EpisodeOfCare resources or referrals (NDJSON)",
        description="Map FHIR R4 files (NDJSON, bulk-export folders, Bundles) to IOP episode records.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="file or folder")
    parser.add_argument("--out", type=Path, help="output NDJSON file (default: stdout)")
    parser.add_argument("--as-of", help="the time episodes are judged at, ISO 8601 (default: now, UTC)")
    parser.add_argument("--rules", type=Path, help="a hospital's level-of-care rules file (TOML)")
    parser.add_argument("--format", choices=FORMATS, default="episodes", help="what to output")
    parser.add_argument("--explain", action="store_true", help="add why each episode began and ended")
    parser.add_argument(
        "--ehr",
        help="name of the EHR connection (part of the ids; default: the config's only one, or 'default')",
    )
    parser.add_argument(
        "--timezone", help="IANA time zone of the EHR, days and weeks (default: the config's EHR's, or UTC)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="the service's config file: map as it maps --ehr (identifier systems, zone)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="processes mapping partitions (default: every core; 1: here)"
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=0,
        help="split the input by patient into this many parts (default: by input size, ~6 MB each)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="validate every whole resource with fhir.resources first (default: the lean projection)",
    )
    parser.add_argument(
        "--max-line-bytes",
        type=int,
        default=DEFAULT_LIMITS.line_bytes,
        help="longest NDJSON line or Bundle entry read; a longer one is a reject (default: 64 MiB)",
    )
    parser.add_argument(
        "--max-document-bytes",
        type=int,
        default=DEFAULT_LIMITS.document_bytes,
        help="largest .json document read, decompressed; a larger one is a reject (default: 512 MiB)",
    )
    parser.add_argument(
        "--vendor",
        choices=VENDOR_NAMES,
        help="vendor profile: the deviations tolerated (default: the config's EHR's, else generic)",
    )
    parser.set_defaults(handler=run)


def _tolerated(vendor: str | None) -> frozenset[str]:
    """The named deviations of the run's vendor profile (``--vendor``, else the config's, else generic)."""
    return profile_named(vendor or "generic").tolerated_deviations


@dataclass(frozen=True)
class MapOptions:
    """What mapping one set of resources needs (plain values, so it reaches worker processes)."""

    ehr: str
    as_of: datetime
    timezone: str
    format: str
    explain: bool
    rules_text: str | None = None
    #: The rules file's folder: the value set files it names are read from there (``sync.rules_files``).
    rules_dir: str | None = None
    #: How resources are read: the lean projection, or whole and validated (``--strict``).
    mode: ReadMode = "lean"
    #: The patient identifiers records may carry (the EHR's ``patient_identifier_systems``).
    patient_identifier_systems: tuple[str, ...] = DEFAULT_PATIENT_IDENTIFIER_SYSTEMS
    #: The configured EHR's episode settings (``--config``); None: the model's defaults.
    episode_settings: EpisodeSettings | None = None
    #: The named deviations both readers keep (the vendor profile's).
    tolerate: frozenset[str] = frozenset()


@dataclass
class Outcome:
    """What mapping one set of resources produced, besides the records themselves."""

    records: int = 0
    patients: int = 0
    episodes: int = 0
    referrals: int = 0
    encounter_levels: Counter[str] = field(default_factory=Counter)
    by_level_status: Counter[tuple[str, str]] = field(default_factory=Counter)
    episode_rejects: list[dict[str, Any]] = field(default_factory=list)
    #: Resources a worker could not read (projection or validation), as ``InputReject`` dicts.
    input_rejects: list[dict[str, Any]] = field(default_factory=list)
    referral_rejects: list[dict[str, Any]] = field(default_factory=list)
    #: Tolerated deviations of the resources a worker kept, by name.
    deviations: Counter[str] = field(default_factory=Counter)

    def add(self, other: Outcome) -> None:
        self.deviations.update(other.deviations)
        self.records += other.records
        self.patients += other.patients
        self.episodes += other.episodes
        self.referrals += other.referrals
        self.encounter_levels.update(other.encounter_levels)
        self.by_level_status.update(other.by_level_status)
        self.episode_rejects.extend(other.episode_rejects)
        self.input_rejects.extend(other.input_rejects)
        self.referral_rejects.extend(other.referral_rejects)

    def remove(self, other: Outcome) -> None:
        """Take away what ``other`` (the shared resources mapped alone) added to this outcome."""
        self.patients -= other.patients
        self.episodes -= other.episodes
        self.referrals -= other.referrals
        self.encounter_levels.subtract(other.encounter_levels)
        self.encounter_levels = +self.encounter_levels
        self.by_level_status.subtract(other.by_level_status)
        self.by_level_status = +self.by_level_status
        self.episode_rejects = _without(self.episode_rejects, other.episode_rejects)
        self.referral_rejects = _without(self.referral_rejects, other.referral_rejects)


@dataclass
class MapRun:
    """Everything one run produced but the records (those are written as they are merged)."""

    as_of: datetime
    files: int
    #: Resources read from the inputs (before the lean projection or validation rejected any).
    resources: int
    input_rejects: list[InputReject]
    outcome: Outcome

    def unreadable(self) -> list[dict[str, Any]]:
        """What could not be read: the parent's and the workers' input rejects, by file and line."""
        found = [r.to_dict() for r in self.input_rejects] + self.outcome.input_rejects
        return sorted(found, key=lambda r: (str(r["source"]), r["line"] or 0))

    def rejects(self) -> list[dict[str, Any]]:
        return [
            *self.unreadable(),
            *sorted(self.outcome.episode_rejects, key=_reject_order),
            *sorted(self.outcome.referral_rejects, key=_reject_order),
        ]


@dataclass(frozen=True)
class PartitionJob:
    """One partition to map: its file, the shared file, where its keyed records go."""

    part: Path
    shared: Path
    out: Path
    options: MapOptions
    #: Every partition but the first drops what the shared resources alone produce, so it counts once.
    without_shared: bool
    #: The input files, by the index partition lines carry (for the rejects).
    sources: tuple[str, ...] = ()


def _reject_order(reject: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(reject["resourceType"]), str(reject["id"] or ""), str(reject["reason"]))


def _without(items: list[Any], remove: Iterable[Any]) -> list[Any]:
    """``items`` less one occurrence of each of ``remove`` (a multiset difference, order kept)."""
    left = Counter(_identity(item) for item in remove)
    if not left:
        return items
    kept = []
    for item in items:
        text = _identity(item)
        if left[text] > 0:
            left[text] -= 1
            continue
        kept.append(item)
    return kept


def _identity(item: Any) -> bytes:
    return item if isinstance(item, bytes) else orjson.dumps(item)


@dataclass(frozen=True)
class _Configured:
    """What the flags and, with ``--config``, the configured EHR they name say about the run."""

    ehr: str
    timezone: str
    identifier_systems: tuple[str, ...] = DEFAULT_PATIENT_IDENTIFIER_SYSTEMS
    episode_settings: EpisodeSettings | None = None
    rules: Path | None = None
    vendor: str | None = None


def _configured(args: argparse.Namespace) -> _Configured:
    """The run's EHR, zone, identifier systems, episode settings, rules file and vendor: the flags win
    over the configured EHR's (``--config``), which win over the defaults."""
    if args.config is None:
        return _Configured(
            args.ehr or "default", args.timezone or "UTC", rules=args.rules, vendor=args.vendor
        )
    settings = load_settings(args.config)
    if args.ehr is not None:
        ehr = settings.ehr_named(args.ehr)
    elif len(settings.ehr) == 1:
        ehr = settings.ehr[0]
    else:
        configured = ", ".join(e.name for e in settings.ehr) or "none"
        raise ConfigError(f"say which EHR to map as with --ehr (configured: {configured})")
    configured_rules = settings.rules_file(ehr.name)
    return _Configured(
        ehr.name,
        args.timezone or ehr.timezone,
        tuple(ehr.patient_identifier_systems),
        settings.episode_settings(ehr),
        args.rules or (Path(configured_rules) if configured_rules else None),
        args.vendor or ehr.vendor,
    )


def run(args: argparse.Namespace) -> int:
    configured = _configured(args)
    args.ehr, args.timezone, args.rules = configured.ehr, configured.timezone, configured.rules
    zone = parse_timezone(args.timezone)
    as_of = parse_as_of(args.as_of, zone) if args.as_of else datetime.now(UTC)
    if not _EHR_NAME.match(args.ehr):
        raise ConfigError(f"--ehr must be letters, digits, '_', '.' or '-' (got {args.ehr!r})")
    if args.out is not None and args.out.is_dir():
        raise ConfigError(
            f"--out {args.out} is a folder: name the output file (e.g. {args.out}/episodes.ndjson)"
        )
    if args.workers < 0 or args.partitions < 0:
        raise ConfigError("--workers and --partitions must be 0 (automatic) or more")
    if args.max_line_bytes < 1024 or args.max_document_bytes < 1024:
        raise ConfigError("--max-line-bytes and --max-document-bytes must be at least 1024")
    limits = InputLimits(line_bytes=args.max_line_bytes, document_bytes=args.max_document_bytes)
    rules_text = read_rules_text(args.rules)
    rules = rules_from(rules_text, args.rules)
    rules_dir = rules_folder(args.rules) if args.rules is not None else None
    options = MapOptions(
        ehr=args.ehr,
        as_of=as_of,
        timezone=args.timezone,
        format=args.format,
        explain=args.explain,
        rules_text=rules_text,
        rules_dir=rules_dir,
        mode="strict" if args.strict else "lean",
        patient_identifier_systems=configured.identifier_systems,
        episode_settings=configured.episode_settings,
        tolerate=_tolerated(configured.vendor),
    )
    workers = args.workers or os.cpu_count() or 1
    parts = args.partitions or min(MAX_PARTITIONS, math.ceil(input_bytes(args.inputs) / PARTITION_BYTES))
    if parts <= 1:
        result = _map_here(args.inputs, options, rules, out=args.out, limits=limits)
    else:
        result = _map_partitioned(
            args.inputs, options, parts=max(parts, workers), workers=workers, out=args.out, limits=limits
        )
    if args.out is not None:
        write_ndjson(rejects_path(args.out), result.rejects())
    sys.stderr.write(summary(result, args=args, rules=rules))
    log.info(
        "map_done",
        ehr=args.ehr,
        format=args.format,
        patients=result.outcome.patients,
        episodes=result.outcome.episodes,
        referrals=result.outcome.referrals,
        rejects=len(result.rejects()),
    )
    return 0


def _map_here(
    inputs: Sequence[Path],
    options: MapOptions,
    rules: Rules,
    *,
    out: Path | None,
    limits: InputLimits = DEFAULT_LIMITS,
) -> MapRun:
    """Read everything and map it in this process (a small input)."""
    with _without_cyclic_gc():
        loaded = load_resources(inputs, mode=options.mode, limits=limits, tolerate=options.tolerate)
        keyed, outcome = map_resources(loaded.resources, options, rules)
        outcome.deviations = loaded.deviations
        count = loaded.read
        del loaded.resources[:]
    _write_output(out, (orjson.dumps(record) + b"\n" for _, record in keyed))
    return MapRun(options.as_of, loaded.files, count, loaded.rejects, outcome)


def _map_partitioned(
    inputs: Sequence[Path],
    options: MapOptions,
    *,
    parts: int,
    workers: int,
    out: Path | None,
    limits: InputLimits = DEFAULT_LIMITS,
) -> MapRun:
    """Split the input by patient into files, map them in worker processes, merge their sorted outputs."""
    with tempfile.TemporaryDirectory(prefix="iop-bridge-map-") as folder:
        partitions = partition_resources(inputs, Path(folder), parts, limits=limits)
        jobs = [
            PartitionJob(
                part=part,
                shared=partitions.shared,
                out=Path(folder) / f"out-{index:04d}.ndjson",
                options=options,
                without_shared=index > 0,
                sources=tuple(partitions.sources),
            )
            for index, part in enumerate(partitions.parts)
        ]
        outcome = Outcome()
        if workers <= 1:
            for job in jobs:
                outcome.add(map_partition(job))
        else:
            context = multiprocessing.get_context("spawn")  # no fork of a process holding locks/threads
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
                for done in pool.map(map_partition, jobs):
                    outcome.add(done)
        log.info("partitions_mapped", parts=len(jobs), workers=workers, records=outcome.records)
        _write_output(out, _merged([job.out for job in jobs]))
    return MapRun(options.as_of, partitions.files, partitions.resources, partitions.rejects, outcome)


@contextlib.contextmanager
def _without_cyclic_gc() -> Generator[None, None, None]:
    """Pause the cyclic garbage collector while a partition is read and mapped.

    Its full passes walk every live object, and a partition's parsed resources are hundreds of thousands
    of them: measured on 109k Encounters it took ~40% of the CPU. Reference counting still frees nearly
    everything; the few cycles wait for the young-generation collection at the end (a partition
    bounds the memory)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect(0)  # everything allocated meanwhile is still in the youngest generation


def map_partition(job: PartitionJob) -> Outcome:
    """Map one partition (in a worker process): its records, keyed, to ``job.out`` in output order."""
    with _without_cyclic_gc():
        return _map_partition(job)


def _map_partition(job: PartitionJob) -> Outcome:
    rules = rules_from_text(job.options.rules_text, job.options.rules_dir)
    mode, sources = job.options.mode, job.sources
    unreadable: list[InputReject] = []
    counted: Counter[str] = Counter()
    shared = read_partition(
        [job.shared], mode=mode, rejects=[] if job.without_shared else unreadable, sources=sources,
        tolerate=job.options.tolerate, deviations=None if job.without_shared else counted,
    )  # fmt: skip
    own = read_partition(
        [job.part], mode=mode, rejects=unreadable, sources=sources,
        tolerate=job.options.tolerate, deviations=counted,
    )  # fmt: skip
    keyed, outcome = map_resources([*own, *shared], job.options, rules)
    del own
    outcome.input_rejects = [r.to_dict() for r in unreadable]
    outcome.deviations = counted
    lines = [orjson.dumps(key) + b"\t" + orjson.dumps(record) + b"\n" for key, record in keyed]
    del keyed
    if job.without_shared:
        alone_keyed, alone = map_resources(shared, job.options, rules)
        lines = _without(lines, [orjson.dumps(k) + b"\t" + orjson.dumps(r) + b"\n" for k, r in alone_keyed])
        outcome.remove(alone)
    outcome.records = len(lines)
    with open_private(job.out) as handle:
        handle.writelines(lines)
    return outcome


def map_resources(
    resources: Sequence[Mapping[str, Any]], options: MapOptions, rules: Rules
) -> tuple[list[tuple[list[Any], Mapping[str, Any]]], Outcome]:
    """The output records of ``resources`` (each with its sort key), in output order, and the counts."""
    settings = options.episode_settings or EpisodeSettings(
        patient_identifier_systems=options.patient_identifier_systems
    )
    episodes = map_episodes(
        resources, ehr=options.ehr, as_of=options.as_of, rules=rules, settings=settings,
        timezone=options.timezone, explain=options.explain,
    )  # fmt: skip
    referrals = map_referrals(
        resources, ehr=options.ehr, rules=rules, local_codes=settings.referral_local_codes,
        part2_program=settings.part2_program, timezone=options.timezone,
        patient_identifier_systems=options.patient_identifier_systems,
    )  # fmt: skip
    keyed: list[tuple[list[Any], Mapping[str, Any]]]
    if options.format == "referrals":
        keyed = [([str(r["referral_id"])], r) for r in referrals.referrals]
    elif options.format == "fhir":
        keyed = [(list(sort_key(r)), episode_of_care(r)) for r in episodes.episodes]
    elif options.explain:
        keyed = [
            (list(sort_key(r)), {**r, "explain": episodes.explanations.get(r["episode_id"], [])})
            for r in episodes.episodes
        ]
    else:
        keyed = [(list(sort_key(r)), r) for r in episodes.episodes]
    outcome = Outcome(
        records=len(keyed),
        patients=episodes.patients,
        episodes=len(episodes.episodes),
        referrals=len(referrals.referrals),
        encounter_levels=Counter(episodes.encounter_levels),
        by_level_status=Counter((str(e["level"]), str(e["status"])) for e in episodes.episodes),
        episode_rejects=[r.to_dict() for r in episodes.rejects],
        referral_rejects=[r.to_dict() for r in referrals.rejects],
    )
    return keyed, outcome


def _merged(paths: Sequence[Path]) -> Iterator[bytes]:
    """The records of the partitions' keyed files, in key order (each file is in key order already)."""
    streams = [_keyed_lines(path) for path in paths]
    for _, line in heapq.merge(*streams, key=itemgetter(0)):
        yield line


def _keyed_lines(path: Path) -> Iterator[tuple[list[Any], bytes]]:
    with path.open("rb") as handle:
        for line in handle:
            key, _, record = line.partition(b"\t")
            yield orjson.loads(key), record


def _write_output(out: Path | None, lines: Iterable[bytes]) -> None:
    if out is None:
        write_stdout(lines)
    else:
        write_lines(out, lines)


def parse_timezone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"--timezone: unknown IANA time zone {name!r}") from exc


def parse_as_of(text: str, zone: tzinfo) -> datetime:
    """An ISO 8601 date or date-time; without an offset it is read in the EHR's zone."""
    try:
        if len(text.strip()) == 10:
            return datetime.combine(date.fromisoformat(text.strip()), time(), tzinfo=zone)
        moment = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ConfigError(f"--as-of must be an ISO 8601 date or date-time, got {text!r}") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)


def read_rules_text(path: Path | None) -> str | None:
    """The rules file's text (None: the default rules)."""
    return None if path is None else rules_files.read_rules_text(path)


def rules_from(text: str | None, path: Path | None) -> Rules:
    try:
        return rules_from_text(text, rules_folder(path) if path is not None else None)
    except RulesError as exc:
        raise ConfigError(f"rules file {path}: {exc}") from exc


def write_stdout(lines: Iterable[bytes]) -> None:
    """JSON lines on stdout; a reader that stops early (``| head``) just ends the output."""
    try:
        for line in lines:
            sys.stdout.write(line.decode())
        sys.stdout.flush()
    except BrokenPipeError:
        log.info("output_closed_early")
        with contextlib.suppress(OSError, ValueError):  # the interpreter's final flush must not fail
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def rejects_path(out: Path) -> Path:
    return out.with_name(out.name + ".rejects.ndjson")


def write_ndjson(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line to ``path`` (see ``write_lines``)."""
    write_lines(path, (orjson.dumps(record) + b"\n" for record in records))


def write_lines(path: Path, lines: Iterable[bytes]) -> None:
    """Write lines to a temporary file beside ``path``, then rename it into place, so a reader never
    sees half a file."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        make_private_dir(folder)  # records hold PHI: a folder we create is 0700 (mkstemp: 0600)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(handle, "wb") as out:
            out.writelines(lines)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _counts(items: Iterable[tuple[str, int]]) -> str:
    shown = ", ".join(f"{name} {count:,}" for name, count in items)
    return shown or "none"


def summary(result: MapRun, *, args: argparse.Namespace, rules: Rules) -> str:
    """The run's summary for stderr: counts and codes only (no patient data)."""
    outcome = result.outcome
    rejects = result.rejects()
    lines = [
        f"as-of: {result.as_of.isoformat()} (timezone {args.timezone}, ehr {args.ehr})",
        f"rules: {rules.version}",
        f"inputs: {result.files:,} files, {result.resources:,} resources read",
        f"patients: {outcome.patients:,}",
        f"encounters by level: {_counts(sorted(outcome.encounter_levels.items()))}",
        "episodes by level and status: "
        + _counts((f"{level} {status}", n) for (level, status), n in sorted(outcome.by_level_status.items())),
        f"referrals: {outcome.referrals:,}",
        f"rejects: {len(rejects):,} (input {len(result.unreadable()):,}, episodes "
        f"{len(outcome.episode_rejects):,}, referrals {len(outcome.referral_rejects):,})",
        f"deviations kept: {_counts(sorted(outcome.deviations.items()))}",
    ]
    if args.explain and args.format != "episodes":
        lines.append(
            f"note: --explain adds to episode records only; --format {args.format} has no room for it"
        )
    if args.out is not None:
        lines.append(f"output: {outcome.records:,} {args.format} records -> {args.out}")
        lines.append(f"rejects file: {rejects_path(args.out)}")
    lines.extend(f"  reject: {_describe(r)}" for r in rejects[:SHOWN_REJECTS])
    if len(rejects) > SHOWN_REJECTS:
        lines.append(f"  … and {len(rejects) - SHOWN_REJECTS:,} more")
    return "\n".join(lines) + "\n"


def _describe(reject: dict[str, Any]) -> str:
    if "source" in reject:
        where = reject["source"] if reject["line"] is None else f"{reject['source']}:{reject['line']}"
        return f"{where}: {reject['reason']}"
    return f"{reject['resourceType']}/{reject['id'] or '(no id)'}: {reject['reason']}"

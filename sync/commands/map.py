"""``iop-bridge map``: FHIR files in, IOP episodes (or EpisodeOfCare resources, or referrals) out.

    iop-bridge map INPUT... [--out FILE] [--as-of ISO] [--rules FILE] [--format episodes|fhir|referrals]
                            [--explain] [--ehr NAME] [--timezone TZ]

INPUT is any mix of NDJSON files, bulk-export folders and Bundle / resource JSON files (``sync.inputs``).
Output is NDJSON, one record per line, to ``--out`` (written whole, then renamed into place) or stdout.
A summary goes to stderr; with ``--out``, every reject is also written to ``<out>.rejects.ndjson``.
Exit status 0 when the run completed, rejects included; 2 when it could not run (bad rules file,
unreadable input, bad option).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, tzinfo
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import structlog

from mappers.episode_of_care import episode_of_care
from mappers.episodes import MappingResult, map_episodes
from mappers.referrals import ReferralResult, map_referrals
from mappers.rules import Rules, RulesError, default_rules, load_rules
from mappers.settings import EpisodeSettings
from sync.errors import ConfigError
from sync.inputs import Loaded, load_resources

log = structlog.get_logger()

FORMATS: Final = ("episodes", "fhir", "referrals")
_EHR_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
#: At most this many rejects are listed on stderr (all of them go to the rejects file with --out).
SHOWN_REJECTS: Final = 20


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
    parser.add_argument("--ehr", default="default", help="name of the EHR connection (part of the ids)")
    parser.add_argument("--timezone", default="UTC", help="IANA time zone of the EHR (days and weeks)")
    parser.set_defaults(handler=run)


@dataclass
class MapRun:
    """Everything one run produced (the output records and what the summary reports)."""

    as_of: datetime
    loaded: Loaded
    episodes: MappingResult
    referrals: ReferralResult
    records: Sequence[Mapping[str, Any]]

    def rejects(self) -> list[dict[str, Any]]:
        return [
            *(r.to_dict() for r in self.loaded.rejects),
            *(r.to_dict() for r in self.episodes.rejects),
            *(r.to_dict() for r in self.referrals.rejects),
        ]


def run(args: argparse.Namespace) -> int:
    zone = parse_timezone(args.timezone)
    as_of = parse_as_of(args.as_of, zone) if args.as_of else datetime.now(UTC)
    if not _EHR_NAME.match(args.ehr):
        raise ConfigError(f"--ehr must be letters, digits, '_', '.' or '-' (got {args.ehr!r})")
    rules = read_rules(args.rules)
    loaded = load_resources(args.inputs)
    result = map_run(loaded, ehr=args.ehr, as_of=as_of, rules=rules, timezone=args.timezone, args=args)
    if args.out is not None:
        write_ndjson(args.out, result.records)
        write_ndjson(rejects_path(args.out), result.rejects())
    else:
        write_stdout(result.records)
    sys.stderr.write(summary(result, args=args, rules=rules))
    log.info(
        "map_done",
        ehr=args.ehr,
        format=args.format,
        patients=result.episodes.patients,
        episodes=len(result.episodes.episodes),
        referrals=len(result.referrals.referrals),
        rejects=len(result.rejects()),
    )
    return 0


def map_run(
    loaded: Loaded, *, ehr: str, as_of: datetime, rules: Rules, timezone: str, args: argparse.Namespace
) -> MapRun:
    settings = EpisodeSettings()
    episodes = map_episodes(
        loaded.resources, ehr=ehr, as_of=as_of, rules=rules, settings=settings, timezone=timezone,
        explain=args.explain,
    )  # fmt: skip
    referrals = map_referrals(
        loaded.resources, ehr=ehr, rules=rules, local_codes=settings.referral_local_codes,
        part2_program=settings.part2_program, timezone=timezone,
    )  # fmt: skip
    records: Sequence[Mapping[str, Any]]
    if args.format == "referrals":
        records = referrals.referrals
    elif args.format == "fhir":
        records = [episode_of_care(record) for record in episodes.episodes]
    elif args.explain:
        records = [
            {**record, "explain": episodes.explanations.get(record["episode_id"], [])}
            for record in episodes.episodes
        ]
    else:
        records = episodes.episodes
    return MapRun(as_of=as_of, loaded=loaded, episodes=episodes, referrals=referrals, records=records)


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


def read_rules(path: Path | None) -> Rules:
    if path is None:
        return default_rules()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read rules file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"rules file {path} is not UTF-8 text") from exc
    try:
        return load_rules(text)
    except RulesError as exc:
        raise ConfigError(f"rules file {path}: {exc}") from exc


def write_stdout(records: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line on stdout; a reader that stops early (``| head``) just ends the output."""
    try:
        for record in records:
            sys.stdout.write(orjson.dumps(record).decode() + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        log.info("output_closed_early")
        with contextlib.suppress(OSError, ValueError):  # the interpreter's final flush must not fail
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def rejects_path(out: Path) -> Path:
    return out.with_name(out.name + ".rejects.ndjson")


def write_ndjson(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write one JSON object per line to a temporary file beside ``path``, then rename it into place, so
    a reader never sees half a file."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(handle, "wb") as out:
            for record in records:
                out.write(orjson.dumps(record))
                out.write(b"\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _counts(items: Iterable[tuple[str, int]]) -> str:
    shown = ", ".join(f"{name} {count:,}" for name, count in items)
    return shown or "none"


def summary(result: MapRun, *, args: argparse.Namespace, rules: Rules) -> str:
    """The run's summary for stderr: counts and codes only (no patient data)."""
    by_level_status = Counter((str(e["level"]), str(e["status"])) for e in result.episodes.episodes)
    rejects = result.rejects()
    lines = [
        f"as-of: {result.as_of.isoformat()} (timezone {args.timezone}, ehr {args.ehr})",
        f"rules: {rules.version}",
        f"inputs: {result.loaded.files:,} files, {len(result.loaded.resources):,} resources",
        f"patients: {result.episodes.patients:,}",
        f"encounters by level: {_counts(sorted(result.episodes.encounter_levels.items()))}",
        "episodes by level and status: "
        + _counts((f"{level} {status}", n) for (level, status), n in sorted(by_level_status.items())),
        f"referrals: {len(result.referrals.referrals):,}",
        f"rejects: {len(rejects):,} (input {len(result.loaded.rejects):,}, episodes "
        f"{len(result.episodes.rejects):,}, referrals {len(result.referrals.rejects):,})",
    ]
    if args.explain and args.format != "episodes":
        lines.append(
            f"note: --explain adds to episode records only; --format {args.format} has no room for it"
        )
    if args.out is not None:
        lines.append(f"output: {len(result.records):,} {args.format} records -> {args.out}")
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

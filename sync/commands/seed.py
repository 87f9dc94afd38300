"""``iop-bridge seed``: turn readable journeys into FHIR resources, as files or into a FHIR server."""

from __future__ import annotations

import argparse
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import structlog
import yaml

from connectors.config import AuthConfig, EhrConfig
from connectors.http import EhrClient
from sync.errors import ConfigError
from sync.journeys import (
    JourneyBook,
    JourneyError,
    build_resources,
    parse_book,
    prefixed,
    scaled,
    transaction_bundle,
)

log = structlog.get_logger()
DEFAULT_JOURNEYS = Path("examples/journeys.yaml")
#: Resources per transaction: small enough for any server's default limits, large enough to be quick.
BATCH = 200


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("seed", help="generate FHIR resources from journey definitions")
    parser.add_argument("--journeys", type=Path, default=DEFAULT_JOURNEYS, help="journeys file (YAML)")
    parser.add_argument("--anchor", help="the date that is day 0 of the journeys (default: today, UTC)")
    parser.add_argument("--timezone", default="UTC", help="IANA zone of the session times")
    parser.add_argument("--patients", type=int, help="scale to this many patients (benchmarks)")
    parser.add_argument(
        "--prefix", default="", help="prefix for every patient key (several copies side by side)"
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed (names, shifts)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="write <Type>.ndjson files into this folder")
    target.add_argument("--fhir-url", help="load into this FHIR server with transactions")
    parser.add_argument("--bearer", help="bearer token for --fhir-url")
    parser.set_defaults(handler=run)


def load_book(path: Path) -> JourneyBook:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"journeys file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"journeys file {path} is not valid YAML: {exc}") from exc
    try:
        return parse_book(data or {})
    except JourneyError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    book = load_book(args.journeys)
    if args.patients:
        book = scaled(book, args.patients, seed=args.seed)
    if args.prefix:
        try:
            book = prefixed(book, args.prefix)
        except JourneyError as exc:
            raise ConfigError(str(exc)) from exc
    try:
        anchor = date.fromisoformat(args.anchor) if args.anchor else datetime.now(UTC).date()
    except ValueError as exc:
        raise ConfigError(f"--anchor must be a date (YYYY-MM-DD), got {args.anchor!r}") from exc
    resources = build_resources(book, anchor=anchor, timezone=args.timezone, seed=args.seed)
    counts: Counter[str] = Counter()
    if args.out is not None:
        write_ndjson(resources, args.out, counts)
    else:
        load_into_server(resources, args.fhir_url, args.bearer, counts)
    summary = ", ".join(f"{t} {n}" for t, n in sorted(counts.items()))
    print(f"seeded {sum(counts.values())} resources ({summary}); day 0 = {anchor.isoformat()}")
    return 0


def write_ndjson(resources: Any, out: Path, counts: Counter[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    handles: dict[str, Any] = {}
    try:
        for resource in resources:
            kind = resource["resourceType"]
            if kind not in handles:
                handles[kind] = (out / f"{kind}.ndjson").open("wb")
            handles[kind].write(orjson.dumps(resource) + b"\n")
            counts[kind] += 1
    finally:
        for handle in handles.values():
            handle.close()


def load_into_server(resources: Any, base_url: str, bearer: str | None, counts: Counter[str]) -> None:
    auth = AuthConfig(kind="bearer", token=bearer) if bearer else AuthConfig()
    ehr = EhrConfig(name="seed", base_url=base_url, auth=auth, timeout_seconds=300)
    batch: list[dict[str, Any]] = []
    with EhrClient(ehr) as client:
        for resource in resources:
            batch.append(resource)
            if len(batch) >= BATCH:
                _post(client, batch, counts)
                batch = []
        if batch:
            _post(client, batch, counts)


def _post(client: EhrClient, batch: list[dict[str, Any]], counts: Counter[str]) -> None:
    client.request(
        "POST", "", json=transaction_bundle(batch), headers={"Content-Type": "application/fhir+json"}
    )
    counts.update(r["resourceType"] for r in batch)
    log.info("seed_batch_loaded", resources=len(batch))

"""``iop-bridge pull``: pull one EHR into ``DIR/<ResourceType>.ndjson`` and the state store.

With ``--config FILE --ehr NAME`` the EHR comes from the config file (plus ``IOP_BRIDGE_*`` overrides);
for a quick try, ``--base-url URL`` with ``--bearer TOKEN`` or ``--client-id ID --private-key PEM
[--token-url URL]`` (SMART Backend Services) needs no file. The cursor advances only after the output
is durably written (see ``connectors.pull``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm

from connectors.config import EhrConfig
from connectors.pull import PullSummary, pull
from sync.config import Settings, load_settings, open_store
from sync.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("pull", help="pull FHIR resources from an EHR (incremental, search or bulk)")
    parser.add_argument("--config", type=Path, help="configuration file (TOML)")
    parser.add_argument("--ehr", help="name of the [[ehr]] to pull (default: the only one configured)")
    parser.add_argument("--out", type=Path, required=True, help="folder for <ResourceType>.ndjson files")
    parser.add_argument("--since", help="pull what changed after this instant (overrides the cursor)")
    parser.add_argument("--mode", choices=("search", "bulk"), help="search (default) or bulk $export")
    parser.add_argument("--types", help="comma-separated resource types (default: the EHR's list)")
    quick = parser.add_argument_group("quick try without a config file")
    quick.add_argument("--base-url", help="FHIR R4 base URL")
    quick.add_argument("--vendor", choices=("generic", "epic", "oracle", "hapi"), default="generic")
    quick.add_argument("--bearer", help="static bearer token")
    quick.add_argument("--client-id", help="SMART Backend Services client id")
    quick.add_argument("--private-key", help="SMART private key: PEM file path")
    quick.add_argument(
        "--token-url", help="OAuth token endpoint (default: from .well-known/smart-configuration)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    ehr = _ehr_from_flags(args) if args.base_url else _ehr_from_config(settings, args.ehr)
    types = tuple(t.strip() for t in args.types.split(",") if t.strip()) if args.types else None
    with _ProgressBar() as advance, open_store(settings.store.url) as store:
        summary = pull(
            ehr, store, args.out, since=args.since, mode=args.mode, resource_types=types, progress=advance
        )
    print(format_summary(summary))
    return 0


def _ehr_from_config(settings: Settings, name: str | None) -> EhrConfig:
    if name is not None:
        return settings.ehr_named(name)
    if len(settings.ehr) == 1:
        return settings.ehr[0]
    configured = ", ".join(e.name for e in settings.ehr) or "none"
    raise ConfigError(f"say which EHR to pull with --ehr (configured: {configured}), or give --base-url")


def _ehr_from_flags(args: argparse.Namespace) -> EhrConfig:
    auth: dict[str, Any] = {"kind": "none"}
    if args.client_id or args.private_key:
        auth = {"kind": "smart", "client_id": args.client_id, "private_key": args.private_key}
        if args.token_url:
            auth["token_url"] = args.token_url
    elif args.bearer:
        auth = {"kind": "bearer", "token": args.bearer}
    values: dict[str, Any] = {
        "name": args.ehr or "cli",
        "base_url": args.base_url,
        "vendor": args.vendor,
        "auth": auth,
    }
    try:
        return EhrConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise ConfigError(f"invalid command line: {problems}") from exc


class _ProgressBar:
    """A tqdm bar on stderr counting resources as they arrive; silent when stderr is not a terminal."""

    def __enter__(self) -> Callable[[str, int], None]:
        self.bar = tqdm(total=None, unit=" resources", file=sys.stderr, disable=not sys.stderr.isatty())

        def advance(resource_type: str, count: int) -> None:
            self.bar.set_description(resource_type, refresh=False)
            self.bar.update(count)

        return advance

    def __exit__(self, *exc_info: object) -> None:
        self.bar.close()


def format_summary(summary: PullSummary) -> str:
    """The summary printed on stdout: counts per type, then the run's totals."""
    lines = [f"pulled {summary.ehr} ({summary.mode}) into {len(summary.files)} files"]
    width = max((len(t) for t in summary.counts), default=0)
    lines.extend(f"  {kind:<{width}}  {count}" for kind, count in summary.counts.items())
    deviations = ", ".join(f"{k} {v}" for k, v in sorted(summary.deviations.items()))
    lines.append(
        f"resources {sum(summary.counts.values())} · rejected {summary.rejected} · "
        f"kept with warnings {summary.warnings}" + (f" ({deviations})" if deviations else "")
    )
    lines.append(
        f"already seen {summary.duplicates} · pages {summary.pages} · requests {summary.requests} · "
        f"retries {summary.retries} · {summary.duration_seconds:.1f}s"
    )
    if summary.patients:
        refused = (
            f" ({summary.patients_failed} refused, fetched whole next time)"
            if summary.patients_failed
            else ""
        )
        lines.append(f"panel patients {summary.patients}{refused}")
    if summary.bulk_error_lines:
        lines.append(f"server error lines (bulk) {summary.bulk_error_lines}")
    return "\n".join(lines)

"""``iop-bridge demo``: the whole loop on this machine, in one command.

    iop-bridge demo [--report PATH] [--anchor DATE] [--state-dir DIR] [--kafka HOST:PORT]
                    [--fhir-url URL] [--part2] [--stop-services] [--verbose]

1. starts (or reuses) the local Kafka broker and the HAPI FHIR sandbox with their launchers
   (``deploy/kafka/run start``, ``deploy/fhir-sandbox/run start``; the address is their last line), unless
   ``--kafka`` / ``--fhir-url`` name running ones;
2. writes a config under the state directory (SQLite store, the broker, one ``[[ehr]]`` "harbor-general"
   at the sandbox whose panel is the demo's patients) and creates the topics;
3. seeds the sandbox with the journeys of ``examples/journeys.yaml`` (day 0 = ``--anchor``, default a week
   ago, so the simulated program has a week of sessions the EHR has not seen);
4. runs one pull-map-publish cycle, lets the program simulator (``sync.simulator``) answer with
   attendance and discharge events, and drains the write-back consumers;
5. prints a short report and writes the HTML report (42 CFR Part 2 records only with ``--part2``).

Running it again re-sends the same events (their ids are derived from the episodes): write-back's ledger
reports them as duplicates and nothing new is written. The services are left running for the next run
(``--stop-services`` stops those this run started); the command says how to stop them.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import orjson
import structlog
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import select

from connectors.private import make_private_dir, open_private
from schemas.topics import Topics
from sync.commands.seed import load_book, load_into_server
from sync.config import KafkaConfig, Settings, load_settings
from sync.errors import ConfigError
from sync.journeys import build_resources
from sync.kafka import client_kwargs, ensure_topics
from sync.logs import configure_logging
from sync.report import DeadLetterRow, WriteBackRow, render_report, render_text
from sync.service import Service
from sync.simulator import ProgramEvent, event_topic, publish_events, simulate
from sync.state import ledger, published

log = structlog.get_logger()

REPO: Final = Path(__file__).resolve().parents[2]
DEPLOY: Final = REPO / "deploy"
DEFAULT_REPORT: Final = Path("iop-bridge-report.html")
DEFAULT_STATE_DIR: Final = Path(".run/demo")
EHR_NAME: Final = "harbor-general"
#: A cold first start resolves jars from Maven Central and builds the sandbox: minutes, not seconds.
LAUNCHER_TIMEOUT_S: Final = 1800
#: Days between the journeys' day 0 and today: the program's sessions the EHR has not seen yet.
DEFAULT_ANCHOR_DAYS_AGO: Final = 7
WRITEBACK_MAX_SECONDS: Final = 120.0


@dataclass(frozen=True)
class ServiceAddress:
    name: str
    address: str
    started: bool  # this run started it (it was not running before)
    launcher: Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the whole loop locally (Kafka, HAPI sandbox, seed, cycle, simulated program, report)",
        description="Start or reuse the local Kafka broker and HAPI FHIR sandbox, seed synthetic patients, "
        "run one cycle, simulate the IOP program's events, write them back, and report.",
    )
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="HTML report path")
    parser.add_argument(
        "--anchor",
        help=f"day 0 of the journeys, YYYY-MM-DD (default: {DEFAULT_ANCHOR_DAYS_AGO} days ago, UTC)",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="config, SQLite store (default .run/demo)"
    )
    parser.add_argument("--kafka", help="use this running broker (host:port) instead of the launcher's")
    parser.add_argument("--fhir-url", help="use this running FHIR server instead of the sandbox launcher's")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the service's log lines at --log-level (default: warnings only, so the report stands out)",
    )
    parser.add_argument(
        "--part2",
        action="store_true",
        help="include 42 CFR Part 2 records in the report (default: left out, with a count)",
    )
    parser.add_argument(
        "--stop-services",
        action="store_true",
        help="stop the broker and sandbox at the end if this run started them (default: leave them running)",
    )
    parser.set_defaults(handler=run)


# -- services ---------------------------------------------------------------------------------------


def _launch(name: str, launcher: Path) -> ServiceAddress:
    if not launcher.is_file():
        raise ConfigError(f"{name}: launcher {launcher} not found (run the demo from a clone of iop-bridge)")
    was_running = (
        subprocess.run(
            [str(launcher), "status"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
        ).returncode
        == 0
    )
    print(
        f"{name}: {'reusing' if was_running else 'starting'} ({launcher.relative_to(REPO)} start)", flush=True
    )
    done = subprocess.run(
        [str(launcher), "start"], stdout=subprocess.PIPE, text=True, check=False, timeout=LAUNCHER_TIMEOUT_S
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise ConfigError(f"{name}: {launcher.relative_to(REPO)} start failed (exit {done.returncode})")
    return ServiceAddress(name, lines[-1].strip(), started=not was_running, launcher=launcher)


def _services(args: argparse.Namespace) -> tuple[str, str, list[ServiceAddress]]:
    launched: list[ServiceAddress] = []
    kafka = args.kafka
    if not kafka:
        launched.append(_launch("kafka", DEPLOY / "kafka" / "run"))
        kafka = launched[-1].address
    fhir = args.fhir_url
    if not fhir:
        launched.append(_launch("fhir-sandbox", DEPLOY / "fhir-sandbox" / "run"))
        fhir = launched[-1].address
    return kafka, fhir.rstrip("/"), launched


# -- configuration ----------------------------------------------------------------------------------


def _toml_string(value: str) -> str:
    return orjson.dumps(value).decode()  # a JSON string is a valid TOML basic string


def write_config(state_dir: Path, *, kafka: str, fhir_url: str, patient_ids: Iterable[str]) -> Path:
    """The demo's config file (and its panel file) under ``state_dir``; returns the config's path."""
    state_dir = state_dir.resolve()
    make_private_dir(state_dir)
    panel = state_dir / "patients.txt"
    panel.write_text("".join(f"{pid}\n" for pid in sorted(patient_ids)), encoding="utf-8")
    config = state_dir / "iop-bridge.toml"
    config.write_text(
        "# Written by `iop-bridge demo`: the local broker, the HAPI sandbox, a SQLite store.\n"
        "[store]\n"
        f"url = {_toml_string('sqlite:///' + str(state_dir / 'iop-bridge.db'))}\n\n"
        "[kafka]\n"
        f"bootstrap_servers = {_toml_string(kafka)}\n\n"
        "[service]\n"
        f"out_dir = {_toml_string(str(state_dir / 'out'))}\n\n"
        "[[ehr]]\n"
        f"name = {_toml_string(EHR_NAME)}\n"
        'vendor = "hapi"\n'
        f"base_url = {_toml_string(fhir_url)}\n"
        "bulk_poll_max_seconds = 1\n"
        + (
            "allow_insecure_http = true  # the sandbox speaks plain http\n"
            if fhir_url.startswith("http:")
            else ""
        )
        + "\n[ehr.panel]\n"
        f"patients_file = {_toml_string(str(panel))}\n",
        encoding="utf-8",
    )
    return config


# -- reading what the cycle published -------------------------------------------------------------------


def published_records(service: Service, kind: str, patient_ids: set[str]) -> list[dict[str, Any]]:
    """The last published version of every record of a kind for the demo's patients."""
    query = select(published.c.patient_id, published.c.record).where(
        published.c.ehr == EHR_NAME, published.c.kind == kind
    )
    with service.state.engine.connect() as conn:
        rows = conn.execute(query).all()
    records = [dict(orjson.loads(row.record)) for row in rows if str(row.patient_id) in patient_ids]
    key = "episode_id" if kind == "episode" else "referral_id"
    return sorted(records, key=lambda r: str(r.get(key)))


def ledger_entries(service: Service, event_ids: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """``event_id -> (outcome, references)`` of the events the ledger holds."""
    found: dict[str, tuple[str, list[str]]] = {}
    with service.state.engine.connect() as conn:
        for start in range(0, len(event_ids), 500):
            chunk = list(event_ids[start : start + 500])
            rows = conn.execute(
                select(ledger.c.event_id, ledger.c.outcome, ledger.c.detail).where(
                    ledger.c.event_id.in_(chunk)
                )
            ).all()
            for row in rows:
                detail = orjson.loads(row.detail) if row.detail else {}
                refs = [str(r) for r in detail.get("references") or []] if isinstance(detail, dict) else []
                found[str(row.event_id)] = (str(row.outcome), refs)
    return found


def dead_letter_reasons(
    config: KafkaConfig, event_ids: Iterable[str], *, max_seconds: float = 15.0
) -> dict[str, tuple[str, str]]:
    """``event_id -> (original topic, reason)`` of those events found on the dead-letter topic.

    Reads the topic from its beginning to its end as it is now (no consumer group, nothing committed).
    Only called when some events were not written, so a long dead-letter topic costs nothing otherwise.
    """
    wanted = set(event_ids)
    names = Topics(config.topic_prefix)
    consumer = KafkaConsumer(**client_kwargs(config), group_id=None, enable_auto_commit=False)
    found: dict[str, tuple[str, str]] = {}
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in (names.deadletter, names.deadletter_part2)
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            return found
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline and any(consumer.position(tp) < ends[tp] for tp in partitions):
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    try:
                        value = orjson.loads(record.value)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(value, dict) and value.get("event_id") in wanted:
                        found[str(value["event_id"])] = (str(value.get("topic")), str(value.get("reason")))
    finally:
        consumer.close()
    return found


def _detail(event: ProgramEvent) -> str:
    if event.kind == "attendance":
        session = event.value["session"]
        return f"{session['start'][:10]} {session['status']}, {session.get('modality', 'in-person')}"
    discharge = event.value["discharge"]
    to_level = f" to {discharge['to_level']}" if discharge.get("to_level") else ""
    return f"{discharge['date']} {discharge['reason']}{to_level}"


def writeback_rows(
    events: Sequence[ProgramEvent],
    before: Mapping[str, tuple[str, list[str]]],
    after: Mapping[str, tuple[str, list[str]]],
    dead_letters: Mapping[str, tuple[str, str]],
    topics: Topics,
) -> tuple[list[WriteBackRow], list[DeadLetterRow]]:
    """What write-back did with each event in this run: written, a duplicate, or dead-lettered (with the
    reason from the dead-letter topic, when it is there)."""
    rows: list[WriteBackRow] = []
    dead: list[DeadLetterRow] = []
    for event in events:
        if event.event_id in before:
            outcome, refs = "duplicate", before[event.event_id][1]
        elif event.event_id in after:
            outcome, refs = after[event.event_id]
        else:
            topic = event_topic(event, topics)
            where = topics.deadletter_part2 if event.part2 else topics.deadletter
            topic, reason = dead_letters.get(event.event_id, (topic, f"not written (nothing on {where} yet)"))
            part2 = event.part2 or topics.is_part2(topic)
            dead.append(DeadLetterRow(event.event_id, topic, reason, part2=part2))
            continue
        rows.append(
            WriteBackRow(event.event_id, event.kind, event.episode_id, _detail(event), outcome, tuple(refs))
        )
    return rows, dead


# -- the command ----------------------------------------------------------------------------------------


def journeys_anchor(text: str | None, today: date) -> date:
    if not text:
        return today - timedelta(days=DEFAULT_ANCHOR_DAYS_AGO)
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"--anchor must be a date (YYYY-MM-DD), got {text!r}") from exc


def _quiet_logs() -> None:
    """Warnings only: the demo's own output is the report. kafka-python's routine warnings (slow event
    loop tasks, metadata not yet there while the group forms) are not the user's concern here."""
    configure_logging("WARNING")
    logging.getLogger("kafka").setLevel(logging.ERROR)


def run(args: argparse.Namespace) -> int:
    if not args.verbose:
        _quiet_logs()
    began = time.monotonic()
    now = datetime.now(UTC)
    anchor = journeys_anchor(args.anchor, now.date())
    book = load_book(REPO / "examples" / "journeys.yaml")
    resources = list(build_resources(book, anchor=anchor, timezone="UTC", seed=7))
    patient_ids = {str(r["id"]) for r in resources if r["resourceType"] == "Patient"}

    kafka, fhir_url, launched = _services(args)
    try:
        config, report_path = _loop(args, kafka, fhir_url, anchor, patient_ids, resources, now)
    finally:
        _finish(launched, stop=args.stop_services)
    print(f"done in {time.monotonic() - began:.1f} s; config {config}")
    print(f"HTML report: {report_path.resolve()}")
    return 0


def _loop(
    args: argparse.Namespace,
    kafka: str,
    fhir_url: str,
    anchor: date,
    patient_ids: set[str],
    resources: list[dict[str, Any]],
    now: datetime,
) -> tuple[Path, Path]:
    """Config, topics, seed, one cycle, the simulated program, write-back, the reports."""
    # The program has recorded every session that ended before today (UTC): the same events all day long.
    program_as_of = datetime.combine(now.date(), datetime.min.time(), tzinfo=UTC)
    config = write_config(args.state_dir, kafka=kafka, fhir_url=fhir_url, patient_ids=patient_ids)
    settings: Settings = load_settings(config)
    created = ensure_topics(settings.kafka)
    print(f"kafka: {kafka} ({len(created)} topics created)")

    counts: Counter[str] = Counter()
    load_into_server(resources, fhir_url, None, counts)
    print(
        f"seeded {sum(counts.values())} resources for {len(patient_ids)} patients into {fhir_url} "
        f"(day 0 = {anchor.isoformat()})"
    )

    with Service(settings) as service:
        for report in service.cycle():
            print(
                f"cycle {report.ehr}: pulled {sum(report.pulled.values())} resources, "
                f"{report.patients_mapped} patients mapped, {report.episodes} episodes, "
                f"{report.referrals} referrals, {report.published} published, "
                f"{report.episode_of_care_written} EpisodeOfCare written"
            )
        episodes = published_records(service, "episode", patient_ids)
        referrals = published_records(service, "referral", patient_ids)
        events = simulate(episodes, since=anchor, as_of=program_as_of)
        event_ids = [e.event_id for e in events]
        before = ledger_entries(service, event_ids)
        sent = publish_events(service.producer, events, service.topics)
        print(
            f"program simulator: {sent} events sent ({sum(1 for e in events if e.kind == 'attendance')} "
            f"attendance, {sum(1 for e in events if e.kind == 'discharge')} discharge)"
        )
        stats = service.drain_writebacks(max_seconds=WRITEBACK_MAX_SECONDS)
        after = ledger_entries(service, event_ids)
        missing = [i for i in event_ids if i not in before and i not in after]
        reasons = dead_letter_reasons(settings.kafka, missing) if missing else {}
        topics = service.topics
    writebacks, dead_letters = writeback_rows(events, before, after, reasons, topics)
    log.info(
        "demo_writeback_done",
        processed=stats.processed,
        dead_lettered=stats.dead_lettered,
        failed=stats.failed,
        duplicates=sum(1 for r in writebacks if r.outcome == "duplicate"),
    )

    print()
    include_part2 = bool(getattr(args, "part2", False))
    print(
        render_text(episodes, referrals, writebacks, dead_letters, as_of=now, include_part2=include_part2),
        end="",
    )
    report_path: Path = args.report
    make_private_dir(report_path.parent)  # the report holds (synthetic) patient data: 0700 / 0600
    with open_private(report_path) as page:
        document = render_report(
            episodes, referrals, writebacks, dead_letters, as_of=now, include_part2=include_part2
        )
        page.write(document.encode())
    return config, report_path


def _finish(launched: Sequence[ServiceAddress], *, stop: bool) -> None:
    if not launched:
        return
    if stop:
        for service in launched:
            if service.started:
                subprocess.run([str(service.launcher), "stop"], check=False, timeout=LAUNCHER_TIMEOUT_S)
                print(f"{service.name}: stopped")
        return
    names = ", ".join(f"{s.name} at {s.address}" for s in launched)
    stops = " && ".join(f"{s.launcher.relative_to(REPO)} stop" for s in launched)
    print(f"left running for the next run: {names}; stop them with: {stops}", file=sys.stdout)

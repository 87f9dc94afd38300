"""``iop-bridge run``: the service — pull, map, publish on a schedule, and write back, in one process.

``--once`` does one pull-map-publish cycle per EHR, drains the write-back topics until they are idle,
and exits 0 (for cron and tests). Without it the process runs until SIGTERM or SIGINT, which finish the
record in hand, commit it and exit cleanly.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from datetime import datetime
from types import FrameType

import structlog

from sync.config import load_settings
from sync.errors import ConfigError
from sync.kafka import ensure_topics
from sync.metrics import HealthServer
from sync.service import Service

log = structlog.get_logger()

#: /healthz turns unhealthy when the consumer loop has not come round for this long (outside pulls).
STUCK_AFTER_SECONDS = 300


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("run", help="run the service (pull, map, publish, write back)")
    parser.add_argument("--config", required=True, help="configuration file (TOML)")
    parser.add_argument("--once", action="store_true", help="one cycle, drain the write-back topics, exit")
    parser.add_argument(
        "--as-of", help="judge episodes at this instant (default: now); for replays and tests"
    )
    parser.add_argument(
        "--create-topics", action="store_true", help="create our topics when the cluster lacks them"
    )
    parser.set_defaults(handler=run)


def _as_of(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"--as-of must be an ISO 8601 instant, got {text!r}") from exc
    if value.tzinfo is None:
        raise ConfigError(f"--as-of needs a time zone offset, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if args.create_topics:
        ensure_topics(settings.kafka)

    with Service(settings, as_of=_as_of(args.as_of)) as service:
        if args.once:
            for report in service.cycle():
                print(
                    f"{report.ehr}: pulled {sum(report.pulled.values())} (rejected {report.rejected}), "
                    f"mapped {report.patients_mapped} patients, {report.episodes} episodes, "
                    f"{report.referrals} referrals, published {report.published}, "
                    f"EpisodeOfCare written {report.episode_of_care_written}"
                )
            stats = service.drain_writebacks()
            print(
                f"write-back: {stats.processed} events processed, {stats.dead_lettered} dead-lettered, "
                f"{stats.failed} to retry"
            )
            return 0

        interval = settings.service.pull_interval_seconds
        # Liveness: the consumer loop must come round. A poll stuck in the Kafka client turns /healthz 503
        # so the orchestrator restarts the process; at-least-once processing makes a restart safe. A
        # pull in progress counts as alive: it is bounded by its own timeouts and retry budget, and a
        # first backfill may take hours.
        progress = [time.monotonic()]
        pulling = threading.Event()

        def healthy() -> bool:
            return pulling.is_set() or time.monotonic() - progress[0] < STUCK_AFTER_SECONDS

        health = None
        if settings.service.metrics_port:
            health = HealthServer(
                service.metrics,
                port=settings.service.metrics_port,
                host=settings.service.metrics_host,
                healthy=healthy,
            )
            health.start()
        next_cycle = 0.0
        try:
            with service.consumer() as consumer:
                while not stop.is_set():
                    if time.monotonic() >= next_cycle:
                        pulling.set()
                        for ehr in settings.ehr:
                            try:
                                service.cycle_ehr(ehr)
                            except Exception as exc:  # one EHR's failure must not stop the others
                                log.error("cycle_failed", ehr=ehr.name, error_type=type(exc).__name__)
                        next_cycle = time.monotonic() + interval
                        progress[0] = time.monotonic()
                        pulling.clear()
                    consumer.poll_once(service.handle_event, timeout_ms=1000)
                    progress[0] = time.monotonic()
        finally:
            if health is not None:
                health.stop()
        log.info("service_stopped")
    return 0

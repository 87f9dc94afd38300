"""write-back: attendance events written to the FHIR sandbox, against a bare httpx loop.

Ours (``WriteBack.attendance``, no broker): each ``attendance.v1`` event (status attended) goes through
``sync.writeback.WriteBack`` on an ``EhrClient``: the ledger and session-table look-ups in a fresh SQLite
state store, the Encounter built by ``sync.fhir_writes``, a conditional create (``If-None-Exist`` on the
session identifier, ``Prefer: return=representation``), then a ``Provenance``, then the ledger entry.
Floor: a bare ``httpx.Client`` sending the same two requests per event (the Encounter and Provenance
built beforehand, outside the timed loop). Both write ``events`` new sessions (ids unique per run) for
patients the sandbox was seeded with; one event at a time, as fast as the server answers; best of two
alternated rounds each. The note gives the per-event latency (p50 / p99) of both.

Through the broker (when a Kafka broker is given): ``BROKER_EVENTS`` events produced at a fixed 100/s
to the attendance topic (unique topic prefix and group per run) and consumed by ``sync.service.Service``'s
write-back consumer against the same sandbox; the rate is events from the first produce to the last
write, the latency from just before an event is produced to just after its write finished (p50 / p99).
Its floor is the same bare httpx loop.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from statistics import quantiles
from typing import Any

import httpx
import orjson

from bench.generate import dataset, size_label
from bench.harness import Measurement, Row, Runner, timed, unavailable

BENCH = "writeback"
DEFAULT_EVENTS = 200
BROKER_EVENTS = 300
RATE = 100.0  # events/s produced in the broker run (the fixed rate)
ROUNDS = 2
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
_NAMESPACE = uuid.UUID("6f1c3a52-0b7e-4d55-9a8e-5b0b3c1d2e4f")  # bench-only episode ids
_FHIR_JSON = "application/fhir+json"


def rows(
    runner: Runner,
    sizes: list[int],
    *,
    fhir_url: str | None,
    kafka: str | None = None,
    events: int = DEFAULT_EVENTS,
) -> list[Row]:
    broker_metric = "events/s through the broker (consumer, produced at 100/s)"
    no_broker = "no broker: set IOP_BRIDGE_TEST_KAFKA, --kafka or --start-broker"
    broker = unavailable(BENCH, "-", broker_metric, no_broker)
    label = size_label(min(sizes))
    metric = "attendance events/s (WriteBack, no broker)"
    if not fhir_url:
        return [
            unavailable(BENCH, label, metric, "no FHIR sandbox: set IOP_BRIDGE_TEST_FHIR or --fhir URL"),
            broker,
        ]
    from bench.pull import seed_sandbox

    base = fhir_url.rstrip("/")
    try:
        seed_sandbox(base, min(sizes))
    except Exception as exc:  # a sandbox that is not there or not working: say so in the table
        return [
            unavailable(BENCH, label, metric, f"sandbox at {base} not usable: {type(exc).__name__}"),
            broker,
        ]
    folder = str(dataset(min(sizes)))
    floors, ourses = [], []
    for _ in range(ROUNDS):  # alternated, best of each: the server and the machine are shared
        floors.append(runner.run("writeback", "floor", base=base, folder=folder, events=events))
        ourses.append(runner.run("writeback", "ours", base=base, folder=folder, events=events))
    floor = max(floors, key=lambda m: m.per_second)
    ours = max(ourses, key=lambda m: m.per_second)
    if kafka:
        try:
            through = runner.run(
                "writeback",
                "broker",
                base=base,
                bootstrap=kafka,
                folder=folder,
                events=BROKER_EVENTS,
                rate=RATE,
            )
        except RuntimeError as exc:
            broker = unavailable(BENCH, label, broker_metric, f"broker run failed: {exc}"[:200])
        else:
            broker = Row(
                bench=BENCH,
                size=label,
                metric=broker_metric,
                ours=through.extra["per_second"],
                floor=floor.per_second,
                rss_ours_mb=through.peak_rss_mb,
                rss_floor_mb=floor.peak_rss_mb,
                note=(
                    f"{BROKER_EVENTS} events at {RATE:.0f}/s; event-to-write latency p50/p99 "
                    f"{through.extra['p50_ms']:,.0f}/{through.extra['p99_ms']:,.0f} ms"
                ),
                load=os.getloadavg()[0],
                extra={"ours": through.extra, "ours_cpu_s": through.cpu},
            )
    note = (
        f"{events} events; latency p50/p99 ours {ours.extra['p50_ms']:.0f}/{ours.extra['p99_ms']:.0f} ms, "
        f"floor {floor.extra['p50_ms']:.0f}/{floor.extra['p99_ms']:.0f} ms; outcomes {ours.extra['outcomes']}"
    )
    row = Row(
        bench=BENCH,
        size=label,
        metric=metric,
        ours=ours.per_second,
        floor=floor.per_second,
        rss_ours_mb=ours.peak_rss_mb,
        rss_floor_mb=floor.peak_rss_mb,
        note=note,
        load=os.getloadavg()[0],
        extra={"ours": ours.extra, "floor": floor.extra, "ours_cpu_s": ours.cpu},
    )
    return [row, broker]


def _patients(folder: str, count: int) -> list[str]:
    with (Path(folder) / "Patient.ndjson").open("rb") as handle:
        return [str(orjson.loads(line)["id"]) for _, line in zip(range(count), handle, strict=False)]


def _events(folder: str, events: int) -> list[dict[str, Any]]:
    """``events`` attendance.v1 events (attended), spread over the first patients, ids unique per run."""
    run = uuid.uuid4().hex[:12]
    patients = _patients(folder, 20)
    out = []
    for number in range(events):
        patient = patients[number % len(patients)]
        day = 1 + number // len(patients)
        out.append(
            {
                "event_id": f"bench-{run}-{number}",
                "occurred_at": f"2026-06-{1 + day % 28:02d}T13:00:00Z",
                "ehr": "bench",
                "episode_id": str(uuid.uuid5(_NAMESPACE, patient)),
                "patient": {"reference": f"Patient/{patient}"},
                "session": {
                    "id": f"bench-{run}-s{number}",
                    "status": "attended",
                    "start": f"2026-06-{1 + day % 28:02d}T09:00:00Z",
                    "end": f"2026-06-{1 + day % 28:02d}T12:00:00Z",
                    "services": [{"system": HCPCS, "code": "S9480"}],
                },
            }
        )
    return out


def _latencies(measurement: Measurement, seconds: list[float]) -> Measurement:
    cuts = quantiles(seconds, n=100, method="inclusive") if len(seconds) > 1 else seconds * 99
    measurement.extra.update(p50_ms=1000 * cuts[49], p99_ms=1000 * cuts[98])
    return measurement


def ours(base: str, folder: str, events: int) -> Measurement:
    from connectors.config import EhrConfig
    from connectors.http import EhrClient
    from connectors.store import StateStore
    from schemas.topics import ATTENDANCE
    from sync.capabilities import discover_targets
    from sync.state import SyncState
    from sync.writeback import WriteBack

    batch = _events(folder, events)
    seconds: list[float] = []
    outcomes: dict[str, int] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-writeback-") as tmp,
        StateStore(f"sqlite:///{tmp}/state.db") as store,
    ):
        state = SyncState(store.engine)  # the service's own engine set-up (WAL, synchronous=NORMAL)
        _stage_episodes(state, batch)
        with EhrClient(EhrConfig(name="bench", base_url=base, timeout_seconds=120)) as client:
            writer = WriteBack(client, state, ehr="bench", targets=discover_targets(client))

            def work() -> int:
                for event in batch:
                    start = time.perf_counter()
                    result = writer.attendance(event, topic=ATTENDANCE)
                    seconds.append(time.perf_counter() - start)
                    outcomes[str(result.outcome)] = outcomes.get(str(result.outcome), 0) + 1
                return len(batch)

            measurement = timed(work)
    measurement.extra["outcomes"] = outcomes
    return _latencies(measurement, seconds)


def floor(base: str, folder: str, events: int) -> Measurement:
    from schemas.identifiers import SESSION_ID_SYSTEM
    from sync import fhir_writes

    writes = []
    for event in _events(folder, events):
        encounter = fhir_writes.attendance_encounter(
            event, patient_reference=event["patient"]["reference"], episode_id=event["episode_id"]
        )
        writes.append((encounter, f"identifier={SESSION_ID_SYSTEM}|{event['session']['id']}"))
    seconds: list[float] = []

    def work() -> int:
        with httpx.Client(timeout=120, headers={"Content-Type": _FHIR_JSON, "Accept": _FHIR_JSON}) as client:
            for encounter, condition in writes:
                start = time.perf_counter()
                created = client.post(
                    f"{base}/Encounter",
                    content=orjson.dumps(encounter),
                    headers={"If-None-Exist": condition, "Prefer": "return=representation"},
                ).raise_for_status()
                reference = f"Encounter/{orjson.loads(created.content)['id']}"
                recorded = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                provenance = fhir_writes.provenance(reference, recorded=recorded, created=True)
                client.post(f"{base}/Provenance", content=orjson.dumps(provenance)).raise_for_status()
                seconds.append(time.perf_counter() - start)
        return len(writes)

    return _latencies(timed(work), seconds)


def _stage_episodes(state: Any, batch: list[dict[str, Any]]) -> None:
    """Publish (in the state store) the episodes the events name, as the service would have."""
    from sync.state import Staged

    episodes = {e["episode_id"]: e["patient"]["reference"] for e in batch}
    state.stage_changes(
        "bench",
        [
            Staged(
                kind="episode",
                record_id=episode_id,
                patient_id=patient.split("/", 1)[1],
                record={"episode_id": episode_id, "patient": {"reference": patient}, "status": "active"},
                topic="bench",
                message_key=f"bench|{patient}",
                schema_name="episode",
                schema_version=1,
            )
            for episode_id, patient in episodes.items()
        ],
    )


def broker(base: str, bootstrap: str, folder: str, events: int, rate: float) -> Measurement:
    """Events produced at ``rate``/s to the attendance topic, consumed by the service's write-back consumer.

    Latency of an event: from just before it is produced to just after its write-back finished.
    Topics and group are unique per run, so nothing of an earlier run is consumed.
    """
    import threading

    from kafka.admin import KafkaAdminClient, NewTopic

    from connectors.config import EhrConfig
    from sync.config import KafkaConfig, Settings, StoreConfig
    from sync.service import Service

    batch = _events(folder, events)
    run = uuid.uuid4().hex[:8]
    produced: dict[str, float] = {}
    done: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        settings = Settings(
            store=StoreConfig(url=f"sqlite:///{tmp}/state.db"),
            kafka=KafkaConfig(
                bootstrap_servers=bootstrap, topic_prefix=f"bench{run}.", group_id=f"bench-{run}"
            ),
            ehr=(EhrConfig(name="bench", base_url=base, timeout_seconds=120),),
        )
        with Service(settings) as service:
            _stage_episodes(service.state, batch)
            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            topics = [
                service.topics.attendance,
                service.topics.discharges,
                service.topics.deadletter,
            ]
            admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1) for name in topics])
            admin.close()
            producer = service.producer

            def handler(event: Any) -> None:
                service.handle_event(event)
                done[str(event.value["event_id"])] = time.perf_counter()

            def produce() -> None:
                start = time.perf_counter()
                for number, event in enumerate(batch):
                    delay = start + number / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    produced[event["event_id"]] = time.perf_counter()
                    producer.publish(
                        service.topics.attendance,
                        f"bench|{event['patient']['reference']}",
                        event,
                        schema="attendance",
                        version=1,
                        event_id=event["event_id"],
                    )
                producer.flush()

            with service.consumer() as consumer:
                consumer.drain(handler, idle_polls=1, max_seconds=30)  # join the group before the clock runs
                sender = threading.Thread(target=produce, daemon=True)

                def work() -> int:
                    sender.start()
                    deadline = time.perf_counter() + 120 + events / rate
                    while len(done) < len(batch) and time.perf_counter() < deadline:
                        consumer.drain(handler, idle_polls=2, max_seconds=10)
                    sender.join()
                    return len(done)

                measurement = timed(work)
    latencies = [done[k] - produced[k] for k in done if k in produced]
    span = max(done.values(), default=0.0) - min(produced.values(), default=0.0)
    # Events/s from the first produce to the last write (the consumer's idle polls at the end excluded).
    measurement.extra.update(
        rate=rate, produced=len(produced), per_second=len(done) / span if span > 0 else 0.0
    )
    return _latencies(measurement, latencies or [0.0])

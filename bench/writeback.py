"""write-back: attendance events written to the FHIR sandbox, against a bare httpx loop.

Ours (``WriteBack.attendance``, no broker): each ``attendance.v1`` event (status attended) goes through
``sync.writeback.WriteBack`` on an ``EhrClient``: the ledger and session-table look-ups in a fresh SQLite
state store, the Encounter built by ``sync.fhir_writes``, a conditional create (``If-None-Exist`` on the
session identifier, ``Prefer: return=representation``), then a ``Provenance``, then the ledger entry
(with the session's row, one transaction). Floor: a bare ``httpx.Client`` sending the same two requests
per event (the Encounter and Provenance built beforehand, outside the timed loop). Both write ``events``
new sessions (ids unique per run) for ``PATIENTS`` patients the sandbox was seeded with, as fast as the
server answers; best of two alternated rounds each. Twice: one event at a time (the issue's floor), and
``CONCURRENCY`` at once (ours: the events of one patient in order through ``sync.keyed_batch``, as the
consumer runs them; the floor: the same loop on as many threads sharing one pooled client). The notes give
the per-event latency (p50 / p99).

Through the broker (when a Kafka broker is given), consumed by ``sync.service.Service``'s write-back
consumer (``service.writeback_concurrency`` = ``CONCURRENCY``) against the same sandbox, topics of
``PARTITIONS`` partitions (unique prefix and group per run), produced by a process of its own keyed by
patient: ``BROKER_EVENTS`` events at a fixed ``RATE``/s (the latency row; and half as many at half the
rate, which the sandbox on this machine can take, to show the latency when the server keeps up), and
``BURST_EVENTS`` produced as fast as the producer goes (the max-rate rows, against the sequential floor
and the concurrent one). The rate is events from the first produce to the last write; the latency from
just before an event is produced to just after its write finished (p50 / p99).
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
BROKER_EVENTS = 1000  # 10 s at the fixed rate: long enough for a queue to show if one builds
BURST_EVENTS = 1000
RATE = 100.0  # events/s produced in the broker run (the fixed rate)
ROUNDS = 2
CONCURRENCY = 8  # service.writeback_concurrency's default
PATIENTS = 40  # the events' patients: message keys, so chains of in-order events
PARTITIONS = 6  # as ensure_topics makes them
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
    concurrency: int = CONCURRENCY,
) -> list[Row]:
    broker_metric = f"events/s through the broker (consumer, produced at {RATE:.0f}/s)"
    no_broker = "no broker: set IOP_BRIDGE_TEST_KAFKA, --kafka or --start-broker"
    broker_rows = [unavailable(BENCH, "-", broker_metric, no_broker)]
    label = size_label(min(sizes))
    metric = "attendance events/s (WriteBack, no broker)"
    if not fhir_url:
        return [
            unavailable(BENCH, label, metric, "no FHIR sandbox: set IOP_BRIDGE_TEST_FHIR or --fhir URL"),
            *broker_rows,
        ]
    from bench.pull import seed_sandbox

    base = fhir_url.rstrip("/")
    try:
        seed_sandbox(base, min(sizes))
    except Exception as exc:  # a sandbox that is not there or not working: say so in the table
        return [
            unavailable(BENCH, label, metric, f"sandbox at {base} not usable: {type(exc).__name__}"),
            *broker_rows,
        ]
    folder = str(dataset(min(sizes)))
    common = {"base": base, "folder": folder, "events": events}
    floors, ourses, floors_n, ourses_n = [], [], [], []
    for _ in range(ROUNDS):  # alternated, best of each: the server and the machine are shared
        floors.append(runner.run("writeback", "floor", **common))
        ourses.append(runner.run("writeback", "ours", **common))
        floors_n.append(runner.run("writeback", "floor", **common, concurrency=concurrency))
        ourses_n.append(runner.run("writeback", "ours", **common, concurrency=concurrency))
    floor = max(floors, key=lambda m: m.per_second)
    ours = max(ourses, key=lambda m: m.per_second)
    floor_n = max(floors_n, key=lambda m: m.per_second)
    ours_n = max(ourses_n, key=lambda m: m.per_second)
    if kafka:
        broker_rows = _broker_rows(runner, label, base, kafka, folder, floor, floor_n, concurrency)
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
    row_n = Row(
        bench=BENCH,
        size=label,
        metric=f"attendance events/s, {concurrency} at once (no broker; floor on {concurrency} threads)",
        ours=ours_n.per_second,
        floor=floor_n.per_second,
        rss_ours_mb=ours_n.peak_rss_mb,
        rss_floor_mb=floor_n.peak_rss_mb,
        note=(
            f"{events} events, one patient's in order; latency p50/p99 ours "
            f"{ours_n.extra['p50_ms']:.0f}/{ours_n.extra['p99_ms']:.0f} ms, floor "
            f"{floor_n.extra['p50_ms']:.0f}/{floor_n.extra['p99_ms']:.0f} ms; "
            f"outcomes {ours_n.extra['outcomes']}"
        ),
        load=os.getloadavg()[0],
        extra={"ours": ours_n.extra, "floor": floor_n.extra, "ours_cpu_s": ours_n.cpu},
    )
    return [row, row_n, *broker_rows]


def _broker_rows(
    runner: Runner,
    label: str,
    base: str,
    kafka: str,
    folder: str,
    floor: Measurement,
    floor_n: Measurement,
    concurrency: int,
) -> list[Row]:
    """Through the broker: at the fixed rate (latency), and produced as fast as possible (max rate),
    the latter against the sequential floor (the issue's) and against the floor on as many threads."""
    metric = f"events/s through the broker (consumer, produced at {RATE:.0f}/s)"
    max_metric = "max events/s through the broker (produced at once)"
    params = {"base": base, "bootstrap": kafka, "folder": folder, "concurrency": concurrency}
    try:
        steady = runner.run("writeback", "broker", **params, events=BROKER_EVENTS, rate=RATE)
        half = runner.run("writeback", "broker", **params, events=BROKER_EVENTS // 2, rate=RATE / 2)
        burst = runner.run("writeback", "broker", **params, events=BURST_EVENTS, rate=0.0)
    except RuntimeError as exc:
        return [unavailable(BENCH, label, metric, f"broker run failed: {exc}"[:200])]

    def row(through: Measurement, name: str, against: Measurement, note: str) -> Row:
        return Row(
            bench=BENCH,
            size=label,
            metric=name,
            ours=through.extra["per_second"],
            floor=against.per_second,
            rss_ours_mb=through.peak_rss_mb,
            rss_floor_mb=against.peak_rss_mb,
            note=note,
            load=os.getloadavg()[0],
            extra={"ours": through.extra, "ours_cpu_s": through.cpu},
        )

    def latency(through: Measurement) -> str:
        return (
            f"event-to-write latency p50/p99 {through.extra['p50_ms']:,.0f}/{through.extra['p99_ms']:,.0f} ms"
        )

    setting = f"writeback_concurrency {concurrency}, {PARTITIONS} partitions"
    return [
        row(
            steady,
            metric,
            floor,
            f"{BROKER_EVENTS} events at {RATE:.0f}/s; {latency(steady)}; {setting}; floor: sequential",
        ),
        row(
            half,
            f"events/s through the broker (consumer, produced at {RATE / 2:.0f}/s)",
            floor,
            f"{BROKER_EVENTS // 2} events at {RATE / 2:.0f}/s, under the server's capacity here; "
            f"{latency(half)}; floor: sequential",
        ),
        row(
            burst,
            max_metric,
            floor,
            f"{BURST_EVENTS} events; {latency(burst)}; {setting}; floor: sequential (the issue's)",
        ),
        row(
            burst,
            f"{max_metric}, vs {concurrency} threads",
            floor_n,
            f"the same run; floor: the bare httpx loop on {concurrency} threads",
        ),
    ]


def _patients(folder: str, count: int) -> list[str]:
    with (Path(folder) / "Patient.ndjson").open("rb") as handle:
        return [str(orjson.loads(line)["id"]) for _, line in zip(range(count), handle, strict=False)]


def _events(folder: str, events: int) -> list[dict[str, Any]]:
    """``events`` attendance.v1 events (attended), spread over the first patients, ids unique per run."""
    run = uuid.uuid4().hex[:12]
    patients = _patients(folder, PATIENTS)
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


def ours(base: str, folder: str, events: int, concurrency: int = 1) -> Measurement:
    """``WriteBack.attendance`` per event; with ``concurrency`` > 1 on that many threads, the events of
    one patient in order (``sync.keyed_batch``, as the consumer runs a poll's records)."""
    from concurrent.futures import ThreadPoolExecutor

    from connectors.config import EhrConfig
    from connectors.http import EhrClient
    from connectors.store import StateStore
    from schemas.topics import ATTENDANCE
    from sync.capabilities import discover_targets
    from sync.keyed_batch import run_keyed
    from sync.state import SyncState
    from sync.writeback import WriteBack

    batch = _events(folder, events)
    seconds: list[float] = []
    outcomes: dict[str, int] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-writeback-") as tmp,
        StateStore(f"sqlite:///{tmp}/state.db") as store,
        ThreadPoolExecutor(max_workers=concurrency) as pool,
    ):
        state = SyncState(store.engine)  # the service's own engine set-up (WAL, synchronous=NORMAL)
        _stage_episodes(state, batch)
        ehr = EhrConfig(name="bench", base_url=base, timeout_seconds=120, concurrency=max(4, concurrency))
        with EhrClient(ehr) as client:
            writer = WriteBack(client, state, ehr="bench", targets=discover_targets(client))

            def one(event: dict[str, Any]) -> str:
                start = time.perf_counter()
                outcome = str(writer.attendance(event, topic=ATTENDANCE).outcome)
                seconds.append(time.perf_counter() - start)
                return outcome

            def work() -> int:
                if concurrency == 1:
                    results: list[str | None] = [one(event) for event in batch]
                else:
                    results = run_keyed(
                        pool,
                        batch,
                        key=lambda event: event["patient"]["reference"],
                        group=lambda _event: "all",
                        work=one,
                        stops=lambda _outcome: False,
                    )
                for outcome in results:
                    outcomes[str(outcome)] = outcomes.get(str(outcome), 0) + 1
                return len(batch)

            measurement = timed(work)
    measurement.extra.update(outcomes=outcomes, concurrency=concurrency)
    return _latencies(measurement, seconds)


def floor(base: str, folder: str, events: int, concurrency: int = 1) -> Measurement:
    """The same conditional create + Provenance per event with a bare ``httpx.Client`` (resources built
    beforehand); with ``concurrency`` > 1 on that many threads sharing one client (pool that large)."""
    from concurrent.futures import ThreadPoolExecutor

    from schemas.identifiers import SESSION_ID_SYSTEM
    from sync import fhir_writes

    writes = []
    for event in _events(folder, events):
        encounter = fhir_writes.attendance_encounter(
            event, patient_reference=event["patient"]["reference"], episode_id=event["episode_id"]
        )
        writes.append((encounter, f"identifier={SESSION_ID_SYSTEM}|{event['session']['id']}"))
    seconds: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Content-Type": _FHIR_JSON, "Accept": _FHIR_JSON}

    def work() -> int:
        with httpx.Client(timeout=120, headers=headers, limits=limits) as client:

            def send(write: tuple[dict[str, Any], str]) -> None:
                encounter, condition = write
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

            if concurrency == 1:
                for write in writes:
                    send(write)
            else:
                with ThreadPoolExecutor(max_workers=concurrency) as pool:
                    list(pool.map(send, writes))
        return len(writes)

    measurement = timed(work)
    measurement.extra["concurrency"] = concurrency
    return _latencies(measurement, seconds)


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


def broker(
    base: str, bootstrap: str, folder: str, events: int, rate: float, concurrency: int = CONCURRENCY
) -> Measurement:
    """Events produced at ``rate``/s (0: as fast as the producer goes) to the attendance topic, consumed
    by the service's write-back consumer (``service.writeback_concurrency`` = ``concurrency``).

    Latency of an event: from just before it is produced to just after its write-back finished.
    Topics and group are unique per run, so nothing of an earlier run is consumed.
    """
    import multiprocessing

    from kafka.admin import KafkaAdminClient, NewTopic

    from connectors.config import EhrConfig
    from sync.config import KafkaConfig, ServiceConfig, Settings, StoreConfig
    from sync.service import Service

    batch = _events(folder, events)
    run = uuid.uuid4().hex[:8]
    produced: dict[str, float] = {}
    done: dict[str, float] = {}
    producer_cpu: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        settings = Settings(
            store=StoreConfig(url=f"sqlite:///{tmp}/state.db"),
            kafka=KafkaConfig(
                bootstrap_servers=bootstrap, topic_prefix=f"bench{run}.", group_id=f"bench-{run}"
            ),
            service=ServiceConfig(writeback_concurrency=concurrency),
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
            admin.create_topics(
                [NewTopic(name, num_partitions=PARTITIONS, replication_factor=1) for name in topics]
            )
            admin.close()

            def handler(event: Any) -> None:
                service.handle_event(event)
                done[str(event.value["event_id"])] = time.perf_counter()

            # The producer is the program's side, not ours: a process of its own, so its CPU (contract
            # checks, serialising) does not compete with the consumer for this process's GIL.
            context = multiprocessing.get_context("spawn")
            results = context.Queue()
            sender = context.Process(
                target=produce_events,
                args=(bootstrap, settings.kafka.topic_prefix, batch, rate, results),
                daemon=True,
            )
            with service.consumer() as consumer:
                consumer.drain(handler, idle_polls=1, max_seconds=30)  # join the group before the clock runs

                def work() -> int:
                    sender.start()
                    deadline = time.perf_counter() + 120 + (events / rate if rate > 0 else events / 10)
                    while len(done) < len(batch) and time.perf_counter() < deadline:
                        consumer.drain(handler, idle_polls=2, max_seconds=10)
                    times, cpu = results.get(timeout=60)
                    produced.update(times)
                    producer_cpu.append(cpu)
                    sender.join(timeout=60)
                    return len(done)

                measurement = timed(work)
    measurement.cpu -= sum(producer_cpu)  # a child process's CPU is counted in the parent's once joined
    latencies = [done[k] - produced[k] for k in done if k in produced]
    span = max(done.values(), default=0.0) - min(produced.values(), default=0.0)
    # Events/s from the first produce to the last write (the consumer's idle polls at the end excluded).
    measurement.extra.update(
        rate=rate,
        produced=len(produced),
        concurrency=concurrency,
        per_second=len(done) / span if span > 0 else 0.0,
    )
    return _latencies(measurement, latencies or [0.0])


def produce_events(
    bootstrap: str, prefix: str, batch: list[dict[str, Any]], rate: float, results: Any
) -> None:
    """The broker run's producer (its own process): ``batch`` to the attendance topic at ``rate``/s (0: as
    fast as it goes), keyed by patient; puts ``({event_id: perf_counter just before producing}, CPU-s)``
    on ``results``. ``perf_counter`` is the system's monotonic clock: comparable across processes."""
    import resource

    from sync.config import KafkaConfig
    from sync.kafka import EventProducer

    produced: dict[str, float] = {}
    with EventProducer(KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=prefix)) as producer:
        start = time.perf_counter()
        for number, event in enumerate(batch):
            delay = start + number / rate - time.perf_counter() if rate > 0 else 0.0
            if delay > 0:
                time.sleep(delay)
            produced[event["event_id"]] = time.perf_counter()
            producer.publish(
                producer.topics.attendance,
                f"bench|{event['patient']['reference']}",
                event,
                schema="attendance",
                version=1,
                event_id=event["event_id"],
            )
        producer.flush()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results.put((produced, usage.ru_utime + usage.ru_stime))

"""The service end to end against the real Kafka broker and the real HAPI FHIR sandbox.

pull -> map -> publish (Part 2 apart), then attendance and discharge events -> write-back, read back
from HAPI with FHIR searches: each event id makes exactly one resource, even when produced twice or
when the consumer is SIGKILLed mid-batch; bad events go to the dead-letter topic with their reasons
while the events after them are written; a 503 storm delays writes but loses none.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from schemas.identifiers import EPISODE_ID_SYSTEM, EVENT_ID_SYSTEM, SESSION_ID_SYSTEM
from schemas.topics import Topics, message_key
from sync.cli import main
from sync.config import Settings, load_settings
from sync.kafka import EventProducer, ensure_topics
from sync.publisher import stage_records
from sync.service import Service
from tests.integration.fhir_fixtures import unique_id
from tests.integration.kafka_fixtures import consume_records, records_to_end
from tests.integration.smart_proxy import SmartProxy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
AS_OF = datetime(2026, 6, 1, 23, 59, tzinfo=UTC)
EHR = "harbor"
#: This module's own copy of the journeys: the sandbox is shared, other tests seed other days.
PREFIX = unique_id("svc") + "-"


@dataclass
class Stack:
    settings: Settings
    config: Path
    proxy: SmartProxy
    fhir: httpx.Client
    topics: Topics


@pytest.fixture(scope="module")
def stack(
    fhir_base_url: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    seed = ["--log-level", "WARNING", "seed", "--anchor", "2026-06-01", "--prefix", PREFIX]
    assert main([*seed, "--fhir-url", fhir_base_url]) == 0
    tmp = tmp_path_factory.mktemp("service")
    # A plain (no auth) proxy in front of HAPI, so a test can make the EHR answer 503 for a while.
    proxy = SmartProxy(upstream=fhir_base_url, client_id="-", public_key_pem=b"", require_auth=False).start()
    prefix = unique_id("svc") + "."
    config = tmp / "config.toml"
    config.write_text(
        f"""
[store]
url = "sqlite:///{tmp / "state.db"}"
[kafka]
bootstrap_servers = "{kafka_bootstrap}"
topic_prefix = "{prefix}"
group_id = "{prefix}writeback"
[service]
out_dir = "{tmp / "out"}"
metrics_port = 0
[[ehr]]
name = "{EHR}"
base_url = "{proxy.base_url}"
vendor = "hapi"
bulk_poll_max_seconds = 1
"""
    )
    settings = load_settings(config)
    ensure_topics(settings.kafka)
    with httpx.Client(
        base_url=fhir_base_url + "/", timeout=60, headers={"Accept": "application/fhir+json"}
    ) as fhir:
        yield Stack(settings, config, proxy, fhir, Topics(prefix))
    proxy.stop()


@pytest.fixture(scope="module")
def published(stack: Stack) -> dict[str, dict[str, Any]]:
    """Run the first cycle; the published episodes by patient id and level ("pt-x/iop/1")."""
    with Service(stack.settings, as_of=AS_OF) as service:
        (report,) = service.cycle()
        assert report.staged >= 20  # 16 episodes and 4 referrals of the example journeys
        assert report.published == report.staged
        episodes: dict[str, dict[str, Any]] = {}
        for patient in ("active-iop", "stepdown-inpatient", "sud-part2", "two-stints"):
            records = service.state.published_ids(EHR, "episode", f"pt-{PREFIX}{patient}").values()
            for n, record in enumerate(sorted(records, key=lambda r: r["start"]), start=1):
                episodes[f"pt-{patient}/{record['level']}/{n}"] = record
    return episodes


def _count(fhir: httpx.Client, resource_type: str, system: str, value: str) -> list[dict[str, Any]]:
    if system != SESSION_ID_SYSTEM:
        bundle = fhir.get(f"{resource_type}?identifier={quote(system + '|' + value, safe='')}").json()
        return [e["resource"] for e in bundle.get("entry", [])]
    # A session's identifier is scoped: "<episode_id>:<program or ->:<session id>" (schemas.identifiers).
    bundle = fhir.get(f"{resource_type}?identifier={quote(system + '|', safe='')}&_count=1000").json()
    return [
        e["resource"]
        for e in bundle.get("entry", [])
        if any(
            i.get("system") == system and str(i.get("value", "")).endswith(f":{value}")
            for i in e["resource"].get("identifier", [])
        )
    ]


def _attendance(
    episode: dict[str, Any],
    session: str,
    *,
    status: str = "attended",
    event: str | None = None,
    occurred: str = "2026-06-02T18:00:00+00:00",
    end: str = "2026-06-02T12:00:00+00:00",
) -> dict[str, Any]:
    return {
        "event_id": event or unique_id("evt"),
        "occurred_at": occurred,
        "ehr": EHR,
        "episode_id": episode["episode_id"],
        "patient": {"reference": episode["patient"]["reference"]},
        "session": {
            "id": session,
            "start": "2026-06-02T09:00:00+00:00",
            "end": end,
            "status": status,
            "modality": "in-person",
        },
    }


def _produce(stack: Stack, events: list[tuple[str, dict[str, Any]]]) -> None:
    with EventProducer(stack.settings.kafka) as producer:
        for topic, event in events:
            key = message_key(EHR, event["patient"]["reference"])
            schema = stack.topics.contract(topic)[0]
            producer.publish(topic, key, event, schema=schema, version=1, event_id=event["event_id"])
        producer.flush()


def _produce_raw(stack: Stack, topic: str, key: str, value: bytes) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=stack.settings.kafka.bootstrap_servers)
    producer.send(topic, key=key.encode(), value=value).get(timeout=30)
    producer.close()


def test_episodes_are_published_and_part2_kept_apart(
    stack: Stack, published: dict[str, dict[str, Any]]
) -> None:
    settings = stack.settings
    plain = records_to_end(settings.kafka.bootstrap_servers, stack.topics.episodes)
    part2 = records_to_end(settings.kafka.bootstrap_servers, stack.topics.episodes_part2)
    assert len([r for r in plain if PREFIX in r.key.decode()]) >= 15
    plain_ids = {json.loads(r.value)["episode_id"] for r in plain}
    (sud,) = [json.loads(r.value) for r in part2 if PREFIX in r.key.decode()]
    assert sud["patient"]["reference"] == f"Patient/pt-{PREFIX}sud-part2"
    assert {s["code"] for s in sud["security"]} == {"ETH", "R", "42CFRPart2"}
    assert sud["episode_id"] not in plain_ids
    assert all(not json.loads(r.value)["part2"] for r in plain)
    ours = {r.key.decode() for r in part2 if PREFIX in r.key.decode()}
    assert ours == {f"{EHR}|Patient/pt-{PREFIX}sud-part2"}


def test_a_cycle_with_nothing_new_publishes_nothing(
    stack: Stack, published: dict[str, dict[str, Any]]
) -> None:
    with Service(stack.settings, as_of=AS_OF) as service:
        service.cycle()  # pulls back the EpisodeOfCare resources the first cycle wrote
        (report,) = service.cycle()
    assert report.staged == 0


def test_attendance_and_discharge_are_written_once(
    stack: Stack, published: dict[str, dict[str, Any]]
) -> None:
    active = published["pt-active-iop/iop/1"]
    finished = published["pt-stepdown-inpatient/iop/1"]
    attended, absent = unique_id("S"), unique_id("S")
    first = _attendance(active, attended, event=unique_id("evt"))
    later = _attendance(
        active, attended, occurred="2026-06-02T19:00:00+00:00", end="2026-06-02T12:30:00+00:00"
    )
    discharge = {
        "event_id": unique_id("evt"),
        "occurred_at": "2026-06-01T17:00:00+00:00",
        "ehr": EHR,
        "episode_id": finished["episode_id"],
        "patient": {"reference": finished["patient"]["reference"]},
        "discharge": {
            "date": "2026-04-06",
            "reason": "stepped_down",
            "to_level": "outpatient",
            "summary": "Completed IOP; weekly therapy next.",
        },
    }
    unknown = _attendance(active, unique_id("S"))
    unknown["episode_id"] = "00000000-0000-5000-8000-000000000000"
    events = [
        (stack.topics.attendance, first),
        (stack.topics.attendance, first),  # produced twice
        (stack.topics.attendance, unknown),
        (stack.topics.attendance, later),
        (stack.topics.attendance, _attendance(active, absent, status="absent")),
        (stack.topics.discharges, discharge),
    ]
    key = message_key(EHR, active["patient"]["reference"])
    _produce_raw(stack, stack.topics.attendance, key, b'{"event_id": "broken", "session": {}}')
    _produce(stack, events)

    with Service(stack.settings, as_of=AS_OF, retry_pause_s=1) as service:
        stats = service.drain_writebacks(max_seconds=120)
    assert stats.dead_lettered == 2

    (encounter,) = _count(stack.fhir, "Encounter", SESSION_ID_SYSTEM, attended)
    assert encounter["status"] == "finished"
    assert encounter["period"]["end"] == "2026-06-02T12:30:00+00:00"  # the later event updated it
    assert encounter["subject"] == {"reference": f"Patient/pt-{PREFIX}active-iop"}
    (appointment,) = _count(stack.fhir, "Appointment", SESSION_ID_SYSTEM, absent)
    assert appointment["status"] == "noshow"
    (document,) = _count(stack.fhir, "DocumentReference", EVENT_ID_SYSTEM, discharge["event_id"])
    assert document["subject"] == {"reference": f"Patient/pt-{PREFIX}stepdown-inpatient"}
    (episode_of_care,) = _count(stack.fhir, "EpisodeOfCare", EPISODE_ID_SYSTEM, finished["episode_id"])
    assert episode_of_care["status"] == "finished"
    assert episode_of_care["period"]["end"] == "2026-04-06"

    letters = consume_records(stack.settings.kafka.bootstrap_servers, stack.topics.deadletter, 2)
    reasons = sorted(json.loads(r.value)["reason"] for r in letters)
    assert any("unknown episode" in r for r in reasons)
    assert any("session" in r for r in reasons)  # the malformed event: its contract problem is named

    # everything again (redelivery): nothing new is written
    _produce(stack, events)
    with Service(stack.settings, as_of=AS_OF, retry_pause_s=1) as service:
        service.drain_writebacks(max_seconds=120)
    assert len(_count(stack.fhir, "Encounter", SESSION_ID_SYSTEM, attended)) == 1
    assert len(_count(stack.fhir, "DocumentReference", EVENT_ID_SYSTEM, discharge["event_id"])) == 1


def test_a_503_storm_delays_writes_but_loses_none(stack: Stack, published: dict[str, dict[str, Any]]) -> None:
    active = published["pt-two-stints/iop/2"]
    sessions = [unique_id("S") for _ in range(4)]
    _produce(stack, [(stack.topics.attendance, _attendance(active, s)) for s in sessions])
    stack.proxy.fail_next = 12
    with Service(stack.settings, as_of=AS_OF, retry_pause_s=1) as service:
        service.drain_writebacks(max_seconds=240)
    assert stack.proxy.failed >= 12
    for session in sessions:
        assert len(_count(stack.fhir, "Encounter", SESSION_ID_SYSTEM, session)) == 1


def test_consumer_killed_mid_batch_writes_each_event_once(
    stack: Stack, published: dict[str, dict[str, Any]]
) -> None:
    active = published["pt-active-iop/iop/1"]
    sessions = [unique_id("K") for _ in range(40)]
    _produce(stack, [(stack.topics.attendance, _attendance(active, s)) for s in sessions])

    def written() -> int:
        return sum(len(_count(stack.fhir, "Encounter", SESSION_ID_SYSTEM, s)) for s in sessions[:8])

    command = [
        sys.executable,
        "-m",
        "sync.cli",
        "--log-level",
        "WARNING",
        "run",
        "--once",
        "--config",
        str(stack.config),
        "--as-of",
        AS_OF.isoformat(),
    ]
    worker = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while written() < 3 and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.2)
    os.kill(worker.pid, signal.SIGKILL)  # mid-batch: some written, their offsets maybe not committed
    worker.wait()

    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    counts = [len(_count(stack.fhir, "Encounter", SESSION_ID_SYSTEM, s)) for s in sessions]
    assert counts == [1] * len(sessions)


#: Episodes of four patients (four message keys): events of different patients run at once.
PATIENT_EPISODES = (
    "pt-active-iop/iop/1",
    "pt-two-stints/iop/1",
    "pt-two-stints/iop/2",
    "pt-stepdown-inpatient/iop/1",
)


@pytest.mark.parametrize("concurrency", [1, 8])
def test_consumer_killed_mid_batch_with_patients_at_once_writes_each_event_once(
    stack: Stack, published: dict[str, dict[str, Any]], concurrency: int
) -> None:
    """Events of four patients interleaved, each produced twice; the consumer (``concurrency`` events
    at once) is SIGKILLed mid-batch and run again: every session has exactly one Encounter."""
    sessions = [(published[PATIENT_EPISODES[n % 4]], unique_id(f"C{concurrency}-")) for n in range(32)]
    events = [(stack.topics.attendance, _attendance(episode, session)) for episode, session in sessions]
    _produce(stack, events + events)  # the same events (same ids) twice

    def written() -> int:
        return sum(len(_count(stack.fhir, "Encounter", SESSION_ID_SYSTEM, s)) for _, s in sessions)

    command = [sys.executable, "-m", "sync.cli", "--log-level", "WARNING", "run", "--once",
               "--config", str(stack.config), "--as-of", AS_OF.isoformat()]  # fmt: skip
    env = {**os.environ, "IOP_BRIDGE_SERVICE__WRITEBACK_CONCURRENCY": str(concurrency)}
    worker = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while written() < 5 and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.2)
    os.kill(
        worker.pid, signal.SIGKILL
    )  # mid-batch: writes in flight, offsets of finished ones maybe not committed
    worker.wait()

    finished = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    counts = [len(_count(stack.fhir, "Encounter", SESSION_ID_SYSTEM, s)) for _, s in sessions]
    assert counts == [1] * len(sessions)


def test_a_503_storm_across_patients_delays_writes_but_loses_none(
    stack: Stack, published: dict[str, dict[str, Any]]
) -> None:
    """Eight events at once meet the outage: the partitions rewind and retry; each event written once."""
    sessions = [(published[PATIENT_EPISODES[n % 4]], unique_id("T")) for n in range(12)]
    _produce(stack, [(stack.topics.attendance, _attendance(episode, s)) for episode, s in sessions])
    before = stack.proxy.failed
    stack.proxy.fail_next = 30
    with Service(stack.settings, as_of=AS_OF, retry_pause_s=1) as service:
        assert service.settings.service.writeback_concurrency == 8
        service.drain_writebacks(max_seconds=240)
    assert stack.proxy.failed - before == 30
    for _, session in sessions:
        assert len(_count(stack.fhir, "Encounter", SESSION_ID_SYSTEM, session)) == 1


def test_no_phi_reaches_any_log_line(
    stack: Stack, published: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The whole flow at DEBUG with planted PHI: names, birth dates, MRNs and free text stay out of logs."""
    finished = published["pt-two-stints/iop/1"]
    planted_summary = "PLANTED Jane Q. Public, born 1961-02-03, MRN 99-ZZ-4242, lives at 12 Elm Street"
    discharge = {
        "event_id": unique_id("evt"),
        "occurred_at": "2026-06-01T17:00:00+00:00",
        "ehr": EHR,
        "episode_id": finished["episode_id"],
        "patient": {"reference": finished["patient"]["reference"]},
        "discharge": {"date": "2026-01-05", "reason": "completed", "summary": planted_summary},
    }
    _produce(stack, [(stack.topics.discharges, discharge)])
    command = [
        sys.executable,
        "-m",
        "sync.cli",
        "--log-level",
        "DEBUG",
        "run",
        "--once",
        "--config",
        str(stack.config),
        "--as-of",
        AS_OF.isoformat(),
    ]
    # A fresh cursor: the whole hospital is pulled, mapped and published again under DEBUG logging.
    env = {**os.environ, "IOP_BRIDGE_STORE__URL": f"sqlite:///{tmp_path / 'fresh.db'}"}
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    logs = result.stderr + result.stdout
    assert "event_written" in logs or "event_duplicate" in logs  # the discharge did go through the flow

    patients = [json.loads(line) for line in (stack.fhir.get("Patient?_count=500").text,)]
    secrets: set[str] = {"Jane Q. Public", "1961-02-03", "99-ZZ-4242", "12 Elm Street", planted_summary}
    for entry in patients[0].get("entry", []):
        patient = entry["resource"]
        if not patient.get("id", "").startswith(f"pt-{PREFIX}"):
            continue
        for name in patient.get("name", []):
            secrets.add(" ".join([*name.get("given", []), name.get("family", "")]).strip())
            secrets.add(name.get("family", ""))
        secrets.add(patient.get("birthDate", "unset-birth-date"))
        secrets.update(i["value"] for i in patient.get("identifier", []))
    secrets.discard("")
    leaked = sorted(s for s in secrets if s in logs)
    assert leaked == []


def test_dead_letters_are_replayed_once_the_cause_is_fixed(
    stack: Stack, published: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    active = published["pt-active-iop/iop/1"]
    missing = str(uuid.uuid4())  # an episode we have not published (yet)
    session = unique_id("R")
    event = _attendance(active, session)
    event["episode_id"] = missing
    _produce(stack, [(stack.topics.attendance, event)])
    with Service(stack.settings, as_of=AS_OF, retry_pause_s=1) as service:
        assert service.drain_writebacks(max_seconds=120).dead_lettered == 1
        # the cause is fixed: the episode becomes known (as if the next cycle had published it)
        service.state.stage_changes(
            EHR,
            stage_records(EHR, stack.topics, episodes=[{**active, "episode_id": missing}]),
        )
    capsys.readouterr()
    assert main(["dlq", "list", "--config", str(stack.config), "--reason", missing]) == 0
    assert "waiting" in capsys.readouterr().out
    assert main(["dlq", "replay", "--config", str(stack.config), "--reason", missing]) == 0
    assert "replayed 1 dead letters" in capsys.readouterr().out
    with Service(stack.settings, as_of=AS_OF, retry_pause_s=1) as service:
        service.drain_writebacks(max_seconds=120)
    assert len(_count(stack.fhir, "Encounter", SESSION_ID_SYSTEM, session)) == 1

    assert main(["dlq", "replay", "--config", str(stack.config), "--reason", missing]) == 0
    assert "replayed 0 dead letters (1 already replayed before" in capsys.readouterr().out


def test_part2_write_backs_and_dead_letters_stay_on_the_part2_topics(
    stack: Stack, published: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 10 item 9: a Part 2 episode's attendance on the Part 2 topic is written back; its bad events
    (on the Part 2 topic, or misrouted to the general one) land on the Part 2 dead-letter topic, never on
    the general one; a misrouted good one is still written; ``dlq list`` shows them only with --part2."""
    sud = published["pt-sud-part2/iop/1"]
    assert sud["part2"]
    good, misrouted_good = unique_id("P2"), unique_id("P2")
    wrong_patient = _attendance(sud, unique_id("P2"))
    wrong_patient["patient"] = {"reference": f"Patient/pt-{PREFIX}active-iop"}
    misrouted_bad = _attendance(sud, unique_id("P2"))
    misrouted_bad["patient"] = {"reference": f"Patient/pt-{PREFIX}active-iop"}
    malformed = unique_id("p2-broken")
    key = message_key(EHR, sud["patient"]["reference"])
    _produce_raw(
        stack, stack.topics.attendance_part2, key, json.dumps({"event_id": malformed, "session": {}}).encode()
    )
    _produce(
        stack,
        [
            (stack.topics.attendance_part2, _attendance(sud, good)),
            (stack.topics.attendance_part2, wrong_patient),
            (stack.topics.attendance, _attendance(sud, misrouted_good)),
            (stack.topics.attendance, misrouted_bad),
        ],
    )
    with Service(stack.settings, as_of=AS_OF, retry_pause_s=1) as service:
        stats = service.drain_writebacks(max_seconds=120)
        misrouted = service.metrics.part2_on_general_topic.labels(ehr=EHR, topic=stack.topics.attendance)
        assert misrouted._value.get() == 2  # the good and the bad one that came on the general topic
    assert stats.dead_lettered >= 3

    for session in (good, misrouted_good):
        (encounter,) = _count(stack.fhir, "Encounter", SESSION_ID_SYSTEM, session)
        assert encounter["subject"] == {"reference": f"Patient/pt-{PREFIX}sud-part2"}
        assert "42CFRPart2" in {label["code"] for label in encounter["meta"].get("security", [])}

    import base64

    def by_event(topic: str) -> dict[str, dict[str, Any]]:
        """Dead letters by the event id in their original value (a malformed one has no header)."""
        found: dict[str, dict[str, Any]] = {}
        for record in records_to_end(stack.settings.kafka.bootstrap_servers, topic):
            letter = json.loads(record.value)
            original = json.loads(base64.b64decode(letter["value_base64"] or "e30="))
            found[str(original.get("event_id"))] = letter
        return found

    bad = {wrong_patient["event_id"], misrouted_bad["event_id"], malformed}
    part2_letters = by_event(stack.topics.deadletter_part2)
    assert bad <= set(part2_letters)
    assert part2_letters[misrouted_bad["event_id"]]["topic"] == stack.topics.attendance
    assert "session" in part2_letters[malformed]["reason"]
    general = by_event(stack.topics.deadletter)
    assert not bad & set(general)
    assert not any(PREFIX + "sud-part2" in str(letter.get("key")) for letter in general.values())

    capsys.readouterr()
    assert main(["dlq", "list", "--config", str(stack.config)]) == 0
    listed = capsys.readouterr().out
    assert not any(event_id in listed for event_id in bad)
    assert "dead letters of 42 CFR Part 2 records not shown" in listed
    assert main(["dlq", "list", "--config", str(stack.config), "--part2"]) == 0
    assert misrouted_bad["event_id"] in capsys.readouterr().out


def test_replay_never_follows_an_envelope_to_another_topic(
    stack: Stack, published: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A forged dead letter of a valid episode record naming the episodes topic (its headers agree):
    replay must not publish it there."""
    import base64

    from kafka import KafkaProducer

    marker = unique_id("forged")
    episode = published["pt-active-iop/iop/1"]
    body = json.dumps(episode).encode()
    key = message_key(EHR, episode["patient"]["reference"]).encode()
    target = stack.topics.episodes
    envelope = {
        "reason": f"forged {marker}", "failed_at": "2026-06-01T00:00:00+00:00", "topic": target,
        "partition": 0, "offset": 0, "timestamp": None, "key": key.decode(),
        "key_base64": base64.b64encode(key).decode(),
        "value_base64": base64.b64encode(body).decode(), "headers": [],
    }  # fmt: skip
    headers = [("dlq_topic", target.encode()), ("dlq_partition", b"0"), ("dlq_offset", b"0")]
    before = len(records_to_end(stack.settings.kafka.bootstrap_servers, target))
    producer = KafkaProducer(bootstrap_servers=stack.settings.kafka.bootstrap_servers)
    producer.send(stack.topics.deadletter, value=json.dumps(envelope).encode(), headers=headers).get(30)
    producer.close()

    capsys.readouterr()
    assert main(["dlq", "replay", "--config", str(stack.config), "--reason", marker]) == 0
    assert "replayed 0 dead letters" in capsys.readouterr().out
    assert len(records_to_end(stack.settings.kafka.bootstrap_servers, target)) == before


def test_sigterm_stops_the_service_cleanly(stack: Stack) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "IOP_BRIDGE_SERVICE__METRICS_PORT": str(port)}
    command = [sys.executable, "-m", "sync.cli", "--log-level", "WARNING", "run",
               "--config", str(stack.config), "--as-of", AS_OF.isoformat()]  # fmt: skip
    service = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        healthy = False
        while time.monotonic() < deadline and service.poll() is None and not healthy:
            try:
                healthy = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                time.sleep(0.5)
        assert healthy, "the service never answered /healthz"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "iop_bridge_writebacks_total" in metrics
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=90) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()


def _provenance_of(fhir: httpx.Client, reference: str) -> list[dict[str, Any]]:
    bundle = fhir.get("Provenance", params={"target": reference}).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def test_hapi_holds_a_provenance_for_the_episode_of_care_and_the_encounter(
    stack: Stack, published: dict[str, dict[str, Any]]
) -> None:
    active = published["pt-active-iop/iop/1"]
    (episode_of_care,) = _count(stack.fhir, "EpisodeOfCare", EPISODE_ID_SYSTEM, active["episode_id"])
    (by_cycle, *_) = _provenance_of(stack.fhir, f"EpisodeOfCare/{episode_of_care['id']}")
    # We send the version the PUT made; HAPI strips versions from stored references by default.
    assert (
        by_cycle["target"][0]["reference"].split("/_history/")[0] == f"EpisodeOfCare/{episode_of_care['id']}"
    )
    assert by_cycle["entity"][0]["what"]["identifier"] == {
        "system": EPISODE_ID_SYSTEM,
        "value": active["episode_id"],
    }
    assert by_cycle["agent"][0]["who"]["display"] == "iop-bridge"

    session = unique_id("S")
    event = _attendance(active, session)
    _produce(stack, [(stack.topics.attendance, event)])
    with Service(stack.settings, as_of=AS_OF, retry_pause_s=1) as service:
        service.drain_writebacks(max_seconds=120)
    (encounter,) = _count(stack.fhir, "Encounter", SESSION_ID_SYSTEM, session)
    (by_event,) = _provenance_of(stack.fhir, f"Encounter/{encounter['id']}")
    assert by_event["target"][0]["reference"].split("/_history/")[0] == f"Encounter/{encounter['id']}"
    assert by_event["activity"]["coding"][0]["code"] == "CREATE"
    assert by_event["entity"][0]["what"]["identifier"] == {
        "system": EVENT_ID_SYSTEM,
        "value": event["event_id"],
    }

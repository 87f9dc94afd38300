"""Trust end to end on the real Kafka broker and HAPI sandbox (issue 10, items 1, 3 and 8).

- item 1: two programs numbering their sessions alike for two patients never touch each other's
  Encounter, and an update whose Encounter on the server belongs to another patient is dead-lettered
  with nothing written;
- item 3: a record whose key names another patient than its body, or whose body names another
  patient's identifier, reaches the dead-letter topic with its reason, and a later good event on the
  same partition is written;
- item 8: an episode with a secondary SUD diagnosis, or with a session the EHR labelled 42CFRPart2,
  goes to the Part 2 topic, not the general one, through the running service's cycle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from schemas.identifiers import SESSION_ID_SYSTEM, session_key
from schemas.topics import Topics, message_key
from sync.cli import main
from sync.config import Settings, load_settings
from sync.journeys import MRN_SYSTEM
from sync.kafka import ensure_topics
from sync.service import Service
from tests.integration.fhir_fixtures import unique_id
from tests.integration.kafka_fixtures import consume_records, produce_records

pytestmark = pytest.mark.integration

AS_OF = datetime(2026, 6, 1, 23, 59, tzinfo=UTC)
EHR = "harbor-authority"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
PRIVACY_LAW = "http://terminology.hl7.org/CodeSystem/v3-ActUSPrivacyLaw"
FHIR_JSON = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
JOURNEY = """
programs:
  mh-iop: {name: "Harbor Behavioral Health IOP", level: iop, code: S9480, location_code: "OF"}
payers:
  bcbs: {name: "Blue Cross Blue Shield", type: commercial}
patients:
""" + "".join(
    f"""
  - key: {key}
    story: "Depression IOP ({key})"
    gender: female
    born: 1990
    payer: bcbs
    diagnosis: F33.1
    steps:
      - {{level: iop, program: mh-iop, day: -21, weeks: 3, per_week: 3, hours: 3}}
"""
    for key in ("a", "b", "secondary", "labelled")
)


@dataclass
class World:
    settings: Settings
    topics: Topics
    fhir: httpx.Client
    episodes: dict[str, dict[str, Any]]  # by journey key
    bootstrap: str


def _encounters(fhir: httpx.Client, patient: str) -> list[dict[str, Any]]:
    bundle = fhir.get(f"Encounter?subject=Patient/{patient}&_count=100").json()
    return sorted((e["resource"] for e in bundle.get("entry", [])), key=lambda r: r["period"]["start"])


def _mark_sud_evidence(fhir: httpx.Client, prefix: str) -> None:
    """A secondary F10.20 on one of ``secondary``'s sessions; a 42CFRPart2 label on one of ``labelled``'s."""
    patient = f"pt-{prefix}secondary"
    condition_id = f"{prefix}f1020"
    condition = {
        "resourceType": "Condition",
        "id": condition_id,
        "subject": {"reference": f"Patient/{patient}"},
        "code": {"coding": [{"system": ICD10, "code": "F10.20"}]},
    }
    assert fhir.put(f"Condition/{condition_id}", json=condition).status_code in (200, 201)
    encounter = _encounters(fhir, patient)[-1]
    encounter["diagnosis"] = [
        *encounter.get("diagnosis", []),
        {"condition": {"reference": f"Condition/{condition_id}"}, "rank": 2},
    ]
    assert fhir.put(f"Encounter/{encounter['id']}", json=encounter).status_code == 200

    encounter = _encounters(fhir, f"pt-{prefix}labelled")[0]
    meta = encounter.setdefault("meta", {})
    meta["security"] = [*meta.get("security", []), {"system": PRIVACY_LAW, "code": "42CFRPart2"}]
    assert fhir.put(f"Encounter/{encounter['id']}", json=encounter).status_code == 200


@pytest.fixture(scope="module")
def world(
    fhir_base_url: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("authority")
    journeys = tmp / "journeys.yaml"
    journeys.write_text(JOURNEY)
    prefix = unique_id("auth") + "-"
    topic_prefix = unique_id("auth") + "."
    config = tmp / "config.toml"
    config.write_text(
        f"""
[store]
url = "sqlite:///{tmp / "state.db"}"
[kafka]
bootstrap_servers = "{kafka_bootstrap}"
topic_prefix = "{topic_prefix}"
group_id = "{topic_prefix}writeback"
[service]
out_dir = "{tmp / "out"}"
metrics_port = 0
[[ehr]]
name = "{EHR}"
base_url = "{fhir_base_url}"
vendor = "hapi"
resource_types = ["Patient", "Encounter", "Condition", "Coverage", "Location", "Organization"]
patient_identifier_systems = ["{MRN_SYSTEM}"]
"""
    )
    settings = load_settings(config)
    ensure_topics(settings.kafka)
    since = (datetime.now(UTC) - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    seed = ["--log-level", "WARNING", "seed", "--anchor", "2026-06-01", "--prefix", prefix]
    assert main([*seed, "--journeys", str(journeys), "--fhir-url", fhir_base_url]) == 0
    with httpx.Client(base_url=fhir_base_url + "/", timeout=60, headers=FHIR_JSON) as fhir:
        _mark_sud_evidence(fhir, prefix)
        with Service(settings, as_of=AS_OF) as service:
            (ehr,) = settings.ehr
            service.cycle_ehr(ehr, since=since)  # only what changed since just before the seed
            episodes = {}
            for key in ("a", "b", "secondary", "labelled"):
                (record,) = service.state.published_ids(EHR, "episode", f"pt-{prefix}{key}").values()
                episodes[key] = record
        yield World(settings, Topics(topic_prefix), fhir, episodes, kafka_bootstrap)


def _attendance(
    episode: dict[str, Any],
    session: str,
    *,
    program: str,
    status: str = "attended",
    occurred: str = "2026-06-02T18:00:00+00:00",
    end: str = "2026-06-02T12:00:00+00:00",
) -> dict[str, Any]:
    return {
        "event_id": unique_id("evt"),
        "occurred_at": occurred,
        "ehr": EHR,
        "episode_id": episode["episode_id"],
        "program": program,
        "patient": {"reference": episode["patient"]["reference"]},
        "session": {
            "id": session,
            "start": "2026-06-02T09:00:00+00:00",
            "end": end,
            "status": status,
        },
    }


def _produce(world: World, events: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, int]]:
    """Each ``(key, event)`` to the attendance topic as a program would send it; (partition, offset)."""
    records = [
        (
            key.encode(),
            orjson.dumps(event),
            [("schema", b"attendance"), ("schema_version", b"1"), ("event_id", event["event_id"].encode())],
        )
        for key, event in events
    ]
    return produce_records(world.bootstrap, world.topics.attendance, records)


def _key(episode: dict[str, Any]) -> str:
    return message_key(EHR, episode["patient"]["reference"])


def _drain(world: World) -> Any:
    with Service(world.settings, as_of=AS_OF, retry_pause_s=1) as service:
        return service.drain_writebacks(max_seconds=120)


def _session_resources(
    world: World, episode: dict[str, Any], program: str, session: str
) -> list[dict[str, Any]]:
    value = session_key(episode["episode_id"], program, session)
    token = quote(f"{SESSION_ID_SYSTEM}|{value}", safe="")
    bundle = world.fhir.get(f"Encounter?identifier={token}").json()
    return [e["resource"] for e in bundle.get("entry", [])]


def _letters(world: World, count: int) -> list[dict[str, Any]]:
    letters = consume_records(world.bootstrap, world.topics.deadletter, count)
    return [json.loads(r.value) for r in letters]


def _records_for(world: World, topic: str, key: str) -> list[dict[str, Any]]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=world.bootstrap, enable_auto_commit=False, group_id=None)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        found: list[Any] = []
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            for batch in consumer.poll(timeout_ms=500).values():
                found.extend(batch)
    finally:
        consumer.close()
    return [json.loads(r.value) for r in found if r.key == key.encode()]


# -- item 8 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["secondary", "labelled"])
def test_sud_evidence_beyond_the_principal_diagnosis_goes_to_the_part2_topic(world: World, key: str) -> None:
    episode = world.episodes[key]
    assert episode["billing"]["diagnoses"][0]["code"].startswith("F33")  # depression is the principal
    assert episode["part2"] is True
    assert {s["code"] for s in episode["security"]} >= {"42CFRPart2"}
    message = _key(episode)
    assert [r["episode_id"] for r in _records_for(world, world.topics.episodes_part2, message)] == [
        episode["episode_id"]
    ]
    assert _records_for(world, world.topics.episodes, message) == []


def test_an_episode_without_sud_evidence_stays_on_the_general_topic(world: World) -> None:
    episode = world.episodes["a"]
    assert episode["part2"] is False
    assert [r["episode_id"] for r in _records_for(world, world.topics.episodes, _key(episode))] == [
        episode["episode_id"]
    ]
    assert _records_for(world, world.topics.episodes_part2, _key(episode)) == []


# -- items 1 and 3 (one test: the dead-letter topic's records are counted in order) -------------------


def test_sessions_stay_with_their_patients_and_bad_authority_is_dead_lettered(world: World) -> None:
    a, b = world.episodes["a"], world.episodes["b"]
    # item 1: programs north (patient a) and south (patient b) both number their first session "1"
    _produce(
        world,
        [
            (_key(a), _attendance(a, "1", program="north")),
            (_key(b), _attendance(b, "1", program="south")),
            (
                _key(b),
                _attendance(
                    b, "1", program="south", status="cancelled", occurred="2026-06-03T10:00:00+00:00"
                ),
            ),
        ],
    )
    stats = _drain(world)
    assert stats.dead_lettered == 0
    (mine,) = _session_resources(world, a, "north", "1")
    (theirs,) = _session_resources(world, b, "south", "1")
    assert mine["subject"] == {"reference": a["patient"]["reference"]}
    assert mine["status"] == "finished"
    assert theirs["subject"] == {"reference": b["patient"]["reference"]}
    assert theirs["status"] == "cancelled"

    # item 1: a's Encounter now belongs to b on the server; a's next event must not change it
    mine["subject"] = {"reference": b["patient"]["reference"]}
    assert world.fhir.put(f"Encounter/{mine['id']}", json=mine).status_code == 200
    moved = world.fhir.get(f"Encounter/{mine['id']}").json()
    update = _attendance(
        a, "1", program="north", occurred="2026-06-04T10:00:00+00:00", end="2026-06-02T12:30:00+00:00"
    )

    # item 3: on b's key (one partition): a body for a's episode, then b's episode named by a's MRN,
    # then a good event of b's
    wrong_key = _attendance(a, "2", program="north")
    wrong_identifier = _attendance(b, "2", program="south")
    wrong_identifier["patient"] = {"identifier": a["patient"]["identifier"]}
    good = _attendance(b, "3", program="south")
    assert a["patient"]["identifier"], "the episode carries its MRN (patient_identifier_systems)"
    placed = _produce(
        world,
        [(_key(a), update), (_key(b), wrong_key), (_key(b), wrong_identifier), (_key(b), good)],
    )
    assert len({partition for partition, _ in placed[1:]}) == 1
    stats = _drain(world)

    assert stats.dead_lettered == 3
    after = world.fhir.get(f"Encounter/{mine['id']}").json()
    assert after["meta"]["versionId"] == moved["meta"]["versionId"]  # nothing written
    assert after["period"] == moved["period"]
    assert _session_resources(world, a, "north", "2") == []
    assert _session_resources(world, b, "south", "2") == []
    (written,) = _session_resources(world, b, "south", "3")
    assert written["subject"] == {"reference": b["patient"]["reference"]}

    reasons = {letter["event_id"]: letter["reason"] for letter in _letters(world, 3)}
    assert "not the episode's patient" in reasons[update["event_id"]]
    assert reasons[wrong_key["event_id"]].startswith("key_mismatch:")
    assert reasons[wrong_identifier["event_id"]].startswith("patient_mismatch:")
    mrn = a["patient"]["identifier"][0]["value"]
    assert all(mrn not in reason for reason in reasons.values())

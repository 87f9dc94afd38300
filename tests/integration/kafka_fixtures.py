"""pytest plugin: the real Apache Kafka broker for integration tests (never an in-memory stand-in).

- ``kafka_bootstrap`` (session): the broker's ``host:port``. Uses ``IOP_BRIDGE_TEST_KAFKA`` when
  ``scripts/test`` started the broker; otherwise runs ``deploy/kafka/run start`` itself and, at the end
  of the session, ``stop`` — but only if the broker was not already running before.
- ``kafka_admin`` (session): an admin client on that broker.
- ``make_topic`` (per test): creates a topic with a random name (or a random prefix + a given name) and
  deletes it after the test, so tests never see each other's records.
- ``produce_records`` / ``consume_records``: plain helpers for reading and writing a topic in tests.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "deploy" / "kafka" / "run"
ENV_BOOTSTRAP = "IOP_BRIDGE_TEST_KAFKA"
#: Long enough for a cold first start (Maven resolution, format, JVM start) on a slow shared machine.
LAUNCHER_TIMEOUT_S = 900
#: How long a helper waits for records that should already be on the broker before it gives up.
WAIT_S = 30.0

Header = tuple[str, bytes]


def _launcher(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LAUNCHER), command],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        timeout=LAUNCHER_TIMEOUT_S,
    )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The real broker's bootstrap address (``127.0.0.1:9092`` by default)."""
    given = os.environ.get(ENV_BOOTSTRAP, "").strip()
    if given:
        yield given
        return
    was_running = _launcher("status").returncode == 0
    started = _launcher("start")
    if started.returncode != 0 or not started.stdout.strip():
        pytest.fail(f"deploy/kafka/run start failed (exit {started.returncode}); see its output above")
    address = started.stdout.strip().splitlines()[-1]
    try:
        yield address
    finally:
        if not was_running:
            _launcher("stop")


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="iop-bridge-tests")
    try:
        yield admin
    finally:
        admin.close()


def unique_name(label: str = "t") -> str:
    """A topic-safe name no other test (or earlier run against the same broker) uses."""
    return f"{label}-{uuid.uuid4().hex[:12]}"


@dataclass
class TopicFactory:
    """Creates topics on the real broker for one test and remembers them for deletion."""

    admin: KafkaAdminClient
    created: list[str] = field(default_factory=list)

    def __call__(self, name: str | None = None, *, partitions: int = 1) -> str:
        topic = name or unique_name()
        self.admin.create_topics(
            {topic: {"num_partitions": partitions, "replication_factor": 1}}, wait_for_metadata=True
        )
        self.created.append(topic)
        return topic


@pytest.fixture
def make_topic(kafka_admin: KafkaAdminClient) -> Iterator[TopicFactory]:
    """``make_topic()`` -> a new random topic; ``make_topic(f"{prefix}iop.attendance.v1", partitions=3)``."""
    factory = TopicFactory(kafka_admin)
    yield factory
    if factory.created:
        kafka_admin.delete_topics(factory.created)


@pytest.fixture
def topic_prefix() -> str:
    """A random topic prefix, so a test can use the real topic names without meeting other tests."""
    return unique_name("test") + "."


def produce_records(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes, Sequence[Header]]],
) -> list[tuple[int, int]]:
    """Produce (key, value, headers) in order with an idempotent producer; returns (partition, offset)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    try:
        futures = [
            producer.send(topic, key=key, value=value, headers=list(headers))
            for key, value, headers in records
        ]
        producer.flush()
        metadata = [future.get(timeout=WAIT_S) for future in futures]
    finally:
        producer.close()
    return [(m.partition, m.offset) for m in metadata]


def consume_records(bootstrap: str, topic: str, count: int) -> list[ConsumerRecord]:
    """Read the first ``count`` records of every partition of a topic (no group, nothing committed).

    Fails the test if fewer than ``count`` records arrive within ``WAIT_S``; returns them ordered by
    (partition, offset).
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        assignment = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assignment)
        consumer.seek_to_beginning(*assignment)
        found: list[ConsumerRecord] = []
        deadline = time.monotonic() + WAIT_S
        while len(found) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                found.extend(batch)
    finally:
        consumer.close()
    assert len(found) >= count, f"{topic}: expected {count} records, got {len(found)} within {WAIT_S}s"
    return sorted(found, key=lambda r: (r.partition, r.offset))


def records_to_end(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    """Every record of every partition of a topic, up to its end offsets now (no group, nothing
    committed), ordered by (partition, offset)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        assignment = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(assignment)
        consumer.seek_to_beginning(*assignment)
        ends = consumer.end_offsets(assignment)
        found: list[ConsumerRecord] = []
        deadline = time.monotonic() + WAIT_S
        while any(consumer.position(tp) < ends[tp] for tp in assignment):
            assert time.monotonic() < deadline, f"{topic}: not read to its end within {WAIT_S}s"
            for batch in consumer.poll(timeout_ms=500).values():
                found.extend(batch)
    finally:
        consumer.close()
    return sorted(found, key=lambda r: (r.partition, r.offset))


@pytest.fixture
def produce(kafka_bootstrap: str) -> Callable[..., list[tuple[int, int]]]:
    def _produce(topic: str, records: Sequence[tuple[bytes | None, bytes, Sequence[Header]]]) -> Any:
        return produce_records(kafka_bootstrap, topic, records)

    return _produce


@pytest.fixture
def consume(kafka_bootstrap: str) -> Callable[[str, int], list[ConsumerRecord]]:
    def _consume(topic: str, count: int) -> list[ConsumerRecord]:
        return consume_records(kafka_bootstrap, topic, count)

    return _consume

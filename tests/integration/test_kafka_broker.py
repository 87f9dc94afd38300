"""The real broker behaves as the service relies on: idempotent produce keeps key, value, headers and
per-key order; a consumer group with manual commits resumes after the last committed record."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import pytest
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from tests.integration.kafka_fixtures import WAIT_S, TopicFactory, unique_name

pytestmark = pytest.mark.integration


def test_round_trip_keeps_key_value_headers_and_per_key_order(
    make_topic: TopicFactory,
    produce: Callable[..., list[tuple[int, int]]],
    consume: Callable[[str, int], list[ConsumerRecord]],
) -> None:
    topic = make_topic(partitions=3)
    keys = [b"ehr-a|Patient/1", b"ehr-b|Patient/1", b"ehr-a|Patient/2", b"ehr-a|Patient/3"]
    sent = [
        (key, f'{{"n": {n}}}'.encode(), [("event_id", f"{key.decode()}#{n}".encode()), ("schema", b"x")])
        for n in range(5)
        for key in keys
    ]

    produce(topic, sent)
    received = consume(topic, len(sent))

    assert len(received) == len(sent)
    by_key: dict[bytes, list[ConsumerRecord]] = defaultdict(list)
    for record in received:
        by_key[record.key].append(record)
    for key in keys:
        records = sorted(by_key[key], key=lambda r: r.offset)
        assert {r.partition for r in records} == {records[0].partition}, "one key, one partition"
        assert [(r.key, r.value, r.headers) for r in records] == [
            (k, v, h) for k, v, h in sent if k == key
        ], "per-key order, value and headers as sent"
    assert len({r.partition for r in received}) > 1, "the keys spread over several partitions"


def _group_consumer(bootstrap: str, topic: str, group: str) -> KafkaConsumer:
    return KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )


def _poll_until(consumer: KafkaConsumer, count: int) -> list[ConsumerRecord]:
    found: list[ConsumerRecord] = []
    for _ in range(int(WAIT_S * 2)):
        for batch in consumer.poll(timeout_ms=500, max_records=count - len(found)).values():
            found.extend(batch)
        if len(found) >= count:
            break
    return found


def test_group_resumes_after_the_last_committed_record(
    kafka_bootstrap: str,
    make_topic: TopicFactory,
    produce: Callable[..., list[tuple[int, int]]],
) -> None:
    topic = make_topic()
    group = unique_name("group")
    produce(topic, [(b"k", f"v{n}".encode(), []) for n in range(5)])

    first = _group_consumer(kafka_bootstrap, topic, group)
    try:
        taken = _poll_until(first, 3)
        assert [r.value for r in taken] == [b"v0", b"v1", b"v2"]
        last = taken[-1]
        tp = TopicPartition(topic, last.partition)
        first.commit({tp: OffsetAndMetadata(last.offset + 1, "", last.leader_epoch)})
        assert first.committed(tp) == 3
    finally:
        first.close()

    second = _group_consumer(kafka_bootstrap, topic, group)
    try:
        rest = _poll_until(second, 2)
    finally:
        second.close()
    assert [(r.offset, r.value) for r in rest] == [(3, b"v3"), (4, b"v4")]


def test_uncommitted_records_are_redelivered_to_the_next_consumer(
    kafka_bootstrap: str,
    make_topic: TopicFactory,
    produce: Callable[..., list[tuple[int, int]]],
) -> None:
    topic = make_topic()
    group = unique_name("group")
    produce(topic, [(b"k", f"v{n}".encode(), []) for n in range(2)])

    first = _group_consumer(kafka_bootstrap, topic, group)
    try:
        assert [r.value for r in _poll_until(first, 2)] == [b"v0", b"v1"]
    finally:
        first.close()

    second = _group_consumer(kafka_bootstrap, topic, group)
    try:
        again = _poll_until(second, 2)
    finally:
        second.close()
    assert [r.value for r in again] == [b"v0", b"v1"]

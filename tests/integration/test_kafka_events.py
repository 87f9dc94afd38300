"""sync.kafka against the real broker: validated publish, at-least-once consume, dead letters."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from connectors.errors import EhrError, TemporaryEhrError
from schemas import ContractError, Topics, message_key
from sync import deadletter
from sync.config import KafkaConfig
from sync.kafka import Event, EventConsumer, EventProducer, PermanentEventError, ensure_topics
from tests.integration.kafka_fixtures import TopicFactory, unique_name

pytestmark = pytest.mark.integration

EPISODE_ID = "6f1c8f4e-2b1d-5c3a-9e7f-0a1b2c3d4e5f"
KEY = message_key("general-hospital", "123")


def attendance(n: int, status: str = "attended") -> dict[str, Any]:
    return {
        "event_id": f"evt-{n}",
        "occurred_at": "2026-03-02T18:05:00-05:00",
        "ehr": "general-hospital",
        "episode_id": EPISODE_ID,
        "patient": {"reference": "Patient/123"},
        "session": {
            "id": f"sess-{n}",
            "start": "2026-03-02T09:00:00-05:00",
            "end": "2026-03-02T12:00:00-05:00",
            "status": status,
        },
    }


@pytest.fixture
def config(kafka_bootstrap: str, topic_prefix: str) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix, group_id=unique_name("g")
    )


@pytest.fixture
def topics(config: KafkaConfig, make_topic: TopicFactory) -> Topics:
    named = Topics(config.topic_prefix)
    make_topic(named.attendance, partitions=2)
    make_topic(named.deadletter)
    return named


@pytest.fixture
def producer(config: KafkaConfig, topics: Topics) -> Iterator[EventProducer]:
    with EventProducer(config) as made:
        yield made


def publish(producer: EventProducer, topics: Topics, events: list[dict[str, Any]]) -> None:
    for event in events:
        producer.publish(
            topics.attendance, KEY, event, schema="attendance", version=1, event_id=event["event_id"]
        ).get(timeout=30)


def consumer_for(
    config: KafkaConfig, topics: Topics, producer: EventProducer, **kwargs: Any
) -> EventConsumer:
    return EventConsumer(config, [topics.attendance], producer, retry_pause_s=0.0, **kwargs)


def committed(config: KafkaConfig, topic: str, partition: int) -> int | None:
    reader = KafkaConsumer(bootstrap_servers=config.bootstrap_servers, group_id=config.group_id)
    try:
        result: int | None = reader.committed(TopicPartition(topic, partition))
        return result
    finally:
        reader.close(autocommit=False)


def test_published_events_are_consumed_with_their_headers(
    config: KafkaConfig,
    topics: Topics,
    producer: EventProducer,
    consume: Callable[[str, int], list[ConsumerRecord]],
) -> None:
    events = [attendance(n) for n in range(3)]
    publish(producer, topics, events)

    [raw, *_] = consume(topics.attendance, 3)
    headers = dict(raw.headers)
    assert raw.key == KEY.encode()
    assert headers["schema"] == b"attendance"
    assert headers["schema_version"] == b"1"
    assert headers["event_id"] == b"evt-0"
    version, trace_id, span_id, flags = headers["traceparent"].decode().split("-")
    assert (version, len(trace_id), len(span_id), flags) == ("00", 32, 16, "01")

    seen: list[Event] = []
    with consumer_for(config, topics, producer) as consumer:
        stats = consumer.drain(seen.append, idle_polls=2, timeout_ms=200)
    assert stats.processed == 3
    assert [e.value for e in seen] == events, "one key, so one partition, in order"
    assert [e.event_id for e in seen] == ["evt-0", "evt-1", "evt-2"]
    assert seen[0].traceparent == headers["traceparent"].decode()
    assert all(e.traceparent for e in seen)
    assert committed(config, topics.attendance, seen[-1].partition) == 3


def test_an_invalid_event_is_refused_and_not_produced(
    config: KafkaConfig, topics: Topics, producer: EventProducer
) -> None:
    bad = attendance(1, status="present")

    with pytest.raises(ContractError, match=r"attendance\.v1: session/status: enum"):
        producer.publish(topics.attendance, KEY, bad, schema="attendance", version=1, event_id="evt-1")
    with pytest.raises(ValueError, match=r"carries attendance\.v1 records, not discharge"):
        producer.publish(topics.attendance, KEY, attendance(2), schema="discharge", version=1, event_id="e")
    with pytest.raises(ValueError, match="message key"):
        producer.publish(
            topics.attendance, "Patient/123", attendance(3), schema="attendance", version=1, event_id="e"
        )
    producer.flush()

    reader = KafkaConsumer(bootstrap_servers=config.bootstrap_servers)
    try:
        partitions = [TopicPartition(topics.attendance, p) for p in (0, 1)]
        assert set(reader.end_offsets(partitions).values()) == {0}
    finally:
        reader.close()


def test_schema_invalid_event_goes_to_the_dead_letter_topic_and_the_rest_is_processed(
    config: KafkaConfig,
    topics: Topics,
    producer: EventProducer,
    produce: Callable[..., list[tuple[int, int]]],
    consume: Callable[[str, int], list[ConsumerRecord]],
) -> None:
    bad_value = orjson.dumps(attendance(1, status="present"))
    bad_headers = [("schema", b"attendance"), ("schema_version", b"1"), ("event_id", b"evt-1")]
    produce(
        topics.attendance,
        [
            (KEY.encode(), orjson.dumps(attendance(0)), []),
            (KEY.encode(), bad_value, bad_headers),
            (KEY.encode(), b"\xff not json", []),
            (KEY.encode(), orjson.dumps(attendance(3)), []),
        ],
    )

    seen: list[Event] = []
    with consumer_for(config, topics, producer) as consumer:
        stats = consumer.drain(seen.append, idle_polls=2, timeout_ms=200)

    assert (stats.processed, stats.dead_lettered) == (2, 2)
    assert [e.event_id for e in seen] == ["evt-0", "evt-3"]
    invalid, undecodable = consume(topics.deadletter, 2)
    assert invalid.key == KEY.encode()
    headers = dict(invalid.headers)
    assert headers["dlq_topic"] == topics.attendance.encode()
    assert headers["dlq_offset"] == b"1"
    assert headers["schema"] == b"deadletter"
    assert headers["event_id"] == b"evt-1"
    assert headers["dlq_reason"].startswith(b"schema_invalid: attendance.v1: session/status: enum")
    envelope = orjson.loads(invalid.value)
    original = deadletter.original(envelope)
    assert (original.topic, original.offset, original.key) == (topics.attendance, 1, KEY.encode())
    assert original.value == bad_value
    assert list(original.headers) == bad_headers
    assert base64.b64decode(envelope["value_base64"]) == bad_value
    with pytest.raises(ContractError, match=r"schema_invalid: attendance\.v1: session/status: enum"):
        producer.republish(original)
    assert (envelope["schema"], envelope["schema_version"], envelope["event_id"]) == (
        "attendance",
        1,
        "evt-1",
    )
    assert orjson.loads(undecodable.value)["reason"] == "undecodable: the value is not UTF-8 JSON"
    assert committed(config, topics.attendance, invalid.partition) == 4


def test_a_permanent_handler_error_dead_letters_with_its_reason(
    config: KafkaConfig,
    topics: Topics,
    producer: EventProducer,
    consume: Callable[[str, int], list[ConsumerRecord]],
) -> None:
    publish(producer, topics, [attendance(0), attendance(1)])
    written: list[str | None] = []

    def handler(event: Event) -> None:
        if event.event_id == "evt-0":
            raise PermanentEventError(f"unknown_episode: {EPISODE_ID}")
        written.append(event.event_id)

    with consumer_for(config, topics, producer) as consumer:
        stats = consumer.drain(handler, idle_polls=2, timeout_ms=200)

    assert (stats.processed, stats.dead_lettered) == (1, 1)
    assert written == ["evt-1"]
    [letter] = consume(topics.deadletter, 1)
    assert orjson.loads(letter.value)["reason"] == f"unknown_episode: {EPISODE_ID}"

    # Once the cause is fixed, the dead letter goes back where it came from, byte for byte.
    original = deadletter.original(orjson.loads(letter.value))
    producer.republish(original)
    replayed = [r for r in consume(topics.attendance, 3) if r.offset >= 1 and r.value == original.value]
    assert [(r.key, r.headers) for r in replayed] == [(original.key, list(original.headers))]
    assert replayed[0].partition == original.partition, "same key, same partition"


def test_a_failed_handler_leaves_the_offset_uncommitted_and_a_new_consumer_gets_the_record(
    config: KafkaConfig, topics: Topics, producer: EventProducer
) -> None:
    publish(producer, topics, [attendance(n) for n in range(3)])

    def fail_on_second(event: Event) -> None:
        if event.event_id == "evt-1":
            raise TemporaryEhrError("EHR unavailable", status=503)

    with consumer_for(config, topics, producer) as first:
        stats = first.poll_once(fail_on_second, timeout_ms=1000)
        for _ in range(30):
            if stats.records:
                break
            stats = first.poll_once(fail_on_second, timeout_ms=1000)
        assert (stats.processed, stats.failed) == (1, 1)
        partition = next(iter(first.paused())).partition
    assert committed(config, topics.attendance, partition) == 1

    seen: list[Event] = []
    with consumer_for(config, topics, producer) as second:
        second.drain(seen.append, idle_polls=2, timeout_ms=200)
    assert [(e.offset, e.event_id) for e in seen] == [(1, "evt-1"), (2, "evt-2")]
    assert committed(config, topics.attendance, partition) == 3


def test_a_paused_partition_is_retried_by_the_same_consumer(
    config: KafkaConfig, topics: Topics, producer: EventProducer
) -> None:
    publish(producer, topics, [attendance(0), attendance(1)])
    attempts: list[str | None] = []

    def flaky(event: Event) -> None:
        attempts.append(event.event_id)
        if attempts.count("evt-0") == 1:
            raise TimeoutError("EHR timed out")

    with consumer_for(config, topics, producer) as consumer:
        stats = consumer.drain(flaky, idle_polls=2, timeout_ms=200)

    assert attempts == ["evt-0", "evt-0", "evt-1"]
    assert (stats.failed, stats.processed) == (1, 2)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_rebalance_moves_partitions_without_losing_or_skipping_records(
    config: KafkaConfig, topics: Topics, producer: EventProducer, concurrency: int
) -> None:
    keys = [message_key("general-hospital", str(n)) for n in range(8)]
    for n, key in enumerate(keys):
        producer.publish(
            topics.attendance, key, attendance(n), schema="attendance", version=1, event_id=f"evt-{n}"
        )
    producer.flush()
    seen: list[tuple[str, Event]] = []
    ehr_down = threading.Event()
    ehr_down.set()

    def handler_of(member: str) -> Callable[[Event], None]:
        def handle(event: Event) -> None:
            if ehr_down.is_set():
                raise ConnectionError("EHR unavailable")
            seen.append((member, event))

        return handle

    def all_seen() -> bool:
        return len({e.event_id for _, e in seen}) == len(keys)

    stop = threading.Event()
    crashed: list[BaseException] = []

    def second_member() -> None:
        try:
            with consumer_for(config, topics, producer, concurrency=concurrency) as second:
                second.run(handler_of("second"), stop.is_set, timeout_ms=100)
        except BaseException as exc:
            crashed.append(exc)

    # The first member fails once on each partition and would wait an hour to retry...
    with EventConsumer(
        config, [topics.attendance], producer, retry_pause_s=3600, concurrency=concurrency
    ) as first:
        for _ in range(50):
            first.poll_once(handler_of("first"), timeout_ms=200)
            if len(first.paused()) == 2:
                break
        assert len(first.paused()) == 2, "one failed record per partition; both partitions wait"
        ehr_down.clear()
        # ...but a second member joins: the group rebalances, the first drops its retry state for
        # what it gives up, and every partition restarts from its committed offset at its new owner.
        thread = threading.Thread(target=second_member)
        thread.start()
        try:
            for _ in range(600):
                first.poll_once(handler_of("first"), timeout_ms=100)
                if all_seen():
                    break
        finally:
            stop.set()
            thread.join(timeout=120)

    assert crashed == []
    assert all_seen()
    assert {member for member, _ in seen} == {"first", "second"}, "each member got a partition"
    for partition in (0, 1):
        offsets = sorted(e.offset for _, e in seen if e.partition == partition)
        assert offsets == list(range(len(offsets))), "from the committed offset on, nothing skipped"
        assert committed(config, topics.attendance, partition) == len(offsets)


OnePartition = tuple[KafkaConfig, Topics, EventProducer]


@pytest.fixture
def one_partition(kafka_bootstrap: str, make_topic: TopicFactory) -> Iterator[OnePartition]:
    """A config, topics and producer of their own whose attendance topic has ONE partition: every
    key's records in one partition, so one poll brings records of several keys together."""
    prefix = unique_name("one") + "."
    config = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, group_id=unique_name("g"))
    named = Topics(prefix)
    make_topic(named.attendance, partitions=1)
    make_topic(named.deadletter)
    with EventProducer(config) as producer:
        yield config, named, producer


def publish_interleaved(producer: EventProducer, topics: Topics, patients: int, each: int) -> list[str]:
    """``each`` events for each of ``patients`` patients (keys), round-robin: offset n is event evt-n of
    patient n % patients. Returns the keys."""
    keys = [message_key("general-hospital", f"p{k}") for k in range(patients)]
    for n in range(patients * each):
        producer.publish(
            topics.attendance, keys[n % patients], attendance(n), schema="attendance", version=1,
            event_id=f"evt-{n}",
        ).get(timeout=30)  # fmt: skip
    return keys


def event_number(event: Event) -> int:
    return int(str(event.event_id).removeprefix("evt-"))


def test_keys_run_at_once_and_each_keys_records_stay_in_offset_order(one_partition: OnePartition) -> None:
    config, topics, producer = one_partition
    keys = publish_interleaved(producer, topics, patients=6, each=5)
    slow = keys[0]
    others_done = threading.Event()
    waited: list[bool] = []
    handled: list[tuple[str | None, int]] = []
    lock = threading.Lock()

    def handler(event: Event) -> None:
        if event.key == slow and event_number(event) == 0:
            # This patient's EHR call hangs until every other patient's events are written: with
            # concurrency they are; one at a time they would wait behind it (and this wait run out).
            waited.append(others_done.wait(60))
        with lock:
            handled.append((event.key, event_number(event)))
            if sum(1 for key, _ in handled if key != slow) == 25:
                others_done.set()

    with EventConsumer(config, [topics.attendance], producer, retry_pause_s=0.0, concurrency=4) as consumer:
        stats = consumer.drain(handler, idle_polls=2, timeout_ms=200)

    assert waited == [True], "the other keys were not held up by the slow one"
    assert stats.processed == 30
    assert sorted(n for _, n in handled) == list(range(30)), "each record once"
    for k, key in enumerate(keys):
        assert [n for seen, n in handled if seen == key] == list(range(k, 30, 6)), "one key: offset order"
    assert committed(config, topics.attendance, 0) == 30


def test_a_temporary_failure_commits_only_the_done_prefix_and_loses_nothing(
    one_partition: OnePartition,
) -> None:
    config, topics, producer = one_partition
    keys = publish_interleaved(producer, topics, patients=3, each=4)  # offset n: evt-n of key n % 3
    attempts: list[int] = []
    ok: list[int] = []
    lock = threading.Lock()

    def handler(event: Event) -> None:
        n = event_number(event)
        with lock:
            attempts.append(n)
        if n == 4 and attempts.count(4) == 1:  # key 1's second record: the EHR fails once
            raise TimeoutError("EHR timed out")
        with lock:
            ok.append(n)

    with EventConsumer(config, [topics.attendance], producer, retry_pause_s=0.0, concurrency=4) as consumer:
        for _ in range(60):
            stats = consumer.poll_once(handler, timeout_ms=500)
            if stats.failed:
                break
        assert stats.failed == 1
        assert stats.records == 12, "every record of the poll is accounted for"
        assert [tp.partition for tp in consumer.paused()] == [0]
        first_pass = set(ok)
        done_prefix = committed(config, topics.attendance, 0)
        assert done_prefix is not None
        assert done_prefix <= 4, "never committed past the failed record"
        assert set(range(done_prefix)) <= first_pass, "everything below the commit was written"
        assert done_prefix not in first_pass, "the commit stops at the first unfinished record"
        assert not {7, 10} & first_pass, "key 1 stopped at its failed record"

        consumer.drain(handler, idle_polls=2, timeout_ms=200)

    assert set(ok) == set(range(12)), "nothing lost"
    assert attempts.count(4) == 2
    for k in range(len(keys)):
        firsts = list(dict.fromkeys(n for n in ok if n % 3 == k))
        assert firsts == list(range(k, 12, 3)), "each key's records first written in offset order"
    assert committed(config, topics.attendance, 0) == 12


def test_concurrency_must_be_positive(config: KafkaConfig, topics: Topics, producer: EventProducer) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EventConsumer(config, [topics.attendance], producer, concurrency=0)


def test_ensure_topics_creates_only_what_is_missing(
    kafka_bootstrap: str, topic_prefix: str, make_topic: TopicFactory, kafka_admin: Any
) -> None:
    config = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix)
    named = Topics(topic_prefix)
    make_topic(named.attendance)

    created = ensure_topics(config, partitions=2)
    make_topic.created.extend(created)

    assert sorted(created) == sorted(set(named.all()) - {named.attendance})
    assert ensure_topics(config, partitions=2) == []
    assert set(named.all()) <= set(kafka_admin.list_topics())


def test_a_permanent_ehr_answer_dead_letters_at_once_and_the_partition_moves_on(
    config: KafkaConfig,
    topics: Topics,
    producer: EventProducer,
    consume: Callable[[str, int], list[ConsumerRecord]],
) -> None:
    """A 403 (not in the old permanent set) and a bug in the handler: each dead-lettered on its first
    try, not retried; the events after them are handled."""
    publish(producer, topics, [attendance(n) for n in range(3)])
    attempts: list[str | None] = []

    def handler(event: Event) -> None:
        attempts.append(event.event_id)
        if event.event_id == "evt-0":
            raise EhrError("harbor: POST Encounter -> HTTP 403: forbidden", status=403)
        if event.event_id == "evt-1":
            raise KeyError("a value the bug quotes")

    with consumer_for(config, topics, producer) as consumer:
        stats = consumer.drain(handler, idle_polls=2, timeout_ms=200, max_seconds=60)

    assert attempts == ["evt-0", "evt-1", "evt-2"], "each tried once"
    assert (stats.dead_lettered, stats.processed, stats.failed) == (2, 1, 0)
    forbidden, bug = (orjson.loads(r.value)["reason"] for r in consume(topics.deadletter, 2))
    assert forbidden == "permanent:EhrError: harbor: POST Encounter -> HTTP 403: forbidden"
    assert bug == "handler_error:KeyError", "an unflagged error's text may quote data: class only"


def test_a_retriable_failure_is_dead_lettered_when_its_budget_is_spent(
    config: KafkaConfig,
    topics: Topics,
    producer: EventProducer,
    consume: Callable[[str, int], list[ConsumerRecord]],
) -> None:
    publish(producer, topics, [attendance(0), attendance(1)])
    attempts: list[str | None] = []

    def handler(event: Event) -> None:
        attempts.append(event.event_id)
        if event.event_id == "evt-0":
            raise TemporaryEhrError("harbor: POST Encounter -> HTTP 503: busy", status=503)

    with consumer_for(config, topics, producer, retry_max_attempts=3) as consumer:
        stats = consumer.drain(handler, idle_polls=2, timeout_ms=200, max_seconds=60)

    assert attempts == ["evt-0", "evt-0", "evt-0", "evt-1"]
    assert (stats.failed, stats.dead_lettered, stats.processed) == (2, 1, 1)
    [letter] = consume(topics.deadletter, 1)
    reason = orjson.loads(letter.value)["reason"]
    assert reason.startswith("gave_up:TemporaryEhrError after 3 attempts in ")
    assert reason.endswith(": harbor: POST Encounter -> HTTP 503: busy")


def test_a_retriable_failure_is_dead_lettered_once_it_is_too_old(
    config: KafkaConfig,
    topics: Topics,
    producer: EventProducer,
    consume: Callable[[str, int], list[ConsumerRecord]],
) -> None:
    publish(producer, topics, [attendance(0), attendance(1)])
    now = [1000.0]
    attempts: list[str | None] = []

    def handler(event: Event) -> None:
        attempts.append(event.event_id)
        if event.event_id == "evt-0":
            now[0] += 400.0  # each try takes the EHR 400 s to time out
            raise TemporaryEhrError("harbor: POST Encounter: ReadTimeout")

    with consumer_for(config, topics, producer, retry_max_seconds=600, clock=lambda: now[0]) as consumer:
        consumer.drain(handler, idle_polls=2, timeout_ms=200, max_seconds=10_000)

    assert attempts == ["evt-0"] * 3 + ["evt-1"], "the third failure is 800 s after the first"
    [letter] = consume(topics.deadletter, 1)
    assert orjson.loads(letter.value)["reason"].startswith(
        "gave_up:TemporaryEhrError after 3 attempts in 800 s"
    )


def test_an_800_kb_invalid_event_is_dead_lettered_and_the_partition_moves_on(
    config: KafkaConfig,
    topics: Topics,
    producer: EventProducer,
    produce: Callable[..., list[tuple[int, int]]],
    consume: Callable[[str, int], list[ConsumerRecord]],
) -> None:
    """Its whole envelope (base64: ~1.07 MB) would be over the producer's 1 MiB limit."""
    import hashlib

    huge = orjson.dumps({**attendance(0), "notes": "x" * 800_000})  # invalid: an unexpected field
    produce(
        topics.attendance,
        [(KEY.encode(), huge, [("event_id", b"evt-0")]), (KEY.encode(), orjson.dumps(attendance(1)), [])],
    )
    seen: list[str | None] = []
    with consumer_for(config, topics, producer) as consumer:
        stats = consumer.drain(
            lambda e: seen.append(e.event_id), idle_polls=2, timeout_ms=200, max_seconds=60
        )

    assert (stats.dead_lettered, stats.processed, stats.failed) == (1, 1, 0)
    assert seen == ["evt-1"]
    [letter] = consume(topics.deadletter, 1)
    envelope = orjson.loads(letter.value)
    assert envelope["reason"].startswith("schema_invalid: attendance.v1: (root): unexpected notes")
    assert envelope["omitted"] == ["value"]
    assert envelope["value_sha256"] == hashlib.sha256(huge).hexdigest()
    assert (envelope["topic"], envelope["offset"], envelope["event_id"]) == (topics.attendance, 0, "evt-0")


def test_when_the_dead_letter_cannot_be_sent_a_stub_still_goes(
    config: KafkaConfig,
    topics: Topics,
    make_topic: TopicFactory,
    produce: Callable[..., list[tuple[int, int]]],
    consume: Callable[[str, int], list[ConsumerRecord]],
) -> None:
    """A producer whose request limit (20 KB) is below the envelope: the stub (no value) fits."""
    with EventProducer(config, max_request_size=20_000) as small:
        produce(
            topics.attendance,
            [(KEY.encode(), b"{" + b" " * 15_000, []), (KEY.encode(), orjson.dumps(attendance(1)), [])],
        )
        seen: list[str | None] = []
        with consumer_for(config, topics, small) as consumer:
            stats = consumer.drain(
                lambda e: seen.append(e.event_id), idle_polls=2, timeout_ms=200, max_seconds=60
            )
    assert (stats.dead_lettered, stats.processed) == (1, 1)
    [letter] = consume(topics.deadletter, 1)
    envelope = orjson.loads(letter.value)
    assert envelope["reason"].startswith("undecodable: the value is not UTF-8 JSON (stub: ")
    assert envelope["omitted"] == ["value", "headers", "key"]

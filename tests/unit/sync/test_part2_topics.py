"""Part 2 beyond the outbound topics (issue 10 item 9): write-back events and dead letters of 42 CFR
Part 2 episodes have topics of their own, and Part 2 stays out of the general dead-letter listing."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import orjson
import pytest

from schemas.topics import Topics
from sync import part2_events
from sync.kafka import EventProducer
from sync.simulator import ProgramEvent, publish_events, simulate
from tests.unit.sync.demo_records import episodes

NAMES = Topics("p.")
GENERAL_EPISODE = "11111111-1111-5111-8111-111111111111"
PART2_EPISODE = "22222222-2222-5222-8222-222222222222"


@dataclass
class Record:
    topic: str
    value: bytes | None
    partition: int = 0
    offset: int = 5
    timestamp: int | None = 1
    key: bytes | None = b"h|Patient/p"
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)


def attendance(episode_id: str, **extra: Any) -> bytes:
    return orjson.dumps({"event_id": "e1", "ehr": "h", "episode_id": episode_id, **extra})


def lookup(ehr: str, episode_id: str) -> bool | None:
    assert ehr == "h"
    return {GENERAL_EPISODE: False, PART2_EPISODE: True}.get(episode_id)


def test_part2_write_back_and_dead_letter_topics_exist() -> None:
    assert NAMES.attendance_part2 == "p.iop.attendance.part2.v1"
    assert NAMES.discharges_part2 == "p.iop.discharges.part2.v1"
    assert NAMES.deadletter_part2 == "p.iop.deadletter.part2.v1"
    assert NAMES.contract(NAMES.attendance_part2) == ("attendance", 1)
    assert NAMES.contract(NAMES.discharges_part2) == ("discharge", 1)
    assert NAMES.contract(NAMES.deadletter_part2) == ("deadletter", 1)
    assert {NAMES.attendance_part2, NAMES.discharges_part2, NAMES.deadletter_part2} <= set(NAMES.all())
    assert NAMES.writeback_topics() == (
        NAMES.attendance,
        NAMES.discharges,
        NAMES.attendance_part2,
        NAMES.discharges_part2,
    )


@pytest.mark.parametrize(
    ("topic", "part2"),
    [
        ("p.iop.episodes.part2.v1", True),
        ("p.iop.referrals.part2.v1", True),
        ("p.iop.attendance.part2.v1", True),
        ("p.iop.discharges.part2.v1", True),
        ("p.iop.deadletter.part2.v1", True),
        ("p.iop.episodes.v1", False),
        ("p.iop.attendance.v1", False),
        ("p.iop.deadletter.v1", False),
    ],
)
def test_which_topics_are_part2(topic: str, part2: bool) -> None:
    assert NAMES.is_part2(topic) is part2


def test_an_event_on_a_part2_topic_is_part2_whatever_its_episode() -> None:
    record = Record(NAMES.attendance_part2, attendance(GENERAL_EPISODE))
    assert part2_events.record_is_part2(NAMES, record, lookup)
    assert part2_events.record_is_part2(NAMES, Record(NAMES.discharges_part2, b"not json"), lookup)


def test_a_part2_episodes_event_on_the_general_topic_is_part2() -> None:
    assert part2_events.record_is_part2(NAMES, Record(NAMES.attendance, attendance(PART2_EPISODE)), lookup)
    assert not part2_events.record_is_part2(
        NAMES, Record(NAMES.attendance, attendance(GENERAL_EPISODE)), lookup
    )


def test_an_event_carrying_a_sud_service_code_is_part2() -> None:
    session = {
        "services": [{"system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "H0015"}]
    }
    record = Record(NAMES.attendance, attendance(GENERAL_EPISODE, session=session))
    assert part2_events.record_is_part2(NAMES, record, lookup)


@pytest.mark.parametrize("value", [None, b"", b"\xff", b"[1]", b'{"episode_id": 3}', attendance("unknown")])
def test_what_cannot_be_tied_to_a_part2_episode_stays_general(value: bytes | None) -> None:
    assert not part2_events.record_is_part2(NAMES, Record(NAMES.attendance, value), lookup)


def test_when_the_store_cannot_tell_the_dead_letter_is_kept_restricted() -> None:
    def broken(ehr: str, episode_id: str) -> bool | None:
        raise OSError("store down")

    assert part2_events.record_is_part2(NAMES, Record(NAMES.attendance, attendance(GENERAL_EPISODE)), broken)


class _Future:
    def get(self, timeout: float | None = None) -> None:
        return None


class _Sent:
    def __init__(self) -> None:
        self.topics: list[str] = []

    def send(self, topic: str, **_: Any) -> _Future:
        self.topics.append(topic)
        return _Future()


def _producer() -> tuple[EventProducer, _Sent]:
    producer = EventProducer.__new__(EventProducer)
    sent = _Sent()
    producer.topics = NAMES
    producer._sleep = lambda _: None
    producer._producer = sent  # type: ignore[assignment]
    return producer, sent


def test_a_part2_dead_letter_goes_only_to_the_part2_dead_letter_topic() -> None:
    producer, sent = _producer()
    record = Record(NAMES.attendance, attendance(PART2_EPISODE))
    producer.dead_letter(record, "unknown episode", contract=("attendance", 1), part2=True)
    producer.dead_letter(
        Record(NAMES.attendance, attendance(GENERAL_EPISODE)), "x", contract=("attendance", 1)
    )
    assert sent.topics == [NAMES.deadletter_part2, NAMES.deadletter]


def test_the_simulator_sends_a_part2_episodes_events_to_the_part2_topics() -> None:
    records = episodes()
    events = simulate(records, since=date(2026, 5, 25), as_of=datetime(2026, 6, 8, tzinfo=UTC))
    part2_ids = {str(r["episode_id"]) for r in records if r["part2"]}
    assert any(e.episode_id in part2_ids for e in events)

    class Producer:
        def __init__(self) -> None:
            self.sent: list[tuple[str, str]] = []

        def publish(self, topic: str, key: str, value: Any, **_: Any) -> None:
            self.sent.append((topic, str(value["episode_id"])))

        def flush(self) -> None:
            return None

    producer = Producer()
    publish_events(producer, events, NAMES)  # type: ignore[arg-type]
    for topic, episode_id in producer.sent:
        assert NAMES.is_part2(topic) == (episode_id in part2_ids)
    assert {t for t, _ in producer.sent} >= {NAMES.attendance}
    assert all(isinstance(e, ProgramEvent) for e in events)

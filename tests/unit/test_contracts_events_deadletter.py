"""The deadletter.v1 envelope keeps a record whole and gives it back for replay."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import errors
from sync import deadletter

FAILED_AT = datetime(2026, 3, 2, 18, 5, tzinfo=timezone(timedelta(hours=-5)))


@dataclass(frozen=True)
class Record:
    topic: str = "p.iop.attendance.v1"
    partition: int = 2
    offset: int = 41
    timestamp: int | None = 1_772_000_000_000
    key: bytes | None = b"general-hospital|Patient/123"
    value: bytes | None = b'{"event_id": "evt-1"}'
    headers: list[tuple[str, bytes | None]] = field(
        default_factory=lambda: [
            ("schema", b"attendance"),
            ("event_id", b"evt-1"),
            ("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
            ("x-extra", None),
        ]
    )


def test_envelope_satisfies_its_contract_and_round_trips() -> None:
    record = Record()
    value = deadletter.envelope(record, "schema_invalid: x", failed_at=FAILED_AT, contract=("attendance", 1))

    assert errors("deadletter", 1, value) == []
    assert value["failed_at"] == "2026-03-02T18:05:00-05:00"
    assert (value["event_id"], value["schema"], value["schema_version"]) == ("evt-1", "attendance", 1)
    assert value["key"] == "general-hospital|Patient/123"
    back = deadletter.original(value)
    assert (back.topic, back.partition, back.offset) == (record.topic, 2, 41)
    assert (back.key, back.value, list(back.headers)) == (record.key, record.value, record.headers)
    assert back.reason == "schema_invalid: x"


@given(
    key=st.none() | st.binary(max_size=40),
    value=st.none() | st.binary(max_size=200),
    headers=st.lists(st.tuples(st.text(max_size=10), st.none() | st.binary(max_size=20)), max_size=4),
)
def test_any_bytes_survive_the_envelope(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]
) -> None:
    record = Record(key=key, value=value, headers=headers)
    envelope = deadletter.envelope(record, "r", failed_at=FAILED_AT, contract=None)
    assert errors("deadletter", 1, envelope) == []
    back = deadletter.original(envelope)
    assert (back.key, back.value, list(back.headers)) == (key, value, headers)


def test_a_key_that_is_not_text_is_kept_as_bytes_only() -> None:
    value = deadletter.envelope(Record(key=b"\xff\xfe"), "r", failed_at=FAILED_AT, contract=None)
    assert value["key"] is None
    assert deadletter.original(value).key == b"\xff\xfe"


def test_dead_letter_headers_say_what_where_and_why() -> None:
    headers = deadletter.headers(Record(), "unknown_episode:\n  6f1c")
    assert headers == [
        ("schema", b"deadletter"),
        ("schema_version", b"1"),
        ("event_id", b"evt-1"),
        ("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
        ("dlq_reason", b"unknown_episode: 6f1c"),
        ("dlq_topic", b"p.iop.attendance.v1"),
        ("dlq_partition", b"2"),
        ("dlq_offset", b"41"),
    ]


def test_long_reasons_are_clipped_to_the_contract() -> None:
    value = deadletter.envelope(Record(), "x" * 10_000, failed_at=FAILED_AT, contract=None)
    assert len(value["reason"]) == deadletter.REASON_MAX
    assert errors("deadletter", 1, value) == []
    header = dict(deadletter.headers(Record(), "x" * 10_000))["dlq_reason"]
    assert len(header.decode()) == deadletter.HEADER_REASON_MAX


def test_an_empty_reason_still_says_something() -> None:
    assert deadletter.clip_reason("  ") == "unspecified"


def test_failed_at_must_carry_its_zone() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        deadletter.envelope(Record(), "r", failed_at=datetime(2026, 3, 2, 18, 5), contract=None)


def test_envelope_contract_rejects_a_missing_origin() -> None:
    value = deadletter.envelope(Record(), "r", failed_at=datetime.now(UTC), contract=None)
    del value["offset"]
    assert errors("deadletter", 1, value) == ["(root): 'offset' is a required property"]


#: kafka-python's default ``max_request_size``: what a producer refuses to send.
PRODUCER_LIMIT = 1_048_576


def test_an_envelope_of_a_huge_value_fits_and_keeps_its_hash_and_origin() -> None:
    import hashlib

    import orjson

    huge = b'{"event_id": "evt-1", "pad": "' + b"x" * 800_000 + b'"}'
    value = deadletter.envelope(Record(value=huge), "schema_invalid: x", failed_at=FAILED_AT, contract=None)

    assert errors("deadletter", 1, value) == []
    assert len(orjson.dumps(value)) <= deadletter.ENVELOPE_MAX < PRODUCER_LIMIT
    assert value["value_base64"] is None
    assert value["omitted"] == ["value"]
    assert value["value_sha256"] == hashlib.sha256(huge).hexdigest()
    assert value["value_bytes"] == len(huge)
    assert (value["topic"], value["partition"], value["offset"]) == ("p.iop.attendance.v1", 2, 41)
    with pytest.raises(ValueError, match="value was not kept"):
        deadletter.original(value)


def test_huge_headers_and_key_are_dropped_too_until_it_fits() -> None:
    import orjson

    record = Record(key=b"k" * 700_000, headers=[("big", b"h" * 700_000)], value=b"v" * 700_000)
    value = deadletter.envelope(record, "r", failed_at=FAILED_AT, contract=None)
    assert errors("deadletter", 1, value) == []
    assert len(orjson.dumps(value)) <= deadletter.ENVELOPE_MAX
    assert value["omitted"] == ["value", "headers", "key"]
    own = deadletter.headers(record, "r")
    assert sum(len(k) + len(v) for k, v in own) < 10_000, "the record's own headers stay small"


def test_a_stub_keeps_only_where_it_came_from_and_why() -> None:
    stub = deadletter.stub(
        Record(), "schema_invalid: x", failed_at=FAILED_AT, cause="MessageSizeTooLargeError"
    )
    assert errors("deadletter", 1, stub) == []
    assert stub["omitted"] == ["value", "headers", "key"]
    assert stub["reason"].startswith("schema_invalid: x (stub: ")
    assert "MessageSizeTooLargeError" in stub["reason"]
    assert stub["value_sha256"] is not None

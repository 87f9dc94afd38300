"""dlq replay sends a dead letter back only to our write-back topics, as its own headers say."""

from __future__ import annotations

from typing import Any

import pytest

from sync import deadletter

ALLOWED = ("p.iop.attendance.v1", "p.iop.discharges.v1")


def envelope(topic: str = "p.iop.attendance.v1") -> dict[str, Any]:
    return {"topic": topic, "partition": 1, "offset": 7}


def own_headers(topic: str = "p.iop.attendance.v1", partition: int = 1, offset: int = 7) -> list[Any]:
    return [
        ("schema", b"deadletter"),
        ("dlq_topic", topic.encode()),
        ("dlq_partition", str(partition).encode()),
        ("dlq_offset", str(offset).encode()),
    ]


def test_a_write_back_dead_letter_goes_back_to_its_topic() -> None:
    assert deadletter.replay_topic(own_headers(), envelope(), ALLOWED) == "p.iop.attendance.v1"


@pytest.mark.parametrize(
    "topic", ["p.iop.episodes.v1", "p.iop.episodes.part2.v1", "elsewhere", "p.iop.deadletter.v1"]
)
def test_never_to_a_topic_we_do_not_consume_for_write_back(topic: str) -> None:
    with pytest.raises(ValueError, match="not one of our write-back topics"):
        deadletter.replay_topic(own_headers(topic), envelope(topic), ALLOWED)


def test_an_envelope_naming_another_topic_than_its_headers_is_refused() -> None:
    with pytest.raises(ValueError, match="dlq_topic header does not match"):
        deadletter.replay_topic(own_headers(), envelope("p.iop.discharges.v1"), ALLOWED)
    with pytest.raises(ValueError, match="dlq_offset header does not match"):
        deadletter.replay_topic(own_headers(offset=8), envelope(), ALLOWED)
    with pytest.raises(ValueError, match="dlq_topic header does not match"):
        deadletter.replay_topic([], envelope(), ALLOWED)

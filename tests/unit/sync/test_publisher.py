"""Topic choice (Part 2 apart), keys, and an outbox drain that never loses a message."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from schemas.topics import Topics
from sync.publisher import drain_outbox, stage_records
from sync.state import SyncState

TOPICS = Topics(prefix="t.")


def _episode(episode_id: str, *, part2: bool = False, patient: str = "p1") -> dict[str, Any]:
    return {"episode_id": episode_id, "patient": {"reference": f"Patient/{patient}"}, "part2": part2}


class RecordingProducer:
    """Records what it was asked to produce; can fail once at a given message (a broker outage)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.fail_at = fail_at
        self.flushes = 0

    def publish(
        self, topic: str, key: str, value: Mapping[str, Any], *, schema: str, version: int, event_id: str
    ) -> None:
        if self.fail_at is not None and len(self.sent) == self.fail_at:
            self.fail_at = None
            raise ConnectionError("broker went away")
        self.sent.append((topic, key, str(value.get("episode_id") or value.get("referral_id"))))

    def flush(self) -> None:
        self.flushes += 1


def test_part2_records_go_only_to_part2_topics() -> None:
    staged = stage_records(
        "general",
        TOPICS,
        episodes=[_episode("e1"), _episode("e2", part2=True)],
        referrals=[{"referral_id": "r1", "patient": {"reference": "Patient/p1"}, "part2": True}],
    )
    assert [(s.record_id, s.topic) for s in staged] == [
        ("e1", "t.iop.episodes.v1"),
        ("e2", "t.iop.episodes.part2.v1"),
        ("r1", "t.iop.referrals.part2.v1"),
    ]
    assert {s.message_key for s in staged} == {"general|Patient/p1"}


def test_a_record_without_a_patient_is_refused() -> None:
    with pytest.raises(ValueError, match="e9 has no Patient reference"):
        stage_records("general", TOPICS, episodes=[{"episode_id": "e9", "patient": {}}])


def test_drain_resends_what_the_broker_did_not_acknowledge(tmp_path: Path) -> None:
    state = SyncState(create_engine(f"sqlite:///{tmp_path / 's.db'}"))
    state.stage_changes(
        "general", stage_records("general", TOPICS, episodes=[_episode("e1"), _episode("e2")])
    )
    producer = RecordingProducer(fail_at=1)
    with pytest.raises(ConnectionError):
        drain_outbox(state, producer)
    assert state.outbox_size() == 2  # nothing acknowledged, nothing forgotten

    assert drain_outbox(state, producer) == 2
    assert [s[2] for s in producer.sent] == ["e1", "e1", "e2"]  # at least once, in order
    assert state.outbox_size() == 0
    assert drain_outbox(state, producer) == 0

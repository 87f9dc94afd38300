"""``dlq list`` and ``dlq replay`` keep 42 CFR Part 2 dead letters out unless ``--part2`` (issue 10,
item 9)."""

from __future__ import annotations

import argparse
import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from schemas.topics import Topics
from sync.commands import dlq
from sync.config import open_store
from sync.state import Staged, SyncState

PREFIX = "t."
NAMES = Topics(PREFIX)


@dataclass
class Record:
    topic: str
    offset: int
    value: bytes
    partition: int = 0
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def envelope(origin: str, body: dict[str, Any], reason: str) -> dict[str, Any]:
    value = orjson.dumps(body)
    return {
        "reason": reason,
        "failed_at": "2026-06-01T00:00:00+00:00",
        "topic": origin,
        "partition": 0,
        "offset": 1,
        "timestamp": None,
        "key": "h|Patient/p",
        "key_base64": base64.b64encode(b"h|Patient/p").decode(),
        "value_base64": base64.b64encode(value).decode(),
        "value_sha256": "0" * 64,
        "value_bytes": len(value),
        "headers": [],
        "event_id": "e",
        "schema": "attendance",
        "schema_version": 1,
        "omitted": [],
    }


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "s.db"}"\n[kafka]\nbootstrap_servers = "127.0.0.1:1"\n'
        f'topic_prefix = "{PREFIX}"\n'
    )
    with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
        SyncState(store.engine).stage_changes(
            "h",
            [
                Staged(
                    kind="episode",
                    record_id="ep-sud",
                    patient_id="p",
                    record={"episode_id": "ep-sud", "part2": True},
                    topic="iop.episodes.part2.v1",
                    message_key="h|Patient/p",
                    schema_name="episode",
                    schema_version=1,
                )
            ],
        )
    return path


@pytest.fixture
def letters(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Record]]:
    general = NAMES.deadletter
    stored = {
        general: [
            Record(
                general,
                0,
                orjson.dumps(envelope(NAMES.attendance, {"ehr": "h", "episode_id": "ep-mh"}, "mh-reason")),
            ),
            # dead-lettered before its episode was known to be Part 2: still hidden from the general list
            Record(
                general,
                1,
                orjson.dumps(envelope(NAMES.attendance, {"ehr": "h", "episode_id": "ep-sud"}, "sud-old")),
            ),
        ],
        NAMES.deadletter_part2: [
            Record(
                NAMES.deadletter_part2,
                0,
                orjson.dumps(
                    envelope(NAMES.attendance_part2, {"ehr": "h", "episode_id": "ep-sud"}, "sud-new")
                ),
            ),
        ],
    }

    def read(settings: Any, topic: str) -> Any:
        for record in stored.get(topic, []):
            yield record, orjson.loads(record.value)

    monkeypatch.setattr(dlq, "_dead_letters", read)
    monkeypatch.setattr(dlq, "_count_records", lambda settings, topic: len(stored.get(topic, [])))
    return stored


def _list(config: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    dlq.register(parser.add_subparsers())
    return parser.parse_args(["dlq", "list", "--config", str(config), *extra])


def test_list_hides_part2_dead_letters_and_says_how_many(
    config: Path, letters: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert dlq.run(_list(config)) == 0
    out = capsys.readouterr().out
    assert "mh-reason" in out
    assert "sud-old" not in out
    assert "sud-new" not in out
    assert "2 dead letters of 42 CFR Part 2 records not shown" in out


def test_list_with_part2_shows_them(config: Path, letters: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert dlq.run(_list(config, "--part2")) == 0
    out = capsys.readouterr().out
    assert all(reason in out for reason in ("mh-reason", "sud-old", "sud-new"))
    assert "not shown" not in out


def test_replay_leaves_part2_dead_letters_alone_unless_asked(
    config: Path, letters: dict[str, list[Record]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for records in letters.values():
        for record in records:
            origin = orjson.loads(record.value)
            record.headers = [
                ("dlq_topic", origin["topic"].encode()),
                ("dlq_partition", b"0"),
                ("dlq_offset", b"1"),
            ]
    sent: list[str] = []

    class Producer:
        def __init__(self, config: Any) -> None:
            pass

        def republish(self, original: Any) -> None:
            sent.append(original.topic)

        def close(self) -> None:
            pass

    monkeypatch.setattr(dlq, "EventProducer", Producer)
    parser = argparse.ArgumentParser()
    dlq.register(parser.add_subparsers())
    assert dlq.run(parser.parse_args(["dlq", "replay", "--config", str(config)])) == 0
    assert sent == [NAMES.attendance]
    sent.clear()
    assert dlq.run(parser.parse_args(["dlq", "replay", "--config", str(config), "--part2"])) == 0
    # the general one was replayed before; the Part 2 ones go back where they came from
    assert sent == [NAMES.attendance, NAMES.attendance_part2]

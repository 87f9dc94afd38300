"""The service consumes the Part 2 write-back topics too, and flags a Part 2 episode's event that came on a
general topic (issue 10 item 9)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from connectors.config import EhrConfig
from sync import service as service_module
from sync.config import Settings, StoreConfig
from sync.kafka import Event
from sync.service import Service
from sync.state import Staged
from sync.writeback import Outcome, WriteBackResult

EHR = "h"


class FakeWriteBack:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def attendance(self, event: Any, *, topic: str, key: str | None = None) -> WriteBackResult:
        self.calls.append(("attendance", topic))
        return WriteBackResult(Outcome.CREATED)

    def discharge(self, event: Any, *, topic: str, key: str | None = None) -> WriteBackResult:
        self.calls.append(("discharge", topic))
        return WriteBackResult(Outcome.DISCHARGED)


def _service(tmp_path: Path) -> tuple[Service, FakeWriteBack]:
    settings = Settings(
        store=StoreConfig(url=f"sqlite:///{tmp_path / 'state.db'}"),
        ehr=(EhrConfig(name=EHR, base_url="http://127.0.0.1:1/fhir"),),
    )
    service = Service(settings)
    fake = FakeWriteBack()
    service._writebacks[EHR] = fake  # type: ignore[assignment]
    for episode_id, part2 in (("ep-sud", True), ("ep-mh", False)):
        service.state.stage_changes(
            EHR,
            [
                Staged(
                    kind="episode",
                    record_id=episode_id,
                    patient_id="p",
                    record={"episode_id": episode_id, "patient": {"reference": "Patient/p"}, "part2": part2},
                    topic="iop.episodes.part2.v1" if part2 else "iop.episodes.v1",
                    message_key=f"{EHR}|Patient/p",
                    schema_name="episode",
                    schema_version=1,
                )
            ],
        )
    return service, fake


def _event(topic: str, episode_id: str, schema: str = "attendance") -> Event:
    value = {"event_id": "e1", "ehr": EHR, "episode_id": episode_id, "patient": {"reference": "Patient/p"}}
    return Event(topic, 0, 1, f"{EHR}|Patient/p", value, schema, 1, "e1", None, ())


def test_part2_topics_are_written_back(tmp_path: Path) -> None:
    service, fake = _service(tmp_path)
    service.handle_event(_event(service.topics.attendance_part2, "ep-sud"))
    service.handle_event(_event(service.topics.discharges_part2, "ep-sud", "discharge"))
    service.handle_event(_event(service.topics.attendance_part2, "ep-mh"))  # a general episode: written
    assert fake.calls == [
        ("attendance", service.topics.attendance_part2),
        ("discharge", service.topics.discharges_part2),
        ("attendance", service.topics.attendance_part2),
    ]
    assert (
        service.metrics.part2_on_general_topic.labels(ehr=EHR, topic=service.topics.attendance)._value.get()
        == 0
    )


def test_a_part2_episodes_event_on_the_general_topic_is_written_and_counted(tmp_path: Path) -> None:
    service, fake = _service(tmp_path)
    service.handle_event(_event(service.topics.attendance, "ep-sud"))
    service.handle_event(_event(service.topics.attendance, "ep-mh"))
    assert fake.calls == [("attendance", service.topics.attendance)] * 2
    counter = service.metrics.part2_on_general_topic.labels(ehr=EHR, topic=service.topics.attendance)
    assert counter._value.get() == 1


def test_the_consumer_subscribes_to_every_write_back_topic_and_routes_part2_dead_letters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, _ = _service(tmp_path)
    seen: dict[str, Any] = {}

    def consumer(config: Any, topics: Any, producer: Any, **kwargs: Any) -> None:
        seen.update(topics=list(topics), **kwargs)

    monkeypatch.setattr(service_module, "EventConsumer", consumer)
    monkeypatch.setattr(Service, "producer", property(lambda self: None))
    service.consumer()
    assert seen["topics"] == list(service.topics.writeback_topics())

    class Record:
        topic = service.topics.attendance
        partition = 0
        offset = 3
        value = b'{"ehr": "h", "episode_id": "ep-sud"}'

    assert seen["part2"](Record())
    Record.value = b'{"ehr": "h", "episode_id": "ep-mh"}'
    assert not seen["part2"](Record())

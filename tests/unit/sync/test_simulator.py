"""The IOP-program simulator: contract-valid, deterministic events that follow the episodes."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.topics import Topics, parse_message_key
from sync.kafka import contract_problems
from sync.simulator import (
    ProgramEvent,
    attendance_events,
    discharge_event,
    discharge_reason,
    publish_events,
    simulate,
)
from tests.unit.sync.demo_records import AS_OF, SINCE, episodes


def _by_patient(patient: str, status: str | None = None) -> dict[str, Any]:
    found = [
        e
        for e in episodes()
        if e["patient"]["reference"] == f"Patient/{patient}" and (status is None or e["status"] == status)
    ]
    assert found, patient
    return found[0]


def test_every_event_satisfies_its_contract() -> None:
    events = simulate(episodes(), since=SINCE, as_of=AS_OF)
    assert events
    for event in events:
        assert contract_problems(event.kind, 1, event.value) == [], event.event_id


def test_one_discharge_per_finished_episode_and_attendance_only_for_active_ones() -> None:
    records = episodes()
    events = simulate(records, since=SINCE, as_of=AS_OF)
    finished = {e["episode_id"] for e in records if e["status"] == "finished" and e["exit"]}
    active = {e["episode_id"] for e in records if e["status"] == "active"}
    assert {e.episode_id for e in events if e.kind == "discharge"} == finished
    assert Counter(e.episode_id for e in events if e.kind == "discharge") == Counter(finished)
    assert {e.episode_id for e in events if e.kind == "attendance"} == active


def test_attendance_follows_the_programs_weekdays_after_since_and_up_to_as_of() -> None:
    episode = _by_patient("pt-active-iop")
    weekdays = {date.fromisoformat(s["date"]).weekday() for s in episode["sessions"][-6:]}
    last = episode["sessions"][-1]
    events = attendance_events(episode, since=SINCE, as_of=AS_OF)
    days = [date.fromisoformat(e.value["session"]["start"][:10]) for e in events]
    assert days, "a week of program sessions"
    assert all(SINCE < d <= AS_OF.date() for d in days)
    assert {d.weekday() for d in days} <= weekdays
    expected = [SINCE + timedelta(days=n) for n in range(1, 8)]
    program_days = [d for d in expected if d.weekday() in weekdays]
    # Every session that ended by as_of is there; one later only as a cancellation made in advance.
    assert [d for d in program_days if d < AS_OF.date()] == [d for d in days if d < AS_OF.date()]
    assert set(days) <= set(program_days)
    late = [e for e, d in zip(events, days, strict=True) if d >= AS_OF.date()]
    assert all(e.value["session"]["status"] == "cancelled" for e in late)
    for event in events:
        session = event.value["session"]
        start = datetime.fromisoformat(session["start"])
        end = datetime.fromisoformat(session["end"])
        assert start.timetz() == datetime.fromisoformat(last["start"]).timetz()
        assert (end - start).total_seconds() / 3600 == last["hours"]
        assert datetime.fromisoformat(event.value["occurred_at"].replace("Z", "+00:00")) <= AS_OF


def test_statuses_rotate_attended_absent_cancelled_and_only_attended_carry_services() -> None:
    episode = _by_patient("pt-active-iop")
    events = attendance_events(episode, since=SINCE, as_of=AS_OF + timedelta(days=21))
    statuses = [e.value["session"]["status"] for e in events]
    assert statuses[:4] == ["attended", "absent", "cancelled", "attended"]
    for event in events:
        session = event.value["session"]
        assert ("services" in session) == (session["status"] == "attended")
        assert session["modality"] in ("in-person", "telehealth")
    attended = [e.value["session"]["services"] for e in events if e.value["session"]["status"] == "attended"]
    assert all(s == [{"system": s[0]["system"], "code": episode["billing"]["hcpcs"]}] for s in attended)


def test_a_session_is_recorded_when_it_ends_and_a_cancellation_the_day_before() -> None:
    episode = _by_patient("pt-active-iop")
    for event in attendance_events(episode, since=SINCE, as_of=AS_OF + timedelta(days=21)):
        session = event.value["session"]
        occurred = event.value["occurred_at"].replace("Z", "+00:00")
        if session["status"] == "cancelled":
            assert datetime.fromisoformat(occurred) < datetime.fromisoformat(session["start"])
        else:
            assert datetime.fromisoformat(occurred) == datetime.fromisoformat(session["end"])


def test_nothing_after_as_of_and_nothing_without_sessions_before_since() -> None:
    episode = _by_patient("pt-active-iop")
    assert (
        attendance_events(episode, since=SINCE, as_of=datetime.combine(SINCE, datetime.min.time(), UTC)) == []
    )
    first = date.fromisoformat(episode["sessions"][0]["date"])
    assert attendance_events(episode, since=first - timedelta(days=1), as_of=AS_OF) == []


def test_line_item_payers_get_group_psychotherapy_as_the_service() -> None:
    episode = _by_patient("pt-active-iop")
    episode["billing"]["hcpcs"] = None
    attended = [
        e
        for e in attendance_events(episode, since=SINCE, as_of=AS_OF)
        if e.value["session"]["status"] == "attended"
    ]
    assert attended
    assert attended[0].value["session"]["services"][0]["code"] == "90853"


@pytest.mark.parametrize(
    ("exit_", "reason"),
    [
        ({"reason": "discharged", "direction": None, "to_level": None}, "completed"),
        ({"reason": "stepped_down", "direction": "step_down", "to_level": "outpatient"}, "stepped_down"),
        ({"reason": "stepped_up", "direction": "step_up", "to_level": "inpatient"}, "stepped_up"),
        ({"reason": "lost_to_follow_up", "direction": None, "to_level": None}, "other"),
        # A record that says discharged but names the next, lower level: the step wins.
        ({"reason": "discharged", "direction": "step_down", "to_level": "iop"}, "stepped_down"),
        ({"reason": "something-new", "direction": None, "to_level": None}, "other"),
    ],
)
def test_discharge_reason_from_the_exit(exit_: dict[str, Any], reason: str) -> None:
    assert discharge_reason(exit_) == reason


def test_discharge_carries_date_next_level_disposition_and_a_summary_without_names() -> None:
    episode = _by_patient("pt-stepdown-inpatient")
    event = discharge_event(episode, as_of=AS_OF)
    discharge = event.value["discharge"]
    assert discharge["date"] == episode["end"]
    assert discharge["reason"] == "stepped_down"
    assert discharge["to_level"] == "outpatient"
    assert discharge["disposition"]["code"] == "home"
    assert str(episode["attendance"]["sessions_attended"]) in discharge["summary"]
    assert "Patient/" not in discharge["summary"]
    assert event.value["patient"] == {"reference": "Patient/pt-stepdown-inpatient"}


def test_an_ehr_disposition_is_kept() -> None:
    episode = _by_patient("pt-stepup-php", "finished")
    episode["exit"] = {**episode["exit"], "disposition": {"system": "urn:x", "code": "01"}}
    assert discharge_event(episode, as_of=AS_OF).value["discharge"]["disposition"] == {
        "system": "urn:x",
        "code": "01",
    }


def test_discharge_is_never_recorded_after_as_of() -> None:
    episode = _by_patient("pt-two-stints")
    as_of = datetime.combine(date.fromisoformat(episode["end"]), datetime.min.time(), UTC) + timedelta(
        hours=1
    )
    assert discharge_event(episode, as_of=as_of).value["occurred_at"] == as_of.isoformat().replace(
        "+00:00", "Z"
    )


def test_cancelled_and_naive_times_are_refused_or_skipped() -> None:
    records = episodes()
    for record in records:
        record["status"] = "cancelled"
    assert simulate(records, since=SINCE, as_of=AS_OF) == []
    with pytest.raises(ValueError, match="time zone"):
        simulate(records, since=SINCE, as_of=AS_OF.replace(tzinfo=None))


@settings(max_examples=25, deadline=None)
@given(st.randoms(use_true_random=False))
def test_same_events_whatever_the_order_and_ids_are_unique(rnd: random.Random) -> None:
    records = episodes()
    expected = simulate(records, since=SINCE, as_of=AS_OF)
    rnd.shuffle(records)
    again = simulate(records, since=SINCE, as_of=AS_OF)
    assert again == expected
    assert len({e.event_id for e in again}) == len(again)
    sessions = [e.value["session"]["id"] for e in again if e.kind == "attendance"]
    assert len(set(sessions)) == len(sessions)


class _Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any], str, int, str]] = []
        self.flushed = 0

    def publish(self, topic: str, key: str, value: Any, *, schema: str, version: int, event_id: str) -> None:
        assert self.flushed == 0, "flush comes last"
        self.sent.append((topic, key, dict(value), schema, version, event_id))

    def flush(self) -> None:
        self.flushed += 1


def test_publish_events_to_their_topics_with_the_patient_key_then_flush() -> None:
    events = simulate(episodes(), since=SINCE, as_of=AS_OF)
    producer = _Producer()
    topics = Topics("demo.")
    assert publish_events(producer, events, topics) == len(events)
    assert producer.flushed == 1
    for event, (topic, key, value, schema, version, event_id) in zip(events, producer.sent, strict=True):
        if event.part2:  # a 42 CFR Part 2 episode's events go to the Part 2 topics (issue 10 item 9)
            assert topic == (
                topics.attendance_part2 if event.kind == "attendance" else topics.discharges_part2
            )
        else:
            assert topic == (topics.attendance if event.kind == "attendance" else topics.discharges)
        assert parse_message_key(key) == ("harbor-general", value["patient"]["reference"][len("Patient/") :])
        assert (schema, version, event_id) == (event.kind, 1, event.event_id)
        assert value == event.value


def test_publish_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        publish_events(_Producer(), [ProgramEvent("billing", {"event_id": "x"})], Topics())

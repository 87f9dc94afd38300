"""A simulated IOP program: what a program would send back about the episodes we published.

The demo and the end-to-end tests need the other side of the loop (``iop.attendance.v1`` and
``iop.discharges.v1``; for a 42 CFR Part 2 episode ``iop.attendance.part2.v1`` and
``iop.discharges.part2.v1``) without a real program, so this module plays one, deterministically:

- **attendance**: an active episode's program keeps meeting after the EHR's data ends. For every day in
  ``(since, as_of]`` on the weekdays the episode met on (up to ``since``), at the time and length of its
  last session, the program reports the session: mostly ``attended``, every fourth from the second on
  ``absent``, every fourth from the third on ``cancelled``; about a third by telehealth. These are sessions
  the EHR has not seen, so writing them back adds care instead of counting an EHR session twice.
- **discharge**: a finished episode with a known exit gets a discharge: the reason from the exit (and its
  direction), the next level when known, a disposition coding, and a short synthetic summary (counts and
  levels only, no names).

Everything is a pure function of the episode records and the two dates: ids (``event_id``, the
program's ``session.id``) are derived from the episode id and the session day, so simulating again
sends the same events, and write-back's ledger treats them as duplicates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Any, Final

from schemas.topics import Topics, message_key
from sync.publisher import EventProducer

ATTENDANCE_SCHEMA: Final = ("attendance", 1)
DISCHARGE_SCHEMA: Final = ("discharge", 1)

HCPCS_SYSTEM: Final = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
CPT_SYSTEM: Final = "http://www.ama-assn.org/go/cpt"
DISPOSITION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/discharge-disposition"

#: Medicare bills line items: group psychotherapy is the typical service of an IOP/PHP day.
_LINE_ITEM_SERVICE: Final = (CPT_SYSTEM, "90853")
_DEFAULT_HOURS: Final[Mapping[str, float]] = {"iop": 3.0, "php": 6.0, "residential": 8.0}

#: exit.reason of the episode record -> discharge.reason of the event.
_REASON_OF_EXIT: Final[Mapping[str, str]] = {
    "discharged": "completed",
    "stepped_down": "stepped_down",
    "stepped_up": "stepped_up",
    # The program stopped seeing the patient without a planned discharge.
    "lost_to_follow_up": "other",
}
#: discharge.reason -> HL7 discharge-disposition code and display, when the EHR gave none.
_DISPOSITION_OF_REASON: Final[Mapping[str, tuple[str, str]]] = {
    "completed": ("home", "Home"),
    "stepped_down": ("home", "Home"),
    "stepped_up": ("psy", "Psychiatric hospital"),
    "left_against_advice": ("aadvice", "Left against advice"),
    "transferred": ("other-hcf", "Other healthcare facility"),
    "other": ("oth", "Other"),
}
_SUMMARY_OF_REASON: Final[Mapping[str, str]] = {
    "completed": "Program completed",
    "stepped_down": "Stepped down",
    "stepped_up": "Stepped up",
    "left_against_advice": "Left against advice",
    "transferred": "Transferred",
    "other": "No sessions attended since the last one; discharged administratively",
}
#: How many of the latest EHR sessions (up to ``since``) give the program's weekdays.
_PATTERN_SESSIONS: Final = 6
#: When the program records a cancellation: this long before the session.
_CANCEL_NOTICE: Final = timedelta(hours=20)


@dataclass(frozen=True)
class ProgramEvent:
    """One event of the simulated program: ``kind`` is ``attendance`` or ``discharge``."""

    kind: str
    value: dict[str, Any]
    #: The episode is a 42 CFR Part 2 record: its events go to the Part 2 topics.
    part2: bool = False

    @property
    def event_id(self) -> str:
        return str(self.value["event_id"])

    @property
    def episode_id(self) -> str:
        return str(self.value["episode_id"])


def simulate(episodes: Iterable[Mapping[str, Any]], *, since: date, as_of: datetime) -> list[ProgramEvent]:
    """The program's events for these episode records: attendance for active episodes' sessions after
    ``since`` up to ``as_of``, a discharge for each finished episode with an exit. Ordered by episode id,
    then occurrence; the same input always gives the same events."""
    if as_of.tzinfo is None:
        raise ValueError("as_of must carry a time zone")
    events: list[ProgramEvent] = []
    for episode in sorted(episodes, key=lambda e: str(e["episode_id"])):
        if episode.get("status") == "active":
            events.extend(attendance_events(episode, since=since, as_of=as_of))
        elif episode.get("status") == "finished" and episode.get("exit"):
            events.append(discharge_event(episode, as_of=as_of))
    return events


def _patient(episode: Mapping[str, Any]) -> dict[str, Any]:
    return {"reference": str(episode["patient"]["reference"])}


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:4], "big")


def _status(index: int) -> str:
    if index % 4 == 1:
        return "absent"
    if index % 4 == 2 and index >= 2:
        return "cancelled"
    return "attended"


def _services(episode: Mapping[str, Any]) -> list[dict[str, str]]:
    """The episode's per-diem code; line-item payers (no per-diem code) get group psychotherapy."""
    hcpcs = (episode.get("billing") or {}).get("hcpcs")
    if hcpcs:
        return [{"system": HCPCS_SYSTEM, "code": str(hcpcs)}]
    system, code = _LINE_ITEM_SERVICE
    return [{"system": system, "code": code}]


def _instant(value: datetime) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def _schedule(sessions: Sequence[Mapping[str, Any]], since: date) -> tuple[set[int], time, tzinfo, float]:
    """Weekdays, start time, zone and hours of the episode's program, from its sessions up to ``since``."""
    known = [s for s in sessions if date.fromisoformat(str(s["date"])) <= since]
    latest = known[-_PATTERN_SESSIONS:]
    weekdays = {date.fromisoformat(str(s["date"])).weekday() for s in latest}
    last = datetime.fromisoformat(str(latest[-1]["start"]).replace("Z", "+00:00"))
    zone = last.tzinfo
    assert zone is not None  # episode.v1 instants carry an offset
    return weekdays, last.timetz().replace(tzinfo=None), zone, float(latest[-1]["hours"])


def attendance_events(episode: Mapping[str, Any], *, since: date, as_of: datetime) -> list[ProgramEvent]:
    """The program's sessions of an active episode on the days after ``since``, those recorded by
    ``as_of`` (a session is recorded when it ends; a cancellation the day before)."""
    sessions = sorted(episode.get("sessions") or [], key=lambda s: (str(s["date"]), str(s["start"])))
    if not any(date.fromisoformat(str(s["date"])) <= since for s in sessions):
        return []
    weekdays, start_time, zone, hours = _schedule(sessions, since)
    if hours <= 0:
        hours = _DEFAULT_HOURS.get(str(episode.get("level")), 3.0)
    episode_id = str(episode["episode_id"])
    events: list[ProgramEvent] = []
    day = since + timedelta(days=1)
    index = 0
    while day <= as_of.date():
        if day.weekday() in weekdays:
            start = datetime.combine(day, start_time, tzinfo=zone)
            end = start + timedelta(hours=hours)
            status = _status(index)
            recorded = start - _CANCEL_NOTICE if status == "cancelled" else end
            if recorded <= as_of:
                events.append(_attendance(episode, episode_id, day, start, end, status, recorded))
            index += 1
        day += timedelta(days=1)
    return events


def _attendance(
    episode: Mapping[str, Any],
    episode_id: str,
    day: date,
    start: datetime,
    end: datetime,
    status: str,
    recorded: datetime,
) -> ProgramEvent:
    session_id = f"sim-{episode_id}-{day:%Y%m%d}"
    modality = "telehealth" if _digest(session_id) % 3 == 0 else "in-person"
    session: dict[str, Any] = {
        "id": session_id,
        "start": _instant(start),
        "end": _instant(end),
        "status": status,
        "modality": modality,
    }
    if status == "attended":
        session["services"] = _services(episode)
    value = {
        "event_id": f"sim-att-{episode_id}-{day:%Y%m%d}",
        "occurred_at": _instant(recorded),
        "ehr": str(episode["ehr"]),
        "episode_id": episode_id,
        "patient": _patient(episode),
        "session": session,
    }
    return ProgramEvent("attendance", value, part2=bool(episode.get("part2")))


def discharge_reason(exit_: Mapping[str, Any]) -> str:
    """The discharge reason of the event for an episode's exit: a step to another level wins (the record
    may say ``discharged`` with a next level), then the exit reason."""
    if exit_.get("to_level"):
        if exit_.get("direction") == "step_down" or exit_.get("reason") == "stepped_down":
            return "stepped_down"
        if exit_.get("direction") == "step_up" or exit_.get("reason") == "stepped_up":
            return "stepped_up"
    return _REASON_OF_EXIT.get(str(exit_.get("reason")), "other")


def _summary(episode: Mapping[str, Any], reason: str, to_level: str | None) -> str:
    attendance = episode.get("attendance") or {}
    weeks = attendance.get("weeks") or []
    met = sum(1 for w in weeks if w.get("meets_minimum"))
    parts = [
        f"{str(episode.get('level', '')).upper()} episode {episode.get('start')} to {episode.get('end')}.",
        f"{attendance.get('sessions_attended', 0)} sessions attended, "
        f"{float(attendance.get('hours_attended', 0)):g} hours; "
        f"{met} of {len(weeks)} weeks met the minimum.",
        _SUMMARY_OF_REASON[reason] + (f" to {to_level}." if to_level else "."),
        "Synthetic summary written by the iop-bridge program simulator.",
    ]
    return " ".join(parts)


def discharge_event(episode: Mapping[str, Any], *, as_of: datetime) -> ProgramEvent:
    """The program's discharge of a finished episode (which must have an ``exit``)."""
    exit_ = episode["exit"]
    episode_id = str(episode["episode_id"])
    reason = discharge_reason(exit_)
    to_level = exit_.get("to_level")
    end = str(episode.get("end") or exit_["at"])
    disposition = exit_.get("disposition")
    if not disposition or not disposition.get("code"):
        code, display = _DISPOSITION_OF_REASON[reason]
        disposition = {"system": DISPOSITION_SYSTEM, "code": code, "display": display}
    # Recorded the evening of the last day, or now when that is still to come.
    recorded = min(datetime.combine(date.fromisoformat(end), time(18, 0), tzinfo=as_of.tzinfo), as_of)
    discharge: dict[str, Any] = {
        "date": end,
        "reason": reason,
        "disposition": {k: str(v) for k, v in disposition.items() if v},
        "summary": _summary(episode, reason, to_level),
    }
    if to_level:
        discharge["to_level"] = str(to_level)
    value = {
        "event_id": f"sim-dis-{episode_id}",
        "occurred_at": _instant(recorded),
        "ehr": str(episode["ehr"]),
        "episode_id": episode_id,
        "patient": _patient(episode),
        "discharge": discharge,
    }
    return ProgramEvent("discharge", value, part2=bool(episode.get("part2")))


def publish_events(producer: EventProducer, events: Iterable[ProgramEvent], topics: Topics) -> int:
    """Produce the events to the attendance and discharge topics (key ``{ehr}|Patient/{id}``), those of
    a Part 2 episode to the Part 2 ones, as a program must; wait for the broker's acknowledgement, and
    return how many were sent."""
    count = 0
    for event in events:
        topic = event_topic(event, topics)
        if event.kind == "attendance":
            schema, version = ATTENDANCE_SCHEMA
        elif event.kind == "discharge":
            schema, version = DISCHARGE_SCHEMA
        else:
            raise ValueError(f"event {event.event_id}: unknown kind {event.kind!r}")
        key = message_key(str(event.value["ehr"]), str(event.value["patient"]["reference"]))
        producer.publish(topic, key, event.value, schema=schema, version=version, event_id=event.event_id)
        count += 1
    producer.flush()
    return count


def event_topic(event: ProgramEvent, topics: Topics) -> str:
    """Where a program sends an event: the Part 2 topic of its kind when its episode record says
    ``part2``, the general one otherwise."""
    if event.kind == "attendance":
        return topics.attendance_part2 if event.part2 else topics.attendance
    if event.kind == "discharge":
        return topics.discharges_part2 if event.part2 else topics.discharges
    raise ValueError(f"event {event.event_id}: unknown kind {event.kind!r}")

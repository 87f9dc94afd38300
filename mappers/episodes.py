"""The IOP episode engine: FHIR resources and an as-of time -> episode.v1 records (episode-model.md).

Pure: no I/O, no wall clock. Resources are grouped by patient first and each patient's Encounters are
sorted once, so the work is linear in the input (plus a sort per patient).

Per patient:
1. Newest versions only; ``entered-in-error`` vanishes; unusable resources become ``Reject``s.
2. Every Encounter gets a level (``levels.classify_encounter``). Grouping hints then apply: sessions
   ``partOf`` a program-level admission Encounter, or linked to an EHR's program-level EpisodeOfCare, take
   its level when their own is none/outpatient, and are grouped by it. Our own EpisodeOfCare
   (``urn:iop-bridge:episode-id``) only lends its level; it never anchors. Our attendance Encounters
   (``urn:iop-bridge:session-id``) count once per session id.
3. Ungrouped sessions form episodes by the gap rule; care at another closing level (a session of another
   program level, residential, inpatient, emergency) or a discharge closes the current episode.
4. Entry (lookback), exit (discharge, step up/down within lookahead, lost to follow-up), status, facts.
5. Identity: ``episode_id`` = uuid5 of ``{ehr}|Patient/{id}|{level}|{anchor}``; earlier ids whose anchor
   changed are emitted once more as ``cancelled`` with ``superseded_by``.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mappers import facts
from mappers.codes import codings
from mappers.fhir import element, is_literal, items, rfc3339
from mappers.index import Collected, PatientResources, Reject, collect, resolve
from mappers.levels import Classifier
from mappers.part2 import is_part2 as has_part2_evidence
from mappers.rules import LEVEL_RANK, NONE_LEVEL, Rules
from mappers.settings import EpisodeSettings
from mappers.visits import GROUPING_STATUSES, Grouping, Visit, read_grouping, read_visit
from schemas.patient_identifiers import allowed

EPISODE_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:iop-bridge:episode")
#: Levels whose care closes a running episode of another level (outpatient is concurrent care).
CLOSING_LEVELS: Final = frozenset({"iop", "php", "residential", "inpatient", "emergency"})
DEFAULT_SETTINGS: Final = EpisodeSettings()

__all__ = [
    "DEFAULT_SETTINGS",
    "EPISODE_NAMESPACE",
    "MappingResult",
    "Reject",
    "anchor_key",
    "episode_id",
    "map_episodes",
    "sort_key",
]


@dataclass
class MappingResult:
    """Episodes (episode.v1 records, sorted), rejects, encounter counts by level, patients seen."""

    episodes: list[dict[str, Any]]
    rejects: list[Reject]
    encounter_levels: dict[str, int]
    patients: int
    explanations: dict[str, list[str]] = field(default_factory=dict)


def episode_id(ehr: str, patient_id: str, level: str, anchor: str) -> str:
    """``uuid5(uuid5(NAMESPACE_URL, "urn:iop-bridge:episode"), "{ehr}|Patient/{id}|{level}|{Type}/{id}")``."""
    return str(uuid.uuid5(EPISODE_NAMESPACE, f"{ehr}|Patient/{patient_id}|{level}|{anchor}"))


def review_after(record: Mapping[str, Any], settings: EpisodeSettings = DEFAULT_SETTINGS) -> date | None:
    """The day (in the EHR's time zone) from which an active episode is finished by time alone.

    The service re-maps the patient on or after that day even when nothing new arrived; None for an
    episode that is not active.
    """
    if record.get("status") != "active":
        return None
    days = [str(s["date"]) for s in items(record, "sessions")] or [str(record["start"])]
    return date.fromisoformat(max(days)) + timedelta(days=settings.max_gap_days + 1)


def anchor_key(record: Mapping[str, Any]) -> str:
    """The ``previous_anchors`` value of a published episode record (see ``map_episodes``)."""
    patient = str((record.get("patient") or {}).get("reference") or "")
    anchor = str((record.get("anchor") or {}).get("reference") or "")
    part2 = "1" if record.get("part2") else "0"
    return f"{patient}|{record.get('level')}|{anchor}|{record.get('start') or ''}|{part2}"


@dataclass
class _Episode:
    level: str
    sessions: list[Visit] = field(default_factory=list)
    hint: Grouping | None = None
    admission: Visit | None = None
    closed: bool = False

    @property
    def hint_key(self) -> str | None:
        if self.hint is not None:
            return self.hint.key
        return self.admission.key if self.admission is not None else None

    def hint_start(self) -> datetime | None:
        if self.hint is not None:
            return self.hint.start
        return self.admission.start if self.admission is not None else None

    def hint_end(self) -> datetime | None:
        if self.hint is not None:
            return self.hint.end
        return self.admission.end if self.admission is not None else None


@dataclass(frozen=True)
class _Previous:
    episode_id: str
    level: str
    anchor: str | None
    start: date | None
    part2: bool
    members: frozenset[str] = frozenset()


class _Patient:
    """Mapping state for one patient."""

    def __init__(
        self,
        holder: PatientResources,
        *,
        collected: Collected,
        ehr: str,
        as_of: datetime,
        zone: tzinfo,
        rules: Rules,
        settings: EpisodeSettings,
        explain: bool,
        rejects: list[Reject],
        classifier: Classifier | None = None,
    ) -> None:
        self.holder = holder
        self.classifier = classifier
        self.shared = collected.shared
        self.by_encounter = collected.by_encounter
        self.ehr = ehr
        self.as_of = as_of
        self.today = as_of.astimezone(zone).date()
        self.zone = zone
        self.rules = rules
        self.settings = settings
        self.explain = explain
        self.rejects = rejects
        self.notes: list[str] = []
        self.visits: list[Visit] = []
        self.unplaced: list[str | None] = []
        self.floating: list[Visit] = []
        self.groupings: dict[str, Grouping] = {}
        self.ours: dict[str, Grouping] = {}
        self.condition_codes: dict[str, list[str]] = {}  # Condition key -> its ICD-10-CM codes
        self.diagnoses: dict[bytes, list[facts.Diagnosis]] = {}  # diagnoses_of's results by their source

    # -- reading ---------------------------------------------------------------------------------------

    def read(self) -> None:
        for encounter in self.holder.of("Encounter"):
            visit = read_visit(
                encounter,
                zone=self.zone,
                context=self.shared,
                shared=self.shared,
                rules=self.rules,
                rejects=self.rejects,
                unplaced=self.unplaced,
                classifier=self.classifier,
            )
            if visit is not None:
                self.visits.append(visit)
        for resource in self.holder.of("EpisodeOfCare"):
            grouping = read_grouping(resource, zone=self.zone, rules=self.rules, rejects=self.rejects)
            if grouping is None:
                continue
            if grouping.ours:
                self.ours[grouping.key] = grouping
                self.ours[f"ours:{grouping.ours}"] = grouping
            elif grouping.status in GROUPING_STATUSES:
                self.groupings[grouping.key] = grouping
        self.visits.sort(key=lambda v: (v.start, v.key))
        self._dedupe_our_sessions()

    def _dedupe_our_sessions(self) -> None:
        """Encounters we wrote for one session (same session id) count once: the attended, earliest one."""
        best: dict[str, Visit] = {}
        for visit in self.visits:
            if visit.session_id is None:
                continue
            current = best.get(visit.session_id)
            if current is None or (not current.attended and visit.attended):
                best[visit.session_id] = visit
        kept = []
        for visit in self.visits:
            if visit.session_id is not None and best[visit.session_id] is not visit:
                self.notes.append(f"{visit.key}: same session as {best[visit.session_id].key}, counted once")
                continue
            kept.append(visit)
        self.visits = kept

    # -- levels and hints ------------------------------------------------------------------------------

    def _majority(self, members: Iterable[Visit]) -> str | None:
        counts: dict[str, int] = {}
        for visit in members:
            if visit.classification.level in self.settings.program_levels:
                level = str(visit.classification.level)
                counts[level] = counts.get(level, 0) + 1
        if not counts:
            return None
        return max(counts, key=lambda level: (counts[level], LEVEL_RANK[level], level))

    def apply_hints(self) -> None:
        by_key = {v.key: v for v in self.visits}
        children: dict[str, list[Visit]] = {}
        for visit in self.visits:
            if visit.part_of and visit.part_of in by_key and visit.part_of != visit.key:
                children.setdefault(visit.part_of, []).append(visit)
        programs = self.settings.program_levels
        # EHR EpisodeOfCare hints: their level from type, else from the sessions linked to them.
        for grouping in self.groupings.values():
            members = [v for v in self.visits if grouping.key in v.episodes_of_care]
            if grouping.level not in programs:
                grouping.level = self._majority(members)
            grouping.members = [v.key for v in members]
        program_hints = {k: g for k, g in self.groupings.items() if g.level in programs}
        # Admission Encounters: not sessions themselves; their level, else their sessions' majority.
        admissions: dict[str, Visit] = {}
        for key, kids in children.items():
            parent = by_key[key]
            parent.is_admission = True
            if parent.level not in programs:
                majority = self._majority(kids)
                if majority is not None and parent.level in (None, "outpatient"):
                    parent.level = majority
            if parent.level in programs:
                admissions[key] = parent
        for visit in self.visits:
            self._hint_visit(visit, program_hints, admissions)

    def _hint_visit(
        self, visit: Visit, hints: Mapping[str, Grouping], admissions: Mapping[str, Visit]
    ) -> None:
        own = visit.level
        pliable = own is None or own == "outpatient"
        for key in visit.episodes_of_care:
            grouping = hints.get(key)
            if grouping is not None and (pliable or own == grouping.level):
                visit.level, visit.hint = grouping.level, grouping.key
                return
        parent = admissions.get(visit.part_of or "")
        if parent is not None and not visit.is_admission:
            for key in parent.episodes_of_care:
                grouping = hints.get(key)
                if (
                    grouping is not None
                    and grouping.level == parent.level
                    and (pliable or own == parent.level)
                ):
                    visit.level, visit.hint = grouping.level, grouping.key
                    return
            if pliable or own == parent.level:
                visit.level, visit.hint = parent.level, parent.key
                return
        if visit.is_admission:
            for key in visit.episodes_of_care:
                grouping = hints.get(key)
                if grouping is not None and grouping.level == visit.level:
                    visit.hint = grouping.key
            return
        if pliable:
            for key in visit.episodes_of_care:
                ours = self.ours.get(key)
                if ours is not None and ours.level in self.settings.program_levels:
                    visit.level = ours.level
                    return

    def adopt_our_sessions(self, built: Sequence[tuple[dict[str, Any], list[str], _Episode]]) -> bool:
        """Our attendance Encounters whose own codes give no level join the episode they name.

        They carry ``episodeOfCare`` = our episode id (a logical reference); when our EpisodeOfCare was
        not pulled back, that id is only known after a first grouping. True when any was adopted.
        """
        level_of = {record["episode_id"]: record["level"] for record, _, _ in built}
        adopted = False
        for visit in self.visits:
            if visit.session_id is None or visit.level is not None or not visit.attended:
                continue
            for key in visit.episodes_of_care:
                level = level_of.get(key[len("ours:") :]) if key.startswith("ours:") else None
                if level is not None:
                    visit.level = level
                    self.notes.append(f"{visit.key}: our attendance Encounter for episode {key[5:]}")
                    adopted = True
                    break
        return adopted

    # -- grouping --------------------------------------------------------------------------------------

    def group(self) -> list[_Episode]:
        programs = self.settings.program_levels
        sessions = [v for v in self.visits if v.attended and not v.is_admission and v.level in programs]
        hinted: dict[str, _Episode] = {}
        for grouping in self.groupings.values():
            if grouping.level in programs and (grouping.members or grouping.start is not None):
                hinted[grouping.key] = _Episode(level=str(grouping.level), hint=grouping)
        for visit in self.visits:
            if visit.is_admission and visit.level in programs and visit.hint is None and visit.attended:
                hinted[visit.key] = _Episode(level=str(visit.level), admission=visit)
        ungrouped: list[Visit] = []
        for visit in sessions:
            episode = hinted.get(visit.hint or "")
            if episode is not None and episode.level == visit.level:
                episode.sessions.append(visit)
            else:
                ungrouped.append(visit)
        loose: list[Visit] = []
        for visit in ungrouped:
            target = self._hint_covering(visit, hinted.values())
            if target is not None:
                target.sessions.append(visit)
                target.sessions.sort(key=lambda v: (v.start, v.key))
            else:
                loose.append(visit)
        episodes = list(hinted.values())
        episodes.extend(self._by_gap(loose, [v for e in hinted.values() for v in e.sessions]))
        return episodes

    def _hint_covering(self, visit: Visit, hinted: Iterable[_Episode]) -> _Episode | None:
        """The hint episode of the same level whose span takes this unlinked session (latest start wins)."""
        best: tuple[datetime, str, _Episode] | None = None
        for episode in hinted:
            if episode.level != visit.level:
                continue
            starts = [m for m in (episode.hint_start(), *(v.start for v in episode.sessions[:1])) if m]
            if not starts or min(starts) > visit.start:
                continue
            end = episode.hint_end()
            if end is not None:
                if visit.start > end:
                    continue
            else:
                last = max([*(v.day for v in episode.sessions), min(starts).astimezone(self.zone).date()])
                if (visit.day - last).days > self.settings.max_gap_days:
                    continue
            candidate = (min(starts), str(episode.hint_key), episode)
            if best is None or candidate[:2] > best[:2]:
                best = candidate
        return best[2] if best else None

    def _by_gap(self, loose: Sequence[Visit], grouped: Sequence[Visit]) -> list[_Episode]:
        closing = [
            v
            for v in self.visits
            if v.attended
            and not v.is_admission
            and v.level in CLOSING_LEVELS
            and v.level not in self.settings.program_levels
        ]
        events: list[tuple[datetime, int, str, Visit]] = [(v.start, 0, v.key, v) for v in closing]
        events.extend((v.start, 0, v.key, v) for v in grouped)
        events.extend((v.start, 1, v.key, v) for v in loose)
        events.sort(key=lambda e: (e[0], e[1], e[2]))
        loose_keys = {v.key for v in loose}
        episodes: list[_Episode] = []
        current: _Episode | None = None
        for _, _, key, visit in events:
            if key not in loose_keys:
                current = None
                continue
            level = str(visit.level)
            if (
                current is not None
                and current.level == level
                and (visit.day - current.sessions[-1].day).days <= self.settings.max_gap_days
            ):
                current.sessions.append(visit)
            else:
                current = _Episode(level=level, sessions=[visit])
                episodes.append(current)
            if visit.disposition is not None:
                current = None
        return episodes

    # -- episode records -------------------------------------------------------------------------------

    def levelled(self) -> list[Visit]:
        return [v for v in self.visits if v.attended and not v.is_admission and v.level is not None]

    def program_services(self) -> list[Visit]:
        """Attended Encounters without a level that carry only program services (G0410/G0411/G0129)."""
        return [
            v
            for v in self.visits
            if v.attended
            and v.level is None
            and not v.is_admission
            and any(code in facts.PROGRAM_SERVICES for code in v.codes)
        ]

    def records(self, episodes: list[_Episode]) -> list[tuple[dict[str, Any], list[str], _Episode]]:
        care = self.levelled()
        care_starts = [v.start for v in care]
        self.floating = self.program_services()
        built = []
        for episode in episodes:
            made = self._record(episode, care, care_starts)
            if made is not None:
                built.append((*made, episode))
        return built

    def _start(self, episode: _Episode) -> datetime | None:
        moments = [m for m in (episode.hint_start(), *(v.start for v in episode.sessions[:1])) if m]
        return min(moments) if moments else None

    def _anchor(self, episode: _Episode) -> str:
        if episode.hint_key is not None:
            return episode.hint_key
        return episode.sessions[0].key

    def _record(
        self, episode: _Episode, care: Sequence[Visit], care_starts: Sequence[datetime]
    ) -> tuple[dict[str, Any], list[str]] | None:
        start = self._start(episode)
        if start is None:
            return None
        level = episode.level
        anchor = self._anchor(episode)
        new_id = episode_id(self.ehr, self.holder.patient_id, level, anchor)
        # The explanation lines; per session only with ``explain`` (they are dropped otherwise).
        lines = (
            [f"{v.key} {v.day.isoformat()}: {v.level} ({_why_level(v)})" for v in episode.sessions]
            if self.explain
            else []
        )
        if episode.admission is not None:
            lines.insert(
                0, f"{episode.admission.key}: program admission ({episode.admission.classification.reason})"
            )
        if episode.hint is not None:
            lines.insert(0, f"{episode.hint.key}: EpisodeOfCare grouping hint, level {level}")
        lines.append(f"anchor {anchor}")
        start_day = start.astimezone(self.zone).date()
        entry = self._entry(episode, start, start_day, care, lines)
        last_moment = episode.sessions[-1].start if episode.sessions else start
        last_day = episode.sessions[-1].day if episode.sessions else start_day
        discharge = self._discharge(episode, new_id, lines)
        exit_record = self._exit(episode, last_moment, last_day, discharge, care, care_starts, lines)
        status = "finished" if exit_record is not None else "active"
        end: str | None = None
        if status == "finished":
            end_day = max(last_day, discharge[0]) if discharge else last_day
            end = end_day.isoformat()
        lines.append(f"status {status} as of {self.today.isoformat()}")
        if self.explain:
            lines.extend(self._around(episode, start_day, date.fromisoformat(end) if end else self.today))
        record = self._facts(episode, new_id, anchor, start_day, end, status, entry, exit_record)
        return record, lines

    def _around(self, episode: _Episode, first: date, last: date) -> list[str]:
        """Why each other Encounter in and around the episode did (not) count: its level and rule."""
        members = {v.key for v in episode.sessions}
        low = first.toordinal() - self.settings.lookback_days
        high = last.toordinal() + self.settings.lookahead_days
        lines = []
        for visit in self.visits:
            if visit.key in members or not low <= visit.day.toordinal() <= high:
                continue
            role = "admission" if visit.is_admission else visit.status if not visit.attended else "care"
            level = visit.level or "none"
            lines.append(
                f"{visit.key} {visit.day.isoformat()}: {role}, {level} ({visit.classification.reason})"
            )
        return lines

    def _entry(
        self, episode: _Episode, start: datetime, start_day: date, care: Sequence[Visit], lines: list[str]
    ) -> dict[str, Any]:
        best: Visit | None = None
        for visit in care:
            if visit.start >= start:
                break
            if visit.level == episode.level:
                continue
            if (start_day - visit.last_day).days > self.settings.lookback_days:
                continue
            if best is None or (visit.last_moment, visit.key) > (best.last_moment, best.key):
                best = visit
        if best is None:
            lines.append(
                f"entry direct: no care at another level in the {self.settings.lookback_days} days before"
            )
            return {"direction": "direct", "from_level": None, "at": None, "encounter": None}
        direction = _direction(str(best.level), episode.level)
        lines.append(f"entry {direction} from {best.level}: {best.key} ({best.classification.reason})")
        return {
            "direction": direction,
            "from_level": best.level,
            "at": best.last_day.isoformat(),
            "encounter": {"reference": best.key},
        }

    def _discharge(
        self, episode: _Episode, new_id: str, lines: list[str]
    ) -> tuple[date, dict[str, Any]] | None:
        found: list[tuple[date, str, dict[str, Any]]] = []
        members = list(episode.sessions)
        if episode.admission is not None:
            members.append(episode.admission)
        for visit in members:
            if visit.disposition is not None:
                found.append((visit.last_day, visit.key, visit.disposition))
        for grouping in (episode.hint, self.ours.get(f"ours:{new_id}")):
            if grouping is not None and grouping.exit_reason not in (None, "discharged"):
                continue  # our own derived exit read back: the evidence decides again, unchanged
            if grouping is not None and grouping.status == "finished" and grouping.end is not None:
                found.append((grouping.end.astimezone(self.zone).date(), grouping.key, {}))
        if not found:
            return None
        day, key, disposition = max(found, key=lambda f: (f[0], bool(f[2]), f[1]))
        if not disposition:
            disposition = next((f[2] for f in sorted(found, reverse=True) if f[2]), {})
        lines.append(f"discharge known from {key} on {day.isoformat()}")
        return day, disposition

    def _exit(
        self,
        episode: _Episode,
        last_moment: datetime,
        last_day: date,
        discharge: tuple[date, dict[str, Any]] | None,
        care: Sequence[Visit],
        care_starts: Sequence[datetime],
        lines: list[str],
    ) -> dict[str, Any] | None:
        next_any: Visit | None = None
        next_closing: Visit | None = None
        for visit in care[bisect.bisect_right(care_starts, last_moment) :]:
            if (visit.day - last_day).days > self.settings.lookahead_days:
                break
            if visit.level == episode.level:
                continue
            next_any = next_any or visit
            if visit.level in CLOSING_LEVELS:
                next_closing = visit
                break
        gap_passed = (self.today - last_day).days > self.settings.max_gap_days
        if discharge is not None:
            reason, target = "discharged", next_any
            at = discharge[0]
        elif next_closing is not None:
            target = next_closing
            reason, at = _stepped(episode.level, str(target.level)), target.day
        elif gap_passed and next_any is not None:
            target = next_any
            reason, at = _stepped(episode.level, str(target.level)), target.day
        elif gap_passed:
            target, reason, at = None, "lost_to_follow_up", last_day
        else:
            lines.append(
                f"no exit: last session {last_day.isoformat()} within {self.settings.max_gap_days} days"
            )
            return None
        lines.append(
            f"exit {reason} on {at.isoformat()}"
            + (f", next care {target.level} {target.key} ({target.classification.reason})" if target else "")
        )
        return {
            "reason": reason,
            "direction": _direction(episode.level, str(target.level)) if target else None,
            "to_level": target.level if target else None,
            "at": at.isoformat(),
            "encounter": {"reference": target.key} if target else None,
            "disposition": (discharge[1] or None) if discharge else None,
        }

    def _facts(
        self,
        episode: _Episode,
        new_id: str,
        anchor: str,
        start_day: date,
        end: str | None,
        status: str,
        entry: dict[str, Any],
        exit_record: dict[str, Any] | None,
    ) -> dict[str, Any]:
        level = episode.level
        sessions = episode.sessions
        last_day = date.fromisoformat(end) if end else max([self.today, start_day])
        sources: list[Mapping[str, Any]] = []
        if episode.admission is not None:
            sources.append(episode.admission.resource)
        sources.extend(v.resource for v in sessions)
        if episode.hint is not None:
            sources.append(episode.hint.resource)
        diagnoses = facts.billing_diagnoses(
            [
                [
                    *facts.diagnoses_of(r, self.shared, self.condition_codes, self.diagnoses),
                    *self._pointing_diagnoses(r),
                ]
                for r in sources
            ]
        )
        principal = diagnoses[0]["code"] if diagnoses else None
        coded = [v.codes for v in sessions]
        if episode.admission is not None:
            coded.append(episode.admission.codes)
        if episode.hint is not None:
            coded.append(codings(episode.hint.resource.get("type")))
        treats_sud = facts.is_substance_use(coded, principal)
        substance_use = level == "iop" and treats_sud
        payer, profile = facts.payer(
            self.holder.of("Coverage"),
            start_day,
            last_day,
            zone=self.zone,
            settings=self.settings,
            shared=self.shared,
        )
        span_end = date.fromisoformat(end) if end else self.today
        extra = [v for v in self.floating if start_day <= v.day <= span_end]
        lines = facts.service_lines(sessions, self.holder.of("Procedure"), self.shared, extra)
        attended_days = len({v.day for v in sessions})
        hours_of = [facts.session_hours(v, self.settings) for v in sessions]
        encounter_keys = {v.key for v in sessions}
        if episode.admission is not None:
            encounter_keys.add(episode.admission.key)
        is_part2 = (
            self.settings.part2_program or treats_sud or self._part2_evidence(sources, extra, encounter_keys)
        )
        return {
            "episode_id": new_id,
            "ehr": self.ehr,
            "patient": self.patient_reference(),
            "level": level,
            "status": status,
            "start": start_day.isoformat(),
            "end": end,
            "anchor": {"reference": anchor},
            "entry": entry,
            "exit": exit_record,
            "sessions": [
                {
                    "reference": v.key,
                    "date": v.day.isoformat(),
                    "start": rfc3339(v.start),
                    "hours": round(hours, 2),
                }
                for v, hours in zip(sessions, hours_of, strict=True)
            ],
            "attendance": facts.attendance(level, sessions, self.settings, hours_of),
            "billing": {
                "condition_code": facts.CONDITION_CODES.get(level),
                "revenue_code": self._revenue_code(level, substance_use, sessions),
                "hcpcs": profile.hcpcs(level, substance_use=substance_use),
                "units": attended_days if profile.per_diem else sum(line["count"] for line in lines),
                "lines": lines,
                "diagnoses": diagnoses,
                "payer": payer,
            },
            "part2": is_part2,
            "security": facts.security_labels(is_part2),
            "referral": self._referral(episode),
            "care_plans": facts.care_plans(
                self.holder.of("CarePlan"),
                start_day,
                last_day,
                zone=self.zone,
                encounters=encounter_keys,
                shared=self.shared,
            ),
            "superseded_by": None,
            "rules_version": self.rules.version,
        }

    def _pointing_diagnoses(self, resource: Mapping[str, Any]) -> list[facts.Diagnosis]:
        """Diagnoses of the Conditions pointing at an Encounter (``Condition.encounter``)."""
        if resource.get("resourceType") != "Encounter":
            return []
        key = f"Encounter/{resource.get('id')}"
        pointing = self.by_encounter.get(key)
        return facts.back_reference_diagnoses(key, pointing, self.condition_codes) if pointing else []

    def _part2_evidence(
        self, sources: Sequence[Mapping[str, Any]], extra: Sequence[Visit], encounters: set[str]
    ) -> bool:
        """Any SUD code or Part 2 label on what feeds the record (``mappers.part2``)."""
        procedures = [
            p for p in self.holder.of("Procedure") if resolve(p.get("encounter"), self.shared) in encounters
        ]
        patient = [self.holder.patient] if self.holder.patient is not None else []
        pointing = [
            c
            for key in sorted(encounters)
            for c in self.by_encounter.get(key, ())
            if c.get("resourceType") == "Condition"
        ]
        return has_part2_evidence(
            [*sources, *(v.resource for v in extra), *procedures, *pointing, *patient], self.shared
        )

    def _revenue_code(self, level: str, substance_use: bool, sessions: Sequence[Visit]) -> str | None:
        if level == "iop":
            return (
                self.settings.iop_substance_use_revenue_code
                if substance_use
                else self.settings.iop_revenue_code
            )
        if level == "php":
            seen = {
                code
                for v in sessions
                for key, code in v.codes
                if key == "revenue" and code in ("0912", "0913")
            }
            return "0912" if seen == {"0912"} else self.settings.php_revenue_code
        if level == "residential":
            return self.settings.residential_revenue_code
        return None

    def _referral(self, episode: _Episode) -> dict[str, str] | None:
        members = ([episode.admission] if episode.admission else []) + list(episode.sessions)
        for visit in members:
            for based_on in items(visit.resource, "basedOn"):
                key = resolve(based_on, self.shared)
                if key and key.startswith("ServiceRequest/") and is_literal(key):
                    return {"reference": key}
        if episode.hint is not None:
            for request in items(episode.hint.resource, "referralRequest"):
                key = resolve(request, self.shared)
                if key and key.startswith("ServiceRequest/") and is_literal(key):
                    return {"reference": key}
        return None

    def patient_reference(self) -> dict[str, Any]:
        identifiers = []
        patient = self.holder.patient
        if patient is not None:
            for identifier in items(patient, "identifier"):
                if (
                    isinstance(identifier, (dict, Mapping))
                    and identifier.get("value")
                    and allowed(identifier, self.settings.patient_identifier_systems)
                ):
                    item = {"value": str(identifier["value"])}
                    if identifier.get("system"):
                        item["system"] = str(identifier["system"])
                    identifiers.append(item)
        return {"reference": f"Patient/{self.holder.patient_id}", "identifier": identifiers}

    # -- identity --------------------------------------------------------------------------------------

    def superseded(
        self, built: list[tuple[dict[str, Any], list[str], _Episode]], previous: Sequence[_Previous]
    ) -> list[tuple[dict[str, Any], list[str]]]:
        current = {record["episode_id"] for record, _, _ in built}
        candidates = list(previous)
        for key, grouping in sorted(self.ours.items()):
            if not key.startswith("ours:") or grouping.ours in current:
                continue
            members = frozenset(
                v.key for v in self.visits if key in v.episodes_of_care or grouping.key in v.episodes_of_care
            )
            candidates.append(
                _Previous(
                    episode_id=str(grouping.ours),
                    level=str(grouping.level or ""),
                    anchor=None,
                    start=grouping.start.astimezone(self.zone).date() if grouping.start else None,
                    part2=bool(element(grouping.resource, "meta").get("security")),
                    members=members,
                )
            )
        out: list[tuple[dict[str, Any], list[str]]] = []
        emitted: set[str] = set()
        for old in sorted(candidates, key=lambda p: p.episode_id):
            if old.episode_id in current or old.episode_id in emitted:
                continue
            emitted.add(old.episode_id)
            target = self._successor(old, built)
            record = self._cancelled(old, target)
            why = f"superseded by {target['episode_id']}" if target else "its evidence is gone; no successor"
            out.append((record, [f"earlier episode {old.episode_id} cancelled: {why}"]))
        return out

    def _successor(
        self, old: _Previous, built: list[tuple[dict[str, Any], list[str], _Episode]]
    ) -> dict[str, Any] | None:
        same_level = [(r, e) for r, _, e in built if not old.level or r["level"] == old.level]
        for record, episode in same_level:
            keys = {v.key for v in episode.sessions} | {episode.hint_key}
            if old.anchor in keys or (old.members & keys):
                return record
        if old.start is not None:
            for record, _ in same_level:
                end = record["end"] or self.today.isoformat()
                if record["start"] <= old.start.isoformat() <= end:
                    return record
            later = [r for r, _ in same_level if r["start"] >= old.start.isoformat()]
            if later:
                return min(later, key=lambda r: (r["start"], r["episode_id"]))
        return None

    def _cancelled(self, old: _Previous, target: dict[str, Any] | None) -> dict[str, Any]:
        level = old.level or (target["level"] if target else "iop")
        part2 = old.part2 or bool(target and target["part2"]) or self.settings.part2_program
        if target is None and not old.part2:
            part2 = True  # nothing tells us it was not Part 2: keep the cancellation on the restricted topic
        start = old.start.isoformat() if old.start else (target["start"] if target else None)
        return {
            "episode_id": old.episode_id,
            "ehr": self.ehr,
            "patient": self.patient_reference(),
            "level": level,
            "status": "cancelled",
            "start": start,
            "end": None,
            "anchor": {"reference": old.anchor} if old.anchor else None,
            "entry": None,
            "exit": None,
            "sessions": [],
            "attendance": {"sessions_attended": 0, "hours_attended": 0.0, "weeks": []},
            "billing": {
                "condition_code": facts.CONDITION_CODES.get(level),
                "revenue_code": None,
                "hcpcs": None,
                "units": 0,
                "lines": [],
                "diagnoses": [],
                "payer": None,
            },
            "part2": part2,
            "security": facts.security_labels(part2),
            "referral": None,
            "care_plans": [],
            "superseded_by": target["episode_id"] if target else None,
            "rules_version": self.rules.version,
        }


def _why_level(visit: Visit) -> str:
    """Why a session has its level: its own rule, or the admission / EpisodeOfCare that groups it."""
    if visit.classification.level is None and visit.hint is not None:
        return f"from {visit.hint}, which groups it; {visit.classification.reason} on its own"
    return visit.classification.reason


def _direction(from_level: str, to_level: str) -> str:
    a, b = LEVEL_RANK[from_level], LEVEL_RANK[to_level]
    if b > a:
        return "step_up"
    if b < a:
        return "step_down"
    return "lateral"


def _stepped(level: str, target: str) -> str:
    return "stepped_up" if LEVEL_RANK[target] > LEVEL_RANK[level] else "stepped_down"


def _previous_by_patient(previous_anchors: Mapping[str, str] | None) -> dict[str, list[_Previous]]:
    by_patient: dict[str, list[_Previous]] = {}
    for old_id, value in (previous_anchors or {}).items():
        parts = str(value).split("|")
        patient = parts[0] if parts else ""
        if not patient.startswith("Patient/"):
            continue
        level = parts[1] if len(parts) > 1 and parts[1] in LEVEL_RANK else ""
        anchor = parts[2] if len(parts) > 2 and parts[2] else None
        start: date | None = None
        if len(parts) > 3 and parts[3]:
            try:
                start = date.fromisoformat(parts[3])
            except ValueError:
                start = None
        part2 = len(parts) > 4 and parts[4] == "1"
        by_patient.setdefault(patient[len("Patient/") :], []).append(
            _Previous(str(old_id), level, anchor, start, part2)
        )
    return by_patient


def _map_patient(
    patient: _Patient, previous: Sequence[_Previous]
) -> tuple[list[tuple[dict[str, Any], list[str]]], list[str | None]]:
    """One patient's episode records (with explanation lines) and the levels of their Encounters."""
    patient.read()
    patient.apply_hints()
    counted = [*(v.level for v in patient.visits), *patient.unplaced]
    built = patient.records(patient.group())
    if patient.adopt_our_sessions(built):
        built = patient.records(patient.group())
    mapped = [(record, [*lines, *patient.notes]) for record, lines, _ in built]
    mapped.extend(patient.superseded(built, previous))
    return mapped, counted


def _zone(timezone: str) -> tzinfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {timezone!r}") from exc


def sort_key(record: Mapping[str, Any]) -> tuple[str, str, int, str]:
    """The order of ``MappingResult.episodes``: patient, start, level rank, episode id."""
    patient = str(record["patient"]["reference"])
    return (
        patient,
        str(record["start"] or ""),
        LEVEL_RANK.get(str(record["level"]), 0),
        str(record["episode_id"]),
    )


def map_episodes(
    resources: Iterable[Mapping[str, Any]],
    *,
    ehr: str,
    as_of: datetime,
    rules: Rules,
    settings: EpisodeSettings = DEFAULT_SETTINGS,
    timezone: str = "UTC",
    explain: bool = False,
    previous_anchors: Mapping[str, str] | None = None,
) -> MappingResult:
    """Map FHIR R4 resources (dicts) of one EHR to episode.v1 records, as of ``as_of`` (aware datetime).

    Pure: the as-of time is an input, nothing reads the clock or a file. The same resources in any order
    give the same records; a patient's episodes depend only on that patient's resources (plus shared
    Locations/Conditions/Organizations).

    ``previous_anchors`` lets the service keep identities stable across runs: it maps each episode id it
    published earlier (and has not published as cancelled) to ``anchor_key(record)`` of that record, i.e.
    ``"Patient/{id}|{level}|{Type}/{id}|{start}|{0|1 part2}"``. Keep the last published record per id in
    the store, and pass ``{r["episode_id"]: anchor_key(r) for r in published if r["status"] != "cancelled"}``
    for the patients being mapped. An earlier id that this run no longer produces (its anchor changed, e.g.
    an admission Encounter or EpisodeOfCare arrived after the sessions) is emitted once more with status
    ``cancelled`` and ``superseded_by`` = the episode now holding its anchor (else the episode of the same
    level covering its start). Ids of patients absent from ``resources`` are left alone. Our own
    EpisodeOfCare resources (``urn:iop-bridge:episode-id``) pulled back from the EHR act the same way, so
    a stale id is cancelled even without the store. ``superseded_by`` is null only when nothing replaces
    the old episode (all its evidence was entered-in-error).

    ``explanations`` (only with ``explain``) maps episode ids to lines: each session's level and rule,
    the anchor, why the episode began (entry) and ended (exit), its status.
    """
    if as_of.tzinfo is None or as_of.utcoffset() is None:
        raise ValueError("as_of must be timezone-aware")
    zone = _zone(timezone)
    with _cyclic_gc_paused():
        return _map_all(
            resources,
            ehr=ehr,
            as_of=as_of,
            rules=rules,
            settings=settings,
            zone=zone,
            explain=explain,
            previous_anchors=previous_anchors,
        )


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for one mapping (as it was before, afterwards).

    Mapping allocates hundreds of thousands of small dicts, tuples and records that reference counting
    frees; every collection the allocations trigger would also walk all the caller's parsed resources
    (measured: ~35% of map_episodes' CPU on 100k Encounters). The engine makes no reference cycles of
    its own that need the collector meanwhile; it runs again as soon as it is re-enabled.
    """
    enabled = gc.isenabled()
    if enabled:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _map_all(
    resources: Iterable[Mapping[str, Any]],
    *,
    ehr: str,
    as_of: datetime,
    rules: Rules,
    settings: EpisodeSettings,
    zone: tzinfo,
    explain: bool,
    previous_anchors: Mapping[str, str] | None,
) -> MappingResult:
    collected = collect(resources)
    rejects = list(collected.rejects)
    previous = _previous_by_patient(previous_anchors)
    episodes: list[dict[str, Any]] = []
    explanations: dict[str, list[str]] = {}
    levels: dict[str, int] = {}
    classifier = Classifier(collected.shared, rules, collected.by_encounter)
    for patient_id in sorted(collected.patients):
        own_rejects: list[Reject] = []
        try:
            mapped, counted = _map_patient(
                _Patient(
                    collected.patients[patient_id],
                    collected=collected,
                    ehr=ehr,
                    as_of=as_of,
                    zone=zone,
                    rules=rules,
                    settings=settings,
                    explain=explain,
                    rejects=own_rejects,
                    classifier=classifier,
                ),
                previous.get(patient_id, ()),
            )
        except Exception as exc:  # one patient's unforeseen data must not stop the run: report it
            reason = f"internal error mapping this patient's resources ({type(exc).__name__}); none mapped"
            rejects.append(Reject("Patient", patient_id, reason))
            continue
        rejects.extend(own_rejects)
        for level in counted:
            name = level or NONE_LEVEL
            levels[name] = levels.get(name, 0) + 1
        for record, lines in mapped:
            episodes.append(record)
            if explain:
                explanations[record["episode_id"]] = lines
    episodes.sort(key=sort_key)
    rejects.sort(key=lambda r: (r.resource_type, r.id or "", r.reason))
    return MappingResult(
        episodes=episodes,
        rejects=rejects,
        encounter_levels=dict(sorted(levels.items())),
        patients=len(collected.patients),
        explanations=explanations,
    )

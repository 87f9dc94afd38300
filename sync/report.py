"""The demo's report: what iop-bridge made of each patient's care, for a person to read.

- ``render_report(...)`` -> one self-contained HTML file (inline CSS and SVG; no scripts, fonts or other
  URLs, so it opens offline and from any folder): per patient a timeline of the levels of care with the
  step-up and step-down transitions drawn as labelled arrows, per episode the weekly hours against the
  level's minimum (9 h IOP, 20 h PHP) and a billing table; then referrals, write-backs and dead letters.
- ``render_text(...)`` -> the same facts as short plain text for the terminal.

It is a local file for the user, but still shows no names: patients appear by their FHIR reference.
42 CFR Part 2 records (episodes and referrals flagged ``part2``, the write-backs of those episodes, the
dead letters marked ``part2``) are left out unless ``include_part2``; the report then says how many
were left out, so a general reader learns that there are some, never what they are.
Everything is a pure function of its arguments (``as_of`` included), so the same data gives the same
bytes.
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Final

#: Levels from least to most intensive: the y axis of the timeline.
LEVELS: Final = ("outpatient", "iop", "php", "residential", "inpatient", "emergency")
LEVEL_RANK: Final = {level: rank for rank, level in enumerate(LEVELS)}
LEVEL_LABEL: Final = {
    "outpatient": "Outpatient",
    "iop": "IOP",
    "php": "PHP",
    "residential": "Residential",
    "inpatient": "Inpatient",
    "emergency": "Emergency",
}
#: Weekly hours a week must reach to meet the level's minimum (episode-model.md).
WEEKLY_MINIMUM: Final = {"iop": 9.0, "php": 20.0}

_EXIT_TEXT: Final = {
    "discharged": "discharged",
    "stepped_up": "stepped up",
    "stepped_down": "stepped down",
    "lost_to_follow_up": "lost to follow-up",
}
_DIRECTION_TEXT: Final = {
    "step_up": "step up",
    "step_down": "step down",
    "lateral": "lateral",
    "direct": "direct",
}


@dataclass(frozen=True)
class WriteBackRow:
    """One simulated event and what write-back did with it in this run."""

    event_id: str
    kind: str  # attendance | discharge
    episode_id: str
    detail: str  # "attended, telehealth" / "stepped_down"
    outcome: str  # created, discharged, voided, ... or "duplicate" when the ledger already had it
    references: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeadLetterRow:
    """An event write-back could not process, with the reason (no PHI)."""

    event_id: str
    topic: str
    reason: str
    #: The dead letter of a 42 CFR Part 2 record (on the Part 2 dead-letter topic).
    part2: bool = False


@dataclass(frozen=True)
class _Shown:
    """What a report shows, and how many 42 CFR Part 2 records it left out."""

    episodes: Sequence[Mapping[str, Any]]
    referrals: Sequence[Mapping[str, Any]]
    writebacks: Sequence[WriteBackRow]
    dead_letters: Sequence[DeadLetterRow]
    hidden: tuple[int, int, int, int] = (0, 0, 0, 0)

    def hidden_text(self) -> str | None:
        """The line that says what was left out; None when nothing was."""
        if not any(self.hidden):
            return None
        episodes, referrals, writebacks, dead = self.hidden
        return (
            f"42 CFR Part 2 records not shown: {episodes} episodes, {referrals} referrals, "
            f"{writebacks} write-backs, {dead} dead letters (include them with --part2)"
        )


def _shown(
    episodes: Sequence[Mapping[str, Any]],
    referrals: Sequence[Mapping[str, Any]],
    writebacks: Sequence[WriteBackRow],
    dead_letters: Sequence[DeadLetterRow],
    include_part2: bool,
) -> _Shown:
    if include_part2:
        return _Shown(episodes, referrals, writebacks, dead_letters)
    part2_ids = {str(e["episode_id"]) for e in episodes if e.get("part2")}
    kept = _Shown(
        [e for e in episodes if not e.get("part2")],
        [r for r in referrals if not r.get("part2")],
        [w for w in writebacks if w.episode_id not in part2_ids],
        [d for d in dead_letters if not d.part2],
    )
    hidden = (
        len(episodes) - len(kept.episodes),
        len(referrals) - len(kept.referrals),
        len(writebacks) - len(kept.writebacks),
        len(dead_letters) - len(kept.dead_letters),
    )
    return _Shown(kept.episodes, kept.referrals, kept.writebacks, kept.dead_letters, hidden)


# -- shared helpers ---------------------------------------------------------------------------------


def _day(value: Any) -> date | None:
    return date.fromisoformat(str(value)) if value else None


def _patient_of(record: Mapping[str, Any]) -> str:
    return str((record.get("patient") or {}).get("reference") or "Patient/?")


def _by_patient(episodes: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    grouped: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for episode in episodes:
        grouped[_patient_of(episode)].append(episode)
    for items in grouped.values():
        items.sort(key=lambda e: (str(e.get("start") or ""), str(e["episode_id"])))
    return dict(sorted(grouped.items()))


def _level(value: Any) -> str:
    return LEVEL_LABEL.get(str(value), str(value))


def entry_text(episode: Mapping[str, Any]) -> str:
    entry = episode.get("entry") or {}
    direction = str(entry.get("direction") or "direct")
    if entry.get("from_level"):
        when = f" (last care {entry['at']})" if entry.get("at") else ""
        return f"{_DIRECTION_TEXT.get(direction, direction)} from {_level(entry['from_level'])}{when}"
    return "direct admission"


def exit_text(episode: Mapping[str, Any]) -> str:
    exit_ = episode.get("exit")
    if not exit_:
        return "ongoing" if episode.get("status") == "active" else "none"
    text = _EXIT_TEXT.get(str(exit_.get("reason")), str(exit_.get("reason")))
    if exit_.get("to_level"):
        text += f" to {_level(exit_['to_level'])}"
        if exit_.get("at"):
            text += f" (next care {exit_['at']})"
    disposition = exit_.get("disposition") or {}
    if disposition.get("code"):
        text += f", disposition {disposition['code']}"
    return text


def _diagnoses(billing: Mapping[str, Any]) -> str:
    codes = [
        str(d.get("code")) + (" (principal)" if d.get("principal") else "")
        for d in billing.get("diagnoses") or []
    ]
    return ", ".join(codes) or "none"


def _payer(billing: Mapping[str, Any]) -> str:
    payer = billing.get("payer")
    if not payer:
        return "none"
    payor = payer.get("payor") or {}
    who = payor.get("display") or payor.get("reference") or ""
    return f"{payer.get('profile')}" + (f" ({who})" if who else "")


def _cancelled_text(episode: Mapping[str, Any]) -> str:
    successor = episode.get("superseded_by")
    return f"{_level(episode.get('level'))} cancelled: " + (
        f"superseded by episode {successor}" if successor else "no longer an episode"
    )


def _hours(value: Any) -> str:
    return f"{float(value or 0):g}"


# -- text -------------------------------------------------------------------------------------------


def render_text(
    episodes: Sequence[Mapping[str, Any]],
    referrals: Sequence[Mapping[str, Any]],
    writebacks: Sequence[WriteBackRow],
    dead_letters: Sequence[DeadLetterRow],
    *,
    as_of: datetime,
    include_part2: bool = False,
) -> str:
    """The report as plain text for the terminal (42 CFR Part 2 records only with ``include_part2``)."""
    shown = _shown(episodes, referrals, writebacks, dead_letters, include_part2)
    episodes, referrals, writebacks, dead_letters = (
        shown.episodes,
        shown.referrals,
        shown.writebacks,
        shown.dead_letters,
    )
    lines = [f"iop-bridge report as of {as_of.isoformat(timespec='seconds')}", ""]
    if (note := shown.hidden_text()) is not None:
        lines += [note, ""]
    by_episode: dict[str, list[WriteBackRow]] = defaultdict(list)
    for row in writebacks:
        by_episode[row.episode_id].append(row)
    for patient, items in _by_patient(episodes).items():
        lines.append(patient)
        for episode in items:
            if episode.get("status") == "cancelled":
                lines.append(f"  {_cancelled_text(episode)}  episode {episode['episode_id']}")
                continue
            billing = episode.get("billing") or {}
            attendance = episode.get("attendance") or {}
            weeks = attendance.get("weeks") or []
            minimum = WEEKLY_MINIMUM.get(str(episode.get("level")))
            badge = " [42 CFR Part 2]" if episode.get("part2") else ""
            lines.append(
                f"  {_level(episode.get('level'))} {episode.get('status')} "
                f"{episode.get('start') or '?'} -> {episode.get('end') or '…'}{badge}  "
                f"episode {episode['episode_id']}"
            )
            lines.append(f"    entry: {entry_text(episode)}; exit: {exit_text(episode)}")
            lines.append(
                f"    sessions: {attendance.get('sessions_attended', 0)} attended, "
                f"{_hours(attendance.get('hours_attended'))} h"
            )
            if weeks:
                met = sum(1 for w in weeks if w.get("meets_minimum"))
                hours = " ".join(_hours(w.get("hours")) for w in weeks)
                target = f" (minimum {minimum:g} h)" if minimum else ""
                lines.append(f"    weekly hours{target}: {hours}; {met} of {len(weeks)} weeks met")
            lines.append(
                f"    billing: condition {billing.get('condition_code') or '-'}, "
                f"revenue {billing.get('revenue_code') or '-'}, HCPCS {billing.get('hcpcs') or '-'}, "
                f"units {billing.get('units', 0)}, dx {_diagnoses(billing)}, payer {_payer(billing)}"
            )
            for row in by_episode.get(str(episode["episode_id"]), []):
                lines.append(f"    write-back: {row.kind} {row.detail}: {row.outcome}")
        lines.append("")
    lines.append(f"referrals: {len(referrals)}")
    for referral in sorted(referrals, key=lambda r: (_patient_of(r), str(r.get("referral_id")))):
        badge = " [42 CFR Part 2]" if referral.get("part2") else ""
        target = (referral.get("target") or {}).get("level") or "?"
        lines.append(
            f"  {_patient_of(referral)} -> {_level(target)}: {referral.get('state')} "
            f"(authored {referral.get('authored') or '?'}){badge}"
        )
    written = [r for r in writebacks if r.outcome != "duplicate"]
    duplicates = len(writebacks) - len(written)
    lines.append("")
    lines.append(f"write-backs: {len(written)} written, {duplicates} duplicates (already in the ledger)")
    lines.append(f"dead letters: {len(dead_letters)}")
    for dead in dead_letters:
        lines.append(f"  {dead.event_id} ({dead.topic}): {dead.reason}")
    return "\n".join(lines) + "\n"


# -- HTML -------------------------------------------------------------------------------------------

_CSS: Final = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;
background:#f5f7fa}
header{background:#1f3b57;color:#fff;padding:16px 24px}
header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;opacity:.85}
main{padding:16px 24px;max-width:1200px}
section.patient{background:#fff;border:1px solid #d8dee6;border-radius:6px;margin:0 0 20px;padding:12px 16px}
section.patient h2{font-size:16px;margin:0 0 8px}
article.episode{border-top:1px solid #e4e8ee;padding:10px 0}
article.episode h3{font-size:14px;margin:0 0 4px}
.badge{display:inline-block;border-radius:3px;padding:0 6px;font-size:12px;margin-left:6px;vertical-align:1px}
.part2{background:#8b1e3f;color:#fff}
.active{background:#1d7a46;color:#fff}
.finished{background:#5b6675;color:#fff}
.cancelled{background:#b26b00;color:#fff}
.facts{margin:2px 0 8px;color:#3b4656}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{border:1px solid #d8dee6;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef2f6}
.charts{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
svg text{font-family:system-ui,sans-serif}
.ok{color:#1d7a46}.bad{color:#a42e2e}
code{font-size:12px}
ol.transitions{margin:0 0 6px;padding-left:28px;font-size:13px}
ol.transitions li.step-up::marker{color:#a42e2e}
ol.transitions li.step-down::marker{color:#1d7a46}
"""

_TIMELINE_WIDTH: Final = 900
_ROW: Final = 30
_TOP: Final = 24
_LEFT: Final = 96
_RIGHT: Final = 24
_LEVEL_COLOUR: Final = {
    "outpatient": "#7fa7c9",
    "iop": "#2f7dbf",
    "php": "#7a4fb3",
    "residential": "#b3682f",
    "inpatient": "#b33a3a",
    "emergency": "#d62f2f",
}


_PART2_BADGE: Final = '<span class="badge part2">42 CFR Part 2</span>'


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class _Transition:
    from_day: date
    from_level: str
    to_day: date
    to_level: str
    label: str


def _transitions(items: Sequence[Mapping[str, Any]]) -> list[_Transition]:
    """Step-ups and step-downs of one patient: each episode's exit to another level, and each entry from
    another level that no earlier episode's exit already drew."""
    found: list[_Transition] = []
    for episode in items:
        if episode.get("status") == "cancelled":
            continue
        level = str(episode.get("level"))
        end = _day(episode.get("end"))
        exit_ = episode.get("exit") or {}
        if end and exit_.get("to_level") and str(exit_["to_level"]) != level:
            to_level = str(exit_["to_level"])
            to_day = _day(exit_.get("at")) or end
            verb = _DIRECTION_TEXT.get(str(exit_.get("direction")), "transition")
            found.append(_Transition(end, level, to_day, to_level, f"{verb} to {_level(to_level)}"))
    for episode in items:
        if episode.get("status") == "cancelled":
            continue
        level = str(episode.get("level"))
        start = _day(episode.get("start"))
        entry = episode.get("entry") or {}
        from_level = entry.get("from_level")
        if not start or not from_level or str(from_level) == level:
            continue
        drawn = any(t.to_level == level and t.from_level == from_level and t.to_day == start for t in found)
        if drawn:
            continue
        from_day = _day(entry.get("at")) or start
        verb = _DIRECTION_TEXT.get(str(entry.get("direction")), "transition")
        found.append(
            _Transition(from_day, str(from_level), start, level, f"{verb} from {_level(from_level)}")
        )
    return sorted(found, key=lambda t: (t.from_day, t.to_day, t.from_level, t.to_level))


def _timeline(patient: str, items: Sequence[Mapping[str, Any]], as_of: date, uid: str) -> str:
    transitions = _transitions(items)
    days: list[date] = [as_of]
    for episode in items:
        if episode.get("status") == "cancelled":
            continue
        for key in ("start", "end"):
            if _day(episode.get(key)):
                days.append(_day(episode.get(key)))  # type: ignore[arg-type]
    for t in transitions:
        days.extend((t.from_day, t.to_day))
    first = min(days) - timedelta(days=7)
    last = max(days) + timedelta(days=7)
    span = max((last - first).days, 1)
    plot = _TIMELINE_WIDTH - _LEFT - _RIGHT
    height = _TOP + _ROW * len(LEVELS) + 28

    def x(day: date) -> float:
        return round(_LEFT + plot * (day - first).days / span, 1)

    def y(level: str) -> float:
        return float(_TOP + _ROW * (len(LEVELS) - 1 - LEVEL_RANK.get(level, 0)) + _ROW / 2)

    parts = [
        f'<svg class="timeline" role="img" width="{_TIMELINE_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_TIMELINE_WIDTH} {height}" aria-label="levels of care of {_e(patient)} over time">',
        "<defs>"
        f'<marker id="arrow-{uid}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" fill="#1d2430"/></marker>'
        "</defs>",
    ]
    for level in LEVELS:
        row_y = y(level)
        parts.append(
            f'<line x1="{_LEFT}" y1="{row_y}" x2="{_TIMELINE_WIDTH - _RIGHT}" y2="{row_y}" '
            'stroke="#e4e8ee" stroke-dasharray="2 3"/>'
            f'<text x="{_LEFT - 8}" y="{row_y + 4}" text-anchor="end" font-size="12" fill="#3b4656">'
            f"{LEVEL_LABEL[level]}</text>"
        )
    # Month ticks along the bottom.
    tick = date(first.year, first.month, 1)
    axis_y = _TOP + _ROW * len(LEVELS) + 4
    while tick <= last:
        if tick >= first:
            parts.append(
                f'<line x1="{x(tick)}" y1="{_TOP}" x2="{x(tick)}" y2="{axis_y}" stroke="#eef2f6"/>'
                f'<text x="{x(tick)}" y="{axis_y + 14}" font-size="11" text-anchor="middle" '
                f'fill="#5b6675">{tick:%Y-%m}</text>'
            )
        tick = date(tick.year + tick.month // 12, tick.month % 12 + 1, 1)
    parts.append(
        f'<line x1="{x(as_of)}" y1="{_TOP - 6}" x2="{x(as_of)}" y2="{axis_y}" stroke="#1d7a46" '
        f'stroke-dasharray="4 3"/><text x="{x(as_of)}" y="{_TOP - 10}" font-size="11" '
        f'text-anchor="middle" fill="#1d7a46">as of {as_of.isoformat()}</text>'
    )
    # Where the patient came from and went to (levels without an episode of their own): small marks.
    for t in transitions:
        for day, level in ((t.from_day, t.from_level), (t.to_day, t.to_level)):
            if not any(str(e.get("level")) == level for e in items):
                parts.append(
                    f'<rect x="{x(day) - 3}" y="{y(level) - 6}" width="6" height="12" rx="2" '
                    f'fill="{_LEVEL_COLOUR.get(level, "#888")}"/>'
                )
    for episode in items:
        level = str(episode.get("level"))
        start = _day(episode.get("start"))
        if start is None or episode.get("status") == "cancelled":
            continue
        end = _day(episode.get("end")) or as_of
        width = max(x(end) - x(start), 4.0)
        fill = _LEVEL_COLOUR.get(level, "#888")
        parts.append(
            f'<rect class="episode-bar" data-episode-bar="{_e(episode["episode_id"])}" x="{x(start)}" '
            f'y="{y(level) - 9}" width="{width}" height="18" rx="3" fill="{fill}" '
            f'stroke="{_LEVEL_COLOUR.get(level, "#888")}"><title>{_e(_level(level))} {_e(start)} to '
            f"{_e(episode.get('end') or 'ongoing')} ({_e(episode.get('status'))})</title></rect>"
        )
    legend = []
    for number, t in enumerate(transitions, start=1):
        x1, y1, x2, y2 = x(t.from_day), y(t.from_level), x(t.to_day), y(t.to_level)
        if x2 - x1 < 8:
            x2 = x1 + 8
        kind = _kind(t)
        mid_x, mid_y = round((x1 + x2) / 2, 1), round((y1 + y2) / 2, 1)
        # The arrow carries its number; the legend under the chart says what it is (labels of steps a
        # few days apart would overlap on a chart that spans months).
        parts.append(
            f'<g class="transition {kind}"><title>{_e(t.label)}</title>'
            f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#1d2430" '
            f'stroke-width="1.6" marker-end="url(#arrow-{uid})"/>'
            f'<circle cx="{mid_x}" cy="{mid_y}" r="7" fill="#ffffff" stroke="#1d2430"/>'
            f'<text x="{mid_x}" y="{mid_y + 3.5}" font-size="10" text-anchor="middle" fill="#1d2430">'
            f"{number}</text></g>"
        )
        legend.append(
            f'<li class="{kind}">{_e(t.label)}: {_e(_level(t.from_level))} {_e(t.from_day.isoformat())} → '
            f"{_e(_level(t.to_level))} {_e(t.to_day.isoformat())}</li>"
        )
    parts.append("</svg>")
    if legend:
        parts.append(f'<ol class="transitions">{"".join(legend)}</ol>')
    return "".join(parts)


def _kind(transition: _Transition) -> str:
    up = LEVEL_RANK.get(transition.to_level, 0) > LEVEL_RANK.get(transition.from_level, 0)
    return "step-up" if up else "step-down"


def _weeks_chart(episode: Mapping[str, Any]) -> str:
    weeks = (episode.get("attendance") or {}).get("weeks") or []
    minimum = WEEKLY_MINIMUM.get(str(episode.get("level")))
    if not weeks:
        return '<p class="facts">No weekly hours yet.</p>'
    top = max([float(w.get("hours") or 0) for w in weeks] + [minimum or 0]) * 1.15 or 1.0
    bar, gap, left, height, plot_top = 26, 8, 40, 150, 16
    plot_h = height - plot_top - 34
    width = max(left + len(weeks) * (bar + gap) + 70, 220)

    def y(hours: float) -> float:
        return round(plot_top + plot_h * (1 - hours / top), 1)

    parts = [
        f'<svg class="weekly-hours" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" aria-label="weekly hours">',
        f'<line x1="{left}" y1="{y(0)}" x2="{width - 60}" y2="{y(0)}" stroke="#8893a2"/>',
    ]
    for index, week in enumerate(weeks):
        hours = float(week.get("hours") or 0)
        bar_x = left + gap / 2 + index * (bar + gap)
        colour = "#2f8a57" if week.get("meets_minimum") else "#c0504d"
        parts.append(
            f'<rect class="week" x="{bar_x}" y="{y(hours)}" width="{bar}" '
            f'height="{round(y(0) - y(hours), 1)}" '
            f'fill="{colour}"><title>week of {_e(week.get("week_start"))}: {_hours(hours)} h, '
            f"{_e(week.get('sessions', 0))} sessions</title></rect>"
            f'<text x="{bar_x + bar / 2}" y="{y(hours) - 3}" font-size="10" text-anchor="middle">'
            f"{_hours(hours)}</text>"
            f'<text x="{bar_x + bar / 2}" y="{y(0) + 12}" font-size="9" text-anchor="middle" fill="#5b6675">'
            f"{_e(str(week.get('week_start', ''))[5:])}</text>"
        )
    if minimum:
        parts.append(
            f'<line class="minimum" data-minimum="{minimum:g}" x1="{left}" y1="{y(minimum)}" '
            f'x2="{width - 60}" y2="{y(minimum)}" stroke="#a42e2e" stroke-dasharray="5 3"/>'
            f'<text x="{width - 56}" y="{y(minimum) + 4}" font-size="11" fill="#a42e2e">'
            f"min {minimum:g} h</text>"
        )
    parts.append(
        f'<text x="{left - 6}" y="{y(0) + 4}" font-size="10" text-anchor="end">0</text>'
        f'<text x="{left}" y="{height - 4}" font-size="10" fill="#5b6675">hours per week (week start)</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _billing_table(billing: Mapping[str, Any]) -> str:
    rows = [
        ("Condition code", billing.get("condition_code") or "–"),
        ("Revenue code", billing.get("revenue_code") or "–"),
        ("HCPCS", billing.get("hcpcs") or "– (line items)"),
        ("Units", billing.get("units", 0)),
        ("Service lines", len(billing.get("lines") or [])),
        ("Diagnoses (ICD-10-CM)", _diagnoses(billing)),
        ("Payer", _payer(billing)),
    ]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="billing">{body}</table>'


def _episode_html(episode: Mapping[str, Any], writebacks: Sequence[WriteBackRow]) -> str:
    episode_id = str(episode["episode_id"])
    status = str(episode.get("status"))
    attendance = episode.get("attendance") or {}
    badges = f'<span class="badge {_e(status)}">{_e(status)}</span>'
    if episode.get("part2"):
        badges += '<span class="badge part2" title="Substance-use treatment record">42 CFR Part 2</span>'
    if status == "cancelled":
        return (
            f'<article class="episode" data-episode-id="{_e(episode_id)}"><h3>'
            f"{_e(_level(episode.get('level')))} {_e(episode.get('start') or '?')}{badges}</h3>"
            f'<p class="facts">Episode <code>{_e(episode_id)}</code> · {_e(_cancelled_text(episode))}</p>'
            "</article>"
        )
    weeks = attendance.get("weeks") or []
    met = sum(1 for w in weeks if w.get("meets_minimum"))
    rows = "".join(
        f"<tr><td>{_e(r.kind)}</td><td>{_e(r.detail)}</td><td>{_e(r.outcome)}</td>"
        f"<td>{_e(', '.join(r.references))}</td></tr>"
        for r in writebacks
    )
    writeback_table = (
        '<table class="writebacks"><tr><th>Event</th><th>What</th><th>Outcome</th><th>Written</th></tr>'
        f"{rows}</table>"
        if rows
        else ""
    )
    return (
        f'<article class="episode" data-episode-id="{_e(episode_id)}">'
        f"<h3>{_e(_level(episode.get('level')))} {_e(episode.get('start') or '?')} → "
        f"{_e(episode.get('end') or 'ongoing')}{badges}</h3>"
        f'<p class="facts">Episode <code>{_e(episode_id)}</code> · entry: {_e(entry_text(episode))} · '
        f"exit: {_e(exit_text(episode))}<br>Sessions attended: {_e(attendance.get('sessions_attended', 0))}"
        f" · hours: {_e(_hours(attendance.get('hours_attended')))} · weeks meeting the minimum: "
        f'<span class="{"ok" if weeks and met == len(weeks) else "bad"}">{met} of {len(weeks)}</span></p>'
        f'<div class="charts">{_weeks_chart(episode)}{_billing_table(episode.get("billing") or {})}</div>'
        f"{writeback_table}</article>"
    )


def render_report(
    episodes: Sequence[Mapping[str, Any]],
    referrals: Sequence[Mapping[str, Any]],
    writebacks: Sequence[WriteBackRow],
    dead_letters: Sequence[DeadLetterRow],
    *,
    as_of: datetime,
    include_part2: bool = False,
) -> str:
    """The report as one self-contained HTML document (42 CFR Part 2 records only with
    ``include_part2``)."""
    shown = _shown(episodes, referrals, writebacks, dead_letters, include_part2)
    episodes, referrals, writebacks, dead_letters = (
        shown.episodes,
        shown.referrals,
        shown.writebacks,
        shown.dead_letters,
    )
    note = shown.hidden_text()
    by_episode: dict[str, list[WriteBackRow]] = defaultdict(list)
    for row in writebacks:
        by_episode[row.episode_id].append(row)
    patients = _by_patient(episodes)
    sections = []
    for number, (patient, items) in enumerate(patients.items()):
        part2 = any(e.get("part2") for e in items)
        badge = '<span class="badge part2">42 CFR Part 2</span>' if part2 else ""
        articles = "".join(_episode_html(e, by_episode.get(str(e["episode_id"]), [])) for e in items)
        sections.append(
            f'<section class="patient" data-patient="{_e(patient)}"><h2>{_e(patient)}{badge}</h2>'
            f"{_timeline(patient, items, as_of.date(), f'p{number}')}{articles}</section>"
        )
    referral_rows = "".join(
        f"<tr><td>{_e(_patient_of(r))}</td><td>{_e(_level((r.get('target') or {}).get('level') or '?'))}</td>"
        f"<td>{_e(r.get('state'))}</td><td>{_e(r.get('authored') or '')}</td>"
        f"<td>{_e((r.get('service_request') or {}).get('reference') or '')}</td>"
        f"<td>{_PART2_BADGE if r.get('part2') else ''}</td></tr>"
        for r in sorted(referrals, key=lambda r: (_patient_of(r), str(r.get("referral_id"))))
    )
    written = [r for r in writebacks if r.outcome != "duplicate"]
    dead_rows = "".join(
        f"<tr><td><code>{_e(d.event_id)}</code></td><td>{_e(d.topic)}</td><td>{_e(d.reason)}</td></tr>"
        for d in dead_letters
    )
    n_episodes = len(episodes)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>iop-bridge report</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>iop-bridge report</h1><p>As of {_e(as_of.isoformat(timespec='seconds'))} · "
        f"{len(patients)} patients · {n_episodes} episodes · {len(referrals)} referrals · "
        f"{len(written)} write-backs · {len(writebacks) - len(written)} duplicates · "
        f"{len(dead_letters)} dead letters. Patients are shown by FHIR reference only.</p>"
        + (f'<p class="hidden-part2">{_e(note)}</p>' if note else "")
        + "</header><main>"
        + "".join(sections)
        + '<section class="patient" id="referrals"><h2>Referrals</h2>'
        + (
            "<table><tr><th>Patient</th><th>To</th><th>State</th><th>Authored</th><th>Request</th><th></th></tr>"
            f"{referral_rows}</table>"
            if referral_rows
            else "<p>None.</p>"
        )
        + '</section><section class="patient" id="dead-letters"><h2>Dead letters</h2>'
        + (
            f"<table><tr><th>Event</th><th>Topic</th><th>Reason</th></tr>{dead_rows}</table>"
            if dead_rows
            else "<p>None.</p>"
        )
        + "</section></main></body></html>\n"
    )

"""Per-episode facts: attendance by week, service lines per day, diagnoses, payer, Part 2, care plans.

Pure helpers over the engine's ``Visit`` records and the patient's other resources (dicts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import Any, Final, NamedTuple

import orjson

from mappers.codes import (
    ACT_CODE,
    CONFIDENTIALITY,
    ICD10CM,
    US_PRIVACY_LAW,
    canonical_system,
    codings,
    icd10_f_range,
    normalise_code,
    system_key,
)
from mappers.fhir import FhirValueError, element, is_literal, items, parse_datetime, reference_key, rfc3339
from mappers.index import resolve
from mappers.settings import EpisodeSettings, PayerProfile
from mappers.visits import Visit

#: Codes that name a per-diem day rather than a service (not counted as services of a line).
PER_DIEM_CODES: Final = frozenset({"S9480", "H0015", "H0035", "S0201", "H0018", "H0019", "H2036", "S9484"})
SERVICE_SYSTEMS: Final = ("hcpcs", "cpt")
#: Program services that decide no level alone: they count as services of the episode they fall in.
PROGRAM_SERVICES: Final = frozenset({("hcpcs", "G0410"), ("hcpcs", "G0411"), ("hcpcs", "G0129")})
#: F10-F16, F18, F19: substance use disorders (F17 nicotine does not make an episode Part 2).
SUD_F_RANGES: Final = frozenset({10, 11, 12, 13, 14, 15, 16, 18, 19})
SECURITY_LABELS: Final = (
    {"system": ACT_CODE, "code": "ETH", "display": "substance abuse information sensitivity"},
    {"system": CONFIDENTIALITY, "code": "R", "display": "restricted"},
    {"system": US_PRIVACY_LAW, "code": "42CFRPart2", "display": "42 CFR Part2"},
)
CONDITION_CODES: Final = {"iop": "92", "php": "41"}
_UNIT_HOURS: Final = {"s": 1 / 3600, "min": 1 / 60, "h": 1.0, "d": 24.0}
_UNIT_DAYS: Final = {
    "s": 1 / 86400,
    "min": 1 / 1440,
    "h": 1 / 24,
    "d": 1.0,
    "wk": 7.0,
    "mo": 30.4375,
    "a": 365.25,
}


def session_hours(visit: Visit, settings: EpisodeSettings) -> float:
    """Hours of one session from its period; the configured default when the period has no usable end."""
    if visit.end is None:
        return settings.default_session_hours
    hours = (visit.end - visit.start).total_seconds() / 3600
    if hours <= 0 or hours > settings.max_session_hours:
        return settings.default_session_hours
    return hours


def week_start(day: date, week: str) -> date:
    if week == "sunday":
        return day - timedelta(days=(day.weekday() + 1) % 7)
    return day - timedelta(days=day.weekday())


def attendance(
    level: str, sessions: Sequence[Visit], settings: EpisodeSettings, hours_of: Sequence[float] | None = None
) -> dict[str, Any]:
    """Sessions and hours attended, with a tally per week (every week from the first to the last).

    ``hours_of`` are the sessions' ``session_hours`` when the caller has them already.
    """
    hours_by_week: dict[date, float] = {}
    sessions_by_week: dict[date, int] = {}
    total = 0.0
    if hours_of is None:
        hours_of = [session_hours(visit, settings) for visit in sessions]
    for visit, hours in zip(sessions, hours_of, strict=True):
        total += hours
        week = week_start(visit.day, settings.week)
        hours_by_week[week] = hours_by_week.get(week, 0.0) + hours
        sessions_by_week[week] = sessions_by_week.get(week, 0) + 1
    weeks = []
    minimum = settings.min_weekly_hours(level)
    if hours_by_week:
        week = min(hours_by_week)
        last = max(hours_by_week)
        while week <= last:
            hours = round(hours_by_week.get(week, 0.0), 2)
            entry: dict[str, Any] = {
                "week_start": week.isoformat(),
                "sessions": sessions_by_week.get(week, 0),
                "hours": hours,
                "meets_minimum": True if minimum is None else hours >= minimum,
            }
            if level == "iop":
                entry["looks_like_php"] = hours >= settings.iop_flag_weekly_hours
            weeks.append(entry)
            week += timedelta(days=7)
    return {"sessions_attended": len(sessions), "hours_attended": round(total, 2), "weeks": weeks}


def _services(found: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [
        {"system": canonical_system(key), "code": code}
        for key, code in found
        if key in SERVICE_SYSTEMS and code not in PER_DIEM_CODES
    ]


def service_lines(
    sessions: Sequence[Visit],
    procedures: Sequence[Mapping[str, Any]],
    shared: Mapping[str, Mapping[str, Any]],
    extra: Sequence[Visit] = (),
) -> list[dict[str, Any]]:
    """Per day: the service codes of that day's sessions, of Procedures done in them, and of ``extra``.

    ``extra`` are Encounters with no level of their own whose services belong to the episode they fall
    in (G0410/G0411 group psychotherapy alone decides no level: episode-model.md).
    """
    by_day: dict[date, list[dict[str, str]]] = {}
    day_of: dict[str, date] = {}
    for visit in (*sessions, *extra):
        day_of[visit.key] = visit.day
        by_day.setdefault(visit.day, []).extend(_services(visit.codes))
    for procedure in procedures:
        if procedure.get("status") in ("not-done", "entered-in-error", "preparation"):
            continue
        encounter = resolve(procedure.get("encounter"), shared)
        if encounter in day_of:
            by_day[day_of[encounter]].extend(_services(codings(procedure.get("code"))))
    lines = []
    for day in sorted(by_day):
        services = sorted(by_day[day], key=lambda s: (s["code"], s["system"]))
        lines.append({"date": day.isoformat(), "services": services, "count": len(services)})
    return lines


class Diagnosis(NamedTuple):
    code: str
    normalised: str
    condition: str | None
    rank: int | None


def _icd_codes(value: Any) -> list[str]:
    """ICD-10-CM codes (as written) of a CodeableConcept or a list of them."""
    if isinstance(value, list):
        return [code for item in value for code in _icd_codes(item)]
    if not isinstance(value, (dict, Mapping)):
        return []
    return [
        str(coding["code"]).strip()
        for coding in items(value, "coding")
        if isinstance(coding, (dict, Mapping))
        and isinstance(coding.get("code"), str)
        and system_key(coding.get("system")) == "icd10cm"
    ]


@lru_cache(maxsize=16384)
def _icd_key(code: str) -> str:
    return normalise_code("icd10cm", code)


def _condition_codes(key: str, condition: Mapping[str, Any], memo: dict[str, list[str]]) -> list[str]:
    codes = memo.get(key)
    if codes is None:
        codes = memo[key] = _icd_codes(condition.get("code"))
    return codes


def diagnoses_of(
    resource: Mapping[str, Any],
    shared: Mapping[str, Mapping[str, Any]],
    memo: dict[str, list[str]] | None = None,
    seen: dict[bytes, list[Diagnosis]] | None = None,
) -> list[Diagnosis]:
    """ICD-10-CM diagnoses of an Encounter or EpisodeOfCare: diagnosis (with rank), reasonCode, reasons.

    ``memo`` keeps the codes of each referenced Condition (by reference key) across calls over the same
    ``shared`` index: a patient's Encounters point at the same few Conditions. ``seen`` (with ``memo``,
    the caller's for the same ``shared``) keeps whole results by the JSON of the three elements they
    come from: a patient's sessions usually repeat the same diagnoses. The result is shared: read only.
    """
    if memo is None:
        memo = {}
    if seen is None or resource.get("contained"):
        return _diagnoses_of(resource, shared, memo)
    try:
        key = orjson.dumps(
            (resource.get("diagnosis"), resource.get("reasonCode"), resource.get("reasonReference"))
        )
    except TypeError:  # what orjson cannot write (integers beyond 64 bits…): no memo
        return _diagnoses_of(resource, shared, memo)
    found = seen.get(key)
    if found is None:
        found = seen[key] = _diagnoses_of(resource, shared, memo)
    return found


def _diagnoses_of(
    resource: Mapping[str, Any], shared: Mapping[str, Mapping[str, Any]], memo: dict[str, list[str]]
) -> list[Diagnosis]:
    found: list[Diagnosis] = []
    for entry in items(resource, "diagnosis"):
        if not isinstance(entry, (dict, Mapping)):
            continue
        rank = entry.get("rank") if isinstance(entry.get("rank"), int) else None
        target = entry.get("condition")
        key = resolve(target, shared)
        condition = shared.get(key) if key else None
        if key and key.startswith("#"):
            condition = next(
                (
                    c
                    for c in items(resource, "contained")
                    if isinstance(c, (dict, Mapping)) and c.get("id") == key[1:]
                ),
                None,
            )
            key = None
        if condition is None:
            codes = _icd_codes(target)
        elif key is None:
            codes = _icd_codes(condition.get("code"))
        else:
            codes = _condition_codes(key, condition, memo)
        for code in codes:
            found.append(Diagnosis(code, _icd_key(code), key, rank))
    for code in _icd_codes(resource.get("reasonCode")):
        found.append(Diagnosis(code, _icd_key(code), None, None))
    for target in items(resource, "reasonReference"):
        key = resolve(target, shared)
        condition = shared.get(key) if key else None
        if condition is not None and key is not None:
            for code in _condition_codes(key, condition, memo):
                found.append(Diagnosis(code, _icd_key(code), key, None))
    return found


def back_reference_diagnoses(
    key: str, pointing: Sequence[Mapping[str, Any]], memo: dict[str, list[str]]
) -> list[Diagnosis]:
    """ICD-10-CM diagnoses of the Conditions pointing at Encounter ``key`` (``Condition.encounter``: US
    Core's encounter diagnosis), not refuted ones; ``pointing`` is ``index.Collected.by_encounter[key]``."""
    found: list[Diagnosis] = []
    for resource in pointing:
        if resource.get("resourceType") != "Condition" or _refuted(resource):
            continue
        reference = f"Condition/{resource.get('id')}"
        for code in _condition_codes(reference, resource, memo):
            found.append(Diagnosis(code, _icd_key(code), reference, None))
    return found


def _refuted(condition: Mapping[str, Any]) -> bool:
    return any(code == "REFUTED" for _, code in codings(condition.get("verificationStatus")))


def billing_diagnoses(ordered: Sequence[Sequence[Diagnosis]]) -> list[dict[str, Any]]:
    """Principal first (rank 1 on the earliest resource, else its first F code, else its first code)."""
    flat = [d for group in ordered for d in group]
    if not flat:
        return []
    ranked = [d for d in flat if d.rank == 1]
    behavioral = [d for d in flat if icd10_f_range(d.normalised) is not None]
    principal = (ranked or behavioral or flat)[0]
    result: list[dict[str, Any]] = []
    seen: set[str] = set()
    for diagnosis in [principal, *flat]:
        if diagnosis.normalised in seen:
            continue
        seen.add(diagnosis.normalised)
        condition = next(
            (d.condition for d in flat if d.normalised == diagnosis.normalised and d.condition), None
        )
        result.append(
            {
                "system": ICD10CM,
                "code": diagnosis.code,
                "principal": not result,
                "condition": {"reference": condition} if is_literal(condition) else None,
            }
        )
    return result


def is_substance_use(coded: Sequence[Sequence[tuple[str, str]]], principal: str | None) -> bool:
    """H0015 or revenue 0906 among the episode's codes, or an F10-F16/F18/F19 principal diagnosis."""
    for codes in coded:
        for key, code in codes:
            if (key, code) in (("hcpcs", "H0015"), ("revenue", "0906")):
                return True
    number = icd10_f_range(principal) if principal else None
    return number in SUD_F_RANGES


def security_labels(part2: bool) -> list[dict[str, str]]:
    return [dict(label) for label in SECURITY_LABELS] if part2 else []


def _payer_matches(profile: PayerProfile, coverage: Mapping[str, Any], shared: Mapping[str, Any]) -> bool:
    for payor in items(coverage, "payor"):
        if not isinstance(payor, (dict, Mapping)):
            continue
        key = reference_key(payor)
        if key and (key in profile.payor_ids or key.split("/")[-1] in profile.payor_ids):
            return True
        identifier = payor.get("identifier")
        if isinstance(identifier, (dict, Mapping)) and identifier.get("value") in profile.payor_ids:
            return True
        organization = shared.get(key) if key else None
        names = [str(payor.get("display") or "")]
        if organization is not None:
            names.append(str(organization.get("name") or ""))
        if any(part.lower() in name.lower() for part in profile.name_contains for name in names if name):
            return True
    codes = {code for _, code in codings(coverage.get("type"))}
    return bool(codes & {c.upper() for c in profile.coverage_types})


def payer(
    coverages: Sequence[Mapping[str, Any]],
    first: date,
    last: date,
    *,
    zone: tzinfo,
    settings: EpisodeSettings,
    shared: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, Any] | None, PayerProfile]:
    """The Coverage in force over the episode (lowest ``order``) and the payer profile it selects."""
    chosen: list[tuple[int, str, Mapping[str, Any]]] = []
    for coverage in coverages:
        if coverage.get("status") not in (None, "active"):
            continue
        if not _overlaps(coverage.get("period"), first, last, zone):
            continue
        raw_order = coverage.get("order")
        order = raw_order if isinstance(raw_order, int) else 1_000_000
        chosen.append((order, str(coverage.get("id")), coverage))
    if not chosen:
        return None, settings.default_payer
    coverage = min(chosen, key=lambda c: (c[0], c[1]))[2]
    profile = next((p for p in settings.payer_profiles if _payer_matches(p, coverage, shared)), None)
    profile = profile or settings.default_payer
    payors = [p for p in items(coverage, "payor") if isinstance(p, (dict, Mapping))]
    record: dict[str, Any] = {
        "coverage": {"reference": f"Coverage/{coverage.get('id')}"},
        "profile": profile.name,
    }
    if payors:
        first_payor = payors[0]
        payor_record: dict[str, Any] = {}
        key = reference_key(first_payor)
        if key:
            payor_record["reference"] = key
        if first_payor.get("display"):
            payor_record["display"] = str(first_payor["display"])
        record["payor"] = payor_record or None
    else:
        record["payor"] = None
    return record, profile


def _overlaps(period: Any, first: date, last: date, zone: tzinfo) -> bool:
    if not isinstance(period, (dict, Mapping)):
        return True
    try:
        start = parse_datetime(period["start"], zone).astimezone(zone).date() if period.get("start") else None
        end = parse_datetime(period["end"], zone).astimezone(zone).date() if period.get("end") else None
    except FhirValueError:
        return False
    return (start is None or start <= last) and (end is None or end >= first)


def _positive(value: Any) -> float | None:
    """A positive JSON number (not a bool) as float, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def _schedule(plan: Mapping[str, Any]) -> dict[str, float | None]:
    sessions = 0.0
    hours = 0.0
    timed = False
    for activity in items(plan, "activity"):
        detail = activity.get("detail") if isinstance(activity, (dict, Mapping)) else None
        if not isinstance(detail, (dict, Mapping)) or detail.get("status") in (
            "cancelled",
            "stopped",
            "entered-in-error",
        ):
            continue
        repeat = element(detail, "scheduledTiming").get("repeat")
        if not isinstance(repeat, (dict, Mapping)):
            continue
        frequency = _positive(repeat.get("frequency")) or 1.0
        days = repeat.get("dayOfWeek")
        period = _positive(repeat.get("period"))
        period_unit = repeat.get("periodUnit")
        per_week: float | None = None
        if isinstance(days, list) and days:
            per_week = len(days) * frequency
        elif period is not None and isinstance(period_unit, str) and period_unit in _UNIT_DAYS:
            per_week = frequency * 7 / (period * _UNIT_DAYS[period_unit])
        if per_week is None:
            continue
        timed = True
        sessions += per_week
        duration = _positive(repeat.get("duration"))
        unit = repeat.get("durationUnit")
        if duration is not None and isinstance(unit, str) and unit in _UNIT_HOURS:
            hours += per_week * duration * _UNIT_HOURS[unit]
    if not timed:
        return {"sessions_per_week": None, "hours_per_session": None, "hours_per_week": None}
    return {
        "sessions_per_week": round(sessions, 2),
        "hours_per_session": round(hours / sessions, 2) if sessions and hours else None,
        "hours_per_week": round(hours, 2) if hours else None,
    }


def care_plans(
    plans: Sequence[Mapping[str, Any]],
    first: date,
    last: date,
    *,
    zone: tzinfo,
    encounters: set[str],
    shared: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """Plans overlapping the episode: schedule, period and last revision (``meta.lastUpdated``)."""
    found = []
    for plan in plans:
        period = plan.get("period")
        linked = resolve(plan.get("encounter"), shared) in encounters
        if isinstance(period, (dict, Mapping)) and period.get("start"):
            if not _overlaps(period, first, last, zone):
                continue
        elif not linked:
            created = plan.get("created")
            if not created or not _overlaps({"start": created, "end": created}, first, last, zone):
                continue
        found.append(_plan_record(plan, zone))
    return sorted(found, key=lambda p: str(p["reference"]))


def _date_of(value: Any, zone: tzinfo) -> str | None:
    try:
        return parse_datetime(value, zone).astimezone(zone).date().isoformat() if value else None
    except FhirValueError:
        return None


def _plan_record(plan: Mapping[str, Any], zone: tzinfo) -> dict[str, Any]:
    period = plan.get("period") if isinstance(plan.get("period"), (dict, Mapping)) else {}
    assert isinstance(period, (dict, Mapping))
    meta = plan.get("meta") if isinstance(plan.get("meta"), (dict, Mapping)) else {}
    assert isinstance(meta, (dict, Mapping))
    revised: str | None = None
    if meta.get("lastUpdated"):
        try:
            revised = rfc3339(parse_datetime(meta["lastUpdated"], zone))
        except FhirValueError:
            revised = None
    return {
        "reference": f"CarePlan/{plan.get('id')}",
        "status": str(plan.get("status") or "unknown"),
        "period": {"start": _date_of(period.get("start"), zone), "end": _date_of(period.get("end"), zone)},
        "last_revised": revised,
        "schedule": _schedule(plan),
    }


def local_date(moment: datetime, zone: tzinfo) -> date:
    return moment.astimezone(zone).date()

"""Writes the golden episode cases: FHIR input (NDJSON), case.toml and the expected episodes.

Run ``python tests/data/make_cases.py`` after changing a case. The expected episodes below are written by
hand from ``episode-model.md`` (not produced by the engine): each comment says which rule gives the value.
Episode ids are computed here with the specified uuid5 formula, independently of the mappers package.
Only the keys an expectation names are compared (``session_refs`` = the session references in order;
``billing`` / ``attendance`` compare the sub-keys given).
"""

from __future__ import annotations

import json
import uuid
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

HERE = Path(__file__).resolve().parent
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
CPT = "http://www.ama-assn.org/go/cpt"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
EHR = "general"
TZ = "America/New_York"
ZONE = ZoneInfo(TZ)
NS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:iop-bridge:episode")
SECURITY = [
    {"system": ACT, "code": "ETH", "display": "substance abuse information sensitivity"},
    {
        "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
        "code": "R",
        "display": "restricted",
    },
    {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActUSPrivacyLaw",
        "code": "42CFRPart2",
        "display": "42 CFR Part2",
    },
]


def eid(patient: str, level: str, anchor: str) -> str:
    return str(uuid.uuid5(NS, f"{EHR}|Patient/{patient}|{level}|{anchor}"))


def at(day: str, hour: int, minute: int = 0) -> str:
    """A local time in the EHR zone with its offset (EST/EDT both occur in the cases)."""
    moment = datetime.combine(date.fromisoformat(day), datetime.min.time()).replace(
        hour=hour, minute=minute, tzinfo=ZONE
    )
    return moment.isoformat()


def days(first: str, count: int, weekdays: tuple[int, ...] = (0, 2, 4)) -> list[str]:
    """``count`` dates from ``first`` falling on ``weekdays`` (Mon=0)."""
    found = []
    day = date.fromisoformat(first)
    while len(found) < count:
        if day.weekday() in weekdays:
            found.append(day.isoformat())
        day += timedelta(days=1)
    return found


def patient(pid: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [
            {
                "system": "urn:oid:1.2.3.4",
                "value": f"MRN-{pid}",
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]
                },
            },
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "000-00-0000"},  # never carried
        ],
    }


def enc(
    eid_: str,
    pid: str,
    day: str,
    *,
    hours: float = 3,
    start_hour: int = 9,
    cls: str = "AMB",
    codes: tuple[tuple[str, str], ...] = (),
    dx: tuple[str, ...] = (),
    status: str = "finished",
    end_day: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    start = at(day, start_hour)
    whole, frac = int(hours), round((hours - int(hours)) * 60)
    end = (
        at(end_day, 12)
        if end_day
        else (datetime.fromisoformat(start) + timedelta(hours=whole, minutes=frac)).isoformat()
    )
    resource: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": eid_,
        "status": status,
        "class": {"system": ACT, "code": cls},
        "subject": {"reference": f"Patient/{pid}"},
        "period": {"start": start, "end": end},
    }
    if codes:
        resource["type"] = [{"coding": [{"system": s, "code": c} for s, c in codes]}]
    if dx:
        resource["reasonCode"] = [{"coding": [{"system": ICD, "code": d}]} for d in dx]
    resource.update(extra)
    return resource


def sessions(prefix: str, pid: str, dates: list[str], **kwargs: Any) -> list[dict[str, Any]]:
    kwargs.setdefault("codes", ((HCPCS, "S9480"), (HCPCS, "G0410")))
    kwargs.setdefault("dx", ("F33.1",))
    return [enc(f"{prefix}{i + 1}", pid, d, **kwargs) for i, d in enumerate(dates)]


def refs(prefix: str, count: int) -> list[str]:
    return [f"Encounter/{prefix}{i + 1}" for i in range(count)]


def weeks(spec: list[tuple[str, int, float]], level: str = "iop") -> list[dict[str, Any]]:
    minimum = {"iop": 9, "php": 20}[level]
    out = []
    for start, count, hours in spec:
        week: dict[str, Any] = {
            "week_start": start,
            "sessions": count,
            "hours": hours,
            "meets_minimum": hours >= minimum,
        }
        if level == "iop":
            week["looks_like_php"] = hours >= 20
        out.append(week)
    return out


def direct() -> dict[str, Any]:
    return {"direction": "direct", "from_level": None, "at": None, "encounter": None}


def g0410_lines(dates: list[str]) -> list[dict[str, Any]]:
    return [{"date": d, "services": [{"system": HCPCS, "code": "G0410"}], "count": 1} for d in dates]


CASES: dict[str, dict[str, Any]] = {}


def case(
    name: str, as_of: str, resources: list[dict[str, Any]], expected: list[dict[str, Any]], **extra: Any
) -> None:
    CASES[name] = {"as_of": as_of, "resources": resources, "expected": expected, **extra}


# 1. Inpatient, then IOP, then weekly outpatient: step down in, step down out. ---------------------------
p = "p-inpt-iop-op"
iop = days("2025-01-13", 12)  # Mon/Wed/Fri, 13 Jan .. 7 Feb
case(
    "inpatient_iop_outpatient",
    "2025-04-01T12:00:00Z",
    [
        patient(p),
        enc("inpt1", p, "2025-01-02", cls="IMP", dx=("F32.2",), end_day="2025-01-10"),
        *sessions("s", p, iop),
        *[
            enc(f"op{i + 1}", p, d, hours=1, codes=((CPT, "90834"),))
            for i, d in enumerate(days("2025-02-12", 4, (2,)))
        ],
    ],
    [
        {
            "episode_id": eid(p, "iop", "Encounter/s1"),  # anchor: first attended session
            "level": "iop",
            "status": "finished",  # gap passed at as-of; exit known
            "start": "2025-01-13",
            "end": "2025-02-07",
            "anchor": {"reference": "Encounter/s1"},
            # Most recent care at another level ending within 30 days before: the BH inpatient stay (rank 5).
            "entry": {
                "direction": "step_down",
                "from_level": "inpatient",
                "at": "2025-01-10",
                "encounter": {"reference": "Encounter/inpt1"},
            },
            # Outpatient 5 days after the last session, within lookahead 30; the gap (14 d) has passed.
            "exit": {
                "reason": "stepped_down",
                "direction": "step_down",
                "to_level": "outpatient",
                "at": "2025-02-12",
                "encounter": {"reference": "Encounter/op1"},
                "disposition": None,
            },
            "session_refs": refs("s", 12),
            "attendance": {
                "sessions_attended": 12,
                "hours_attended": 36.0,
                "weeks": weeks(
                    [(w, 3, 9.0) for w in ("2025-01-13", "2025-01-20", "2025-01-27", "2025-02-03")]
                ),
            },
            "billing": {
                "condition_code": "92",
                "revenue_code": "0905",
                "hcpcs": "S9480",  # no Coverage: the default per-diem profile
                "units": 12,  # attended days
                "lines": g0410_lines(iop),
                "diagnoses": [{"system": ICD, "code": "F33.1", "principal": True, "condition": None}],
                "payer": None,
            },
            "part2": False,
            "security": [],
            "referral": None,
            "superseded_by": None,
        }
    ],
)

# 2. Outpatient, IOP, PHP, IOP, discharge: three episodes and the transitions between them. --------------
p = "p-op-iop-php-iop"
iop1 = days("2025-01-20", 9)  # 20 Jan .. 7 Feb
php = days("2025-02-10", 10, (0, 1, 2, 3, 4))  # 10 .. 21 Feb, 6 h a day
iop2 = days("2025-02-24", 9)  # 24 Feb .. 14 Mar (DST starts 9 Mar: -04:00 after)
iop2_resources = sessions("c", p, iop2)
iop2_resources[-1]["hospitalization"] = {
    "dischargeDisposition": {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/discharge-disposition", "code": "home"}]
    }
}
case(
    "outpatient_iop_php_iop_discharge",
    "2025-05-01T12:00:00Z",
    [
        patient(p),
        enc("op1", p, "2025-01-06", hours=1, codes=((CPT, "90834"),), dx=("F41.1",)),
        enc("op2", p, "2025-01-13", hours=1, codes=((CPT, "90834"),), dx=("F41.1",)),
        *sessions("a", p, iop1),
        *sessions("b", p, php, hours=6, codes=((HCPCS, "H0035"),)),
        *iop2_resources,
        enc("op3", p, "2025-03-20", hours=1, codes=((CPT, "90834"),), dx=("F41.1",)),
    ],
    [
        {
            "episode_id": eid(p, "iop", "Encounter/a1"),
            "level": "iop",
            "status": "finished",
            "start": "2025-01-20",
            "end": "2025-02-07",
            # Weekly outpatient (rank 1) ended 13 Jan, within 30 days: a step up.
            "entry": {
                "direction": "step_up",
                "from_level": "outpatient",
                "at": "2025-01-13",
                "encounter": {"reference": "Encounter/op2"},
            },
            # PHP (rank 3) began 3 days after the last IOP session: closes the episode, a step up.
            "exit": {
                "reason": "stepped_up",
                "direction": "step_up",
                "to_level": "php",
                "at": "2025-02-10",
                "encounter": {"reference": "Encounter/b1"},
                "disposition": None,
            },
            "session_refs": refs("a", 9),
            "attendance": {"sessions_attended": 9, "hours_attended": 27.0},
            "billing": {"condition_code": "92", "revenue_code": "0905", "hcpcs": "S9480", "units": 9},
        },
        {
            "episode_id": eid(p, "php", "Encounter/b1"),
            "level": "php",
            "status": "finished",
            "start": "2025-02-10",
            "end": "2025-02-21",
            "entry": {
                "direction": "step_up",
                "from_level": "iop",
                "at": "2025-02-07",
                "encounter": {"reference": "Encounter/a9"},
            },
            "exit": {
                "reason": "stepped_down",
                "direction": "step_down",
                "to_level": "iop",
                "at": "2025-02-24",
                "encounter": {"reference": "Encounter/c1"},
                "disposition": None,
            },
            "session_refs": refs("b", 10),
            "attendance": {
                "sessions_attended": 10,
                "hours_attended": 60.0,
                "weeks": weeks([("2025-02-10", 5, 30.0), ("2025-02-17", 5, 30.0)], "php"),
            },
            # PHP: condition code 41, revenue 0913 (intensive, default), per diem H0035; no G-codes.
            "billing": {
                "condition_code": "41",
                "revenue_code": "0913",
                "hcpcs": "H0035",
                "units": 10,
                "lines": [{"date": d, "services": [], "count": 0} for d in php],
            },
        },
        {
            "episode_id": eid(p, "iop", "Encounter/c1"),
            "level": "iop",
            "status": "finished",
            "start": "2025-02-24",
            "end": "2025-03-14",
            "entry": {
                "direction": "step_down",
                "from_level": "php",
                "at": "2025-02-21",
                "encounter": {"reference": "Encounter/b10"},
            },
            # Discharge known (dischargeDisposition on the last session); the next care (outpatient on
            # 20 Mar, within 30 days) gives direction and target: a discharge that is also a step down.
            "exit": {
                "reason": "discharged",
                "direction": "step_down",
                "to_level": "outpatient",
                "at": "2025-03-14",
                "encounter": {"reference": "Encounter/op3"},
                "disposition": {
                    "system": "http://terminology.hl7.org/CodeSystem/discharge-disposition",
                    "code": "home",
                },
            },
            "session_refs": refs("c", 9),
            "attendance": {"sessions_attended": 9, "hours_attended": 27.0},
        },
    ],
)

# 3. ED, then IOP, then nothing: lost to follow-up. --------------------------------------------------------
p = "p-ed-iop"
iop = days("2025-03-03", 6)  # 3 .. 14 Mar
case(
    "ed_iop_lost_to_follow_up",
    "2025-05-01T12:00:00Z",
    [
        patient(p),
        enc("ed1", p, "2025-03-01", hours=5, cls="EMER", dx=("F43.10",)),
        *sessions("s", p, iop),
    ],
    [
        {
            "episode_id": eid(p, "iop", "Encounter/s1"),
            "level": "iop",
            "status": "finished",
            "start": "2025-03-03",
            "end": "2025-03-14",
            "entry": {
                "direction": "step_down",  # emergency rank 5 -> iop rank 2
                "from_level": "emergency",
                "at": "2025-03-01",
                "encounter": {"reference": "Encounter/ed1"},
            },
            # No discharge, no care within 30 days, more than 14 days without a session.
            "exit": {
                "reason": "lost_to_follow_up",
                "direction": None,
                "to_level": None,
                "at": "2025-03-14",
                "encounter": None,
                "disposition": None,
            },
            "session_refs": refs("s", 6),
        }
    ],
)

# 4. Two IOP stints 60 days apart: two episodes. ----------------------------------------------------------
p = "p-two-stints"
first = days("2025-01-06", 6)  # 6 .. 17 Jan
second = days("2025-03-18", 6, (1, 3))  # Tue/Thu from 18 Mar (60 days after 17 Jan)
case(
    "two_iop_stints",
    "2025-06-01T12:00:00Z",
    [patient(p), *sessions("a", p, first), *sessions("b", p, second)],
    [
        {
            "episode_id": eid(p, "iop", "Encounter/a1"),
            "status": "finished",
            "start": "2025-01-06",
            "end": "2025-01-17",
            "entry": direct(),
            "exit": {
                "reason": "lost_to_follow_up",
                "direction": None,
                "to_level": None,
                "at": "2025-01-17",
                "encounter": None,
                "disposition": None,
            },
            "session_refs": refs("a", 6),
        },
        {
            "episode_id": eid(p, "iop", "Encounter/b1"),
            "status": "finished",
            "start": "2025-03-18",
            "end": "2025-04-03",
            "entry": direct(),  # the earlier IOP stint is the same level, not an entry
            "exit": {
                "reason": "lost_to_follow_up",
                "direction": None,
                "to_level": None,
                "at": "2025-04-03",
                "encounter": None,
                "disposition": None,
            },
            "session_refs": refs("b", 6),
            # Tue/Thu only: 6 h a week, under the IOP minimum of 9.
            "attendance": {
                "sessions_attended": 6,
                "hours_attended": 18.0,
                "weeks": weeks([("2025-03-17", 2, 6.0), ("2025-03-24", 2, 6.0), ("2025-03-31", 2, 6.0)]),
            },
        },
    ],
)

# 5. An active episode, with a care plan, a referral and Medicare coverage. -------------------------------
p = "p-active"
iop = days("2025-04-07", 9)  # 7 .. 25 Apr
active_sessions = sessions("s", p, iop)
active_sessions[0]["basedOn"] = [{"reference": "ServiceRequest/ref-1"}]
case(
    "active_episode",
    "2025-04-28T15:00:00Z",
    [
        patient(p),
        *active_sessions,
        {
            "resourceType": "ServiceRequest",
            "id": "ref-1",
            "status": "completed",
            "intent": "order",
            "subject": {"reference": f"Patient/{p}"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "3457005"}]},
        },
        {
            "resourceType": "CarePlan",
            "id": "plan-1",
            "meta": {"versionId": "3", "lastUpdated": "2025-04-14T16:30:00Z"},
            "status": "active",
            "intent": "plan",
            "subject": {"reference": f"Patient/{p}"},
            "period": {"start": "2025-04-07", "end": "2025-06-30"},
            "activity": [
                {
                    "detail": {
                        "status": "in-progress",
                        "scheduledTiming": {
                            "repeat": {
                                "frequency": 3,
                                "period": 1,
                                "periodUnit": "wk",
                                "duration": 3,
                                "durationUnit": "h",
                            }
                        },
                    }
                }
            ],
        },
        {
            "resourceType": "CarePlan",
            "id": "plan-old",
            "status": "completed",
            "intent": "plan",
            "subject": {"reference": f"Patient/{p}"},
            "period": {"start": "2024-01-01", "end": "2024-03-01"},
        },
        {
            "resourceType": "Coverage",
            "id": "cov-1",
            "status": "active",
            "beneficiary": {"reference": f"Patient/{p}"},
            "payor": [{"reference": "Organization/cms", "display": "Medicare"}],
            "period": {"start": "2025-01-01"},
        },
    ],
    [
        {
            "episode_id": eid(p, "iop", "Encounter/s1"),
            "level": "iop",
            # Last session 25 Apr, as of 28 Apr: within 14 days, no exit known.
            "status": "active",
            "start": "2025-04-07",
            "end": None,
            "exit": None,
            "entry": direct(),
            "session_refs": refs("s", 9),
            "billing": {
                "condition_code": "92",
                "revenue_code": "0905",
                "hcpcs": None,  # Medicare: line items, no per diem
                "units": 9,  # one G0410 service on each of 9 days
                "payer": {
                    "coverage": {"reference": "Coverage/cov-1"},
                    "profile": "medicare",
                    "payor": {"reference": "Organization/cms", "display": "Medicare"},
                },
            },
            "referral": {"reference": "ServiceRequest/ref-1"},
            "care_plans": [
                {
                    "reference": "CarePlan/plan-1",
                    "status": "active",
                    "period": {"start": "2025-04-07", "end": "2025-06-30"},
                    "last_revised": "2025-04-14T16:30:00Z",
                    "schedule": {"sessions_per_week": 3.0, "hours_per_session": 3.0, "hours_per_week": 9.0},
                }
            ],
        }
    ],
)

# 6. Noise: entered-in-error, cancelled sessions, a primary-care visit, a newer cancelling version. -------
p = "p-noise"
iop = days("2025-02-03", 9)  # 3 .. 21 Feb
noise_sessions = sessions("s", p, iop)
case(
    "noise",
    "2025-04-15T12:00:00Z",
    [
        patient(p),
        # Entered in error before the first real session: would change the anchor if it counted.
        enc("err1", p, "2025-01-31", codes=((HCPCS, "S9480"),), dx=("F33.1",), status="entered-in-error"),
        *noise_sessions,
        enc("cx1", p, "2025-02-10", codes=((HCPCS, "S9480"),), status="cancelled"),
        enc("cx2", p, "2025-03-03", codes=((HCPCS, "S9480"),), status="cancelled"),  # would extend the span
        enc("plan1", p, "2025-03-10", codes=((HCPCS, "S9480"),), status="planned"),
        # Primary care inside the span: E/M without a behavioral-health qualifier is no level.
        enc("pc1", p, "2025-02-12", hours=0.5, start_hour=14, codes=((CPT, "99213"),), dx=("I10",)),
        # A session that came in finished, then a newer version cancelled it: not attendance.
        enc("v1", p, "2025-02-25", codes=((HCPCS, "S9480"),), meta={"versionId": "1"}),
        enc("v1", p, "2025-02-25", codes=((HCPCS, "S9480"),), status="cancelled", meta={"versionId": "2"}),
        # Unusable: no subject, and an unparsable start.
        {
            "resourceType": "Encounter",
            "id": "nosubj",
            "status": "finished",
            "period": {"start": "2025-02-05"},
        },
        {
            "resourceType": "Encounter",
            "id": "baddate",
            "status": "finished",
            "subject": {"reference": f"Patient/{p}"},
            "period": {"start": "05/02/2025"},
        },
    ],
    [
        {
            "episode_id": eid(p, "iop", "Encounter/s1"),
            "status": "finished",
            "start": "2025-02-03",
            "end": "2025-02-21",
            "entry": direct(),  # the primary-care visit has no level
            "exit": {
                "reason": "lost_to_follow_up",
                "direction": None,
                "to_level": None,
                "at": "2025-02-21",
                "encounter": None,
                "disposition": None,
            },
            "session_refs": refs("s", 9),
            "attendance": {"sessions_attended": 9, "hours_attended": 27.0},
        }
    ],
    rejects=[
        {"resourceType": "Encounter", "id": "baddate", "reason": "period: unparsable date"},
        {"resourceType": "Encounter", "id": "nosubj", "reason": "no subject"},
    ],
)

# 7. Substance-use IOP: Part 2. ---------------------------------------------------------------------------
p = "p-sud"
iop = days("2025-02-03", 6)
case(
    "substance_use_iop_part2",
    "2025-02-17T12:00:00Z",
    [patient(p), *sessions("s", p, iop, codes=((HCPCS, "H0015"),), dx=("F10.20", "F17.210"))],
    [
        {
            "episode_id": eid(p, "iop", "Encounter/s1"),
            "status": "active",  # last session 14 Feb, as of 17 Feb
            "start": "2025-02-03",
            "session_refs": refs("s", 6),
            "billing": {
                "condition_code": "92",
                "revenue_code": "0906",  # substance-use IOP
                "hcpcs": "H0015",
                "units": 6,
                "diagnoses": [
                    {"system": ICD, "code": "F10.20", "principal": True, "condition": None},
                    {"system": ICD, "code": "F17.210", "principal": False, "condition": None},
                ],
            },
            "part2": True,
            "security": SECURITY,
        }
    ],
)

# 8. Residential, then IOP, then inpatient. ---------------------------------------------------------------
p = "p-res-iop-inpt"
iop = days("2025-02-03", 9)  # 3 .. 21 Feb
case(
    "residential_iop_inpatient",
    "2025-04-15T12:00:00Z",
    [
        patient(p),
        enc(
            "res1",
            p,
            "2025-01-02",
            cls="NONAC",
            codes=((HCPCS, "H0019"),),
            dx=("F11.20",),
            end_day="2025-01-31",
        ),
        *sessions("s", p, iop, dx=("F33.1",)),
        enc("inpt1", p, "2025-02-24", cls="IMP", dx=("F33.2",), end_day="2025-03-03"),
    ],
    [
        {
            "episode_id": eid(p, "iop", "Encounter/s1"),
            "status": "finished",
            "start": "2025-02-03",
            "end": "2025-02-21",
            "entry": {
                "direction": "step_down",
                "from_level": "residential",
                "at": "2025-01-31",
                "encounter": {"reference": "Encounter/res1"},
            },
            "exit": {
                "reason": "stepped_up",
                "direction": "step_up",
                "to_level": "inpatient",
                "at": "2025-02-24",
                "encounter": {"reference": "Encounter/inpt1"},
                "disposition": None,
            },
            "session_refs": refs("s", 9),
            # Principal F33.1 (a depressive disorder) is not substance use; no SUD codes: not Part 2.
            "part2": False,
        }
    ],
)

# 9. A knee operation (non-behavioral inpatient stay) inside an IOP episode: no transition. --------------
p = "p-surgery"
iop = days("2025-01-06", 12)  # 6 Jan .. 31 Jan
case(
    "surgery_inside_iop",
    "2025-03-15T12:00:00Z",
    [
        patient(p),
        *sessions("s", p, iop),
        enc(
            "surg1", p, "2025-01-14", cls="IMP", dx=("M17.11",), codes=((CPT, "27447"),), end_day="2025-01-16"
        ),
    ],
    [
        {
            "episode_id": eid(p, "iop", "Encounter/s1"),
            "status": "finished",
            "start": "2025-01-06",
            "end": "2025-01-31",
            "entry": direct(),
            "exit": {
                "reason": "lost_to_follow_up",
                "direction": None,
                "to_level": None,
                "at": "2025-01-31",
                "encounter": None,
                "disposition": None,
            },
            "session_refs": refs("s", 12),  # one episode across the stay
        }
    ],
)

# 10. A program-level admission Encounter with session Encounters partOf it. -----------------------------
p = "p-admission"
first = days("2025-01-06", 6)  # 6 .. 17 Jan
after_gap = days("2025-02-03", 6)  # 17 days without a session: the admission still holds them together
admission = enc(
    "adm1",
    p,
    "2025-01-06",
    start_hour=8,
    codes=((HCPCS, "S9480"),),
    dx=("F31.81",),
    end_day="2025-02-14",
    hospitalization={
        "dischargeDisposition": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/discharge-disposition", "code": "home"}
            ]
        }
    },
)
admission_sessions = sessions("s", p, first + after_gap, codes=((HCPCS, "G0410"),), dx=())
for item in admission_sessions:
    item["partOf"] = {"reference": "Encounter/adm1"}
case(
    "admission_with_sessions",
    "2025-04-01T12:00:00Z",
    [patient(p), admission, *admission_sessions],
    [
        {
            "episode_id": eid(p, "iop", "Encounter/adm1"),  # anchor: the admission Encounter
            "level": "iop",
            "status": "finished",
            "start": "2025-01-06",
            "end": "2025-02-14",
            "anchor": {"reference": "Encounter/adm1"},
            "entry": direct(),
            "exit": {
                "reason": "discharged",
                "direction": None,
                "to_level": None,
                "at": "2025-02-14",
                "encounter": None,
                "disposition": {
                    "system": "http://terminology.hl7.org/CodeSystem/discharge-disposition",
                    "code": "home",
                },
            },
            "session_refs": refs("s", 12),  # the admission itself is not a session
            "attendance": {"sessions_attended": 12, "hours_attended": 36.0},
            "billing": {
                "condition_code": "92",
                "units": 12,
                "diagnoses": [{"system": ICD, "code": "F31.81", "principal": True, "condition": None}],
            },
        }
    ],
)

# 11. An existing EpisodeOfCare grouping sessions. -------------------------------------------------------
p = "p-eoc"
iop = days("2025-01-06", 9)  # 6 .. 24 Jan
eoc_sessions = sessions("s", p, iop)
for item in eoc_sessions:
    item["episodeOfCare"] = [{"reference": "EpisodeOfCare/eoc-1"}]
case(
    "existing_episode_of_care",
    "2025-04-01T12:00:00Z",
    [
        patient(p),
        {
            "resourceType": "Condition",
            "id": "cond-1",
            "subject": {"reference": f"Patient/{p}"},
            "code": {"coding": [{"system": ICD, "code": "F41.1"}]},
        },
        {
            "resourceType": "EpisodeOfCare",
            "id": "eoc-1",
            "status": "finished",
            "patient": {"reference": f"Patient/{p}"},
            "period": {"start": "2025-01-06", "end": "2025-01-31"},
            "diagnosis": [{"condition": {"reference": "Condition/cond-1"}, "rank": 1}],
            "referralRequest": [{"reference": "ServiceRequest/ref-9"}],
        },
        *eoc_sessions,
    ],
    [
        {
            "episode_id": eid(p, "iop", "EpisodeOfCare/eoc-1"),
            "level": "iop",  # from its sessions (the EpisodeOfCare has no type)
            "status": "finished",
            "start": "2025-01-06",
            "end": "2025-01-31",  # the EpisodeOfCare's period.end, after the last session
            "anchor": {"reference": "EpisodeOfCare/eoc-1"},
            "exit": {
                "reason": "discharged",  # finished EpisodeOfCare with period.end
                "direction": None,
                "to_level": None,
                "at": "2025-01-31",
                "encounter": None,
                "disposition": None,
            },
            "session_refs": refs("s", 9),
            "referral": {"reference": "ServiceRequest/ref-9"},
            "billing": {
                # Rank 1 on the EpisodeOfCare's diagnosis makes F41.1 principal over the sessions' F33.1.
                "diagnoses": [
                    {
                        "system": ICD,
                        "code": "F41.1",
                        "principal": True,
                        "condition": {"reference": "Condition/cond-1"},
                    },
                    {"system": ICD, "code": "F33.1", "principal": False, "condition": None},
                ],
            },
        }
    ],
)

# 12. Our own EpisodeOfCare and attendance Encounters pulled back: they change nothing. --------------------
p = "p-own"
iop = days("2025-01-06", 9)  # 6 .. 24 Jan
own_id = eid(p, "iop", "Encounter/s1")
own_eoc = {
    "resourceType": "EpisodeOfCare",
    "id": "9001",
    "identifier": [{"system": "urn:iop-bridge:episode-id", "value": own_id}],
    "status": "active",
    "type": [{"coding": [{"system": "urn:iop-bridge:level-of-care", "code": "iop"}]}],
    "patient": {"reference": f"Patient/{p}"},
    "period": {"start": "2025-01-06"},
}


def attendance_encounter(fhir_id: str, session: str, day: str, version: str = "1") -> dict[str, Any]:
    """An Encounter as sync.fhir_writes writes it for an attended session (G0410 only: no level alone)."""
    return {
        "resourceType": "Encounter",
        "id": fhir_id,
        "meta": {"versionId": version},
        "identifier": [{"system": "urn:iop-bridge:session-id", "value": session}],
        "status": "finished",
        "class": {"system": ACT, "code": "AMB"},
        "subject": {"reference": f"Patient/{p}"},
        "episodeOfCare": [{"identifier": {"system": "urn:iop-bridge:episode-id", "value": own_id}}],
        "type": [{"coding": [{"system": HCPCS, "code": "G0410"}]}],
        "period": {"start": at(day, 13), "end": at(day, 16)},
    }


own_base = [
    patient(p),
    own_eoc,
    *sessions("s", p, iop[:6]),
    attendance_encounter("w1", "sess-7", iop[6]),
    attendance_encounter("w2", "sess-8", iop[7]),
    attendance_encounter("w3", "sess-9", iop[8]),
]
own_echo = [
    attendance_encounter("w1", "sess-7", iop[6], version="2"),  # a newer version of the same resource
    attendance_encounter("w9", "sess-8", iop[7]),  # the same session written twice (retried create)
]
case(
    "own_writes_pulled_back",
    "2025-01-27T12:00:00Z",
    own_base + own_echo,
    [
        {
            "episode_id": own_id,  # our EpisodeOfCare is never an anchor: the first session is
            "level": "iop",
            "status": "active",
            "start": "2025-01-06",
            "end": None,
            "anchor": {"reference": "Encounter/s1"},
            "exit": None,
            # Each session once; w9 repeats session sess-8 (w2 kept: the same start, lower id).
            "session_refs": [*refs("s", 6), "Encounter/w1", "Encounter/w2", "Encounter/w3"],
            "attendance": {"sessions_attended": 9, "hours_attended": 27.0},
            "superseded_by": None,
        }
    ],
    without=["Encounter/w9"],
)

# 13. An admission Encounter arrives after its sessions were published: the old id is superseded. ---------
p = "p-late-admission"
iop = days("2025-03-03", 6)
old_id = eid(p, "iop", "Encounter/s1")
late_sessions = sessions("s", p, iop)
late_admission = enc("adm9", p, "2025-03-03", start_hour=8, codes=((HCPCS, "S9480"),), status="in-progress")
del late_admission["period"]["end"]
for item in late_sessions:
    item["partOf"] = {"reference": "Encounter/adm9"}
case(
    "late_admission_supersedes",
    "2025-03-17T12:00:00Z",
    [
        patient(p),
        late_admission,
        *late_sessions,
    ],
    [
        {
            "episode_id": eid(p, "iop", "Encounter/adm9"),
            "status": "active",
            "start": "2025-03-03",
            "anchor": {"reference": "Encounter/adm9"},
            "session_refs": refs("s", 6),
            "superseded_by": None,
        },
        {
            "episode_id": old_id,
            "level": "iop",
            "status": "cancelled",
            "start": "2025-03-03",
            "end": None,
            "exit": None,
            "session_refs": [],
            "superseded_by": eid(p, "iop", "Encounter/adm9"),
            "part2": False,
        },
    ],
    previous_anchors={old_id: f"Patient/{p}|iop|Encounter/s1|2025-03-03|0"},
)


# 14. A transaction Bundle with urn:uuid references (how Synthea and many exports link entries). -------
p = "6d2f4a8e-1b7c-4c1e-9a55-0f3b8e2d7c10"
adm_id = "b3c1e7a2-58d4-4f0e-8e6a-7d9c2f1a4b33"
bundle_sessions = sessions("u", p, days("2025-05-05", 6), codes=((HCPCS, "G0410"),))
for item in bundle_sessions:
    item["subject"] = {"reference": f"urn:uuid:{p}"}
    item["partOf"] = {"reference": f"urn:uuid:{adm_id}"}
bundle_admission = enc(adm_id, p, "2025-05-05", start_hour=8, codes=((HCPCS, "H0015"),), status="in-progress")
bundle_admission["subject"] = {"reference": f"urn:uuid:{p}"}
del bundle_admission["period"]["end"]
case(
    "bundle_urn_uuid_references",
    "2025-05-20T12:00:00Z",
    [patient(p), bundle_admission, *bundle_sessions],
    [
        {
            "episode_id": eid(p, "iop", f"Encounter/{adm_id}"),
            "level": "iop",  # the admission's H0015
            "status": "active",  # last session 16 May, as of 20 May
            "start": "2025-05-05",
            "anchor": {"reference": f"Encounter/{adm_id}"},
            "patient": {
                "reference": f"Patient/{p}",
                "identifier": [{"system": "urn:oid:1.2.3.4", "value": f"MRN-{p}"}],
            },
            "session_refs": refs("u", 6),
            # Substance-use treatment: H0015 on the admission (F33.1, the principal, is no SUD code).
            "part2": True,
            "billing": {"revenue_code": "0906", "hcpcs": "H0015"},
        }
    ],
    bundle=True,
)


def _order(expected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return expected


def main() -> None:
    for name, spec in CASES.items():
        folder = HERE / name
        folder.mkdir(exist_ok=True)
        if spec.get("bundle"):
            entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in spec["resources"]]
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
            (folder / "input.bundle.json").write_text(json.dumps(bundle, indent=1) + "\n", encoding="utf-8")
        else:
            lines = [json.dumps(r, sort_keys=True) for r in spec["resources"]]
            (folder / "input.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
        toml = [f'ehr = "{EHR}"', f'as_of = "{spec["as_of"]}"', f'timezone = "{TZ}"']
        if spec.get("without"):
            toml.append("# Resources whose absence must give the same episodes (our own writes pulled back).")
            toml.append("without = [" + ", ".join(f'"{w}"' for w in spec["without"]) + "]")
        if spec.get("previous_anchors"):
            toml.append("")
            toml.append("[previous_anchors]")
            toml.extend(f'"{k}" = "{v}"' for k, v in spec["previous_anchors"].items())
        (folder / "case.toml").write_text("\n".join(toml) + "\n", encoding="utf-8")
        (folder / "expected_episodes.json").write_text(
            json.dumps(_order(spec["expected"]), indent=2) + "\n", encoding="utf-8"
        )
        if "rejects" in spec:
            (folder / "expected_rejects.json").write_text(
                json.dumps(spec["rejects"], indent=2) + "\n", encoding="utf-8"
            )


if __name__ == "__main__":
    main()

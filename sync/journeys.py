"""Readable IOP journeys (``examples/journeys.yaml``) turned into FHIR R4 resources.

Used to seed the FHIR sandbox for the demo and the end-to-end tests, and to generate health systems of
any size for the benchmarks. Deterministic: the same book, anchor date and seed give the same resources
(ids included), so seeding twice updates in place and tests can assert exact results.

Each step of a journey is one level of care: a stay (inpatient, emergency, residential, surgery,
primary-care: one Encounter) or a series of sessions (iop, php, outpatient: one Encounter per attended
session). Sessions after the anchor date are booked Appointments, absent ones are ``noshow``
Appointments, cancelled and entered-in-error ones are Encounters with that status.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ROLE_CODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
CPT = "http://www.ama-assn.org/go/cpt"
POS = "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED = "http://snomed.info/sct"
ADMIT_SOURCE = "http://terminology.hl7.org/CodeSystem/admit-source"
DISCHARGE_DISPOSITION = "http://terminology.hl7.org/CodeSystem/discharge-disposition"
BSER_STATUS = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"  # a made-up OID arc for synthetic MRNs

SESSION_LEVELS = frozenset({"iop", "php", "outpatient"})
STAY_LEVELS = frozenset({"inpatient", "emergency", "residential", "surgery", "primary-care"})
# Weekday offsets of the sessions of one week, by sessions per week.
_WEEK_PATTERN = {1: (0,), 2: (0, 2), 3: (0, 2, 4), 4: (0, 1, 3, 4), 5: (0, 1, 2, 3, 4)}
_TASK_STATUS = {"2.0": "requested", "3.0": "accepted", "5.1.1": "in-progress", "7.0": "completed"}
_GIVEN = ("Alex", "Jordan", "Sam", "Taylor", "Riley", "Casey", "Morgan", "Jamie", "Avery", "Quinn", "Robin")
_FAMILY = (
    "Rivera",
    "Chen",
    "Okafor",
    "Novak",
    "Haddad",
    "Lindqvist",
    "Moreau",
    "Tanaka",
    "Silva",
    "Kowalski",
)


class JourneyError(ValueError):
    """A journey definition that cannot be built; the message names the patient and the step."""


@dataclass(frozen=True)
class Step:
    level: str
    day: int
    days: int = 1
    weeks: int = 0
    per_week: int = 0
    hours: float = 3.0
    code: str | None = None
    program: str | None = None
    absent: frozenset[int] = frozenset()
    cancelled: frozenset[int] = frozenset()
    entered_in_error: frozenset[int] = frozenset()
    discharge: str | None = None
    telehealth: bool = False
    #: A program-level admission Encounter spans the sessions, which point to it with ``partOf``.
    admission: bool = False
    #: The EHR groups the sessions in an EpisodeOfCare of its own (``Encounter.episodeOfCare``).
    grouped: bool = False


@dataclass(frozen=True)
class Referral:
    day: int
    task: str = "2.0"
    code: str = "3457005"


@dataclass(frozen=True)
class Journey:
    key: str
    story: str
    gender: str
    born: int
    payer: str
    diagnosis: str
    steps: tuple[Step, ...]
    referral: Referral | None = None


@dataclass(frozen=True)
class JourneyBook:
    programs: Mapping[str, Mapping[str, Any]]
    payers: Mapping[str, Mapping[str, Any]]
    journeys: tuple[Journey, ...] = field(default=())


def _step(key: str, index: int, raw: Mapping[str, Any]) -> Step:
    where = f"journey {key!r} step {index + 1}"
    level = raw.get("level")
    if level not in SESSION_LEVELS | STAY_LEVELS:
        raise JourneyError(f"{where}: unknown level {level!r}")
    if "day" not in raw:
        raise JourneyError(f"{where}: 'day' is required")
    step = Step(
        level=str(level),
        day=int(raw["day"]),
        days=int(raw.get("days", 1)),
        weeks=int(raw.get("weeks", 0)),
        per_week=int(raw.get("per_week", 0)),
        hours=float(raw.get("hours", 3.0)),
        code=str(raw["code"]) if raw.get("code") is not None else None,
        program=raw.get("program"),
        absent=frozenset(int(n) for n in raw.get("absent", [])),
        cancelled=frozenset(int(n) for n in raw.get("cancelled", [])),
        entered_in_error=frozenset(int(n) for n in raw.get("entered_in_error", [])),
        discharge=raw.get("discharge"),
        telehealth=bool(raw.get("telehealth", False)),
        admission=bool(raw.get("admission", False)),
        grouped=bool(raw.get("grouped", False)),
    )
    if step.level in SESSION_LEVELS and (step.weeks < 1 or step.per_week not in _WEEK_PATTERN):
        raise JourneyError(f"{where}: sessions need weeks >= 1 and per_week 1..5")
    return step


def parse_book(data: Mapping[str, Any]) -> JourneyBook:
    """Check and type a parsed journeys file (YAML or JSON)."""
    programs = dict(data.get("programs") or {})
    payers = dict(data.get("payers") or {})
    journeys = []
    for raw in data.get("patients") or []:
        key = str(raw.get("key") or "")
        if not key:
            raise JourneyError("a journey without 'key'")
        steps = tuple(_step(key, i, s) for i, s in enumerate(raw.get("steps") or []))
        for step in steps:
            if step.program is not None and step.program not in programs:
                raise JourneyError(f"journey {key!r}: unknown program {step.program!r}")
        if raw.get("payer") not in payers:
            raise JourneyError(f"journey {key!r}: unknown payer {raw.get('payer')!r}")
        referral = raw.get("referral")
        journeys.append(
            Journey(
                key=key,
                story=str(raw.get("story", "")),
                gender=str(raw.get("gender", "unknown")),
                born=int(raw.get("born", 1980)),
                payer=str(raw["payer"]),
                diagnosis=str(raw.get("diagnosis", "F32.9")),
                steps=steps,
                referral=Referral(
                    day=int(referral["day"]),
                    task=str(referral.get("task", "2.0")),
                    code=str(referral.get("code", "3457005")),
                )
                if referral
                else None,
            )
        )
    return JourneyBook(programs=programs, payers=payers, journeys=tuple(journeys))


def prefixed(book: JourneyBook, prefix: str) -> JourneyBook:
    """The same journeys under other patient keys (``pt-<prefix><key>``): several copies of the book can
    live in one FHIR server side by side, e.g. one per test module, anchored on different days."""
    if prefix and not prefix.replace("-", "").isalnum():
        raise JourneyError(f"prefix {prefix!r}: letters, digits and '-' only")
    return replace(book, journeys=tuple(replace(j, key=prefix + j.key) for j in book.journeys))


def scaled(book: JourneyBook, patients: int, *, seed: int = 7) -> JourneyBook:
    """A health system of ``patients`` patients: the book's journeys repeated, shifted by up to a year."""
    rng = random.Random(seed)
    out = []
    for n in range(patients):
        template = book.journeys[n % len(book.journeys)]
        shift = -rng.randrange(0, 365)
        out.append(
            replace(
                template,
                key=f"{template.key}-{n:07d}",
                steps=tuple(replace(s, day=s.day + shift) for s in template.steps),
                referral=replace(template.referral, day=template.referral.day + shift)
                if template.referral
                else None,
            )
        )
    return replace(book, journeys=tuple(out))


@dataclass
class _Builder:
    book: JourneyBook
    anchor: date
    zone: ZoneInfo
    rng: random.Random

    def instant(self, day: int, at: time = time(9, 0), plus_hours: float = 0.0) -> str:
        moment = datetime.combine(self.anchor + timedelta(days=day), at, tzinfo=self.zone)
        return (moment + timedelta(hours=plus_hours)).isoformat()

    def date(self, day: int) -> str:
        return (self.anchor + timedelta(days=day)).isoformat()

    def shared(self) -> list[dict[str, Any]]:
        resources: list[dict[str, Any]] = [
            {
                "resourceType": "Organization",
                "id": "org-hospital",
                "active": True,
                "name": "Harbor General Hospital",
                "type": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                                "code": "prov",
                            }
                        ]
                    }
                ],
            },
            _location("loc-psych-unit", "Inpatient psychiatry", ROLE_CODE, "PSYCHF"),
            _location("loc-ed", "Emergency department", ROLE_CODE, "ER"),
            _location("loc-residential", "Residential treatment", POS, "56"),
            _location("loc-or", "Operating rooms", ROLE_CODE, "HOSP"),
            _location("loc-clinic", "Outpatient clinic", ROLE_CODE, "OF"),
            {
                "resourceType": "Practitioner",
                "id": "prac-psych",
                "name": [{"family": "Synthetic", "given": ["Dana"], "prefix": ["Dr."]}],
            },
        ]
        for key, program in sorted(self.book.programs.items()):
            code = str(program.get("location_code", ""))
            system = POS if code.isdigit() else ROLE_CODE
            resources.append(_location(f"loc-{key}", str(program.get("name", key)), system, code))
            resources.append(
                {
                    "resourceType": "Organization",
                    "id": f"org-{key}",
                    "active": True,
                    "name": str(program.get("name", key)),
                    "partOf": {"reference": "Organization/org-hospital"},
                }
            )
        for key, payer in sorted(self.book.payers.items()):
            resources.append(
                {
                    "resourceType": "Organization",
                    "id": f"org-payer-{key}",
                    "active": True,
                    "name": str(payer.get("name", key)),
                    "type": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                                    "code": "pay",
                                }
                            ]
                        }
                    ],
                }
            )
        return resources

    def journey(self, number: int, journey: Journey) -> Iterator[dict[str, Any]]:
        pid = f"pt-{journey.key}"
        patient_ref = {"reference": f"Patient/{pid}"}
        yield {
            "resourceType": "Patient",
            "id": pid,
            "identifier": [{"system": MRN_SYSTEM, "value": f"MRN{100000 + number}"}],
            "name": [{"family": self.rng.choice(_FAMILY), "given": [self.rng.choice(_GIVEN)]}],
            "gender": journey.gender,
            "birthDate": f"{journey.born}-{self.rng.randrange(1, 13):02d}-{self.rng.randrange(1, 29):02d}",
            "address": [{"city": "Springfield", "state": "IL", "postalCode": "62701"}],
        }
        condition_id = f"cond-{journey.key}"
        first_day = min([s.day for s in journey.steps] + [journey.referral.day if journey.referral else 0])
        yield {
            "resourceType": "Condition",
            "id": condition_id,
            "clinicalStatus": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
                ]
            },
            "verificationStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                        "code": "confirmed",
                    }
                ]
            },
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                            "code": "encounter-diagnosis",
                        }
                    ]
                }
            ],
            "code": {"coding": [{"system": ICD10, "code": journey.diagnosis}]},
            "subject": patient_ref,
            "onsetDateTime": self.date(first_day - 30),
        }
        yield {
            "resourceType": "Coverage",
            "id": f"cov-{journey.key}",
            "status": "active",
            "beneficiary": patient_ref,
            "payor": [{"reference": f"Organization/org-payer-{journey.payer}"}],
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                        "code": "HIP" if journey.payer != "medicaid" else "SUBSIDIZ",
                    }
                ]
            },
            "period": {"start": self.date(first_day - 365)},
        }
        referral_ref: dict[str, str] | None = None
        if journey.referral is not None:
            referral_ref = {"reference": f"ServiceRequest/sr-{journey.key}"}
            yield from self.referral(journey, patient_ref, condition_id)
        for index, step in enumerate(journey.steps):
            based_on = referral_ref if step.level in ("iop", "php") else None
            if step.level in SESSION_LEVELS:
                yield from self.sessions(journey, index, step, patient_ref, condition_id, based_on)
            else:
                yield self.stay(journey, index, step, patient_ref, condition_id)

    def referral(
        self, journey: Journey, patient_ref: dict[str, str], condition_id: str
    ) -> Iterator[dict[str, Any]]:
        assert journey.referral is not None
        referral = journey.referral
        program = next((s.program for s in journey.steps if s.program), None) or (
            "sud-iop" if referral.code == "4266003" else "mh-iop"
        )
        program_code = str(self.book.programs.get(program, {}).get("code", "S9480"))
        done = referral.task == "7.0"
        yield {
            "resourceType": "ServiceRequest",
            "id": f"sr-{journey.key}",
            "status": "completed" if done else "active",
            "intent": "order",
            "category": [{"coding": [{"system": SNOMED, "code": "3457005", "display": "Patient referral"}]}],
            "code": {
                "coding": [{"system": SNOMED, "code": referral.code}, {"system": HCPCS, "code": program_code}]
            },
            "priority": "routine",
            "subject": patient_ref,
            "authoredOn": self.instant(referral.day, time(14, 0)),
            "requester": {"reference": "Practitioner/prac-psych"},
            "performer": [{"reference": f"Organization/org-{program}"}],
            "reasonReference": [{"reference": f"Condition/{condition_id}"}],
        }
        yield {
            "resourceType": "Task",
            "id": f"task-{journey.key}",
            "status": _TASK_STATUS.get(referral.task, "requested"),
            "intent": "order",
            "businessStatus": {"coding": [{"system": BSER_STATUS, "code": referral.task}]},
            "focus": {"reference": f"ServiceRequest/sr-{journey.key}"},
            "for": patient_ref,
            "authoredOn": self.instant(referral.day, time(14, 5)),
            "requester": {"reference": "Practitioner/prac-psych"},
            "owner": {"reference": f"Organization/org-{program}"},
        }

    def stay(
        self, journey: Journey, index: int, step: Step, patient_ref: dict[str, str], condition_id: str
    ) -> dict[str, Any]:
        encounter: dict[str, Any] = {
            "resourceType": "Encounter",
            "id": f"enc-{journey.key}-{index}",
            "status": "finished",
            "subject": patient_ref,
            "serviceProvider": {"reference": "Organization/org-hospital"},
            "period": {
                "start": self.instant(step.day, time(8, 0)),
                "end": self.instant(step.day + max(step.days - 1, 0), time(16, 0)),
            },
        }
        behavioural = {
            "reasonCode": [{"coding": [{"system": ICD10, "code": journey.diagnosis}]}],
            "diagnosis": [{"condition": {"reference": f"Condition/{condition_id}"}, "rank": 1}],
        }
        if step.level == "inpatient":
            encounter.update(behavioural)
            encounter["class"] = {"system": ACT_CODE, "code": "IMP"}
            encounter["location"] = [{"location": {"reference": "Location/loc-psych-unit"}}]
            encounter["hospitalization"] = {
                "admitSource": {"coding": [{"system": ADMIT_SOURCE, "code": "emd"}]}
            }
        elif step.level == "emergency":
            encounter.update(behavioural)
            encounter["class"] = {"system": ACT_CODE, "code": "EMER"}
            encounter["location"] = [{"location": {"reference": "Location/loc-ed"}}]
        elif step.level == "residential":
            encounter.update(behavioural)
            encounter["class"] = {"system": ACT_CODE, "code": "NONAC"}
            encounter["type"] = [{"coding": [{"system": HCPCS, "code": step.code or "H0019"}]}]
            encounter["location"] = [{"location": {"reference": "Location/loc-residential"}}]
        elif step.level == "surgery":
            encounter["class"] = {"system": ACT_CODE, "code": "IMP"}
            encounter["type"] = [
                {"coding": [{"system": SNOMED, "code": "609588000", "display": "Total knee replacement"}]}
            ]
            encounter["reasonCode"] = [{"coding": [{"system": ICD10, "code": "M17.11"}]}]
            encounter["location"] = [{"location": {"reference": "Location/loc-or"}}]
        else:  # primary care
            encounter["class"] = {"system": ACT_CODE, "code": "AMB"}
            encounter["type"] = [{"coding": [{"system": CPT, "code": step.code or "99213"}]}]
            encounter["reasonCode"] = [{"coding": [{"system": ICD10, "code": "I10"}]}]
            encounter["location"] = [{"location": {"reference": "Location/loc-clinic"}}]
        if step.discharge:
            encounter.setdefault("hospitalization", {})["dischargeDisposition"] = {
                "coding": [{"system": DISCHARGE_DISPOSITION, "code": step.discharge}]
            }
        return encounter

    def sessions(
        self,
        journey: Journey,
        index: int,
        step: Step,
        patient_ref: dict[str, str],
        condition_id: str,
        based_on: dict[str, str] | None,
    ) -> Iterator[dict[str, Any]]:
        program = self.book.programs.get(step.program or "", {})
        code = step.code or str(program.get("code") or ("90834" if step.level == "outpatient" else "S9480"))
        system = CPT if code[:1].isdigit() else HCPCS
        location = f"Location/loc-{step.program}" if step.program else "Location/loc-clinic"
        days = [
            step.day + 7 * week + offset
            for week in range(step.weeks)
            for offset in _WEEK_PATTERN[step.per_week]
        ]
        if step.level in ("iop", "php"):
            yield self.care_plan(journey, index, step, patient_ref, code, system, days)
        links: dict[str, Any] = {}
        if step.admission or step.grouped:
            container = self.program_container(journey, index, step, patient_ref, code, system, days)
            yield container
            if step.admission:
                links["partOf"] = {"reference": f"Encounter/{container['id']}"}
            else:
                links["episodeOfCare"] = [{"reference": f"EpisodeOfCare/{container['id']}"}]
            # The sessions carry only the group-therapy code: the admission or the EHR's episode says
            # which program they belong to (G0410 alone decides no level).
            code, system = "G0410", HCPCS
        for number, day in enumerate(days, start=1):
            sid = f"{journey.key}-{index}-{number}"
            start = self.instant(day)
            end = self.instant(day, plus_hours=step.hours)
            if day > 0 or number in step.absent:
                yield {
                    "resourceType": "Appointment",
                    "id": f"apt-{sid}",
                    "status": "noshow" if number in step.absent and day <= 0 else "booked",
                    "serviceType": [{"coding": [{"system": system, "code": code}]}],
                    "start": start,
                    "end": end,
                    "participant": [
                        {"actor": patient_ref, "status": "accepted"},
                        {"actor": {"reference": location}, "status": "accepted"},
                    ],
                }
                continue
            status = "finished"
            if number in step.cancelled:
                status = "cancelled"
            elif number in step.entered_in_error:
                status = "entered-in-error"
            telehealth = step.telehealth and number % 3 != 1
            encounter: dict[str, Any] = {
                "resourceType": "Encounter",
                "id": f"enc-{sid}",
                "status": status,
                "class": {"system": ACT_CODE, "code": "VR" if telehealth else "AMB"},
                "type": [{"coding": [{"system": system, "code": code}]}],
                "subject": patient_ref,
                "period": {"start": start, "end": end},
                "reasonCode": [{"coding": [{"system": ICD10, "code": journey.diagnosis}]}],
                "diagnosis": [{"condition": {"reference": f"Condition/{condition_id}"}, "rank": 1}],
                "location": [{"location": {"reference": location}}],
                "serviceProvider": {"reference": "Organization/org-hospital"},
            }
            if based_on is not None:
                encounter["basedOn"] = [based_on]
            encounter.update(links)
            if step.discharge and number == len(days):
                encounter["hospitalization"] = {
                    "dischargeDisposition": {
                        "coding": [{"system": DISCHARGE_DISPOSITION, "code": step.discharge}]
                    }
                }
            yield encounter

    def program_container(
        self,
        journey: Journey,
        index: int,
        step: Step,
        patient_ref: dict[str, str],
        code: str,
        system: str,
        days: Sequence[int],
    ) -> dict[str, Any]:
        """The admission Encounter, or the EHR's own EpisodeOfCare, that groups a step's sessions."""
        finished = days[-1] <= 0
        period: dict[str, str] = {"start": self.instant(days[0])}
        if finished:
            period["end"] = self.instant(days[-1], plus_hours=step.hours)
        if step.admission:
            admission: dict[str, Any] = {
                "resourceType": "Encounter",
                "id": f"enc-{journey.key}-{index}-admission",
                "status": "finished" if finished else "in-progress",
                "class": {"system": ACT_CODE, "code": "AMB"},
                "type": [{"coding": [{"system": system, "code": code}]}],
                "subject": patient_ref,
                "period": period,
                "reasonCode": [{"coding": [{"system": ICD10, "code": journey.diagnosis}]}],
                "serviceProvider": {"reference": "Organization/org-hospital"},
            }
            if finished and step.discharge:
                admission["hospitalization"] = {
                    "dischargeDisposition": {
                        "coding": [{"system": DISCHARGE_DISPOSITION, "code": step.discharge}]
                    }
                }
            return admission
        return {
            "resourceType": "EpisodeOfCare",
            "id": f"eoc-{journey.key}-{index}",
            "status": "finished" if finished else "active",
            "type": [{"coding": [{"system": system, "code": code}]}],
            "patient": patient_ref,
            "managingOrganization": {"reference": f"Organization/org-{step.program}"}
            if step.program
            else {"reference": "Organization/org-hospital"},
            "period": {"start": self.date(days[0]), **({"end": self.date(days[-1])} if finished else {})},
        }

    def care_plan(
        self,
        journey: Journey,
        index: int,
        step: Step,
        patient_ref: dict[str, str],
        code: str,
        system: str,
        days: Sequence[int],
    ) -> dict[str, Any]:
        finished = days[-1] <= 0
        return {
            "resourceType": "CarePlan",
            "id": f"cp-{journey.key}-{index}",
            "status": "completed" if finished else "active",
            "intent": "plan",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://hl7.org/fhir/us/core/CodeSystem/careplan-category",
                            "code": "assess-plan",
                        }
                    ]
                }
            ],
            "subject": patient_ref,
            "period": {"start": self.date(days[0]), "end": self.date(days[-1])},
            "activity": [
                {
                    "detail": {
                        "kind": "ServiceRequest",
                        "code": {"coding": [{"system": system, "code": code}]},
                        "status": "completed" if finished else "in-progress",
                        "scheduledTiming": {
                            "repeat": {
                                "frequency": step.per_week,
                                "period": 1,
                                "periodUnit": "wk",
                                "duration": step.hours,
                                "durationUnit": "h",
                            }
                        },
                    }
                }
            ],
        }


def _location(resource_id: str, name: str, system: str, code: str) -> dict[str, Any]:
    return {
        "resourceType": "Location",
        "id": resource_id,
        "status": "active",
        "name": name,
        "type": [{"coding": [{"system": system, "code": code}]}],
        "managingOrganization": {"reference": "Organization/org-hospital"},
    }


def build_resources(
    book: JourneyBook, *, anchor: date, timezone: str = "UTC", seed: int = 7
) -> Iterator[dict[str, Any]]:
    """Every resource of the book, shared ones (organizations, locations) first, patient by patient."""
    builder = _Builder(book=book, anchor=anchor, zone=ZoneInfo(timezone), rng=random.Random(seed))
    yield from builder.shared()
    for number, journey in enumerate(book.journeys):
        yield from builder.journey(number, journey)


def transaction_bundle(resources: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A transaction that PUTs each resource at its id: loading it twice updates in place."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": dict(resource),
                "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
            }
            for resource in resources
        ],
    }

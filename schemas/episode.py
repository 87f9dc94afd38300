"""Typed view of the ``episode.v1`` record (``schemas/episode.v1.json``), checked against it in a test.

The JSON Schema is the contract; these TypedDicts let Python code that builds or reads the records be
type-checked. Keys are the schema's properties exactly; ``NotRequired`` marks what the schema does not
require. (No ``from __future__ import annotations`` here: TypedDict needs evaluated annotations to
see ``NotRequired`` on Python 3.11.)
"""

from typing import Literal, NotRequired, TypedDict

Level = Literal["outpatient", "iop", "php", "residential", "inpatient", "emergency"]
ProgramLevel = Literal["iop", "php", "residential"]
Direction = Literal["step_down", "step_up", "lateral"]


class Reference(TypedDict):
    reference: str


class Identifier(TypedDict):
    value: str
    system: NotRequired[str]


class PatientReference(TypedDict):
    reference: str
    identifier: list[Identifier]


class Coding(TypedDict):
    system: NotRequired[str]
    code: NotRequired[str]
    display: NotRequired[str]


class Entry(TypedDict):
    direction: Literal["step_down", "step_up", "lateral", "direct"]
    from_level: Level | None
    at: str | None
    encounter: Reference | None


class Exit(TypedDict):
    reason: Literal["discharged", "stepped_up", "stepped_down", "lost_to_follow_up"]
    direction: Direction | None
    to_level: Level | None
    at: str
    encounter: Reference | None
    disposition: Coding | None


class Session(TypedDict):
    reference: str
    date: str
    start: str
    hours: float


class Week(TypedDict):
    week_start: str
    sessions: int
    hours: float
    meets_minimum: bool
    looks_like_php: NotRequired[bool]


class Attendance(TypedDict):
    sessions_attended: int
    hours_attended: float
    weeks: list[Week]


class ServiceLine(TypedDict):
    date: str
    services: list[Coding]
    count: int


class Diagnosis(TypedDict):
    system: str
    code: str
    principal: bool
    condition: Reference | None


class Payor(TypedDict):
    reference: NotRequired[str]
    display: NotRequired[str]


class Payer(TypedDict):
    coverage: Reference
    profile: str
    payor: Payor | None


class Billing(TypedDict):
    condition_code: Literal["92", "41"] | None
    revenue_code: str | None
    hcpcs: str | None
    units: int
    lines: list[ServiceLine]
    diagnoses: list[Diagnosis]
    payer: Payer | None


class PlanPeriod(TypedDict):
    start: str | None
    end: str | None


class Schedule(TypedDict):
    sessions_per_week: float | None
    hours_per_session: float | None
    hours_per_week: float | None


class CarePlanSummary(TypedDict):
    reference: str
    status: str
    period: PlanPeriod
    last_revised: str | None
    schedule: Schedule


class Episode(TypedDict):
    episode_id: str
    ehr: str
    patient: PatientReference
    level: ProgramLevel
    status: Literal["active", "finished", "cancelled"]
    start: str | None
    end: str | None
    anchor: Reference | None
    entry: Entry | None
    exit: Exit | None
    sessions: list[Session]
    attendance: Attendance
    billing: Billing
    part2: bool
    security: list[Coding]
    referral: Reference | None
    care_plans: list[CarePlanSummary]
    superseded_by: str | None
    rules_version: str

"""Typed shape of a ``referral.v1`` record (``schemas/referral.v1.json`` is the contract; a test checks
that these types and the JSON Schema name the same fields and the same required ones).

Producers build records as these TypedDicts so mypy catches a misspelt or missing field; consumers can
annotate what they read with them.
"""

# No ``from __future__ import annotations`` here: TypedDict must see ``NotRequired`` at runtime
# (``__required_keys__``), which string annotations hide on Python 3.11.
from typing import Literal, NotRequired, TypedDict

__all__ = [
    "Coding",
    "Identifier",
    "PatientReference",
    "Reference",
    "Referral",
    "ReferralState",
    "ReferralTarget",
    "ReferralTask",
    "ServiceRequestReference",
]

ReferralState = Literal[
    "draft",
    "sent",
    "received",
    "accepted",
    "declined",
    "scheduled",
    "completed",
    "cancelled",
    "on-hold",
    "unknown",
]


class Coding(TypedDict):
    code: str
    system: NotRequired[str]
    display: NotRequired[str]


class Identifier(TypedDict):
    value: str
    system: NotRequired[str]


class Reference(TypedDict):
    reference: str | None
    identifier: list[Identifier]


class PatientReference(TypedDict):
    reference: str
    identifier: list[Identifier]


class ServiceRequestReference(TypedDict):
    reference: str
    identifier: list[Identifier]


class ReferralTarget(TypedDict):
    level: Literal["iop", "php", "residential"] | None
    performer: list[Reference]
    location_code: list[Coding]
    code: list[Coding]


class ReferralTask(TypedDict):
    reference: str
    status: str | None
    business_status: Coding | None
    state: ReferralState
    last_modified: str | None


class Referral(TypedDict):
    referral_id: str
    ehr: str
    patient: PatientReference
    service_request: ServiceRequestReference
    status: str
    intent: str | None
    state: ReferralState
    state_source: Literal["task", "service_request"]
    priority: Literal["routine", "urgent", "asap", "stat"] | None
    referral_type: list[Coding]
    reason: list[Coding]
    reason_references: list[str]
    requester: Reference | None
    authored: str | None
    target: ReferralTarget
    task: ReferralTask | None
    part2: bool
    security: list[Coding]
    rules_version: str

"""Referrals: ServiceRequests that refer a patient (SNOMED 3457005 or a descendant, or a local code).

A referral record carries the request's status, priority, reason codes (never free text), requester,
authored date, target program and, when a BSeR / Gravity Task points at it (``focus`` or ``basedOn``),
the Task's state. The state vocabulary (``REFERRAL_STATES``) is the same whether it comes from a Task or,
without one, from ``ServiceRequest.status``:

    Task businessStatus (BSeR STU2, domain.md 3.6)   state
    2.0 created                                      received
    3.0 accepted                                     accepted
    4.0 declined                                     declined
    5.1.1 event scheduled                            scheduled
    5.1.2 unattended, 5.1.3 event cancelled,         accepted   (referral still open, nothing booked;
    5.1.4 event completed                                        the code itself is kept in the record)
    5.2 cancellation requested, 6.0 cancelled        cancelled
    7.0 fulfillment completed                        completed

A terminal ``Task.status`` (completed, cancelled, rejected, failed) wins over its businessStatus; without
a known businessStatus the Task status decides (requested/received -> received, accepted/ready/
in-progress/on-hold -> accepted, rejected -> declined). Without a Task: draft -> draft, active -> sent,
on-hold -> on-hold, revoked -> cancelled, completed -> completed, unknown -> unknown.

Like episodes, a referral's id is a UUIDv5 of the EHR connection's name and the ServiceRequest's id, so
the same request maps to the same record every time. ``entered-in-error`` requests and Tasks vanish; the
newest version of a resource replaces older ones. A referral the mapper cannot use (no id, no patient,
an unparsable authored date) is a ``Reject``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, tzinfo
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo

from mappers.codes import CANONICAL, codings, icd10_f_range, normalise_code, system_key
from mappers.facts import SUD_F_RANGES, security_labels
from mappers.fhir import FhirValueError, parse_datetime, reference_key, rfc3339
from mappers.index import Reject, newest_versions, resolve
from mappers.part2 import is_part2 as has_part2_evidence
from mappers.rules import Rules
from schemas.patient_identifiers import DEFAULT_PATIENT_IDENTIFIER_SYSTEMS, allowed, check_entries
from schemas.referral import (
    Coding,
    Identifier,
    Reference,
    Referral,
    ReferralState,
    ReferralTarget,
    ReferralTask,
)

__all__ = [
    "REFERRAL_NAMESPACE",
    "REFERRAL_SNOMED_CODES",
    "REFERRAL_STATES",
    "REFERRAL_TO",
    "ReferralResult",
    "map_referrals",
    "referral_id",
]

#: Namespace of referral ids: ``uuid5(REFERRAL_NAMESPACE, "{ehr}|ServiceRequest/{id}")``.
REFERRAL_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:iop-bridge:referral")

#: SNOMED CT 3457005 "Patient referral" and the descendants (is-a 3457005, the R4/STU3 ``referral-type``
#: value set, http://hl7.org/fhir/ValueSet/referral-type) that a behavioral-health program receives or
#: that EHRs commonly put in ServiceRequest.category. The value set has ~900 concepts; a hospital using
#: another one adds it as a local code.
REFERRAL_SNOMED_CODES: Final[Mapping[str, str]] = {
    "3457005": "Patient referral",
    "4266003": "Patient referral for drug addiction rehabilitation",
    "38670004": "Patient referral for alcoholism rehabilitation",
    "81294000": "Patient referral for psychotherapy",
    "103696004": "Patient referral to specialist",
    "103698003": "Patient referral to non-physician provider",
    "183515008": "Referral to physician",
    "183524004": "Referral to psychiatry service",
    "183528001": "Referral to psychiatrist for the elderly mentally ill",
    "183583007": "Refer to mental health worker",
    "183904005": "Private referral to psychiatrist",
    "306136006": "Referral to liaison psychiatry service",
    "306138007": "Referral to psychogeriatric service",
    "306204008": "Referral to psychogeriatric day hospital",
    "306206005": "Referral to service",
    "306226009": "Referral to mental health counseling service",
    "306227000": "Referral for mental health counseling",
    "306252003": "Referral to mental health counselor",
    "306253008": "Referral to doctor",
    "306291008": "Referral to child and adolescent psychiatrist",
    "308459004": "Referral to psychologist",
    "308477009": "Referral to psychiatrist",
    "390866009": "Referral to mental health team",
    "1186918003": "Referral to intellectual disability psychiatrist",
    "1186920000": "Referral to intellectual disability psychiatry service",
}
#: SNOMED 440379008 "Referral to": some implementers use it for referrals (domain.md 3.5); on by default,
#: ``map_referrals(referral_to=False)`` turns it off.
REFERRAL_TO: Final = "440379008"
#: Referral codes that by themselves make a referral substance-use treatment (42 CFR Part 2).
SUBSTANCE_USE_REFERRALS: Final = frozenset({"4266003", "38670004"})
#: Codes on the target program that make it substance-use treatment (H0015 SUD IOP, revenue 0906).
SUBSTANCE_USE_PROGRAM: Final = frozenset({("hcpcs", "H0015"), ("revenue", "0906")})
#: The only resource types read: the requests, their Tasks, patients, reasons, and what a Bundle's
#: ``urn:uuid`` requester / performer / subject references can point at. Everything else (the many
#: Encounters) is skipped unread.
READ_TYPES: Final = frozenset(
    {
        "ServiceRequest", "Task", "Patient", "Group", "Condition", "Observation", "Practitioner",
        "PractitionerRole", "Organization", "HealthcareService", "Location", "CareTeam", "Device",
        "RelatedPerson",
    }
)  # fmt: skip

REFERRAL_STATES: Final = (
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
)
_BUSINESS_STATES: Final[Mapping[str, ReferralState]] = {
    "2.0": "received",
    "3.0": "accepted",
    "4.0": "declined",
    "5.1.1": "scheduled",
    "5.1.2": "accepted",
    "5.1.3": "accepted",
    "5.1.4": "accepted",
    "5.2": "cancelled",
    "6.0": "cancelled",
    "7.0": "completed",
}
_TERMINAL_TASK_STATES: Final[Mapping[str, ReferralState]] = {
    "completed": "completed",
    "cancelled": "cancelled",
    "rejected": "declined",
    "failed": "cancelled",
}
_TASK_STATES: Final[Mapping[str, ReferralState]] = {
    "requested": "received",
    "received": "received",
    "accepted": "accepted",
    "ready": "accepted",
    "in-progress": "accepted",
    "on-hold": "accepted",
    **_TERMINAL_TASK_STATES,
}
_REQUEST_STATES: Final[Mapping[str, ReferralState]] = {
    "draft": "draft",
    "active": "sent",
    "on-hold": "on-hold",
    "revoked": "cancelled",
    "completed": "completed",
    "unknown": "unknown",
}
_PRIORITIES: Final[Mapping[str, Literal["routine", "urgent", "asap", "stat"]]] = {
    "routine": "routine",
    "urgent": "urgent",
    "asap": "asap",
    "stat": "stat",
}
_TARGET_LEVELS: Final[Mapping[str, Literal["iop", "php", "residential"]]] = {
    "iop": "iop",
    "php": "php",
    "residential": "residential",
}


@dataclass
class ReferralResult:
    """Referral records (sorted by ``referral_id``) and the ServiceRequests that could not be used."""

    referrals: list[Referral] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def referral_id(ehr: str, service_request_id: str) -> str:
    """The deterministic id of the referral a ServiceRequest stands for."""
    return str(uuid.uuid5(REFERRAL_NAMESPACE, f"{ehr}|ServiceRequest/{service_request_id}"))


def _zone(timezone: str | tzinfo) -> tzinfo:
    if isinstance(timezone, tzinfo):
        return timezone
    return UTC if timezone.upper() == "UTC" else ZoneInfo(timezone)


def _list(value: Any) -> list[Any]:
    """A repeating element as a list (a single value sent where FHIR says 0..*, too); junk as empty."""
    if isinstance(value, list):
        return value
    return [value] if isinstance(value, (dict, Mapping)) else []


def _local_keys(local_codes: Iterable[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    keys = set()
    for system, code in local_codes:
        key = system_key(system)
        keys.add((key, normalise_code(key, code)))
    return frozenset(keys)


def _referral_codings(
    request: Mapping[str, Any], local: frozenset[tuple[str, str]], referral_to: bool
) -> list[Coding]:
    """The category / code codings that make this ServiceRequest a referral (empty: not a referral)."""
    found: list[Coding] = []
    seen: set[tuple[str, str]] = set()
    for key, code, out in _raw_codings([request.get("category"), request.get("code")]):
        snomed = key == "snomed" and (code in REFERRAL_SNOMED_CODES or (referral_to and code == REFERRAL_TO))
        if (snomed or (key, code) in local) and (key, code) not in seen:
            seen.add((key, code))
            found.append(out)
    return found


def _raw_codings(value: Any) -> Iterator[tuple[str, str, Coding]]:
    """``(system key, normalised code, coding out)`` of every coding in a (list of) CodeableConcept.

    The coding out has the canonical URI of a known system (else the system as sent) and the code as
    sent; its display is left out (free text).
    """
    if isinstance(value, list):
        for item in value:
            yield from _raw_codings(item)
        return
    if not isinstance(value, (dict, Mapping)):
        return
    for coding in _list(value.get("coding")):
        if isinstance(coding, (dict, Mapping)):
            for key, code in codings(coding):
                sent = coding.get("system")
                system = CANONICAL.get(key) or (sent.strip() if isinstance(sent, str) else "")
                out: Coding = {"code": str(coding["code"]).strip()}
                if system:
                    out = {"system": system, **out}
                yield key, code, out


def _coding_list(value: Any) -> list[Coding]:
    """Codings as ``{system, code}`` (canonical system URI, the code as sent; display left out)."""
    found: list[Coding] = []
    seen: set[tuple[str, str]] = set()
    for key, code, out in _raw_codings(value):
        if (key, code) not in seen:
            seen.add((key, code))
            found.append(out)
    return found


def _identifiers(value: Any, systems: Sequence[str] | None = None) -> list[Identifier]:
    """Identifiers as ``{system, value}`` (type text and other free text left out); with ``systems``
    (a patient's: ``schemas.patient_identifiers``) only those these entries allow."""
    items = value if isinstance(value, list) else [value] if isinstance(value, (dict, Mapping)) else []
    found: list[Identifier] = []
    for item in items:
        if systems is not None and not (isinstance(item, (dict, Mapping)) and allowed(item, systems)):
            continue
        if isinstance(item, (dict, Mapping)) and isinstance(item.get("value"), str) and item["value"].strip():
            identifier: Identifier = {"value": item["value"].strip()}
            if isinstance(item.get("system"), str) and item["system"].strip():
                identifier = {"system": item["system"].strip(), **identifier}
            found.append(identifier)
    return found


def _reference(value: Any, shared: Mapping[str, Mapping[str, Any]]) -> Reference | None:
    """A reference as the records carry it: ``{"reference": "Type/id", "identifier": [...]}`` or None."""
    if not isinstance(value, (dict, Mapping)):
        return None
    key = resolve(value, shared)
    identifiers = _identifiers(value.get("identifier"))
    if key is None and not identifiers:
        return None
    return {"reference": key, "identifier": identifiers}


def _target(
    request: Mapping[str, Any], rules: Rules, shared: Mapping[str, Mapping[str, Any]]
) -> ReferralTarget:
    """Where the referral goes: performers, location codes, the requested service and its program level."""
    level: Literal["iop", "php", "residential"] | None = None
    for tier, value in (("code", request.get("code")), ("location_type", request.get("locationCode"))):
        for key, code in codings(value):
            hits = [
                _TARGET_LEVELS[r.level]
                for r in rules.candidates(tier, key, code)
                if r.level in _TARGET_LEVELS
            ]
            if hits and level is None:
                level = hits[0]
    performers = [ref for ref in (_reference(p, shared) for p in _list(request.get("performer"))) if ref]
    return {
        "level": level,
        "performer": performers,
        "location_code": _coding_list(request.get("locationCode")),
        "code": _coding_list(request.get("code")),
    }


def _reasons(
    request: Mapping[str, Any], shared: Mapping[str, Mapping[str, Any]]
) -> tuple[list[Coding], list[str]]:
    reasons = _coding_list(request.get("reasonCode"))
    references: list[str] = []
    for target in _list(request.get("reasonReference")):
        key = resolve(target, shared)
        if key is None:
            continue
        references.append(key)
        resource = shared.get(key)
        for coding in _coding_list(resource.get("code") if resource else None):
            if coding not in reasons:
                reasons.append(coding)
    return reasons, references


def _is_substance_use(
    referral_codes: Sequence[Coding], reasons: Sequence[Coding], target: ReferralTarget
) -> bool:
    if any(
        c["code"] in SUBSTANCE_USE_REFERRALS and system_key(c.get("system")) == "snomed"
        for c in referral_codes
    ):
        return True
    for reason in reasons:
        if system_key(reason.get("system")) == "icd10cm" and icd10_f_range(reason["code"]) in SUD_F_RANGES:
            return True
    for coding in target["code"]:
        key = system_key(coding.get("system"))
        if (key, normalise_code(key, coding["code"])) in SUBSTANCE_USE_PROGRAM:
            return True
    return False


def _task_targets(task: Mapping[str, Any]) -> Iterator[str]:
    for value in (task.get("focus"), *_list(task.get("basedOn"))):
        key = reference_key(value)
        if key is not None:
            yield key


def _task_moment(task: Mapping[str, Any]) -> str:
    meta = task.get("meta") if isinstance(task.get("meta"), (dict, Mapping)) else {}
    assert isinstance(meta, (dict, Mapping))
    for value in (task.get("lastModified"), meta.get("lastUpdated"), task.get("authoredOn")):
        if isinstance(value, str):
            try:
                return parse_datetime(value, UTC).isoformat()
            except FhirValueError:
                continue
    return ""


def _task_state(task: Mapping[str, Any]) -> ReferralState | None:
    status = str(task.get("status"))
    if status in _TERMINAL_TASK_STATES:
        return _TERMINAL_TASK_STATES[status]
    for _, code in codings(task.get("businessStatus")):
        if code in _BUSINESS_STATES:
            return _BUSINESS_STATES[code]
    return _TASK_STATES.get(status)


def _task_record(task: Mapping[str, Any], state: ReferralState, zone: tzinfo) -> ReferralTask:
    business = _coding_list(task.get("businessStatus"))
    modified = None
    if isinstance(task.get("lastModified"), str):
        try:
            modified = rfc3339(parse_datetime(task["lastModified"], zone))
        except FhirValueError:
            modified = None
    return {
        "reference": f"Task/{task['id']}",
        "status": task.get("status") if isinstance(task.get("status"), str) else None,
        "business_status": business[0] if business else None,
        "state": state,
        "last_modified": modified,
    }


def _tasks_by_request(
    tasks: Iterable[Mapping[str, Any]], shared: Mapping[str, Mapping[str, Any]]
) -> dict[str, Mapping[str, Any]]:
    """The latest usable Task per ServiceRequest (latest modification, then id, so order never matters)."""
    chosen: dict[str, tuple[tuple[str, str], Mapping[str, Any]]] = {}
    for task in tasks:
        if str(task.get("status")) in ("entered-in-error", "draft") or _task_state(task) is None:
            continue
        rank = (_task_moment(task), str(task.get("id")))
        for key in _task_targets(task):
            target = resolve(key, shared) if key.startswith("urn:") else key
            if target is None or not target.startswith("ServiceRequest/"):
                continue
            if target not in chosen or rank > chosen[target][0]:
                chosen[target] = (rank, task)
    return {key: task for key, (_, task) in chosen.items()}


def map_referrals(
    resources: Iterable[Mapping[str, Any]],
    *,
    ehr: str,
    rules: Rules,
    local_codes: Iterable[tuple[str, str]] = (),
    referral_to: bool = True,
    part2_program: bool = False,
    timezone: str | tzinfo = "UTC",
    patient_identifier_systems: Iterable[str] = DEFAULT_PATIENT_IDENTIFIER_SYSTEMS,
) -> ReferralResult:
    """Referral records from any mix of FHIR resources (only ServiceRequest, Task, Patient, Condition,
    Observation and Bundle-referenced resources are read; everything else is ignored).

    ``local_codes`` are ``(system URI, code)`` pairs a hospital uses for referrals besides SNOMED;
    ``part2_program`` marks every referral Part 2 (the receiving program is a 42 CFR Part 2 program);
    ``patient_identifier_systems`` are the patient identifiers a record may carry (HIPAA minimum
    necessary: ``schemas.patient_identifiers``; the MR type by default, never SSN / licence / passport,
    which raise ``ValueError``), as for episodes.
    """
    systems = tuple(patient_identifier_systems)
    try:
        check_entries(systems)
    except ValueError as exc:
        raise ValueError(f"patient_identifier_systems: {exc}") from exc
    zone = _zone(timezone)
    local = _local_keys(local_codes)
    result = ReferralResult()
    scratch: list[Reject] = []
    items = [
        r for r in resources if isinstance(r, (dict, Mapping)) and isinstance(r.get("resourceType"), str)
        and r["resourceType"] in READ_TYPES
    ]  # fmt: skip
    for item in items:
        if (
            item.get("resourceType") == "ServiceRequest"
            and not (isinstance(item.get("id"), str) and item["id"])
            and _referral_codings(item, local, referral_to)
        ):
            result.rejects.append(Reject("ServiceRequest", None, "no id"))
    newest = newest_versions(items, scratch)
    shared: dict[str, Mapping[str, Any]] = {}
    for (resource_type, resource_id), resource in newest.items():
        shared[f"{resource_type}/{resource_id}"] = resource
        shared.setdefault(f"urn:uuid:{resource_id}", resource)
    tasks = _tasks_by_request((r for (t, _), r in newest.items() if t == "Task"), shared)
    requests = sorted((key, r) for key, r in newest.items() if key[0] == "ServiceRequest")
    for (_, resource_id), request in requests:
        if request.get("status") == "entered-in-error":
            continue
        referral_codes = _referral_codings(request, local, referral_to)
        if not referral_codes:
            continue
        record = _record(
            request,
            referral_codes,
            tasks.get(f"ServiceRequest/{resource_id}"),
            shared,
            ehr=ehr,
            rules=rules,
            zone=zone,
            part2_program=part2_program,
            patient_identifier_systems=systems,
        )
        if isinstance(record, Reject):
            result.rejects.append(record)
        else:
            result.referrals.append(record)
    result.referrals.sort(key=lambda r: str(r["referral_id"]))
    result.rejects.sort(key=lambda r: (r.resource_type, r.id or "", r.reason))
    return result


def _record(
    request: Mapping[str, Any],
    referral_codes: list[Coding],
    task: Mapping[str, Any] | None,
    shared: Mapping[str, Mapping[str, Any]],
    *,
    ehr: str,
    rules: Rules,
    zone: tzinfo,
    part2_program: bool,
    patient_identifier_systems: Sequence[str],
) -> Referral | Reject:
    request_id = str(request["id"])
    subject = resolve(request.get("subject"), shared)
    if subject is None:
        reason = "no subject" if not request.get("subject") else "subject is not a Patient reference"
        return Reject("ServiceRequest", request_id, reason)
    if not subject.startswith("Patient/"):
        kind = subject.split("/")[0]
        shown = kind if kind.isalpha() and kind.isascii() and len(kind) <= 64 else "reference"
        return Reject("ServiceRequest", request_id, f"subject is a {shown}, not a Patient")
    authored: date | None = None
    if request.get("authoredOn") is not None:
        try:
            authored = parse_datetime(request.get("authoredOn"), zone).astimezone(zone).date()
        except FhirValueError as exc:
            return Reject("ServiceRequest", request_id, f"authoredOn: {exc}")
    patient = shared.get(subject)
    systems = patient_identifier_systems
    identifiers = _identifiers(patient.get("identifier"), systems) if patient else []
    subject_ref = request.get("subject")
    sent = subject_ref.get("identifier") if isinstance(subject_ref, (dict, Mapping)) else None
    for identifier in _identifiers(sent, systems):
        if identifier not in identifiers:
            identifiers.append(identifier)
    reasons, reason_references = _reasons(request, shared)
    target = _target(request, rules, shared)
    reason_resources = [shared[key] for key in reason_references if key in shared]
    part2 = (
        part2_program
        or _is_substance_use(referral_codes, reasons, target)
        or has_part2_evidence([request, *reason_resources, *([patient] if patient else [])], shared)
    )
    task_state = _task_state(task) if task is not None else None
    task_record = _task_record(task, task_state, zone) if task is not None and task_state else None
    status = str(request.get("status"))
    if status not in _REQUEST_STATES:
        status = "unknown"
    state: ReferralState = _REQUEST_STATES[status]
    state_source: Literal["task", "service_request"] = "service_request"
    if task_record is not None:
        state, state_source = task_record["state"], "task"
    labels: list[Coding] = [
        {"system": label["system"], "code": label["code"], "display": label["display"]}
        for label in security_labels(part2)
    ]
    return {
        "referral_id": referral_id(ehr, request_id),
        "ehr": ehr,
        "patient": {"reference": subject, "identifier": identifiers},
        "service_request": {
            "reference": f"ServiceRequest/{request_id}",
            "identifier": _identifiers(request.get("identifier")),
        },
        "status": status,
        "intent": request.get("intent") if isinstance(request.get("intent"), str) else None,
        "state": state,
        "state_source": state_source,
        "priority": _PRIORITIES.get(str(request.get("priority"))),
        "referral_type": referral_codes,
        "reason": reasons,
        "reason_references": reason_references,
        "requester": _reference(request.get("requester"), shared),
        "authored": authored.isoformat() if authored else None,
        "target": target,
        "task": task_record,
        "part2": part2,
        "security": labels,
        "rules_version": rules.version,
    }

"""Sorting raw resources into what the engine needs: newest versions only, per patient, with rejects.

- A resource's newer version (higher ``meta.versionId``, then later ``meta.lastUpdated``) replaces the
  older one; an exact tie is broken by content so the choice never depends on input order.
- ``entered-in-error`` (after choosing the newest version) vanishes as if it never arrived.
- Resources the engine uses but cannot place (no id, no subject) become ``Reject``s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any, Final

import orjson

from mappers.fhir import FhirValueError, element, parse_datetime, reference_id, reference_key

#: Resource types the engine reads, and the element naming their patient.
PATIENT_ELEMENT: Final[Mapping[str, str]] = {
    "Encounter": "subject",
    "EpisodeOfCare": "patient",
    "CarePlan": "subject",
    "Condition": "subject",
    "Procedure": "subject",
    "Coverage": "beneficiary",
}
#: Ids we can use: wider than FHIR's rule ([A-Za-z0-9.-]{1,64}) because the Epic/Oracle profiles keep
#: resources whose ids break it (Oracle's underscores, Epic's ids over 64 characters); same as the contracts.
FHIR_ID: Final = re.compile(r"[A-Za-z0-9._\-]{1,255}")
#: Types kept in the shared index for references (no patient of their own needed).
SHARED_TYPES: Final = frozenset({"Location", "Organization", "Condition"})


@dataclass
class Reject:
    """A resource the mappers could not use, and why (never a crash, never silently dropped)."""

    resource_type: str
    id: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"resourceType": self.resource_type, "id": self.id, "reason": self.reason}


@dataclass
class PatientResources:
    """One patient's resources by type (newest versions, no entered-in-error)."""

    patient_id: str
    patient: Mapping[str, Any] | None = None
    by_type: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)

    def of(self, resource_type: str) -> list[Mapping[str, Any]]:
        return self.by_type.get(resource_type, [])


@dataclass
class Collected:
    patients: dict[str, PatientResources]
    shared: dict[str, Mapping[str, Any]]
    rejects: list[Reject]
    #: Conditions and Procedures by the Encounter they point at (``"Encounter/1"``): the US Core
    #: encounter diagnosis is a ``Condition.encounter`` back-reference only; services ``Procedure.encounter``.
    by_encounter: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)


_MIN: Final = datetime.min.replace(tzinfo=UTC)


def _version_key(resource: Mapping[str, Any]) -> tuple[int, datetime]:
    meta = resource.get("meta") if isinstance(resource.get("meta"), (dict, Mapping)) else {}
    assert isinstance(meta, (dict, Mapping))
    version = meta.get("versionId")
    number = int(version) if isinstance(version, str) and version.isdigit() else -1
    try:
        updated = parse_datetime(meta.get("lastUpdated"), UTC) if meta.get("lastUpdated") else _MIN
    except FhirValueError:
        updated = _MIN
    return number, updated


def _newer(candidate: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    a, b = _version_key(candidate), _version_key(current)
    if a != b:
        return a > b
    return _canonical(candidate) > _canonical(current)


def _canonical(resource: Mapping[str, Any]) -> bytes:
    """Sorted-key JSON of a resource: the order-independent tie-break between equal versions."""
    try:
        return orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # values orjson refuses (integers beyond 64 bits, non-string keys)
        return json.dumps(resource, sort_keys=True, default=repr).encode()


def newest_versions(
    resources: Iterable[Mapping[str, Any]], rejects: list[Reject]
) -> dict[tuple[str, str], Mapping[str, Any]]:
    """The newest version of each ``(type, id)``; unusable items go to ``rejects``."""
    newest: dict[tuple[str, str], Mapping[str, Any]] = {}
    for resource in resources:
        if not isinstance(resource, (dict, Mapping)) or not isinstance(resource.get("resourceType"), str):
            rejects.append(Reject("unknown", None, "not a FHIR resource (no resourceType)"))
            continue
        resource_type = str(resource["resourceType"])
        resource_id = resource.get("id")
        if not isinstance(resource_id, str) or not resource_id:
            if resource_type in PATIENT_ELEMENT or resource_type == "Patient":
                rejects.append(Reject(resource_type, None, "no id"))
            continue
        if not FHIR_ID.fullmatch(resource_id):
            if resource_type in PATIENT_ELEMENT or resource_type == "Patient":
                rejects.append(Reject(resource_type, None, "id is not usable ([A-Za-z0-9._-]{1,255})"))
            continue
        key = (resource_type, resource_id)
        current = newest.get(key)
        if current is None or _newer(resource, current):
            newest[key] = resource
    return newest


def _patient_of(resource: Mapping[str, Any]) -> str | None:
    name = PATIENT_ELEMENT[str(resource["resourceType"])]
    value = resource.get(name)
    if type(value) is dict:  # the common case: {"reference": "Patient/<id>"}, read once per string
        reference = value.get("reference")
        if type(reference) is str:
            return _patient_id(reference)
    patient_id = reference_id(value, "Patient")
    return patient_id if patient_id is not None and FHIR_ID.fullmatch(patient_id) else None


@lru_cache(maxsize=4096)  # a patient's resources repeat their reference; a batch's patients fit
def _patient_id(reference: str) -> str | None:
    patient_id = reference_id(reference, "Patient")
    return patient_id if patient_id is not None and FHIR_ID.fullmatch(patient_id) else None


def collect(resources: Iterable[Mapping[str, Any]]) -> Collected:
    """Group the newest versions by patient; build the shared reference index."""
    rejects: list[Reject] = []
    newest = newest_versions(resources, rejects)
    patients: dict[str, PatientResources] = {}
    shared: dict[str, Mapping[str, Any]] = {}
    for (resource_type, resource_id), resource in newest.items():
        if resource.get("status") == "entered-in-error" or (
            resource_type == "Condition" and _is_error_condition(resource)
        ):
            continue
        if resource_type in SHARED_TYPES:
            shared[f"{resource_type}/{resource_id}"] = resource
            shared[f"urn:uuid:{resource_id}"] = resource
        if resource_type == "Patient":
            patients.setdefault(resource_id, PatientResources(resource_id)).patient = resource
            continue
        if resource_type not in PATIENT_ELEMENT:
            if resource_type not in SHARED_TYPES:
                # Referenced by partOf / episodeOfCare through urn:uuid in a Bundle.
                shared.setdefault(f"urn:uuid:{resource_id}", resource)
            continue
        patient_id = _patient_of(resource)
        if patient_id is None:
            element = PATIENT_ELEMENT[resource_type]
            has_ref = reference_key(resource.get(element)) is not None
            reason = f"{element} is not a Patient reference" if has_ref else f"no {element}"
            rejects.append(Reject(resource_type, resource_id, reason))
            continue
        shared[f"urn:uuid:{resource_id}"] = resource
        holder = patients.setdefault(patient_id, PatientResources(patient_id))
        holder.by_type.setdefault(resource_type, []).append(resource)
    by_encounter: dict[str, list[Mapping[str, Any]]] = {}
    for holder in patients.values():
        for items in holder.by_type.values():
            items.sort(key=_id_of)  # every id is a string here: newest_versions kept no other
        for resource in (*holder.of("Condition"), *holder.of("Procedure")):
            if resource.get("encounter") is not None:
                target = resolve(resource.get("encounter"), shared)
                if target is not None and target.startswith("Encounter/"):
                    by_encounter.setdefault(target, []).append(resource)
    rejects.sort(key=lambda r: (r.resource_type, r.id or "", r.reason))
    return Collected(patients=patients, shared=shared, rejects=rejects, by_encounter=by_encounter)


_id_of: Final = itemgetter("id")


def _is_error_condition(resource: Mapping[str, Any]) -> bool:
    coding = element(resource, "verificationStatus").get("coding")
    codes = (
        [c.get("code") for c in coding or [] if isinstance(c, (dict, Mapping))]
        if isinstance(coding, list)
        else []
    )
    return "entered-in-error" in codes


def resolve(reference: Any, shared: Mapping[str, Mapping[str, Any]]) -> str | None:
    """``Type/id`` of a reference, resolving Bundle ``urn:uuid:`` references through the index."""
    key = reference_key(reference)
    if key is None or not key.startswith("urn:"):
        return key
    target = shared.get(key)
    if target is None:
        return None
    return f"{target.get('resourceType')}/{target.get('id')}"

"""The lean projection: each resource type decoded straight from JSON into only the fields the mappers read.

``iop-bridge map`` reads resources that ``pull`` already validated with ``fhir.resources``, so it need not
build or validate whole resources again. Each type has a ``TypedDict`` naming exactly the elements the
episode and referral mappers read, down to the leaves (a ``Reference``'s ``reference``, a ``Coding``'s
``system`` and ``code``…). ``msgspec`` decodes the JSON bytes into plain dicts holding only those keys:
everything else is skipped unread, and every kept value is checked against its declared type. A value of
the wrong type is a ``ProjectionError`` naming the resource (type and id when readable), the path of the
field (``$.period.start``) and what is wrong; the resource is then rejected, never half-read.

JSON ``null`` is accepted wherever a value is (``fhir.resources`` accepts it too, and the mappers treat it
as absent). Types the mappers do not read beyond their identity (Practitioner, Appointment…) keep only
``resourceType``, ``id``, ``meta`` and ``status``. ``map --strict`` validates every whole resource with
``fhir.resources`` instead (see ``sync.commands.map``).

Pure: bytes or dicts in, dicts out; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypedDict

import msgspec

__all__ = ["LEAN_TYPES", "ProjectionError", "project", "project_line", "resource_type_of"]


class ProjectionError(ValueError):
    """A resource the lean projection cannot read: its type, id (when readable), field path and problem."""

    def __init__(self, resource_type: str, resource_id: str | None, reason: str) -> None:
        super().__init__(f"{resource_type}/{resource_id or '(no id)'}: {reason}")
        self.resource_type = resource_type
        self.id = resource_id
        self.reason = reason


# -- data types (only the elements read) ---------------------------------------------------------------


class Coding(TypedDict, total=False):
    system: str | None
    code: str | None
    display: str | None


class CodeableConcept(TypedDict, total=False):
    coding: list[Coding] | None


class Identifier(TypedDict, total=False):
    system: str | None
    value: str | None
    type: CodeableConcept | None  # v2-0203 MR / SS / DL / PPN: which identifiers a record may carry


class Reference(TypedDict, total=False):
    reference: str | None
    identifier: Identifier | None
    display: str | None
    concept: CodeableConcept | None  # R5-style CodeableReference some servers send


class Period(TypedDict, total=False):
    start: str | None
    end: str | None


class Meta(TypedDict, total=False):
    versionId: str | None
    lastUpdated: str | None
    tag: list[Coding] | None
    security: list[Coding] | None


class Diagnosis(TypedDict, total=False):
    condition: Reference | None
    rank: int | None


class EncounterLocation(TypedDict, total=False):
    location: Reference | None


class Hospitalization(TypedDict, total=False):
    admitSource: CodeableConcept | None
    dischargeDisposition: CodeableConcept | None


class Repeat(TypedDict, total=False):
    frequency: int | float | None
    dayOfWeek: list[str] | None
    period: int | float | None
    periodUnit: str | None
    duration: int | float | None
    durationUnit: str | None


class Timing(TypedDict, total=False):
    repeat: Repeat | None


class ActivityDetail(TypedDict, total=False):
    status: str | None
    scheduledTiming: Timing | None


class Activity(TypedDict, total=False):
    detail: ActivityDetail | None


# -- resources -----------------------------------------------------------------------------------------


class _Resource(TypedDict, total=False):
    resourceType: str
    id: str | None
    meta: Meta | None
    status: str | None


class Other(_Resource, total=False):
    """A type read only for its identity (resolving ``urn:uuid`` references, entered-in-error)."""


# Contained resources are kept whole (checked as objects only): the mappers read Locations and
# Conditions inside them by ``#id``, and they are small.
Encounter = TypedDict(
    "Encounter",
    {
        "resourceType": str,
        "id": str | None,
        "meta": Meta | None,
        "status": str | None,
        "class": Coding | None,
        "type": list[CodeableConcept] | None,
        "serviceType": CodeableConcept | None,
        "subject": Reference | None,
        "period": Period | None,
        "reasonCode": list[CodeableConcept] | None,
        "reasonReference": list[Reference] | None,
        "diagnosis": list[Diagnosis] | None,
        "location": list[EncounterLocation] | None,
        "serviceProvider": Reference | None,
        "hospitalization": Hospitalization | None,
        "partOf": Reference | None,
        "episodeOfCare": list[Reference] | None,
        "basedOn": list[Reference] | None,
        "identifier": list[Identifier] | None,
        "contained": list[dict[str, Any]] | None,
    },
    total=False,
)


class EpisodeOfCare(_Resource, total=False):
    type: list[CodeableConcept] | None
    patient: Reference | None
    period: Period | None
    identifier: list[Identifier] | None
    referralRequest: list[Reference] | None
    diagnosis: list[Diagnosis] | None
    reasonCode: list[CodeableConcept] | None
    reasonReference: list[Reference] | None
    contained: list[dict[str, Any]] | None


class CarePlan(_Resource, total=False):
    subject: Reference | None
    period: Period | None
    created: str | None
    encounter: Reference | None
    activity: list[Activity] | None


class Condition(_Resource, total=False):
    subject: Reference | None
    code: CodeableConcept | None
    category: list[CodeableConcept] | None
    clinicalStatus: CodeableConcept | None
    verificationStatus: CodeableConcept | None
    encounter: Reference | None


class Procedure(_Resource, total=False):
    subject: Reference | None
    encounter: Reference | None
    code: CodeableConcept | None


class Coverage(_Resource, total=False):
    beneficiary: Reference | None
    period: Period | None
    order: int | None
    payor: list[Reference] | None
    type: CodeableConcept | None


class Location(_Resource, total=False):
    type: list[CodeableConcept] | None
    #: Oracle Health sends its Millennium location types (code set 222) here, not in ``type``.
    physicalType: CodeableConcept | None


class Organization(_Resource, total=False):
    name: str | None


class Patient(_Resource, total=False):
    identifier: list[Identifier] | None


class Observation(_Resource, total=False):
    subject: Reference | None
    code: CodeableConcept | None


class ServiceRequest(_Resource, total=False):
    intent: str | None
    priority: str | None
    category: list[CodeableConcept] | None
    code: CodeableConcept | None
    locationCode: list[CodeableConcept] | None
    performer: list[Reference] | None
    reasonCode: list[CodeableConcept] | None
    reasonReference: list[Reference] | None
    subject: Reference | None
    authoredOn: str | None
    identifier: list[Identifier] | None
    requester: Reference | None


Task = TypedDict(
    "Task",
    {
        "resourceType": str,
        "id": str | None,
        "meta": Meta | None,
        "status": str | None,
        "businessStatus": CodeableConcept | None,
        "focus": Reference | None,
        "basedOn": list[Reference] | None,
        "for": Reference | None,
        "lastModified": str | None,
        "authoredOn": str | None,
    },
    total=False,
)

#: The projection of each resource type the mappers read; any other type is read as ``Other``.
LEAN_TYPES: Final[Mapping[str, type]] = {
    "Encounter": Encounter,
    "EpisodeOfCare": EpisodeOfCare,
    "CarePlan": CarePlan,
    "Condition": Condition,
    "Procedure": Procedure,
    "Coverage": Coverage,
    "Location": Location,
    "Organization": Organization,
    "Patient": Patient,
    "Observation": Observation,
    "ServiceRequest": ServiceRequest,
    "Task": Task,
}


class _Head(msgspec.Struct, gc=False):
    """What a resource is, read before its type's projection when the caller does not know it."""

    resourceType: Any = None
    id: Any = None


_HEAD: Final = msgspec.json.Decoder(_Head)
_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    name: msgspec.json.Decoder(kind) for name, kind in LEAN_TYPES.items()
}
_OTHER: Final = msgspec.json.Decoder(Other)


def resource_type_of(line: bytes) -> str | None:
    """The ``resourceType`` of one JSON object (None when it has none, or is no JSON object at all)."""
    try:
        kind = _HEAD.decode(line).resourceType
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return kind if isinstance(kind, str) and kind else None


def project_line(line: bytes, resource_type: str) -> dict[str, Any]:
    """The lean projection of one resource's JSON, known to be a ``resource_type``.

    Raises ``ProjectionError`` naming the field that has the wrong type (or the JSON error).
    """
    decoder = _DECODERS.get(resource_type, _OTHER)
    try:
        projected: dict[str, Any] = decoder.decode(line)
    except msgspec.ValidationError as exc:
        raise ProjectionError(resource_type, _id_of(line), _reason(exc)) from None
    except msgspec.DecodeError as exc:
        raise ProjectionError(resource_type, None, f"not valid JSON: {exc}") from None
    if projected.get("resourceType") != resource_type:
        raise ProjectionError(resource_type, projected.get("id"), "resourceType differs from its file's")
    return projected


def project(resource: Mapping[str, Any]) -> dict[str, Any]:
    """The lean projection of a resource already parsed (a Bundle entry, a single-resource file)."""
    kind = resource.get("resourceType")
    resource_type = kind if isinstance(kind, str) else "unknown"
    try:
        projected: dict[str, Any] = msgspec.convert(resource, LEAN_TYPES.get(resource_type, Other))
    except msgspec.ValidationError as exc:
        raw_id = resource.get("id")
        raise ProjectionError(
            resource_type, raw_id if isinstance(raw_id, str) else None, _reason(exc)
        ) from None
    return projected


def _id_of(line: bytes) -> str | None:
    try:
        value = _HEAD.decode(line).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return value if isinstance(value, str) and value else None


def _reason(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `str`, got `int` - at `$.period.start`" as "$.period.start: expected …"."""
    text = str(exc)
    what, separator, where = text.rpartition(" - at ")
    if not separator:
        return text
    what = (what[:1].lower() + what[1:]).replace(" | null`", "`")  # null is accepted anywhere: unsaid
    return f"{where.strip('`')}: {what}"

"""The lean projection: each resource type decoded straight from JSON into only the fields the mappers read.

``iop-bridge map`` reads resources that ``pull`` already validated with ``fhir.resources``, so it need not
build or validate whole resources again. Each type has a ``TypedDict`` naming exactly the elements the
episode and referral mappers read, down to the leaves (a ``Reference``'s ``reference``, a ``Coding``'s
``system`` and ``code``…). ``msgspec`` decodes the JSON bytes into plain dicts holding only those keys:
everything else is skipped unread, and every kept value is checked against its declared type. A value of
the wrong type is a ``ProjectionError`` naming the resource (type and id when readable), the path of the
field (``$.period.start``) and what is wrong; the resource is then rejected, never half-read.

Named deviations (``schemas.deviations``): a ``code`` with stray whitespace (``status: "finished "``), a
JSON number where a string belongs (``versionId: 2``) and a string holding a number where a number belongs
(``rank: "1"``) are what the strict reader (``connectors.validation``) names too. The caller says which
it tolerates (its vendor profile's): a tolerated one is normalised, the resource kept and the deviation's
name added to ``deviations``; an untolerated one is a ``ProjectionError`` naming it. The fast path is
unchanged: only a resource msgspec refuses is looked at again.

JSON ``null`` is accepted wherever a value is (``fhir.resources`` accepts it too, and the mappers treat it
as absent). Types the mappers do not read beyond their identity (Practitioner, Appointment…) keep only
``resourceType``, ``id``, ``meta`` and ``status``. ``map --strict`` validates every whole resource with
``fhir.resources`` instead (see ``sync.commands.map``).

Pure: bytes or dicts in, dicts out; no I/O.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, TypedDict

import msgspec

from schemas.deviations import collapsed_code, not_tolerated, number_from_text, number_text

__all__ = ["LEAN_TYPES", "ProjectionError", "project", "project_line", "resource_type_of"]


class ProjectionError(ValueError):
    """A resource the lean projection cannot read: its type, id (when readable), field path and problem."""

    def __init__(self, resource_type: str, resource_id: str | None, reason: str) -> None:
        super().__init__(f"{resource_type}/{resource_id or '(no id)'}: {reason}")
        self.resource_type = resource_type
        self.id = resource_id
        self.reason = reason


# -- data types (only the elements read) ---------------------------------------------------------------

#: A FHIR ``code``: no leading, trailing or double whitespace (what ``fhir.resources`` checks too).
_CODE_PATTERN: Final = r"^[^\s]+(\s[^\s]+)*$"
Code = Annotated[str, msgspec.Meta(pattern=_CODE_PATTERN)]
#: A FHIR ``id``: 1 to 64 of [A-Za-z0-9-.] (the ``id-format`` deviation when not).
Id = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9\-.]{1,64}$")]


class Coding(TypedDict, total=False):
    system: str | None
    # Not checked as a Code: the rules strip every code they compare (``mappers.codes``), and a pattern
    # on each coding doubles the projection's cost. Every shipped profile tolerates code-whitespace.
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
    frequency: int | None
    dayOfWeek: list[Code] | None
    period: int | float | None
    periodUnit: Code | None
    duration: int | float | None
    durationUnit: Code | None


class Timing(TypedDict, total=False):
    repeat: Repeat | None


class ActivityDetail(TypedDict, total=False):
    status: Code | None
    scheduledTiming: Timing | None


class Activity(TypedDict, total=False):
    detail: ActivityDetail | None


# -- resources -----------------------------------------------------------------------------------------


class _Resource(TypedDict, total=False):
    resourceType: str
    id: Id | None
    meta: Meta | None
    status: Code | None


class Other(_Resource, total=False):
    """A type read only for its identity (resolving ``urn:uuid`` references, entered-in-error)."""


# Contained resources are kept whole (checked as objects only): the mappers read Locations and
# Conditions inside them by ``#id``, and they are small.
Encounter = TypedDict(
    "Encounter",
    {
        "resourceType": str,
        "id": Id | None,
        "meta": Meta | None,
        "status": Code | None,
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
    intent: Code | None
    priority: Code | None
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
        "id": Id | None,
        "meta": Meta | None,
        "status": Code | None,
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


def project_line(
    line: bytes,
    resource_type: str,
    *,
    tolerate: frozenset[str] = frozenset(),
    deviations: list[str] | None = None,
) -> dict[str, Any]:
    """The lean projection of one resource's JSON, known to be a ``resource_type``.

    Tolerated deviations are normalised and named in ``deviations``; raises ``ProjectionError`` naming
    the field that has the wrong type or an untolerated deviation (or the JSON error).
    """
    decoder = _DECODERS.get(resource_type, _OTHER)
    try:
        projected: dict[str, Any] = decoder.decode(line)
    except msgspec.ValidationError as exc:
        raw = msgspec.json.decode(line)
        kind = LEAN_TYPES.get(resource_type, Other)
        projected = _tolerant(raw, kind, resource_type, exc, tolerate, deviations)
    except msgspec.DecodeError as exc:
        raise ProjectionError(resource_type, None, f"not valid JSON: {exc}") from None
    if projected.get("resourceType") != resource_type:
        raise ProjectionError(resource_type, projected.get("id"), "resourceType differs from its file's")
    return projected


def project(
    resource: Mapping[str, Any],
    *,
    tolerate: frozenset[str] = frozenset(),
    deviations: list[str] | None = None,
) -> dict[str, Any]:
    """The lean projection of a resource already parsed (a Bundle entry, a single-resource file); see
    ``project_line`` for ``tolerate`` and ``deviations``."""
    kind = resource.get("resourceType")
    resource_type = kind if isinstance(kind, str) else "unknown"
    lean = LEAN_TYPES.get(resource_type, Other)
    try:
        projected: dict[str, Any] = msgspec.convert(resource, lean)
    except msgspec.ValidationError as exc:
        projected = _tolerant(resource, lean, resource_type, exc, tolerate, deviations)
    return projected


#: At most this many deviations are normalised in one resource (msgspec names one error at a time).
_MAX_FIXES: Final = 64
_AT: Final = re.compile(r"^(?P<what>.*) - at `(?P<path>\$[^`]*)`$", re.DOTALL)
_STEP: Final = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _tolerant(
    raw: Any,
    lean: type,
    resource_type: str,
    error: msgspec.ValidationError,
    tolerate: frozenset[str],
    deviations: list[str] | None,
) -> dict[str, Any]:
    """``raw`` projected after normalising each tolerated deviation msgspec stops at, one by one."""
    raw_id = raw.get("id") if isinstance(raw, Mapping) else None
    resource_id = raw_id if isinstance(raw_id, str) and raw_id else None
    fixed: Any = None
    found: list[str] = []
    as_sent: list[tuple[list[str | int], Any]] = []  # kept as sent: checked with a stand-in, put back
    for _ in range(_MAX_FIXES):
        located = _deviation(error, raw if fixed is None else fixed)
        if located is None:
            raise ProjectionError(resource_type, resource_id, _reason(error)) from None
        name, steps, value = located
        if name not in tolerate:
            raise ProjectionError(resource_type, resource_id, f"{_shown(steps)}: {not_tolerated(name)}")
        if fixed is None:
            fixed = copy.deepcopy(dict(raw))
        if name == "id-format":
            as_sent.append((steps, _get(fixed, steps)))
        _set(fixed, steps, value)
        found.append(name)
        try:
            projected: dict[str, Any] = msgspec.convert(fixed, lean)
        except msgspec.ValidationError as exc:
            error = exc
            continue
        for where, original in as_sent:
            _set(projected, where, original)
        if deviations is not None:
            deviations.extend(found)
        return projected
    raise ProjectionError(resource_type, resource_id, f"more than {_MAX_FIXES} deviations")


def _deviation(error: msgspec.ValidationError, raw: Any) -> tuple[str, list[str | int], Any] | None:
    """The named deviation msgspec's error is (its name, the field's path, the normalised value)."""
    match = _AT.match(str(error))
    if match is None:
        return None
    steps: list[str | int] = [key if key else int(index) for key, index in _STEP.findall(match["path"][1:])]
    value = _get(raw, steps)
    what = match["what"]
    if what.startswith("Expected `str` matching regex") and steps == ["id"] and isinstance(value, str):
        return "id-format", steps, "x"
    if what.startswith("Expected `str` matching regex") and isinstance(value, str):
        collapsed = collapsed_code(value)
        return None if collapsed is None else ("code-whitespace", steps, collapsed)
    expected, _, got = what.partition(", got ")
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if expected.startswith("Expected `str") and got.strip("`") in ("int", "float") and is_number:
        return "number-as-string", steps, number_text(value)
    if expected.startswith("Expected `int") and got == "`str`" and isinstance(value, str):
        number = number_from_text(value, integer="float" not in expected)
        if number is not None:
            return "string-as-number", steps, number
    return None


def _get(node: Any, steps: list[str | int]) -> Any:
    for step in steps:
        found = (isinstance(step, int) and isinstance(node, list) and 0 <= step < len(node)) or (
            isinstance(step, str) and isinstance(node, Mapping) and step in node
        )
        if not found:
            return None
        node = node[step]
    return node


def _set(node: Any, steps: list[str | int], value: Any) -> None:
    for step in steps[:-1]:
        node = node[step]
    node[steps[-1]] = value


def _shown(steps: list[str | int]) -> str:
    return "$" + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps)


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

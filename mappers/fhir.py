"""Small helpers over FHIR resources held as plain dicts: references and date/time values.

The engine works on dicts (not ``fhir.resources`` models) because it must be fast on millions of
Encounters; these helpers are the only places that know how FHIR spells references and times.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from functools import lru_cache
from typing import Any, Final

_DATETIME: Final = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:[T ](?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?"
    r"(?P<tz>Z|[+-]\d{2}:?\d{2})?)?)?)?$"
)


class FhirValueError(ValueError):
    """A value in a resource cannot be read (unparsable date, malformed reference)."""


def parse_datetime(value: Any, zone: tzinfo) -> datetime:
    """A FHIR date / dateTime / instant as an aware datetime.

    Partial dates (``2025``, ``2025-03``, ``2025-03-04``) mean their first instant; a time without an
    offset is read in ``zone`` (the EHR's configured time zone). Raises ``FhirValueError``.
    """
    if type(value) is str or isinstance(value, str):
        return _parse_datetime(value, zone)
    raise FhirValueError(f"not a date: {type(value).__name__}")


@lru_cache(maxsize=16384)
def _parse_datetime(value: str, zone: tzinfo) -> datetime:
    """``parse_datetime`` of a string, cached: an export repeats the same instants (and datetimes are
    immutable, so sharing one is safe). Kept small: real Encounter times are mostly unique, so a large
    cache would only hold memory in every worker."""
    if len(value) >= 19 and value[10] == "T":  # the common full dateTime: the C parser first
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)
    match = _DATETIME.match(value.strip())
    if match is None:
        raise FhirValueError("unparsable date")  # never the value: it may be a name or a birth date
    parts = match.groupdict()
    try:
        day = date(int(parts["y"]), int(parts["m"] or 1), int(parts["d"] or 1))
        fraction = (parts["f"] or "0")[:6].ljust(6, "0")
        clock = time(int(parts["H"] or 0), int(parts["M"] or 0), int(parts["S"] or 0), int(fraction))
    except ValueError as exc:
        raise FhirValueError("unparsable date") from exc
    offset = parts["tz"]
    if offset is None:
        return datetime.combine(day, clock).replace(tzinfo=zone)
    if offset == "Z":
        return datetime.combine(day, clock).replace(tzinfo=UTC)
    text = offset.replace(":", "")
    sign = -1 if text[0] == "-" else 1
    delta = timedelta(hours=int(text[1:3]), minutes=int(text[3:5]))
    try:
        return datetime.combine(day, clock).replace(tzinfo=timezone(sign * delta))
    except ValueError as exc:
        raise FhirValueError("unparsable date") from exc


def rfc3339(moment: datetime) -> str:
    """An aware datetime as RFC 3339 with its offset (``Z`` for UTC), seconds precision."""
    # Equal instants in other offsets are equal datetimes (same hash): the offset is part of the key.
    return _rfc3339(moment, moment.utcoffset())


@lru_cache(maxsize=16384)
def _rfc3339(moment: datetime, offset: timedelta | None) -> str:
    text = moment.replace(microsecond=0).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def element(resource: Any, name: str) -> dict[str, Any]:
    """A complex element of a resource as a dict; ``{}`` when it is absent or not an object."""
    value = resource.get(name) if isinstance(resource, (dict, Mapping)) else None
    return dict(value) if isinstance(value, (dict, Mapping)) else {}


def items(resource: Any, name: str) -> list[Any]:
    """A repeating element of a resource as a list; ``[]`` when it is absent or not an array."""
    if type(resource) is dict:  # the common case first: a plain dict from the JSON parser
        value = resource.get(name)
    else:
        value = resource.get(name) if isinstance(resource, Mapping) else None
    return value if isinstance(value, list) else []


_LITERAL: Final = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9._\-]{1,255}")


def is_literal(key: str | None) -> bool:
    """``key`` is a ``Type/id`` with a valid FHIR id (what records may carry as a reference)."""
    return key is not None and _LITERAL.fullmatch(key) is not None


def reference_key(value: Any) -> str | None:
    """``Type/id`` of a reference (absolute URL, ``_history`` and contained ``#id`` kept as is).

    ``urn:uuid:…`` / ``urn:oid:…`` references (Bundle entries) come back unchanged; the index resolves them
    by resource id.
    """
    reference = value.get("reference") if isinstance(value, (dict, Mapping)) else value
    if not isinstance(reference, str):
        return None
    return _key_of(reference)


@lru_cache(maxsize=32768)  # a working set of a patient batch; bigger only holds memory per worker
def _key_of(reference: str) -> str | None:
    reference = reference.strip()
    if not reference:
        return None
    if reference.startswith(("#", "urn:")):
        return reference
    parts = reference.split("?")[0].rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) < 2 or not parts[-1] or not parts[-2][:1].isupper():
        return None
    return f"{parts[-2]}/{parts[-1]}"


def reference_id(value: Any, resource_type: str) -> str | None:
    """The id of a reference to ``resource_type`` (``Patient/12`` -> ``12``), else None."""
    key = reference_key(value)
    if key is None:
        return None
    if key.startswith("urn:uuid:"):
        return key[len("urn:uuid:") :]
    prefix = resource_type + "/"
    return key[len(prefix) :] if key.startswith(prefix) else None

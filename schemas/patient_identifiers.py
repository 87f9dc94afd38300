"""Patient identifiers a record may carry (HIPAA minimum necessary, 45 CFR 164.502(b)).

An entry of ``patient_identifier_systems`` is either an identifier system URI (``Identifier.system``)
or a type token ``<type system>|<code>`` matching a coding of ``Identifier.type``. The default is the
HL7 v2-0203 ``MR`` (medical record number) type: what a treatment program needs to match the patient
to its chart, whatever URI a hospital gives its MRN system. Social security numbers, driver's licences
and passports are never carried: they are refused as configuration and dropped from every record even
when an EHR types them as ``MR``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
MR_TYPE: Final = f"{V2_0203}|MR"
DEFAULT_PATIENT_IDENTIFIER_SYSTEMS: Final = (MR_TYPE,)
#: Identifier types never carried: SSN, driver's licence, passport (HL7 v2 table 0203).
FORBIDDEN_TYPES: Final = frozenset({"SS", "DL", "PPN"})
#: System URIs never carried (normalised: lower case, no scheme): US SSN (FHIR sid and OID
#: 2.16.840.1.113883.4.1), the US state driver's-licence OID arc 2.16.840.1.113883.4.3, FHIR passports.
_FORBIDDEN_SYSTEMS: Final = ("hl7.org/fhir/sid/us-ssn", "urn:oid:2.16.840.1.113883.4.1")
_FORBIDDEN_PREFIXES: Final = ("urn:oid:2.16.840.1.113883.4.3.", "hl7.org/fhir/sid/passport-")


def _norm(uri: str) -> str:
    text = uri.strip().lower()
    for scheme in ("https://", "http://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    return text.rstrip("/")


def forbidden_system(system: str) -> bool:
    """An SSN, driver's licence or passport system URI."""
    text = _norm(system)
    return text in _FORBIDDEN_SYSTEMS or text.startswith(_FORBIDDEN_PREFIXES)


def forbidden_entry(entry: str) -> bool:
    """A configured system URI or ``type system|code`` token naming SSN, driver's licence or passport."""
    if "|" in entry:
        system, _, code = entry.rpartition("|")
        return _norm(system) == _norm(V2_0203) and code.strip().upper() in FORBIDDEN_TYPES
    return forbidden_system(entry)


def check_entries(entries: Iterable[str]) -> None:
    """Raise ``ValueError`` naming the first forbidden entry."""
    for entry in entries:
        if forbidden_entry(entry):
            raise ValueError(f"{entry!r} is an SSN, driver's licence or passport identifier: never carried")


def _types(identifier: Mapping[str, Any]) -> set[tuple[str, str]]:
    value = identifier.get("type")
    coding = value.get("coding") if isinstance(value, Mapping) else None
    found = set()
    for item in coding if isinstance(coding, list) else []:
        if isinstance(item, Mapping) and isinstance(item.get("code"), str):
            system = item.get("system") if isinstance(item.get("system"), str) else ""
            found.add((_norm(str(system)), item["code"].strip().upper()))
    return found


def allowed(identifier: Mapping[str, Any], entries: Iterable[str]) -> bool:
    """Whether an ``Identifier`` matches a configured entry and is not SSN / DL / passport."""
    system = identifier.get("system") if isinstance(identifier.get("system"), str) else ""
    types = _types(identifier)
    if forbidden_system(str(system)) or any(
        s == _norm(V2_0203) and code in FORBIDDEN_TYPES for s, code in types
    ):
        return False
    for entry in entries:
        if "|" in entry:
            type_system, _, code = entry.rpartition("|")
            if (_norm(type_system), code.strip().upper()) in types:
                return True
        elif system and _norm(entry) == _norm(str(system)):
            return True
    return False

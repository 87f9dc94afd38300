"""Code systems: tolerant URI matching and normalised codes.

EHRs spell the same code system several ways (``http`` or ``https``, a trailing slash, ``www.``, an OID,
an older FHIR URL). Every system is reduced to a short key (``"hcpcs"``, ``"cpt"``…) when it is a known
alias, else to its normalised URI, so rule lookups are plain dict hits on ``(key, code)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Final

HCPCS: Final = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
CPT: Final = "http://www.ama-assn.org/go/cpt"
REVENUE: Final = "https://www.nubc.org/CodeSystem/RevenueCodes"
POS: Final = "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set"
ACT_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ROLE_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
HSLOC: Final = "https://www.cdc.gov/nhsn/cdaportal/terminology/codesystem/hsloc.html"
SNOMED: Final = "http://snomed.info/sct"
ICD10CM: Final = "http://hl7.org/fhir/sid/icd-10-cm"
ICD9CM: Final = "http://hl7.org/fhir/sid/icd-9-cm"
ADMIT_SOURCE: Final = "http://terminology.hl7.org/CodeSystem/admit-source"
CONFIDENTIALITY: Final = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
US_PRIVACY_LAW: Final = "http://terminology.hl7.org/CodeSystem/v3-ActUSPrivacyLaw"
#: The level of care of an EpisodeOfCare iop-bridge writes (``EpisodeOfCare.type``): code = level name.
LEVEL_SYSTEM: Final = "urn:iop-bridge:level-of-care"

#: Canonical URI of each short key (what the records carry).
CANONICAL: Final[Mapping[str, str]] = {
    "hcpcs": HCPCS,
    "cpt": CPT,
    "revenue": REVENUE,
    "pos": POS,
    "actcode": ACT_CODE,
    "rolecode": ROLE_CODE,
    "hsloc": HSLOC,
    "snomed": SNOMED,
    "icd10cm": ICD10CM,
    "icd9cm": ICD9CM,
    "admitsource": ADMIT_SOURCE,
    "level": LEVEL_SYSTEM,
}

# Known spellings of each system, already normalised (no scheme, no www., no trailing slash, lower case).
_ALIASES: Final[Mapping[str, tuple[str, ...]]] = {
    "hcpcs": (
        "cms.gov/medicare/coding/hcpcsreleasecodesets",
        "urn:oid:2.16.840.1.113883.6.285",
        "urn:oid:2.16.840.1.113883.6.14",
        "terminology.hl7.org/codesystem/hcpcs",
        "hl7.org/fhir/sid/hcpcs",
        "cms.gov/medicare/coding-billing/healthcare-common-procedure-system",
        "hcpcs",
    ),
    "cpt": ("ama-assn.org/go/cpt", "urn:oid:2.16.840.1.113883.6.12", "hl7.org/fhir/sid/cpt", "cpt"),
    "revenue": (
        "nubc.org/codesystem/revenuecodes",
        "urn:oid:2.16.840.1.113883.6.301.3",
        "terminology.hl7.org/codesystem/nubc-revenue-codes",
        "terminology.hl7.org/codesystem/ex-revenue-center",
        "hl7.org/fhir/ex-revenue-center",
        "revenue",
    ),
    "pos": (
        "cms.gov/medicare/coding/place-of-service-codes/place_of_service_code_set",
        "urn:oid:2.16.840.1.113883.6.50",
        "terminology.hl7.org/codesystem/cmsplaceofservicecodes",
        "terminology.hl7.org/codesystem/ex-serviceplace",
        "pos",
    ),
    "actcode": (
        "terminology.hl7.org/codesystem/v3-actcode",
        "hl7.org/fhir/v3/actcode",
        "urn:oid:2.16.840.1.113883.5.4",
        "actcode",
    ),
    "rolecode": (
        "terminology.hl7.org/codesystem/v3-rolecode",
        "hl7.org/fhir/v3/rolecode",
        "urn:oid:2.16.840.1.113883.5.111",
        "rolecode",
    ),
    "hsloc": (
        "cdc.gov/nhsn/cdaportal/terminology/codesystem/hsloc.html",
        "urn:oid:2.16.840.1.113883.6.259",
        "terminology.hl7.org/codesystem/hsloc",
        "hsloc",
    ),
    "snomed": ("snomed.info/sct", "urn:oid:2.16.840.1.113883.6.96", "snomed"),
    "icd10cm": (
        "hl7.org/fhir/sid/icd-10-cm",
        "hl7.org/fhir/sid/icd-10",
        "urn:oid:2.16.840.1.113883.6.90",
        "urn:oid:2.16.840.1.113883.6.3",
        "icd10cm",
        "icd-10-cm",
    ),
    "icd9cm": (
        "hl7.org/fhir/sid/icd-9-cm",
        "hl7.org/fhir/sid/icd-9",
        "urn:oid:2.16.840.1.113883.6.103",
        "urn:oid:2.16.840.1.113883.6.2",
        "icd9cm",
        "icd-9-cm",
    ),
    "admitsource": (
        "terminology.hl7.org/codesystem/admit-source",
        "hl7.org/fhir/admit-source",
        "admitsource",
    ),
    "level": ("urn:iop-bridge:level-of-care", "level"),
}
_KEY_OF_ALIAS: Final = {alias: key for key, aliases in _ALIASES.items() for alias in aliases}


def _strip(uri: str) -> str:
    text = uri.strip().lower()
    for scheme in ("https://", "http://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
            break
    if text.startswith("www."):
        text = text[4:]
    return text.rstrip("/")


def system_key(uri: Any) -> str:
    """The short key of a known code system (``"hcpcs"``…), else the normalised URI; ``""`` for none."""
    if not isinstance(uri, str) or not uri:
        return ""
    return _system_key(uri)


@lru_cache(maxsize=4096)
def _system_key(uri: str) -> str:
    stripped = _strip(uri)
    return _KEY_OF_ALIAS.get(stripped, stripped)


def canonical_system(key: str) -> str:
    """The URI records carry for a system key (the key itself when it is not a known system)."""
    return CANONICAL.get(key, key)


def normalise_code(key: str, code: str) -> str:
    """A code as the rules store it: upper case, revenue codes four digits, POS two digits."""
    text = code.strip().upper()
    if key == "revenue" and text.isdigit():
        return text.zfill(4)
    if key == "pos" and text.isdigit():
        return text.zfill(2)
    if key in ("icd10cm", "icd9cm"):
        return text.replace(".", "")
    return text


def codings(value: Any) -> list[tuple[str, str]]:
    """``(system key, normalised code)`` of every coding in a Coding, CodeableConcept or a list of them."""
    found: list[tuple[str, str]] = []
    if value is None:
        return found
    if type(value) is list:  # the common shapes first: a list of CodeableConcepts of plain dicts
        for concept in value:
            inner = concept.get("coding") if type(concept) is dict else None
            if type(inner) is list:
                for coding in inner:
                    if type(coding) is dict and "coding" not in coding and "concept" not in coding:
                        code = coding.get("code")
                        if type(code) is str and code:
                            system = coding.get("system")
                            found.append(_coded(system if type(system) is str else "", code))
                            continue
                    _collect(coding, found)
            else:
                _collect(concept, found)
        return found
    if type(value) is dict and "coding" not in value and "concept" not in value:  # one plain Coding
        code = value.get("code")
        if type(code) is str and code:
            system = value.get("system")
            found.append(_coded(system if type(system) is str else "", code))
            return found
    _collect(value, found)
    return found


@lru_cache(maxsize=65536)
def _coded(system: str, code: str) -> tuple[str, str]:
    """``(system key, normalised code)`` of one coding's system and (non-empty) code, cached."""
    key = _system_key(system) if system else ""
    return key, _normalise_cached(key, code)


def _collect(value: Any, found: list[tuple[str, str]]) -> None:
    if type(value) is list:
        for item in value:
            _collect(item, found)
        return
    if type(value) is not dict:
        if isinstance(value, list):
            for item in value:
                _collect(item, found)
            return
        if not isinstance(value, Mapping):
            return
    inner = value.get("coding")
    if inner is not None:
        _collect(inner, found)
        return
    concept = value.get("concept")  # R5-style CodeableReference sent by some servers
    if concept is not None:
        _collect(concept, found)
        return
    code = value.get("code")
    if type(code) is str and code:
        system = value.get("system")
        key = _system_key(system) if type(system) is str and system else ""
        found.append((key, _normalise_cached(key, code)))
    elif isinstance(code, str) and code:
        system = value.get("system")
        key = system_key(system if isinstance(system, str) else None)
        found.append((key, _normalise_cached(key, code)))


@lru_cache(maxsize=65536)
def _normalise_cached(key: str, code: str) -> str:
    return normalise_code(key, code)


@lru_cache(maxsize=16384)
def icd10_f_range(code: str) -> int | None:
    """The two-digit number of an ICD-10 chapter-F code (``F32.9`` -> 32), else None."""
    text = code.replace(".", "").upper()
    if len(text) >= 3 and text[0] == "F" and text[1:3].isdigit():
        return int(text[1:3])
    return None

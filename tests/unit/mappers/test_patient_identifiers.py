"""Minimum necessary: an episode carries only the configured patient identifier systems, never SSN/DL/PPN."""

from __future__ import annotations

from typing import Any

import pytest

from mappers import EpisodeSettings
from tests.unit.mappers.test_episodes import run, session

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
MRN_SYSTEM = "urn:oid:1.2.3.4.mrn"


def typed(code: str) -> dict[str, Any]:
    return {"coding": [{"system": V2_0203, "code": code}]}


PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p",
    "identifier": [
        {"system": MRN_SYSTEM, "value": "M1", "type": typed("MR")},
        {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789", "type": typed("SS")},
        {"system": "urn:oid:2.16.840.1.113883.4.3.25", "value": "S123", "type": typed("DL")},
        {"system": "http://hl7.org/fhir/sid/passport-USA", "value": "X1", "type": typed("PPN")},
        {"system": "urn:oid:9.9.other", "value": "O1"},
    ],
}


def identifiers(**kwargs: Any) -> list[dict[str, str]]:
    record = run([PATIENT, session("a", "2025-01-06")], **kwargs).episodes[0]
    found: list[dict[str, str]] = record["patient"]["identifier"]
    return found


def test_by_default_only_the_mr_typed_identifier_is_carried() -> None:
    assert identifiers() == [{"system": MRN_SYSTEM, "value": "M1"}]


def test_a_configured_system_is_carried_alone() -> None:
    settings = EpisodeSettings(patient_identifier_systems=("urn:oid:9.9.other",))
    assert identifiers(settings=settings) == [{"system": "urn:oid:9.9.other", "value": "O1"}]


def test_no_configured_system_carries_no_identifier() -> None:
    assert identifiers(settings=EpisodeSettings(patient_identifier_systems=())) == []


def test_an_ssn_typed_mr_is_still_never_carried() -> None:
    patient = {
        **PATIENT,
        "identifier": [
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789", "type": typed("MR")}
        ],
    }
    record = run([patient, session("a", "2025-01-06")]).episodes[0]
    assert record["patient"]["identifier"] == []


@pytest.mark.parametrize(
    "system",
    [
        "http://hl7.org/fhir/sid/us-ssn",
        f"{V2_0203}|SS",
        f"{V2_0203}|DL",
        f"{V2_0203}|PPN",
        "urn:oid:2.16.840.1.113883.4.1",
    ],
)
def test_ssn_dl_and_passport_are_refused_in_settings(system: str) -> None:
    with pytest.raises(ValueError, match="patient_identifier_systems"):
        EpisodeSettings(patient_identifier_systems=(system,))

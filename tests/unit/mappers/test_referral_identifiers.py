"""Minimum necessary for referrals: a referral record carries only the configured patient identifier
systems, like an episode, never SSN / driver's licence / passport (issue 10, item 10)."""

from __future__ import annotations

from typing import Any

import pytest

from mappers.referrals import map_referrals
from mappers.rules import default_rules
from schemas.contracts import validate
from tests.unit.mappers.test_patient_identifiers import MRN_SYSTEM, PATIENT, typed
from tests.unit.mappers.test_referrals import request

SSN = {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789"}


def identifiers(*resources: dict[str, Any], **options: Any) -> list[dict[str, str]]:
    result = map_referrals(resources, ehr="north", rules=default_rules(), **options)
    (record,) = result.referrals
    validate("referral", 1, record)
    found: list[dict[str, str]] = record["patient"]["identifier"]
    return found


def test_by_default_only_the_mr_typed_identifier_is_carried() -> None:
    patient = {**PATIENT, "id": "p1"}

    assert identifiers(patient, request()) == [{"system": MRN_SYSTEM, "value": "M1"}]


def test_a_configured_system_is_carried_alone() -> None:
    patient = {**PATIENT, "id": "p1"}

    found = identifiers(patient, request(), patient_identifier_systems=("urn:oid:9.9.other",))

    assert found == [{"system": "urn:oid:9.9.other", "value": "O1"}]


def test_no_configured_system_carries_no_identifier() -> None:
    assert identifiers({**PATIENT, "id": "p1"}, request(), patient_identifier_systems=()) == []


def test_identifiers_the_request_names_its_subject_by_are_filtered_too() -> None:
    subject = {
        "reference": "Patient/p1",
        "identifier": [
            {**SSN, "type": typed("SS")},
            {"system": "urn:oid:9.9.other", "value": "O1"},
            {"system": MRN_SYSTEM, "value": "M1", "type": typed("MR")},
        ],
    }
    sent = request(subject=subject)

    assert identifiers(sent) == [{"system": MRN_SYSTEM, "value": "M1"}]
    assert identifiers({**PATIENT, "id": "p1"}, sent) == [{"system": MRN_SYSTEM, "value": "M1"}]


def test_an_ssn_typed_mr_is_still_never_carried() -> None:
    patient = {"resourceType": "Patient", "id": "p1", "identifier": [{**SSN, "type": typed("MR")}]}

    assert identifiers(patient, request()) == []


@pytest.mark.parametrize(
    "entry", ["http://hl7.org/fhir/sid/us-ssn", "http://terminology.hl7.org/CodeSystem/v2-0203|SS"]
)
def test_a_forbidden_system_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="patient_identifier_systems"):
        map_referrals([request()], ehr="north", rules=default_rules(), patient_identifier_systems=(entry,))

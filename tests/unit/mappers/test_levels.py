"""Level-of-care classification: each default rule, tolerant code systems, the BH qualifier, precedence."""

from __future__ import annotations

from typing import Any

import pytest

from mappers import classify_encounter, default_rules, load_rules
from mappers.codes import system_key

HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
CPT = "http://www.ama-assn.org/go/cpt"
REVENUE = "https://www.nubc.org/CodeSystem/RevenueCodes"
POS = "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
ROLE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
HSLOC = "https://www.cdc.gov/nhsn/cdaportal/terminology/codesystem/hsloc.html"

CONTEXT: dict[str, dict[str, Any]] = {
    "Location/pos52": {
        "resourceType": "Location",
        "id": "pos52",
        "type": [{"coding": [{"system": POS, "code": "52"}]}],
    },
    "Location/pos51": {
        "resourceType": "Location",
        "id": "pos51",
        "type": [{"coding": [{"system": POS, "code": "51"}]}],
    },
    "Location/pos55": {
        "resourceType": "Location",
        "id": "pos55",
        "type": [{"coding": [{"system": POS, "code": "55"}]}],
    },
    "Location/psychf": {
        "resourceType": "Location",
        "id": "psychf",
        "type": [{"coding": [{"system": ROLE, "code": "PSYCHF"}]}],
    },
    "Location/rhat": {
        "resourceType": "Location",
        "id": "rhat",
        "type": [{"coding": [{"system": ROLE, "code": "RHAT"}]}],
    },
    "Location/bhward": {
        "resourceType": "Location",
        "id": "bhward",
        "type": [{"coding": [{"system": HSLOC, "code": "1051-2"}]}],
    },
    "Location/ortho": {
        "resourceType": "Location",
        "id": "ortho",
        "type": [{"coding": [{"system": ROLE, "code": "HOSP"}]}],
    },
    "Condition/dep": {
        "resourceType": "Condition",
        "id": "dep",
        "code": {"coding": [{"system": ICD, "code": "F32.9"}]},
    },
    "Condition/knee": {
        "resourceType": "Condition",
        "id": "knee",
        "code": {"coding": [{"system": ICD, "code": "M17.11"}]},
    },
}


def encounter(
    cls: str = "AMB", codes: tuple[tuple[str, str], ...] = (), *, location: str | None = None, **extra: Any
) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Encounter", "id": "e", "class": {"system": ACT, "code": cls}}
    if codes:
        resource["type"] = [{"coding": [{"system": s, "code": c} for s, c in codes]}]
    if location:
        resource["location"] = [{"location": {"reference": location}}]
    resource.update(extra)
    return resource


F_REASON = {"reasonCode": [{"coding": [{"system": ICD, "code": "F33.1"}]}]}


@pytest.mark.parametrize(
    ("resource", "level", "rule_id"),
    [
        (encounter(codes=((HCPCS, "S9480"),)), "iop", "iop-hcpcs-per-diem"),
        (encounter(codes=((HCPCS, "H0015"),)), "iop", "iop-hcpcs-per-diem"),
        (encounter(codes=((REVENUE, "0905"),)), "iop", "iop-revenue"),
        (encounter(codes=((REVENUE, "906"),)), "iop", "iop-revenue"),  # revenue codes are 4 digits
        (encounter(codes=((HCPCS, "H0035"),)), "php", "php-hcpcs"),
        (encounter(codes=((HCPCS, "S0201"),)), "php", "php-hcpcs"),
        (encounter(codes=((REVENUE, "0913"),)), "php", "php-revenue"),
        (encounter(location="Location/pos52"), "php", "php-pos-52"),
        (encounter(codes=((HCPCS, "H0019"),)), "residential", "residential-hcpcs"),
        (encounter(codes=((REVENUE, "1002"),)), "residential", "residential-revenue"),
        (encounter(location="Location/pos55"), "residential", "residential-pos"),
        (encounter("NONAC", **F_REASON), "residential", "residential-class-nonac"),
        (encounter("IMP", location="Location/pos51"), "inpatient", "inpatient-pos-51"),
        (encounter("IMP", **F_REASON), "inpatient", "inpatient-class-bh"),
        (encounter("ACUTE", **F_REASON), "inpatient", "inpatient-class-bh"),
        (encounter("EMER", **F_REASON), "emergency", "emergency-class-bh"),
        (encounter("OBSENC", **F_REASON), "emergency", "emergency-class-bh"),
        (encounter(codes=((CPT, "90791"),)), "outpatient", "outpatient-psychotherapy-cpt"),
        (encounter("VR", codes=((CPT, "90837"),)), "outpatient", "outpatient-psychotherapy-cpt"),
        (encounter(codes=((CPT, "90853"),)), "outpatient", "outpatient-psychotherapy-cpt"),
        (encounter(codes=((CPT, "99214"),), **F_REASON), "outpatient", "outpatient-em-medication-management"),
        (
            encounter(type=[{"coding": [{"system": "urn:iop-bridge:level-of-care", "code": "php"}]}]),
            "php",
            "php-level-of-care",
        ),
    ],
)
def test_each_default_rule(resource: dict[str, Any], level: str, rule_id: str) -> None:
    result = classify_encounter(resource, CONTEXT, default_rules())
    assert (result.level, result.rule_id) == (level, rule_id)
    assert rule_id in result.reason


@pytest.mark.parametrize(
    "resource",
    [
        encounter("IMP"),  # a knee operation: no behavioral-health qualifier
        encounter("IMP", diagnosis=[{"condition": {"reference": "Condition/knee"}}]),
        encounter("IMP", location="Location/ortho"),
        encounter("EMER", reasonCode=[{"coding": [{"system": ICD, "code": "S82.001A"}]}]),
        encounter(codes=((CPT, "99213"),)),  # primary-care E/M without a BH diagnosis
        encounter("EMER", codes=((CPT, "90834"),)),  # psychotherapy CPT counts AMB/VR only; no qualifier
        encounter(codes=((HCPCS, "G0410"),)),  # G0410 alone decides no level
        encounter("AMB"),
        {"resourceType": "Encounter", "id": "bare"},
    ],
)
def test_not_a_level_of_care_encounter(resource: dict[str, Any]) -> None:
    result = classify_encounter(resource, CONTEXT, default_rules())
    assert result.level is None
    # None, or the rule saying these program services decide no level on their own (G0410/G0411/G0129).
    assert result.rule_id in (None, "program-services-no-level")


def test_a_missing_qualifier_is_explained() -> None:
    result = classify_encounter(encounter("IMP"), CONTEXT, default_rules())
    assert "inpatient-class-bh needs a behavioral-health qualifier" in result.reason


@pytest.mark.parametrize(
    ("extra", "qualifier"),
    [
        (F_REASON, "bh-icd10-f01-f99"),
        ({"diagnosis": [{"condition": {"reference": "Condition/dep"}}]}, "bh-icd10-f01-f99"),
        ({"reasonReference": [{"reference": "Condition/dep"}]}, "bh-icd10-f01-f99"),
        (
            {
                "contained": [
                    {
                        "resourceType": "Condition",
                        "id": "c1",
                        "code": {"coding": [{"system": ICD, "code": "F20.9"}]},
                    }
                ],
                "diagnosis": [{"condition": {"reference": "#c1"}}],
            },
            "bh-icd10-f01-f99",
        ),
        ({"location_ref": "Location/psychf"}, "bh-location-rolecode"),
        ({"location_ref": "Location/rhat"}, "bh-location-rolecode"),
        ({"location_ref": "Location/bhward"}, "bh-location-hsloc"),
        (
            {
                "hospitalization": {
                    "admitSource": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/admit-source", "code": "psych"}
                        ]
                    }
                }
            },
            "bh-admit-source-psych",
        ),
    ],
)
def test_behavioral_health_qualifier_makes_an_inpatient_stay_count(
    extra: dict[str, Any], qualifier: str
) -> None:
    extra = dict(extra)
    location = extra.pop("location_ref", None)
    result = classify_encounter(encounter("IMP", location=location, **extra), CONTEXT, default_rules())
    assert result.level == "inpatient"
    assert qualifier in result.reason


def test_f00_and_non_f_codes_are_not_qualifiers() -> None:
    for code in ("F00.9", "G30.9", "Z13.31"):
        reason = {"reasonCode": [{"coding": [{"system": ICD, "code": code}]}]}
        assert classify_encounter(encounter("IMP", **reason), CONTEXT, default_rules()).level is None
    boundary = {"reasonCode": [{"coding": [{"system": ICD, "code": "F99"}]}]}
    assert classify_encounter(encounter("IMP", **boundary), CONTEXT, default_rules()).level == "inpatient"


@pytest.mark.parametrize(
    "system",
    [
        "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
        "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
        "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets/",
        "http://cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
        "urn:oid:2.16.840.1.113883.6.285",
        "http://terminology.hl7.org/CodeSystem/HCPCS",
    ],
)
def test_code_system_uris_match_tolerantly(system: str) -> None:
    result = classify_encounter(encounter(codes=((system, "s9480"),)), CONTEXT, default_rules())
    assert result.level == "iop"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("http://www.ama-assn.org/go/cpt", "urn:oid:2.16.840.1.113883.6.12"),
        ("https://www.nubc.org/CodeSystem/RevenueCodes", "http://www.nubc.org/CodeSystem/RevenueCodes/"),
        (POS, "urn:oid:2.16.840.1.113883.6.50"),
        (ACT, "http://hl7.org/fhir/v3/ActCode"),
        (ICD, "urn:oid:2.16.840.1.113883.6.90"),
    ],
)
def test_known_aliases_share_a_key(a: str, b: str) -> None:
    assert system_key(a) == system_key(b)


def test_unknown_system_does_not_match_a_known_code() -> None:
    result = classify_encounter(
        encounter(codes=(("http://example.org/local", "S9480"),)), CONTEXT, default_rules()
    )
    assert result.level is None


def test_class_without_a_system_is_read_as_act_code() -> None:
    resource = {"resourceType": "Encounter", "class": {"code": "EMER"}, **F_REASON}
    assert classify_encounter(resource, CONTEXT, default_rules()).level == "emergency"


def test_precedence_location_id_then_codes_then_location_type_then_class() -> None:
    rules = load_rules(
        """
version = "h1"
[[rule]]
id = "dept-php"
level = "php"
on = "location"
ids = ["Location/pos52-iop-suite"]
source = "hospital department"
"""
    )
    context = {**CONTEXT, "Location/pos52-iop-suite": CONTEXT["Location/pos52"]}
    both = encounter("IMP", codes=((HCPCS, "S9480"),), location="Location/pos52", **F_REASON)
    assert (
        classify_encounter(both, context, rules).rule_id == "iop-hcpcs-per-diem"
    )  # codes beat Location.type
    located = encounter("IMP", location="Location/pos52", **F_REASON)
    assert classify_encounter(located, context, rules).rule_id == "php-pos-52"  # Location.type beats class
    department = encounter(codes=((HCPCS, "S9480"),), location="Location/pos52-iop-suite")
    assert classify_encounter(department, context, rules).rule_id == "dept-php"  # the hospital's id beats all


def test_a_hospital_rule_can_say_none() -> None:
    rules = load_rules(
        'version = "h2"\n[[rule]]\nid = "lab-not-care"\nlevel = "none"\non = "location"\n'
        'ids = ["lab"]\nsource = "the lab shares the IOP building"\n'
    )
    result = classify_encounter(encounter(codes=((HCPCS, "S9480"),), location="Location/lab"), CONTEXT, rules)
    assert (result.level, result.rule_id) == (None, "lab-not-care")


def test_configured_service_type_and_department_qualify() -> None:
    rules = load_rules(
        """
version = "h3"
[[qualifier]]
id = "local-bh-service"
on = "service_type"
system = "http://hospital.example/service"
codes = ["BH"]
source = "hospital BH service line"
[[qualifier]]
id = "bh-department"
on = "location"
ids = ["Organization/psych-dept"]
source = "hospital psychiatry department"
"""
    )
    service = encounter(
        "IMP", serviceType={"coding": [{"system": "https://hospital.example/service/", "code": "bh"}]}
    )
    assert classify_encounter(service, CONTEXT, rules).level == "inpatient"
    department = encounter("EMER", serviceProvider={"reference": "Organization/psych-dept"})
    assert classify_encounter(department, CONTEXT, rules).level == "emergency"
    assert classify_encounter(department, CONTEXT, default_rules()).level is None

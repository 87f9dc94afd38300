"""Referral records from ServiceRequests (and their BSeR Tasks): which requests are referrals, what the
record says, and what happens to bad or noisy input."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mappers.referrals import REFERRAL_STATES, map_referrals, referral_id
from mappers.rules import default_rules
from schemas.contracts import ContractError, validate

SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
POS = "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set"
BSER = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
RULES = default_rules()


def concept(system: str, code: str, text: str | None = None) -> dict[str, Any]:
    value: dict[str, Any] = {"coding": [{"system": system, "code": code}]}
    if text:
        value["text"] = text
    return value


def request(rid: str = "sr1", **fields: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": rid,
        "status": "active",
        "intent": "order",
        "category": [concept(SNOMED, "3457005")],
        "subject": {"reference": "Patient/p1"},
        "authoredOn": "2026-03-02T09:30:00-05:00",
    }
    resource.update(fields)
    return resource


def task(tid: str = "t1", **fields: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Task",
        "id": tid,
        "status": "requested",
        "intent": "order",
        "focus": {"reference": "ServiceRequest/sr1"},
    }
    resource.update(fields)
    return resource


def mapped(*resources: Mapping[str, Any], **options: Any) -> Any:
    result = map_referrals(resources, ehr=options.pop("ehr", "north"), rules=RULES, **options)
    for record in result.referrals:
        validate("referral", 1, record)
    return result


def only(*resources: Mapping[str, Any], **options: Any) -> dict[str, Any]:
    result = mapped(*resources, **options)
    assert result.rejects == []
    assert len(result.referrals) == 1
    record: dict[str, Any] = result.referrals[0]
    return record


def test_a_referral_category_makes_a_referral_record() -> None:
    patient = {"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:mrn", "value": "M7"}]}
    record = only(
        request(
            priority="urgent",
            requester={"reference": "Practitioner/dr1", "display": "Dr Who"},
            identifier=[{"system": "urn:orders", "value": "O-1", "type": {"text": "order"}}],
        ),
        patient,
        patient_identifier_systems=("urn:mrn",),
    )
    assert record["referral_id"] == str(
        uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, "urn:iop-bridge:referral"), "north|ServiceRequest/sr1")
    )
    assert record["ehr"] == "north"
    assert record["patient"] == {
        "reference": "Patient/p1",
        "identifier": [{"system": "urn:mrn", "value": "M7"}],
    }
    assert record["service_request"] == {
        "reference": "ServiceRequest/sr1",
        "identifier": [{"system": "urn:orders", "value": "O-1"}],
    }
    assert record["status"] == "active"
    assert record["state"] == "sent"
    assert record["state_source"] == "service_request"
    assert record["priority"] == "urgent"
    assert record["requester"] == {"reference": "Practitioner/dr1", "identifier": []}
    assert record["authored"] == "2026-03-02"
    assert record["referral_type"] == [{"system": SNOMED, "code": "3457005"}]
    assert record["task"] is None
    assert record["part2"] is False
    assert record["security"] == []
    assert record["rules_version"] == RULES.version


def test_the_referral_code_may_be_in_code_instead_of_category() -> None:
    record = only(request(category=None, code=concept(SNOMED, "3457005")))
    assert record["referral_type"] == [{"system": SNOMED, "code": "3457005"}]


@pytest.mark.parametrize(
    ("system", "code"),
    [
        (SNOMED, "103696004"),  # referral to specialist (the HL7 myringotomy example)
        (SNOMED, "183524004"),  # referral to psychiatry service
        (SNOMED, "306206005"),  # referral to service
        ("https://snomed.info/sct/", "81294000"),  # https and a trailing slash: same system
        ("urn:oid:2.16.840.1.113883.6.96", "308477009"),  # SNOMED by OID
    ],
)
def test_descendants_of_patient_referral_are_referrals(system: str, code: str) -> None:
    record = only(request(category=[concept(system, code)]))
    assert record["referral_type"] == [{"system": SNOMED, "code": code}]


@pytest.mark.parametrize(
    "category",
    [
        concept(SNOMED, "108252007"),  # laboratory procedure
        concept("http://loinc.org", "3457005"),  # the right code in the wrong system
        {"text": "Patient referral"},  # free text alone decides nothing
    ],
)
def test_other_service_requests_are_not_referrals(category: dict[str, Any]) -> None:
    result = mapped(request(category=[category]))
    assert result.referrals == []
    assert result.rejects == []


def test_referral_to_440379008_is_on_by_default_and_can_be_turned_off() -> None:
    resource = request(category=[concept(SNOMED, "440379008")])
    assert len(mapped(resource).referrals) == 1
    assert mapped(resource, referral_to=False).referrals == []


def test_a_configured_local_code_makes_a_referral() -> None:
    resource = request(category=[concept("http://hospital.example/order-types", "ref-iop")])
    assert mapped(resource).referrals == []
    record = only(resource, local_codes=[("https://hospital.example/order-types/", "REF-IOP")])
    assert record["referral_type"] == [{"system": "http://hospital.example/order-types", "code": "ref-iop"}]


def test_substance_use_referral_is_part2_with_its_security_labels() -> None:
    record = only(request(category=[concept(SNOMED, "4266003")]))
    assert record["part2"] is True
    assert {(label["system"], label["code"]) for label in record["security"]} == {
        ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "ETH"),
        ("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "R"),
        ("http://terminology.hl7.org/CodeSystem/v3-ActUSPrivacyLaw", "42CFRPart2"),
    }


@pytest.mark.parametrize(
    ("code", "part2"),
    [("F10.20", True), ("F11.10", True), ("F19.99", True), ("F17.210", False), ("F32.9", False)],
)
def test_a_substance_use_reason_makes_part2_but_nicotine_does_not(code: str, part2: bool) -> None:
    record = only(request(reasonCode=[concept(ICD10, code)]))
    assert record["part2"] is part2
    assert len(record["security"]) == (3 if part2 else 0)


def test_a_part2_program_marks_every_referral() -> None:
    assert only(request(), part2_program=True)["part2"] is True


def test_reasons_are_codes_only_from_reason_code_and_referenced_conditions() -> None:
    condition = {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": "Patient/p1"},
        "code": concept(ICD10, "F33.1", "recurrent depression after the loss of her son"),
        "note": [{"text": "lives with her sister"}],
    }
    record = only(
        request(
            reasonCode=[concept(ICD10, "F41.1", "very anxious since the accident")],
            reasonReference=[{"reference": "Condition/c1", "display": "Depression"}],
            note=[{"text": "please call her mother first"}],
            patientInstruction="bring your medication list",
        ),
        condition,
    )
    assert record["reason"] == [{"system": ICD10, "code": "F41.1"}, {"system": ICD10, "code": "F33.1"}]
    assert record["reason_references"] == ["Condition/c1"]
    text = orjson.dumps(record).decode()
    for free_text in ("accident", "her son", "sister", "mother", "medication list", "Depression"):
        assert free_text not in text


@pytest.mark.parametrize(
    ("fields", "level"),
    [
        ({"code": concept(HCPCS, "S9480")}, "iop"),
        ({"code": concept(HCPCS, "H0015")}, "iop"),
        ({"code": concept(HCPCS, "H0035")}, "php"),
        ({"locationCode": [concept(POS, "52")]}, "php"),
        ({"code": concept(SNOMED, "172676009")}, None),
    ],
)
def test_target_program_level_comes_from_the_level_rules(fields: dict[str, Any], level: str | None) -> None:
    record = only(request(performer=[{"reference": "Organization/iop-north"}], **fields))
    assert record["target"]["level"] == level
    assert record["target"]["performer"] == [{"reference": "Organization/iop-north", "identifier": []}]


def test_an_h0015_target_is_substance_use_treatment() -> None:
    assert only(request(code=concept(HCPCS, "H0015")))["part2"] is True


@pytest.mark.parametrize(
    ("status", "business", "state"),
    [
        ("requested", "2.0", "received"),
        ("accepted", "3.0", "accepted"),
        ("rejected", "4.0", "declined"),
        ("in-progress", "5.1.1", "scheduled"),
        ("in-progress", "5.1.2", "accepted"),
        ("in-progress", "5.1.4", "accepted"),
        ("in-progress", "5.2", "cancelled"),
        ("cancelled", "6.0", "cancelled"),
        ("completed", "7.0", "completed"),
        ("cancelled", "5.1.1", "cancelled"),  # a terminal Task status wins over a stale businessStatus
        ("accepted", None, "accepted"),
        ("received", None, "received"),
        ("rejected", None, "declined"),
        ("failed", None, "cancelled"),
    ],
)
def test_bser_task_state_becomes_the_referral_state(status: str, business: str | None, state: str) -> None:
    fields: dict[str, Any] = {"status": status, "lastModified": "2026-03-03T10:00:00Z"}
    if business:
        fields["businessStatus"] = concept(BSER, business)
    record = only(request(), task(**fields))
    assert record["state"] == state
    assert record["state"] in REFERRAL_STATES
    assert record["state_source"] == "task"
    assert record["task"]["reference"] == "Task/t1"
    assert record["task"]["status"] == status
    assert record["task"]["business_status"] == ({"system": BSER, "code": business} if business else None)
    assert record["task"]["last_modified"] == "2026-03-03T10:00:00Z"


def test_a_task_may_point_with_based_on_and_an_absolute_reference() -> None:
    record = only(
        request(),
        task(
            focus=None,
            basedOn=[{"reference": "https://ehr.example/fhir/ServiceRequest/sr1"}],
            status="accepted",
        ),
    )
    assert record["state"] == "accepted"


def test_the_latest_task_gives_the_state_and_errors_or_drafts_do_not() -> None:
    older = task("t1", status="accepted", lastModified="2026-03-03T10:00:00Z")
    newer = task("t2", status="completed", lastModified="2026-03-20T10:00:00Z")
    wrong = task("t3", status="entered-in-error", lastModified="2026-04-01T10:00:00Z")
    draft = task("t4", status="draft", lastModified="2026-04-01T10:00:00Z")
    record = only(request(), older, newer, wrong, draft)
    assert record["state"] == "completed"
    assert record["task"]["reference"] == "Task/t2"


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("draft", "draft"),
        ("active", "sent"),
        ("on-hold", "on-hold"),
        ("revoked", "cancelled"),
        ("completed", "completed"),
        ("unknown", "unknown"),
    ],
)
def test_without_a_task_the_request_status_gives_the_state(status: str, state: str) -> None:
    assert only(request(status=status))["state"] == state


def test_entered_in_error_vanishes_and_the_newest_version_wins() -> None:
    v1 = request(meta={"versionId": "1"}, priority="routine")
    v2 = request(meta={"versionId": "2"}, priority="stat")
    assert only(v2, v1)["priority"] == "stat"
    gone = request(meta={"versionId": "3"}, status="entered-in-error")
    assert mapped(v1, gone, v2).referrals == []
    assert mapped(v1, gone, v2).rejects == []


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"subject": None}, "no subject"),
        ({"subject": {"reference": "Group/g1"}}, "subject is a Group, not a Patient"),
        ({"subject": {"display": "Jane"}}, "subject is not a Patient reference"),
        ({"authoredOn": "02/03/2026"}, "authoredOn: unparsable date"),
    ],
)
def test_unusable_referrals_are_rejected_with_a_reason(fields: dict[str, Any], reason: str) -> None:
    result = mapped(request(**fields), request("sr2"))
    assert [r.to_dict() for r in result.rejects] == [
        {"resourceType": "ServiceRequest", "id": "sr1", "reason": reason}
    ]
    assert [r["service_request"]["reference"] for r in result.referrals] == ["ServiceRequest/sr2"]


def test_a_referral_without_an_id_is_rejected() -> None:
    resource = request()
    del resource["id"]
    result = mapped(resource)
    assert [r.to_dict() for r in result.rejects] == [
        {"resourceType": "ServiceRequest", "id": None, "reason": "no id"}
    ]


def test_bundle_urn_uuid_references_resolve_to_the_resources() -> None:
    patient = {"resourceType": "Patient", "id": "9f1c", "identifier": [{"system": "urn:mrn", "value": "M9"}]}
    record = only(
        request(subject={"reference": "urn:uuid:9f1c"}),
        patient,
        task(focus={"reference": "urn:uuid:sr1"}, status="accepted"),
        patient_identifier_systems=("urn:mrn",),
    )
    assert record["patient"] == {
        "reference": "Patient/9f1c",
        "identifier": [{"system": "urn:mrn", "value": "M9"}],
    }
    assert record["state"] == "accepted"


def test_the_ehr_name_is_part_of_the_id() -> None:
    assert only(request(), ehr="south")["referral_id"] == referral_id("south", "sr1")
    assert referral_id("south", "sr1") != referral_id("north", "sr1")


def test_the_contract_rejects_a_record_with_free_text_or_a_missing_field() -> None:
    record = only(request())
    with pytest.raises(ContractError, match="note"):
        validate("referral", 1, {**record, "note": "call her mother"})
    incomplete = dict(record)
    del incomplete["state"]
    with pytest.raises(ContractError, match="state"):
        validate("referral", 1, incomplete)
    with pytest.raises(ContractError, match="security"):
        validate("referral", 1, {**record, "part2": True})


_POOL = [
    request("sr1", priority="routine"),
    request("sr1", meta={"versionId": "2"}, priority="asap"),
    request("sr2", category=[concept(SNOMED, "4266003")], subject={"reference": "Patient/p2"}),
    request("sr3", subject=None),
    request("sr4", status="entered-in-error"),
    task("t1", status="accepted", lastModified="2026-03-03T10:00:00Z"),
    task(
        "t2",
        status="completed",
        lastModified="2026-03-04T10:00:00Z",
        focus={"reference": "ServiceRequest/sr2"},
    ),
    {"resourceType": "Patient", "id": "p1", "identifier": [{"value": "1"}]},
]


@settings(max_examples=40, deadline=None)
@given(st.permutations(_POOL))
def test_input_order_never_changes_the_output(shuffled: list[dict[str, Any]]) -> None:
    expected = map_referrals(_POOL, ehr="north", rules=RULES)
    result = map_referrals(shuffled, ehr="north", rules=RULES)
    assert result.referrals == expected.referrals
    assert [r.to_dict() for r in result.rejects] == [r.to_dict() for r in expected.rejects]
    assert len(result.referrals) == 2


def test_codings_without_a_system_and_an_unknown_status_are_kept_safely() -> None:
    record = only(request(status="in-review", reasonCode=[{"coding": [{"code": "F10.20"}]}]))
    assert record["reason"] == [{"code": "F10.20"}]
    assert record["part2"] is False  # an ICD-10 code needs its system to count
    assert record["status"] == "unknown"
    assert record["state"] == "unknown"


_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["reference", "coding", "system", "code", "value", "identifier", "id", "text"]),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)
_REQUEST_FIELDS = ["status", "intent", "priority", "authoredOn", "requester", "performer", "locationCode",
                   "code", "reasonCode", "reasonReference", "identifier", "meta"]  # fmt: skip
_ODD_REQUESTS = st.fixed_dictionaries(
    {
        "resourceType": st.just("ServiceRequest"),
        "id": st.sampled_from(["a", "b"]),
        "category": st.just([concept(SNOMED, "3457005")]),
        "subject": st.sampled_from([{"reference": "Patient/p"}, None, "Patient/p", {"reference": 5}]),
    },
    optional=dict.fromkeys(_REQUEST_FIELDS, _JUNK),
)
_ODD_TASKS = st.fixed_dictionaries(
    {
        "resourceType": st.just("Task"),
        "id": st.sampled_from(["t1", "t2"]),
        "focus": st.sampled_from([{"reference": "ServiceRequest/a"}, "x", None]),
    },
    optional=dict.fromkeys(
        ["status", "businessStatus", "basedOn", "lastModified", "meta", "authoredOn"], _JUNK
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ODD_REQUESTS | _ODD_TASKS | _JUNK, max_size=5))
def test_malformed_resources_never_crash_and_every_record_meets_the_contract(resources: list[Any]) -> None:
    result = map_referrals(resources, ehr="north", rules=RULES)
    for record in result.referrals:
        validate("referral", 1, record)
    for reject in result.rejects:
        assert reject.resource_type == "ServiceRequest"
        assert reject.reason

"""Topic names, message keys and headers of the Kafka contract."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import topics
from schemas.contracts import errors
from schemas.topics import Topics, message_key, parse_message_key

EHR_NAMES = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z")
PATIENT_IDS = st.from_regex(r"\A[A-Za-z0-9._-]{1,255}\Z")


def test_the_issue_s_topic_names() -> None:
    assert Topics().all() == (
        "iop.episodes.v1",
        "iop.referrals.v1",
        "iop.episodes.part2.v1",
        "iop.referrals.part2.v1",
        "iop.attendance.v1",
        "iop.discharges.v1",
        "iop.deadletter.v1",
        "iop.attendance.part2.v1",
        "iop.discharges.part2.v1",
        "iop.deadletter.part2.v1",
    )


def test_prefix_applies_to_every_topic() -> None:
    named = Topics("staging.")
    assert named.episodes == "staging.iop.episodes.v1"
    assert named.referrals_part2 == "staging.iop.referrals.part2.v1"
    assert named.attendance == "staging.iop.attendance.v1"
    assert named.deadletter == "staging.iop.deadletter.v1"
    assert all(name.startswith("staging.iop.") for name in named.all())


def test_contract_of_a_prefixed_topic() -> None:
    named = Topics("t-1.")
    assert named.contract("t-1.iop.attendance.v1") == ("attendance", 1)
    assert named.contract("t-1.iop.episodes.part2.v1") == ("episode", 1)
    assert named.unprefixed("t-1.iop.discharges.v1") == topics.DISCHARGES


@pytest.mark.parametrize("name", ["iop.attendance.v1", "t-2.iop.attendance.v1", "t-1.iop.unknown.v1"])
def test_a_topic_that_is_not_ours_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not one of ours"):
        Topics("t-1.").contract(name)


def test_unknown_topic_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown topic"):
        Topics().name("iop.billing.v1")


@pytest.mark.parametrize("prefix", ["bad prefix.", "a/b.", "x" * 240])
def test_prefix_must_make_legal_kafka_topic_names(prefix: str) -> None:
    with pytest.raises(ValueError, match="topic prefix"):
        Topics(prefix)


def test_message_key_format() -> None:
    assert message_key("general-hospital", "123") == "general-hospital|Patient/123"
    assert message_key("general-hospital", "Patient/123") == "general-hospital|Patient/123"


def test_same_patient_id_at_two_ehrs_gets_two_keys() -> None:
    assert message_key("a", "123") != message_key("b", "123")


@pytest.mark.parametrize(
    ("ehr", "patient"), [("a|b", "1"), ("", "1"), ("ehr", ""), ("ehr", "Encounter/1"), ("ehr", "x" * 256)]
)
def test_message_key_refuses_what_would_be_ambiguous(ehr: str, patient: str) -> None:
    with pytest.raises(ValueError, match="message key"):
        message_key(ehr, patient)


def test_vendor_ids_that_break_the_fhir_id_rule_are_keyed_and_pass_the_contracts() -> None:
    oracle, epic = "LIFETIME_PROVIDER-4169494-0", "e" + "X" * 80
    assert parse_message_key(message_key("oracle", oracle)) == ("oracle", oracle)
    assert parse_message_key(message_key("epic", epic)) == ("epic", epic)
    event = {
        "event_id": "evt-1",
        "occurred_at": "2026-03-02T18:00:00+00:00",
        "ehr": "oracle",
        "episode_id": "5b1a2f44-1111-5222-8333-444455556666",
        "patient": {"reference": f"Patient/{oracle}"},
        "session": {"id": "S-1", "start": "2026-03-02T09:00:00+00:00", "end": "2026-03-02T12:00:00+00:00",
                    "status": "attended"},
    }  # fmt: skip
    assert errors("attendance", 1, event) == []


@given(EHR_NAMES, PATIENT_IDS)
def test_message_key_round_trips(ehr: str, patient_id: str) -> None:
    assert parse_message_key(message_key(ehr, patient_id)) == (ehr, patient_id)


@pytest.mark.parametrize("key", ["ehr|123", "ehr/Patient/1", "|Patient/1", "ehr|Patient/", "a|b|Patient/1"])
def test_malformed_keys_are_named(key: str) -> None:
    with pytest.raises(ValueError, match="is not"):
        parse_message_key(key)


def test_header_names() -> None:
    assert (
        topics.HEADER_SCHEMA,
        topics.HEADER_SCHEMA_VERSION,
        topics.HEADER_EVENT_ID,
        topics.HEADER_TRACEPARENT,
    ) == ("schema", "schema_version", "event_id", "traceparent")

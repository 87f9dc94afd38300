"""42 CFR Part 2 by any SUD evidence: any diagnosis position, SUD service codes, inbound security labels."""

from __future__ import annotations

from typing import Any

from mappers import EpisodeSettings
from mappers.referrals import map_referrals
from mappers.rules import default_rules
from tests.unit.mappers.test_episodes import HCPCS, ICD, REVENUE, run, session

SNOMED = "http://snomed.info/sct"
PRIVACY_LAW = "http://terminology.hl7.org/CodeSystem/v3-ActUSPrivacyLaw"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"


def depression(sid: str = "a", **extra: Any) -> dict[str, Any]:
    return session(sid, "2025-01-06", **extra)


def part2_of(*resources: dict[str, Any], **kwargs: Any) -> bool:
    episodes = run(list(resources), **kwargs).episodes
    assert len(episodes) == 1
    assert {s["code"] for s in episodes[0]["security"]} == (
        {"ETH", "R", "42CFRPart2"} if episodes[0]["part2"] else set()
    )
    return bool(episodes[0]["part2"])


def condition(cid: str, code: str, system: str = ICD, **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": "Patient/p"},
        "code": {"coding": [{"system": system, "code": code}]},
    }
    resource.update(extra)
    return resource


def test_depression_alone_is_not_part2() -> None:
    assert part2_of(depression()) is False


def test_a_secondary_f10_diagnosis_makes_the_episode_part2() -> None:
    reasons = [
        {"coding": [{"system": ICD, "code": "F33.1"}]},
        {"coding": [{"system": ICD, "code": "F10.20"}]},
    ]
    assert part2_of(depression(reasonCode=reasons)) is True


def test_a_secondary_sud_condition_by_diagnosis_rank_makes_the_episode_part2() -> None:
    diagnosis = [
        {"condition": {"reference": "Condition/dep"}, "rank": 1},
        {"condition": {"reference": "Condition/aud"}, "rank": 2},
    ]
    resources = [depression(diagnosis=diagnosis), condition("dep", "F33.1"), condition("aud", "F10.20")]
    assert part2_of(*resources) is True


def test_a_snomed_substance_use_condition_makes_the_episode_part2() -> None:
    resources = [
        depression(reasonReference=[{"reference": "Condition/oud"}]),
        condition("oud", "5602001", SNOMED),  # opioid abuse
    ]
    assert part2_of(*resources) is True


def test_a_sud_hcpcs_service_line_makes_the_episode_part2() -> None:
    procedure = {
        "resourceType": "Procedure",
        "id": "pr",
        "status": "completed",
        "subject": {"reference": "Patient/p"},
        "encounter": {"reference": "Encounter/a"},
        "code": {"coding": [{"system": HCPCS, "code": "H0005"}]},  # alcohol and/or drug group counseling
    }
    assert part2_of(depression(), procedure) is True


def test_a_sud_revenue_code_on_the_encounter_makes_the_episode_part2() -> None:
    types = [
        {"coding": [{"system": HCPCS, "code": "S9480"}]},
        {"coding": [{"system": REVENUE, "code": "0944"}]},  # drug rehabilitation
    ]
    assert part2_of(depression(type=types)) is True


def test_an_inbound_42cfrpart2_label_on_the_encounter_makes_the_episode_part2() -> None:
    meta = {"security": [{"system": PRIVACY_LAW, "code": "42CFRPart2"}]}
    assert part2_of(depression(meta=meta)) is True


def test_an_inbound_eth_label_on_a_condition_makes_the_episode_part2() -> None:
    meta = {"security": [{"system": ACT, "code": "ETH"}]}
    resources = [
        depression(reasonReference=[{"reference": "Condition/c"}]),
        condition("c", "F33.1", meta=meta),
    ]
    assert part2_of(*resources) is True


def test_restricted_confidentiality_alone_does_not_make_part2() -> None:
    meta = {"security": [{"system": CONFIDENTIALITY, "code": "R"}]}
    assert part2_of(depression(meta=meta)) is False


def test_nicotine_in_any_position_is_not_part2() -> None:
    reasons = [
        {"coding": [{"system": ICD, "code": "F33.1"}]},
        {"coding": [{"system": ICD, "code": "F17.210"}]},
    ]
    assert part2_of(depression(reasonCode=reasons)) is False


def test_billing_still_follows_the_principal_diagnosis() -> None:
    reasons = [
        {"coding": [{"system": ICD, "code": "F33.1"}]},
        {"coding": [{"system": ICD, "code": "F10.20"}]},
    ]
    episode = run([depression(reasonCode=reasons)]).episodes[0]
    assert episode["billing"]["revenue_code"] == "0905"
    assert episode["billing"]["hcpcs"] == "S9480"


def test_part2_program_setting_still_applies() -> None:
    assert part2_of(depression(), settings=EpisodeSettings(part2_program=True)) is True


# -- referrals ----------------------------------------------------------------------------------------


def referral(**fields: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": "sr1",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": SNOMED, "code": "3457005"}]}],
        "subject": {"reference": "Patient/p"},
    }
    resource.update(fields)
    return resource


def referral_part2(*resources: dict[str, Any], **options: Any) -> bool:
    result = map_referrals(resources, ehr="h", rules=default_rules(), **options)
    assert len(result.referrals) == 1
    return bool(result.referrals[0]["part2"])


def test_a_referral_with_a_secondary_sud_reason_is_part2() -> None:
    reasons = [
        {"coding": [{"system": ICD, "code": "F33.1"}]},
        {"coding": [{"system": ICD, "code": "F11.20"}]},
    ]
    assert referral_part2(referral(reasonCode=reasons)) is True


def test_a_referral_with_a_snomed_sud_reason_is_part2() -> None:
    assert referral_part2(referral(reasonCode=[{"coding": [{"system": SNOMED, "code": "66590003"}]}])) is True


def test_a_referral_labelled_42cfrpart2_is_part2() -> None:
    meta = {"security": [{"system": PRIVACY_LAW, "code": "42CFRPart2"}]}
    assert referral_part2(referral(meta=meta)) is True


def test_a_referral_whose_reason_condition_is_labelled_is_part2() -> None:
    meta = {"security": [{"system": ACT, "code": "ETH"}]}
    resources = [referral(reasonReference=[{"reference": "Condition/c"}]), condition("c", "F33.1", meta=meta)]
    assert referral_part2(*resources) is True


def test_a_depression_referral_is_not_part2() -> None:
    assert referral_part2(referral(reasonCode=[{"coding": [{"system": ICD, "code": "F33.1"}]}])) is False

"""Engine behaviour beyond the golden journeys: boundaries, identity, hints, settings, bad input."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from mappers import (
    EpisodeSettings,
    MappingResult,
    anchor_key,
    default_rules,
    episode_id,
    map_episodes,
    review_after,
)

HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
REVENUE = "https://www.nubc.org/CodeSystem/RevenueCodes"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
CPT = "http://www.ama-assn.org/go/cpt"


def session(
    sid: str,
    day: date | str,
    *,
    hours: float | None = 3,
    code: str = "S9480",
    system: str = HCPCS,
    patient: str = "p",
    hour: int = 9,
    **extra: Any,
) -> dict[str, Any]:
    day = date.fromisoformat(day) if isinstance(day, str) else day
    start = datetime(day.year, day.month, day.day, hour, tzinfo=UTC)
    period = {"start": start.isoformat()}
    if hours is not None:
        period["end"] = (start + timedelta(hours=hours)).isoformat()
    resource = {
        "resourceType": "Encounter",
        "id": sid,
        "status": "finished",
        "class": {"system": ACT, "code": "AMB"},
        "subject": {"reference": f"Patient/{patient}"},
        "type": [{"coding": [{"system": system, "code": code}]}],
        "reasonCode": [{"coding": [{"system": ICD, "code": "F33.1"}]}],
        "period": period,
    }
    resource.update(extra)
    return resource


def run(
    resources: list[dict[str, Any]], as_of: str = "2025-06-01T00:00:00+00:00", **kwargs: Any
) -> MappingResult:
    kwargs.setdefault("rules", default_rules())
    return map_episodes(resources, ehr="h", as_of=datetime.fromisoformat(as_of), **kwargs)


def every(first: str, count: int, step: int) -> list[date]:
    start = date.fromisoformat(first)
    return [start + timedelta(days=step * i) for i in range(count)]


def test_gap_of_max_gap_days_continues_one_more_splits() -> None:
    joined = run([session("a", "2025-01-01"), session("b", "2025-01-15")])
    assert [len(e["sessions"]) for e in joined.episodes] == [2]
    split = run([session("a", "2025-01-01"), session("b", "2025-01-16")])
    assert [len(e["sessions"]) for e in split.episodes] == [1, 1]
    assert split.episodes[0]["exit"]["reason"] == "lost_to_follow_up"
    wider = run(
        [session("a", "2025-01-01"), session("b", "2025-01-16")], settings=EpisodeSettings(max_gap_days=15)
    )
    assert len(wider.episodes) == 1


def test_an_active_episode_finishes_by_the_passage_of_time_alone() -> None:
    resources = [session(f"s{i}", d) for i, d in enumerate(every("2025-03-03", 6, 2))]  # last 13 Mar
    assert run(resources, "2025-03-27T23:00:00+00:00").episodes[0]["status"] == "active"  # 14 days
    later = run(resources, "2025-03-28T01:00:00+00:00").episodes[0]
    assert (later["status"], later["exit"]["reason"], later["end"]) == (
        "finished",
        "lost_to_follow_up",
        "2025-03-13",
    )


def test_sessions_after_a_discharge_open_a_new_episode() -> None:
    discharge = {"dischargeDisposition": {"coding": [{"code": "home"}]}}
    resources = [
        session("a", "2025-01-06"),
        session("b", "2025-01-08", hospitalization=discharge),
        session("c", "2025-01-10"),
    ]
    first, second = run(resources).episodes
    assert first["exit"]["reason"] == "discharged"
    assert first["exit"]["disposition"] == {"code": "home"}
    assert [s["reference"] for s in second["sessions"]] == ["Encounter/c"]


def test_our_finished_episode_of_care_is_a_discharge() -> None:
    sessions = [session(f"s{i}", d) for i, d in enumerate(every("2025-03-03", 4, 2))]
    ours = episode_id("h", "p", "iop", "Encounter/s0")
    eoc = {
        "resourceType": "EpisodeOfCare",
        "id": "77",
        "identifier": [{"system": "urn:iop-bridge:episode-id", "value": ours}],
        "status": "finished",
        "type": [{"coding": [{"system": "urn:iop-bridge:level-of-care", "code": "iop"}]}],
        "patient": {"reference": "Patient/p"},
        "period": {"start": "2025-03-03", "end": "2025-03-12"},
    }
    before = run(sessions, "2025-03-12T12:00:00+00:00").episodes[0]
    assert before["status"] == "active"
    after = run([*sessions, eoc], "2025-03-12T12:00:00+00:00").episodes[0]
    assert after["episode_id"] == ours  # never an anchor
    assert (after["status"], after["exit"]["reason"], after["exit"]["at"], after["end"]) == (
        "finished",
        "discharged",
        "2025-03-12",
        "2025-03-12",
    )


def test_our_episode_of_care_with_an_id_no_longer_produced_is_cancelled_and_superseded() -> None:
    sessions = [session(f"s{i}", d) for i, d in enumerate(every("2025-03-03", 4, 2))]
    stale = episode_id("h", "p", "iop", "Encounter/gone")
    eoc = {
        "resourceType": "EpisodeOfCare",
        "id": "78",
        "identifier": [{"system": "urn:iop-bridge:episode-id", "value": stale}],
        "status": "active",
        "type": [{"coding": [{"system": "urn:iop-bridge:level-of-care", "code": "iop"}]}],
        "patient": {"reference": "Patient/p"},
        "period": {"start": "2025-03-03"},
    }
    records = run([*sessions, eoc], "2025-03-12T12:00:00+00:00").episodes
    current = next(r for r in records if r["status"] != "cancelled")
    cancelled = next(r for r in records if r["status"] == "cancelled")
    assert cancelled["episode_id"] == stale
    assert cancelled["superseded_by"] == current["episode_id"]


def test_previous_anchors_are_cancelled_once_and_only_for_patients_mapped() -> None:
    sessions = [session("s0", "2025-03-03"), session("s1", "2025-03-05")]
    current = run(sessions).episodes[0]
    assert anchor_key(current) == "Patient/p|iop|Encounter/s0|2025-03-03|0"
    still = run(sessions, previous_anchors={current["episode_id"]: anchor_key(current)}).episodes
    assert still == [current]  # an id still produced is not cancelled
    elsewhere = run(
        sessions,
        previous_anchors={"0d1b9a4e-0000-5000-8000-000000000000": "Patient/q|iop|Encounter/x|2025-01-01|0"},
    )
    assert elsewhere.episodes == [current]  # patient q is not in this run
    old = "0d1b9a4e-0000-5000-8000-000000000001"
    moved = run(sessions, previous_anchors={old: "Patient/p|iop|Encounter/s1|2025-03-05|1"}).episodes
    cancelled = next(r for r in moved if r["episode_id"] == old)
    assert (cancelled["status"], cancelled["superseded_by"]) == ("cancelled", current["episode_id"])
    assert cancelled["part2"] is True  # it was Part 2: its retirement stays on the Part 2 topic
    assert len(cancelled["security"]) == 3


@pytest.mark.parametrize(
    "bad",
    [
        ["not a resource"],
        [{"id": "x"}],
        [{"resourceType": "Encounter", "status": "finished"}],
        [{"resourceType": "Encounter", "id": "e", "subject": {"reference": "Group/1"}, "status": "finished"}],
        [
            {
                "resourceType": "Encounter",
                "id": "e",
                "subject": {"reference": "Patient/p"},
                "status": "finished",
                "period": {"start": 20250101},
            }
        ],
        [{"resourceType": "EpisodeOfCare", "id": "x", "status": "active"}],
        [
            {
                "resourceType": "EpisodeOfCare",
                "id": "x",
                "status": "active",
                "patient": {"reference": "Patient/p"},
                "period": {"start": "soon"},
            }
        ],
        [{"resourceType": "Coverage", "id": "c", "status": "active"}],
        [session("e", "2025-01-01", period={"start": "2025-13-45T09:00:00Z"})],
        [session("e", "2025-01-01", period={})],
    ],
)
def test_bad_input_is_rejected_with_a_reason_never_a_crash(bad: list[Any]) -> None:
    result = run(bad)
    assert result.episodes == []
    assert len(result.rejects) == 1
    assert result.rejects[0].reason
    assert set(result.rejects[0].to_dict()) == {"resourceType", "id", "reason"}


def test_explanations_only_when_asked() -> None:
    resources = [
        session("ed", "2025-01-01", code="99285", system=CPT, **{"class": {"system": ACT, "code": "EMER"}}),
        session("a", "2025-01-03"),
    ]
    assert run(resources).explanations == {}
    result = run(resources, explain=True)
    lines = result.explanations[result.episodes[0]["episode_id"]]
    text = "\n".join(lines)
    assert "rule iop-hcpcs-per-diem" in text
    assert "entry step_down from emergency: Encounter/ed (rule emergency-class-bh" in text
    assert "exit lost_to_follow_up" in text
    assert result.encounter_levels == {"emergency": 1, "iop": 1}


def test_bundle_urn_uuid_references_resolve() -> None:
    pid = "6f1d7a7e-98c1-4a8e-9f0e-1d5d3c1c2b11"
    adm = "0b0e58c0-5d0f-4a1e-8f1a-2f6f3c1d9e22"
    resources = [
        {"resourceType": "Patient", "id": pid},
        session(
            adm, "2025-01-06", hours=None, status="in-progress", subject={"reference": f"urn:uuid:{pid}"}
        ),
        session(
            "s1",
            "2025-01-06",
            code="G0410",
            subject={"reference": f"urn:uuid:{pid}"},
            partOf={"reference": f"urn:uuid:{adm}"},
        ),
    ]
    episode = run(resources, "2025-01-07T00:00:00+00:00").episodes[0]
    assert episode["patient"]["reference"] == f"Patient/{pid}"
    assert episode["anchor"] == {"reference": f"Encounter/{adm}"}
    assert [s["reference"] for s in episode["sessions"]] == ["Encounter/s1"]


def test_weeks_days_and_hours_follow_the_settings_and_the_time_zone() -> None:
    # 02:30 UTC on Monday 6 Jan is Sunday 5 Jan in Chicago.
    resources = [session("a", "2025-01-06", hour=2, hours=None), session("b", "2025-01-07", hours=30)]
    iso = run(resources, timezone="America/Chicago").episodes[0]
    assert iso["start"] == "2025-01-05"
    assert [w["week_start"] for w in iso["attendance"]["weeks"]] == ["2024-12-30", "2025-01-06"]
    assert iso["attendance"]["hours_attended"] == 6.0  # no end and an implausible 30 h: the default 3 h each
    sunday = run(resources, timezone="America/Chicago", settings=EpisodeSettings(week="sunday")).episodes[0]
    assert [w["week_start"] for w in sunday["attendance"]["weeks"]] == ["2025-01-05"]
    four = run(resources, settings=EpisodeSettings(default_session_hours=4.0)).episodes[0]
    assert four["attendance"]["hours_attended"] == 8.0


def test_iop_weeks_at_php_intensity_are_flagged_and_short_weeks_do_not_meet_the_minimum() -> None:
    heavy = [session(f"s{i}", d, hours=5) for i, d in enumerate(every("2025-01-06", 4, 1))]  # 20 h
    light = [session(f"t{i}", d, hours=2) for i, d in enumerate(every("2025-01-13", 2, 2))]  # 4 h
    weeks = run(heavy + light).episodes[0]["attendance"]["weeks"]
    assert [(w["hours"], w["meets_minimum"], w["looks_like_php"]) for w in weeks] == [
        (20.0, True, True),
        (4.0, False, False),
    ]


def test_part2_program_setting_labels_every_episode() -> None:
    episode = run([session("a", "2025-01-06")], settings=EpisodeSettings(part2_program=True)).episodes[0]
    assert episode["part2"] is True
    assert {s["code"] for s in episode["security"]} == {"ETH", "R", "42CFRPart2"}
    assert episode["billing"]["revenue_code"] == "0905"  # a Part 2 program alone is not SUD coding


def test_nicotine_alone_is_not_part2() -> None:
    resource = session("a", "2025-01-06", reasonCode=[{"coding": [{"system": ICD, "code": "F17.210"}]}])
    assert run([resource]).episodes[0]["part2"] is False


def test_php_revenue_code_follows_the_sessions() -> None:
    resources = [
        session(f"s{i}", d, hours=6, code="0912", system=REVENUE)
        for i, d in enumerate(every("2025-01-06", 3, 1))
    ]
    billing = run(resources).episodes[0]["billing"]
    assert (billing["condition_code"], billing["revenue_code"], billing["hcpcs"]) == ("41", "0912", "H0035")


def test_newer_version_by_last_updated_replaces_the_older() -> None:
    old = session("a", "2025-01-06", meta={"lastUpdated": "2025-01-06T12:00:00Z"})
    new = session("a", "2025-01-06", status="cancelled", meta={"lastUpdated": "2025-01-07T12:00:00Z"})
    assert run([new, old]).episodes == []
    assert run([old, new]).episodes == []


def test_entered_in_error_condition_is_no_qualifier() -> None:
    condition = {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": "Patient/p"},
        "verificationStatus": {"coding": [{"code": "entered-in-error"}]},
        "code": {"coding": [{"system": ICD, "code": "F32.9"}]},
    }
    stay = session(
        "in",
        "2025-01-01",
        reasonCode=[],
        diagnosis=[{"condition": {"reference": "Condition/c1"}}],
        **{"class": {"code": "IMP"}},
    )
    stay.pop("type")
    result = run([condition, stay, session("a", "2025-01-03")])
    assert result.encounter_levels == {"iop": 1, "none": 1}
    assert result.episodes[0]["entry"]["direction"] == "direct"


def test_a_cancelled_ehr_episode_of_care_groups_nothing() -> None:
    eoc = {
        "resourceType": "EpisodeOfCare",
        "id": "e1",
        "status": "cancelled",
        "patient": {"reference": "Patient/p"},
        "period": {"start": "2025-01-01"},
    }
    linked = [session("a", "2025-01-06", episodeOfCare=[{"reference": "EpisodeOfCare/e1"}])]
    assert run([eoc, *linked]).episodes[0]["anchor"] == {"reference": "Encounter/a"}


def test_procedures_in_a_session_add_service_lines() -> None:
    procedure = {
        "resourceType": "Procedure",
        "id": "pr1",
        "status": "completed",
        "subject": {"reference": "Patient/p"},
        "encounter": {"reference": "Encounter/a"},
        "code": {"coding": [{"system": CPT, "code": "90853"}]},
    }
    lines = run([procedure, session("a", "2025-01-06")]).episodes[0]["billing"]["lines"]
    assert lines == [{"date": "2025-01-06", "services": [{"system": CPT, "code": "90853"}], "count": 1}]


def test_ranked_encounter_diagnosis_is_principal() -> None:
    resource = session(
        "a",
        "2025-01-06",
        contained=[
            {"resourceType": "Condition", "id": "d", "code": {"coding": [{"system": ICD, "code": "F41.1"}]}}
        ],
        diagnosis=[{"condition": {"reference": "#d"}, "rank": 1}],
    )
    diagnoses = run([resource]).episodes[0]["billing"]["diagnoses"]
    assert [(d["code"], d["principal"]) for d in diagnoses] == [("F41.1", True), ("F33.1", False)]


def test_as_of_must_be_aware_and_the_zone_known() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        map_episodes([], ehr="h", as_of=datetime(2025, 1, 1), rules=default_rules())
    with pytest.raises(ValueError, match="unknown time zone"):
        map_episodes(
            [], ehr="h", as_of=datetime(2025, 1, 1, tzinfo=UTC), rules=default_rules(), timezone="Mars/Base"
        )


def test_settings_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="program_levels"):
        EpisodeSettings(program_levels=("inpatient",))
    with pytest.raises(ValueError, match="week"):
        EpisodeSettings(week="friday")
    with pytest.raises(ValueError, match="max_gap_days"):
        EpisodeSettings(max_gap_days=-1)


def test_residential_episodes_where_a_hospital_turns_them_on() -> None:
    stay = session("r", "2025-01-06", code="H0019", hours=None)
    assert run([stay]).episodes == []
    episode = run([stay], settings=EpisodeSettings(program_levels=("iop", "php", "residential"))).episodes[0]
    assert (episode["level"], episode["billing"]["revenue_code"]) == ("residential", "1001")


def test_our_attendance_encounter_joins_the_episode_it_names_even_without_our_episode_of_care() -> None:
    sessions = [session(f"s{i}", d) for i, d in enumerate(every("2025-03-03", 3, 2))]
    ours = episode_id("h", "p", "iop", "Encounter/s0")
    written = session(
        "w1",
        "2025-03-10",
        code="G0410",  # no level on its own
        identifier=[{"system": "urn:iop-bridge:session-id", "value": "sess-4"}],
        episodeOfCare=[{"identifier": {"system": "urn:iop-bridge:episode-id", "value": ours}}],
    )
    duplicate = {**written, "id": "w2"}
    result = run([*sessions, written, duplicate], "2025-03-11T00:00:00+00:00", explain=True)
    (episode,) = result.episodes
    assert episode["episode_id"] == ours
    assert [s["reference"] for s in episode["sessions"]][-1] == "Encounter/w1"
    assert episode["attendance"]["sessions_attended"] == 4  # w2 is the same session: counted once
    assert any("same session as Encounter/w1" in line for line in result.explanations[ours])


def test_group_psychotherapy_alone_counts_as_a_service_of_the_episode_it_falls_in() -> None:
    resources = [
        session("a", "2025-01-06"),
        session("b", "2025-01-08"),
        session("g", "2025-01-07", code="G0410"),  # inside the span: a service, not a session
        session("late", "2025-03-01", code="G0411"),  # outside every episode: nowhere
    ]
    episode = run(resources, "2025-01-09T00:00:00+00:00").episodes[0]
    assert [s["reference"] for s in episode["sessions"]] == ["Encounter/a", "Encounter/b"]
    lines = {line["date"]: line["count"] for line in episode["billing"]["lines"]}
    assert lines == {"2025-01-06": 0, "2025-01-07": 1, "2025-01-08": 0}
    assert episode["billing"]["units"] == 2  # attended days


def test_review_after_is_the_first_day_time_alone_finishes_an_active_episode() -> None:
    resources = [session("a", "2025-03-03"), session("b", "2025-03-05")]
    active = run(resources, "2025-03-06T00:00:00+00:00").episodes[0]
    deadline = review_after(active)
    assert deadline == date(2025, 3, 20)
    assert run(resources, "2025-03-19T23:00:00+00:00").episodes[0]["status"] == "active"
    finished = run(resources, "2025-03-20T00:30:00+00:00").episodes[0]
    assert finished["status"] == "finished"
    assert review_after(finished) is None


def test_explain_says_why_other_encounters_around_the_episode_did_not_count() -> None:
    primary = session("pc", "2025-01-07", code="99213", system=CPT, reasonCode=[])
    cancelled = session("cx", "2025-01-09", status="cancelled")
    result = run([session("a", "2025-01-06"), session("b", "2025-01-08"), primary, cancelled], explain=True)
    lines = result.explanations[result.episodes[0]["episode_id"]]
    assert (
        "Encounter/pc 2025-01-07: care, none (no level: rule outpatient-em-medication-management needs a "
        "behavioral-health qualifier)" in lines
    )
    assert any(
        line.startswith("Encounter/cx 2025-01-09: cancelled, iop (rule iop-hcpcs-per-diem") for line in lines
    )

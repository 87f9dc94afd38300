"""Properties of the episode engine: order-independence, stable ids, patients independent of each other."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mappers import MappingResult, default_rules, map_episodes

HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
CPT = "http://www.ama-assn.org/go/cpt"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
DAY0 = date(2025, 1, 6)
AS_OF = datetime(2025, 6, 1, 12, tzinfo=UTC)

# (class, type codes, reason, status)
KINDS: dict[str, tuple[str, tuple[tuple[str, str], ...], str | None, str]] = {
    "iop": ("AMB", ((HCPCS, "S9480"),), "F33.1", "finished"),
    "sud-iop": ("AMB", ((HCPCS, "H0015"),), "F10.20", "finished"),
    "php": ("AMB", ((HCPCS, "H0035"),), "F33.2", "finished"),
    "outpatient": ("AMB", ((CPT, "90834"),), "F41.1", "finished"),
    "inpatient": ("IMP", (), "F32.3", "finished"),
    "emergency": ("EMER", (), "F43.0", "finished"),
    "surgery": ("IMP", ((CPT, "27447"),), "M17.11", "finished"),
    "primary": ("AMB", ((CPT, "99213"),), "I10", "finished"),
    "cancelled": ("AMB", ((HCPCS, "S9480"),), "F33.1", "cancelled"),
    "error": ("AMB", ((HCPCS, "S9480"),), "F33.1", "entered-in-error"),
    "group-only": ("AMB", ((HCPCS, "G0410"),), None, "finished"),
}

visit = st.tuples(
    st.sampled_from(sorted(KINDS)),
    st.integers(min_value=0, max_value=150),  # day offset
    st.integers(min_value=7, max_value=17),  # start hour
    st.sampled_from([1, 3, 6, None]),  # hours (None = no end)
    st.booleans(),  # partOf the admission
    st.booleans(),  # discharge disposition
)
journey = st.lists(visit, min_size=1, max_size=25)


def build(
    patient: str, visits: list[tuple[str, int, int, int | None, bool, bool]], hint: int
) -> list[dict[str, Any]]:
    """A patient's resources; ``hint`` adds an admission Encounter (1) or an EpisodeOfCare (2)."""
    resources: list[dict[str, Any]] = [{"resourceType": "Patient", "id": patient}]
    if hint == 1:
        resources.append(
            {
                "resourceType": "Encounter",
                "id": f"{patient}-adm",
                "status": "finished",
                "class": {"system": ACT, "code": "AMB"},
                "type": [{"coding": [{"system": HCPCS, "code": "S9480"}]}],
                "subject": {"reference": f"Patient/{patient}"},
                "period": {"start": "2025-01-06T08:00:00Z", "end": "2025-03-01T12:00:00Z"},
            }
        )
    if hint == 2:
        resources.append(
            {
                "resourceType": "EpisodeOfCare",
                "id": f"{patient}-eoc",
                "status": "active",
                "patient": {"reference": f"Patient/{patient}"},
                "period": {"start": "2025-01-06"},
            }
        )
    for index, (kind, offset, hour, hours, linked, discharged) in enumerate(visits):
        cls, codes, reason, status = KINDS[kind]
        start = datetime.combine(DAY0 + timedelta(days=offset), datetime.min.time(), UTC).replace(hour=hour)
        encounter: dict[str, Any] = {
            "resourceType": "Encounter",
            "id": f"{patient}-e{index}",
            "status": status,
            "class": {"system": ACT, "code": cls},
            "subject": {"reference": f"Patient/{patient}"},
            "period": {"start": start.isoformat()},
        }
        if hours is not None:
            encounter["period"]["end"] = (start + timedelta(hours=hours)).isoformat()
        if codes:
            encounter["type"] = [{"coding": [{"system": s, "code": c} for s, c in codes]}]
        if reason:
            encounter["reasonCode"] = [{"coding": [{"system": ICD, "code": reason}]}]
        if linked and hint == 1:
            encounter["partOf"] = {"reference": f"Encounter/{patient}-adm"}
        if linked and hint == 2:
            encounter["episodeOfCare"] = [{"reference": f"EpisodeOfCare/{patient}-eoc"}]
        if discharged and kind in ("iop", "php"):
            encounter["hospitalization"] = {"dischargeDisposition": {"coding": [{"code": "home"}]}}
        resources.append(encounter)
    return resources


def run(resources: list[dict[str, Any]]) -> MappingResult:
    return map_episodes(
        resources, ehr="prop", as_of=AS_OF, rules=default_rules(), timezone="America/Chicago", explain=True
    )


def comparable(result: MappingResult) -> tuple[Any, ...]:
    rejects = [r.to_dict() for r in result.rejects]
    return result.episodes, rejects, result.encounter_levels, result.patients, result.explanations


@settings(max_examples=60, deadline=None)
@given(journey, st.integers(min_value=0, max_value=2), st.randoms(use_true_random=False))
def test_shuffling_the_input_never_changes_the_output(visits: Any, hint: int, rnd: Any) -> None:
    resources = build("p1", visits, hint) + build("p2", list(reversed(visits)), 2 - hint)
    shuffled = list(resources)
    rnd.shuffle(shuffled)
    assert comparable(run(shuffled)) == comparable(run(resources))


@settings(max_examples=40, deadline=None)
@given(journey, st.integers(min_value=0, max_value=2))
def test_mapping_twice_gives_the_same_ids_and_leaves_the_input_alone(visits: Any, hint: int) -> None:
    resources = build("p1", visits, hint)
    before = copy.deepcopy(resources)
    first = run(resources)
    second = run(resources)
    assert resources == before
    assert [e["episode_id"] for e in first.episodes] == [e["episode_id"] for e in second.episodes]
    assert comparable(first) == comparable(second)
    # A resource delivered twice (a page fetched again) is one resource.
    assert comparable(run(resources + copy.deepcopy(resources))) == comparable(first)


@settings(max_examples=40, deadline=None)
@given(journey, journey, st.integers(min_value=0, max_value=2))
def test_an_unrelated_patient_never_changes_another_patients_episodes(
    mine: Any, theirs: Any, hint: int
) -> None:
    alone = run(build("me", mine, hint))
    together = run(build("me", mine, hint) + build("other", theirs, 2 - hint))
    assert [e for e in together.episodes if e["patient"]["reference"] == "Patient/me"] == alone.episodes
    assert {
        k: v for k, v in together.explanations.items() if k in {e["episode_id"] for e in alone.episodes}
    } == (alone.explanations)


@settings(max_examples=40, deadline=None)
@given(journey, st.integers(min_value=0, max_value=2))
def test_every_generated_record_satisfies_the_contract(visits: Any, hint: int) -> None:
    from schemas import errors

    for record in run(build("p1", visits, hint)).episodes:
        assert errors("episode", 1, record) == []

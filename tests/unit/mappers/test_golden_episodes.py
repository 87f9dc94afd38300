"""Golden cases: FHIR input in tests/data/<case>/ mapped to the episodes episode-model.md prescribes."""

from __future__ import annotations

import pytest

from schemas import errors
from tests.unit.mappers.golden import case_names, load_case, project

CASES = case_names()


def test_the_required_cases_exist() -> None:
    assert len(CASES) >= 12


@pytest.mark.parametrize("name", CASES)
def test_case_maps_to_the_expected_episodes(name: str) -> None:
    case = load_case(name)
    result = case.run()
    assert len(result.episodes) == len(case.expected), [e["episode_id"] for e in result.episodes]
    for record, expected in zip(result.episodes, case.expected, strict=True):
        assert project(record, expected) == expected


@pytest.mark.parametrize("name", CASES)
def test_every_record_satisfies_episode_v1(name: str) -> None:
    result = load_case(name).run()
    for record in result.episodes:
        assert errors("episode", 1, record) == []
        assert record["rules_version"]


@pytest.mark.parametrize("name", CASES)
def test_rejects_are_the_expected_ones(name: str) -> None:
    case = load_case(name)
    rejects = [r.to_dict() for r in case.run().rejects]
    assert rejects == (case.expected_rejects or [])


@pytest.mark.parametrize("name", [n for n in CASES if load_case(n).without])
def test_our_own_writes_pulled_back_change_nothing(name: str) -> None:
    case = load_case(name)
    dropped = set(case.without)
    fewer = [r for r in case.resources if f"{r['resourceType']}/{r['id']}" not in dropped]
    assert len(fewer) < len(case.resources)
    assert case.run(fewer).episodes == case.run().episodes

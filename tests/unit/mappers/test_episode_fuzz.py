"""Malformed FHIR never crashes the engine: any element replaced by a value of the wrong shape."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import errors
from tests.unit.mappers.golden import load_case

BASE = (
    load_case("outpatient_iop_php_iop_discharge").resources + load_case("existing_episode_of_care").resources
)
BASE += load_case("active_episode").resources + load_case("own_writes_pulled_back").resources
CASE = load_case("own_writes_pulled_back")

garbage = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=12),
    st.just([]),
    st.just({}),
    st.just([1, "x", None]),
    st.just({"reference": 7, "coding": "F32", "start": []}),
    st.just("2025-13-40T99:99:99Z"),
    st.just("urn:uuid:nowhere"),
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            found.append((*prefix, key))
            found.extend(_paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.append((*prefix, index))
            found.extend(_paths(item, (*prefix, index)))
    return found


def _replace(resource: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = resource
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000), garbage), min_size=1, max_size=6))
def test_wrong_shapes_are_rejected_or_ignored_never_a_crash(mutations: list[tuple[int, int, Any]]) -> None:
    resources = copy.deepcopy(BASE)
    for which, where, value in mutations:
        resource = resources[which % len(resources)]
        paths = [p for p in _paths(resource) if p[0] != "resourceType"]
        if paths:
            _replace(resource, paths[where % len(paths)], copy.deepcopy(value))
    result = CASE.run(resources)
    assert [r.reason for r in result.rejects if "internal error" in r.reason] == []
    for record in result.episodes:
        assert errors("episode", 1, record) == []

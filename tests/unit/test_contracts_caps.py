"""Event contracts bound every string and array (issue 10, item 16): an oversized event is refused by
schema validation with a reason that names the field and the size, never the value."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from schemas.contracts import errors, load_schema

BOUNDED = ("attendance", "discharge", "deadletter")


def _nodes(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from _nodes(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _nodes(value, f"{where}/{index}")


def _types(node: dict[str, Any]) -> set[str]:
    kind = node.get("type")
    return set(kind) if isinstance(kind, list) else {kind} if isinstance(kind, str) else set()


@pytest.mark.parametrize("name", BOUNDED)
def test_every_string_has_a_max_length_and_every_array_max_items(name: str) -> None:
    schema = load_schema(name, 1)
    unbounded = [
        where
        for where, node in _nodes(schema)
        if ("string" in _types(node) and "maxLength" not in node)
        or ("array" in _types(node) and "maxItems" not in node)
    ]
    assert unbounded == []


def _attendance(**session: Any) -> dict[str, Any]:
    return {
        "event_id": "evt-1",
        "occurred_at": "2026-03-02T18:00:00Z",
        "ehr": "hospital-a",
        "episode_id": "6f1c2a53-3f0e-5c1a-9d5e-0b8a8f2b1c11",
        "patient": {"reference": "Patient/p1"},
        "session": {
            "id": "s-1",
            "status": "attended",
            "start": "2026-03-02T15:00:00Z",
            "end": "2026-03-02T18:00:00Z",
            **session,
        },
    }


def test_the_sample_attendance_event_passes() -> None:
    assert errors("attendance", 1, _attendance(services=[{"code": "S9480"}])) == []


def test_an_oversized_string_is_refused_naming_the_field_and_size_not_the_value() -> None:
    secret = "relapsed on alcohol " * 5000
    found = errors("attendance", 1, _attendance(services=[{"code": "S9480", "display": secret}]))
    assert found == ["session/services/0/display: 100000 characters, over maxLength 1024"]


def test_too_many_items_are_refused_naming_the_field_and_count() -> None:
    found = errors("attendance", 1, _attendance(services=[{"code": "S9480"}] * 10_000))
    assert found == ["session/services: 10000 items, over maxItems 50"]


def test_an_oversized_discharge_summary_is_refused() -> None:
    event = {
        "event_id": "evt-2",
        "occurred_at": "2026-03-20T18:00:00Z",
        "ehr": "hospital-a",
        "episode_id": "6f1c2a53-3f0e-5c1a-9d5e-0b8a8f2b1c11",
        "patient": {"identifier": [{"system": "urn:mrn", "value": "1"}] * 21},
        "discharge": {"date": "2026-03-20", "reason": "completed", "summary": "x" * 100_001},
    }
    assert errors("discharge", 1, event) == [
        "discharge/summary: 100001 characters, over maxLength 100000",
        "patient/identifier: 21 items, over maxItems 20",
    ]

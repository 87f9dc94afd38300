"""schemas/episode.py (TypedDicts) says exactly what schemas/episode.v1.json says, key for key."""

from __future__ import annotations

from typing import Any, get_type_hints

import pytest

from schemas import episode as model
from schemas import load_schema

SCHEMA = load_schema("episode", 1)


def _object(path: str) -> dict[str, Any]:
    """The object schema at a path of property names (``oneOf`` with null and ``items`` unwrapped)."""
    node: dict[str, Any] = SCHEMA
    for part in [p for p in path.split(".") if p]:
        node = node["properties"][part]
        node = _unwrap(node)
    return node


def _unwrap(node: dict[str, Any]) -> dict[str, Any]:
    while True:
        if "$ref" in node:
            node = SCHEMA["$defs"][node["$ref"].split("/")[-1]]
        elif "oneOf" in node:
            node = next(n for n in node["oneOf"] if n.get("type") != "null")
        elif node.get("type") == "array":
            node = node["items"]
        else:
            return node


CASES = [
    ("", model.Episode),
    ("patient", model.PatientReference),
    ("patient.identifier", model.Identifier),
    ("anchor", model.Reference),
    ("entry", model.Entry),
    ("exit", model.Exit),
    ("exit.disposition", model.Coding),
    ("sessions", model.Session),
    ("attendance", model.Attendance),
    ("attendance.weeks", model.Week),
    ("billing", model.Billing),
    ("billing.lines", model.ServiceLine),
    ("billing.diagnoses", model.Diagnosis),
    ("billing.payer", model.Payer),
    ("billing.payer.payor", model.Payor),
    ("care_plans", model.CarePlanSummary),
    ("care_plans.period", model.PlanPeriod),
    ("care_plans.schedule", model.Schedule),
]


@pytest.mark.parametrize(("path", "typed"), CASES, ids=[c[0] or "episode" for c in CASES])
def test_typed_model_matches_the_schema(path: str, typed: Any) -> None:
    node = _object(path)
    assert set(get_type_hints(typed)) == set(node["properties"])
    assert set(typed.__required_keys__) == set(node.get("required", []))
    assert node.get("additionalProperties") is False

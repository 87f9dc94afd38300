"""``schemas/referral.py`` (the typed model producers build) and ``schemas/referral.v1.json`` (the
contract) name the same fields, the same required ones and the same enumerations."""

from __future__ import annotations

import typing
from typing import Any

import pytest

from mappers.referrals import REFERRAL_STATES
from schemas import referral as model
from schemas.contracts import load_schema

SCHEMA = load_schema("referral", 1)


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    """The object schema a node stands for (following ``$ref`` and a nullable ``oneOf``)."""
    if "$ref" in node:
        return _resolve(SCHEMA["$defs"][node["$ref"].split("/")[-1]])
    for option in node.get("oneOf", ()):
        if option.get("type") != "null":
            return _resolve(option)
    return node


@pytest.mark.parametrize(
    ("typed", "node"),
    [
        (model.Referral, SCHEMA),
        (model.PatientReference, SCHEMA["properties"]["patient"]),
        (model.ServiceRequestReference, SCHEMA["properties"]["service_request"]),
        (model.ReferralTarget, SCHEMA["properties"]["target"]),
        (model.ReferralTask, _resolve(SCHEMA["properties"]["task"])),
        (model.Reference, SCHEMA["$defs"]["reference"]),
        (model.Coding, SCHEMA["$defs"]["coding"]),
        (model.Identifier, SCHEMA["$defs"]["identifier"]),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
def test_typed_model_and_json_schema_name_the_same_fields(typed: Any, node: dict[str, Any]) -> None:
    assert set(typed.__annotations__) == set(node["properties"])
    assert set(typed.__required_keys__) == set(node.get("required", ()))
    assert node.get("additionalProperties") is False


def test_the_states_agree_everywhere() -> None:
    states = set(typing.get_args(model.ReferralState))
    assert states == set(SCHEMA["$defs"]["state"]["enum"]) == set(REFERRAL_STATES)


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("priority", {"routine", "urgent", "asap", "stat", None}),
        ("state_source", {"task", "service_request"}),
    ],
)
def test_enumerations_agree(field: str, values: set[Any]) -> None:
    hints = typing.get_type_hints(model.Referral)
    typed: set[Any] = set()
    for arg in typing.get_args(hints[field]) or (hints[field],):
        typed |= set(typing.get_args(arg)) if typing.get_args(arg) else {None if arg is type(None) else arg}
    assert typed == values == set(SCHEMA["properties"][field]["enum"])

"""Validation on the way in: vendor deviations kept under a tolerant profile, real errors rejected."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.config import EhrConfig
from connectors.validation import check_resource
from connectors.vendors import profile_for

DATA = Path(__file__).resolve().parents[2] / "data" / "external"  # copied in, each with its SOURCE.md
ENCOUNTER: dict[str, Any] = {
    "resourceType": "Encounter",
    "id": "enc-1",
    "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    "subject": {"reference": "Patient/p1"},
}
UUID_V1 = "urn:uuid:a8098c1a-f86e-11da-bd1a-00112444be1e"


def _oracle_style() -> list[tuple[str, dict[str, Any], str]]:
    """(deviation class, resource, where the warning points)."""
    return [
        ("id-format", {**ENCOUNTER, "id": "LIFETIME_PROVIDER-4169494-0-0-0"}, "id"),
        ("id-format", {**ENCOUNTER, "id": "E" * 80}, "id"),
        ("code-whitespace", {**ENCOUNTER, "status": "entered-in-error "}, "status"),
        ("number-as-string", {**ENCOUNTER, "meta": {"versionId": 94}}, "meta.versionId"),
        (
            "uuid-version",
            {**ENCOUNTER, "extension": [{"url": "http://example.org/x", "valueUuid": UUID_V1}]},
            "extension[0].valueUuid",
        ),
        (
            "base64-padding",
            {"resourceType": "Binary", "id": "b1", "contentType": "text/plain", "data": "YWJjZA"},
            "data",
        ),
    ]


@pytest.fixture
def oracle(make_ehr: Callable[..., EhrConfig]) -> frozenset[str]:
    return profile_for(make_ehr(vendor="oracle")).tolerated_deviations


@pytest.fixture
def strict() -> frozenset[str]:
    """A profile tolerating nothing (generic tolerates the lossless deviations: ``schemas.deviations``)."""
    return frozenset()


@pytest.mark.parametrize(("deviation", "resource", "where"), _oracle_style())
def test_tolerated_deviations_are_kept_with_a_warning(
    oracle: frozenset[str], deviation: str, resource: dict[str, Any], where: str
) -> None:
    before = copy.deepcopy(resource)
    checked = check_resource(resource, tolerate=oracle)
    assert checked.error is None
    assert checked.resource is not None
    assert len(checked.warnings) == 1
    assert checked.warnings[0].startswith(f"{deviation} at {where}")
    assert resource == before  # the input is never modified


@pytest.mark.parametrize(("deviation", "resource", "where"), _oracle_style())
def test_the_same_deviations_are_rejected_under_a_strict_profile(
    strict: frozenset[str], deviation: str, resource: dict[str, Any], where: str
) -> None:
    checked = check_resource(resource, tolerate=strict)
    assert checked.resource is None
    assert checked.error is not None
    assert f"{where}:" in checked.error
    assert f"({deviation}, not tolerated for this EHR)" in checked.error


def test_normalisable_deviations_are_normalised(oracle: frozenset[str]) -> None:
    raw = {**ENCOUNTER, "id": "A_1", "status": "  finished ", "meta": {"versionId": 94}}
    checked = check_resource(raw, tolerate=oracle)
    assert checked.resource is not None
    assert checked.resource["status"] == "finished"
    assert checked.resource["meta"] == {"versionId": "94"}
    assert checked.resource["id"] == "A_1"  # ids are kept as sent: other resources reference them
    assert sorted(w.split(" ")[0] for w in checked.warnings) == [
        "code-whitespace",
        "id-format",
        "number-as-string",
    ]
    binary = {"resourceType": "Binary", "contentType": "text/plain", "data": "YWJjZA"}
    assert (check_resource(binary, tolerate=oracle).resource or {})["data"] == "YWJjZA=="


def test_a_tolerated_deviation_does_not_hide_a_real_error(oracle: frozenset[str]) -> None:
    raw = {**ENCOUNTER, "status": "finished ", "period": {"start": "2026-02-30T10:00:00+01:00"}}
    checked = check_resource(raw, tolerate=oracle)
    assert checked.resource is None
    assert checked.error is not None
    assert "period.start" in checked.error


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ([{"resourceType": "Encounter"}], "not a FHIR resource: a JSON array"),
        ("<html>error</html>", "not a FHIR resource: a JSON string"),
        (None, "not a FHIR resource: a JSON null"),
        ({"id": "x", "status": "finished"}, "resourceType is missing"),
        ({"resourceType": "", "id": "x"}, "resourceType is missing"),
        ({"resourceType": "Encounterr", "id": "x"}, "unknown resourceType 'Encounterr'"),
        ({**ENCOUNTER, "period": {"start": "2026-13-45"}}, "Encounter/enc-1: period.start: DateTime value"),
        ({**ENCOUNTER, "class": "AMB"}, "Encounter/enc-1: class:"),
        ({**ENCOUNTER, "bogus": 1}, "Encounter/enc-1: bogus: Extra inputs are not permitted"),
        ({k: v for k, v in ENCOUNTER.items() if k != "status"}, "Encounter/enc-1: status:"),
    ],
)
def test_unusable_input_gets_a_clear_reason(oracle: frozenset[str], raw: object, reason: str) -> None:
    checked = check_resource(raw, tolerate=oracle)
    assert checked.resource is None
    assert checked.error is not None
    assert reason in checked.error
    assert "\n" not in checked.error


def test_reasons_carry_no_values(strict: frozenset[str]) -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "name": [{"family": "Doe", "given": ["Jane"]}],
        "birthDate": "1980-02-30x",
        "active": "maybe",
    }
    checked = check_resource(patient, tolerate=strict)
    assert checked.error is not None
    assert "birthDate" in checked.error
    assert "active" in checked.error
    for value in ("Doe", "Jane", "1980-02-30x", "maybe"):
        assert value not in checked.error


def test_checked_crosses_a_process_boundary(oracle: frozenset[str]) -> None:
    checked = check_resource({**ENCOUNTER, "status": "finished "}, tolerate=oracle)
    assert pickle.loads(pickle.dumps(checked)) == checked


def test_published_examples_pass_strict_validation(strict: frozenset[str]) -> None:
    examples = sorted((DATA / "hl7-r4-examples").glob("*.json"))
    assert len(examples) > 50
    failures = {p.name: check_resource(json.loads(p.read_text()), tolerate=strict) for p in examples}
    assert {name: c.error for name, c in failures.items() if not c.ok} == {}
    assert all(c.warnings == [] for c in failures.values())


def test_bulk_export_sample_passes_strict_validation(strict: frozenset[str]) -> None:
    checked = 0
    for path in sorted((DATA / "synthea-bulk-10").glob("*.ndjson")):
        with path.open("rb") as lines:
            for number, line in enumerate(lines):
                if number >= 40:  # a sample of each type keeps the unit tier quick
                    break
                result = check_resource(orjson.loads(line), tolerate=strict)
                assert result.error is None, (path.name, result.error)
                assert result.resource is not None
                checked += 1
    assert checked > 150


@pytest.mark.parametrize("bad", ["..", ".", "enc/1", "enc-1?x=1", "enc-1#f", "a,b", "Jane Doe", "%2e%2e"])
@pytest.mark.parametrize("vendor", ["generic", "oracle"])
def test_an_id_that_cannot_be_a_path_segment_is_rejected_even_where_id_format_is_tolerated(
    bad: str, vendor: str
) -> None:
    tolerate = profile_for(
        EhrConfig(name="x", base_url="https://ehr.example.org/fhir", vendor=vendor)
    ).tolerated_deviations
    checked = check_resource({**ENCOUNTER, "id": bad}, tolerate=tolerate)

    assert not checked.ok
    assert checked.error == f"Encounter: id: invalid id ({len(bad)} characters)"

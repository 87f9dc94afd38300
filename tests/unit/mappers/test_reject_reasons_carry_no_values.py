"""Reject reasons name the resource type, id, field and what is wrong, never the value (it may be PHI).

Each probe puts a name and a birth date where a reader or a mapper refuses it; the reasons of every
reject, lean and strict, must hold neither.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.vendors import profile_named
from mappers import default_rules, map_episodes, map_referrals
from sync.inputs import ReadMode, load_resources

PHI = "John Smith 1970-01-01"
MARKERS = ("John", "Smith", "1970")
AS_OF = datetime(2026, 6, 1, tzinfo=UTC)
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"


def _encounter(rid: str, **changes: Any) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": rid,
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"coding": [{"system": HCPCS, "code": "S9480"}]}],
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2026-05-04T09:00:00Z"},
        **changes,
    }


def _request(rid: str, **changes: Any) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "id": rid,
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": HCPCS, "code": "S9480"}]},
        **changes,
    }


PROBES: list[Any] = [
    {"resourceType": "Patient", "id": "p1", "birthDate": PHI},
    {"resourceType": "Patient", "id": "p2", "identifier": [{"system": "urn:mrn", "value": {"name": PHI}}]},
    _encounter("e1", period={"start": PHI}),
    _encounter("e2", period={"start": "2026-05-04T09:00:00Z", "end": PHI}),
    _encounter("e3", status=f"{PHI}  x"),
    _encounter("e4", diagnosis=[{"condition": {"reference": "Condition/c1"}, "rank": PHI}]),
    _request("sr1", authoredOn=PHI),
    _request("sr2", subject={"reference": f"{PHI}/1"}),
    {"resourceType": "Coverage", "id": "cov1", "status": "active", "order": PHI,
     "beneficiary": {"reference": "Patient/p1"}, "payor": [{"reference": "Organization/o"}]},
]  # fmt: skip


@pytest.mark.parametrize("mode", ["lean", "strict"])
@pytest.mark.parametrize("vendor", ["generic", "epic"])
def test_no_reject_reason_holds_the_value_it_refused(tmp_path: Path, mode: ReadMode, vendor: str) -> None:
    path = tmp_path / "in.ndjson"
    lines = [json.dumps(r) for r in PROBES] + ['{"resourceType": "Patient", "name": "' + PHI]
    path.write_text("\n".join(lines) + "\n", "utf-8")
    loaded = load_resources([path], mode=mode, tolerate=profile_named(vendor).tolerated_deviations)
    rules = default_rules()
    episodes = map_episodes(loaded.resources, ehr="t", as_of=AS_OF, rules=rules)
    referrals = map_referrals(loaded.resources, ehr="t", rules=rules)
    reasons = [r.reason for r in loaded.rejects]
    reasons += [r.reason for r in episodes.rejects] + [r.reason for r in referrals.rejects]
    assert len(reasons) >= 6  # the probes are refused somewhere (lean reads fewer fields than strict)
    leaked = [reason for reason in reasons if any(marker in reason for marker in MARKERS)]
    assert leaked == []


def test_strict_reasons_never_quote_the_input() -> None:
    from connectors.validation import check_resource

    probes = [
        {"resourceType": "Patient", "id": "p1", "John Smith": 1},
        {"resourceType": "Patient", "id": "p2", "gender": "x", "contained": [{"resourceType": "Patient",
                                                                               "id": "c", "Smith": PHI}]},
        {"resourceType": f"{PHI}", "id": "p3"},
        {"resourceType": "Patient", "id": "p4", "birthDate": PHI},
        {"resourceType": "Patient", "id": "p5", "name": [{"family": {"given": PHI}}]},
        {"resourceType": "Encounter", "id": "e5", "status": "finished", "class": {"code": "AMB"},
         "contained": [{"resourceType": "Location", "id": "l", "position": {"longitude": PHI}}]},
    ]  # fmt: skip
    for probe in probes:
        checked = check_resource(probe, tolerate=frozenset())
        assert checked.error is not None, probe["id"]
        assert not any(marker in checked.error for marker in MARKERS), checked.error


def test_dead_letter_contract_reasons_never_quote_a_key_made_of_data() -> None:
    from sync.kafka import contract_problems

    problems = contract_problems("attendance", 1, {"John Smith 1970": 1, "extra_field": 2})
    assert problems
    assert not any(marker in p for p in problems for marker in MARKERS)
    assert any("unexpected (a field), extra_field" in p for p in problems)

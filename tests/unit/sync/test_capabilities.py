"""Write-back targets chosen from recorded CapabilityStatements (tests/data/capability/)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from pytest_httpx import HTTPXMock
from structlog.testing import capture_logs

from connectors.config import EhrConfig
from connectors.errors import EhrError
from connectors.http import EhrClient
from sync.capabilities import Purpose, Targets, discover_targets, resource_access, targets_for
from sync.errors import ConfigError, PermanentEventError

CAPABILITY = Path(__file__).resolve().parents[2] / "data" / "capability"
BASE = "https://ehr.example.org/fhir/r4/tenant-1"


def recorded(name: str) -> dict[str, Any]:
    statement: dict[str, Any] = json.loads((CAPABILITY / f"{name}.json").read_text())
    return statement


def _without(statement: dict[str, Any], resource_type: str, *interactions: str) -> dict[str, Any]:
    result = copy.deepcopy(statement)
    for entry in result["rest"][0]["resource"]:
        if entry["type"] == resource_type:
            entry["interaction"] = [i for i in entry["interaction"] if i["code"] not in interactions]
    return result


def test_epic_writes_notes_and_updates_the_task() -> None:
    targets = targets_for("epic", recorded("epic"), ehr="epic-prod")

    assert targets.style == "epic"
    assert dict(targets.plan) == {
        Purpose.ATTENDED: "DocumentReference",
        Purpose.ABSENT: "DocumentReference",
        Purpose.DISCHARGE_SUMMARY: "DocumentReference",
        Purpose.REFERRAL_TASK: "Task",
    }
    assert targets.off == {}
    assert not targets.enabled(Purpose.PROVENANCE)  # Provenance is read-only at Epic
    assert targets.resource_type(Purpose.EPISODE_OF_CARE) is None
    note = targets.access("DocumentReference")
    assert note.change_method == "PUT"
    assert not note.conditional_create
    assert note.searchable_by("identifier")


def test_oracle_patches_encounters_and_appointments() -> None:
    targets = targets_for("oracle", recorded("oracle"), ehr="oracle-prod")

    assert dict(targets.plan) == {
        Purpose.ATTENDED: "Encounter",
        Purpose.ABSENT: "Appointment",
        Purpose.DISCHARGE_SUMMARY: "DocumentReference",
        Purpose.PROVENANCE: "Provenance",
    }
    assert targets.off == {}
    assert targets.resource_type(Purpose.REFERRAL_TASK) is None  # no writable Task: not part of the plan
    assert targets.access("Encounter").change_method == "PATCH"
    assert targets.access("Appointment").change_method == "PATCH"
    assert targets.access("DocumentReference").change_method == "PUT"
    assert targets.access("Encounter").searchable_by("identifier")
    assert not targets.access("Appointment").searchable_by("identifier")
    assert targets.access("Appointment").searchable_by("patient", "date")
    assert not targets.access("EpisodeOfCare").can("read")


@pytest.mark.parametrize("profile", ["generic", "hapi"])
def test_hapi_takes_the_whole_generic_plan_with_conditional_creates(profile: str) -> None:
    targets = targets_for(profile, recorded("hapi"))

    assert targets.style == "generic"
    assert set(targets.plan) == set(Purpose)
    assert targets.off == {}
    for resource_type in ("Encounter", "Appointment", "EpisodeOfCare", "DocumentReference", "Task"):
        access = targets.access(resource_type)
        assert access.conditional_create
        assert access.change_method == "PUT"
        assert access.versioning == "versioned-update"


def test_a_generic_plan_on_a_server_that_cannot_write_encounters_is_off_with_the_reason() -> None:
    # a "generic" connection pointed at a server with Epic's statement
    targets = targets_for("generic", recorded("epic"), ehr="x")

    assert targets.off[Purpose.ATTENDED].startswith("EHR 'x' does not support create on Encounter")
    assert targets.off[Purpose.ABSENT].startswith("EHR 'x' does not support create on Appointment")
    assert targets.off[Purpose.EPISODE_OF_CARE].startswith(
        "EHR 'x' does not support update or patch on EpisodeOfCare"
    )
    assert Purpose.DISCHARGE_SUMMARY not in targets.off
    assert Purpose.REFERRAL_TASK not in targets.off
    with pytest.raises(PermanentEventError, match="does not support create on Encounter"):
        targets.require(Purpose.ATTENDED)
    assert targets.require(Purpose.DISCHARGE_SUMMARY) == "DocumentReference"
    assert targets.describe()["off"] == ["absent", "attended", "episode_of_care"]


def test_oracle_tenant_without_appointment_create_has_absent_off() -> None:
    targets = targets_for("oracle", _without(recorded("oracle"), "Appointment", "create"), ehr="o")
    assert dict(targets.off) == {
        Purpose.ABSENT: "EHR 'o' does not support create on Appointment (needed for absent)"
    }
    assert targets.enabled(Purpose.ATTENDED)


def test_patch_counts_only_as_json_patch() -> None:
    statement = recorded("oracle")
    statement["patchFormat"] = ["application/xml-patch+xml"]
    targets = targets_for("oracle", statement, ehr="o")
    assert (
        targets.off[Purpose.ATTENDED]
        == "EHR 'o' does not support update or patch on Encounter (needed for attended)"
    )
    assert targets.access("Encounter").change_method is None


def test_an_optional_target_the_server_lacks_is_simply_not_written() -> None:
    targets = targets_for("generic", _without(recorded("hapi"), "Provenance", "create"))
    assert not targets.enabled(Purpose.PROVENANCE)
    assert Purpose.PROVENANCE not in targets.off


def test_a_resource_without_search_params_is_searchable_by_any() -> None:
    statement = recorded("hapi")
    for entry in statement["rest"][0]["resource"]:
        entry.pop("searchParam")
    access = resource_access(statement)["Task"]
    assert access.searchable_by("focus")
    assert access.search_params is None


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ({"resourceType": "OperationOutcome"}, "expected a CapabilityStatement"),
        (
            {"resourceType": "CapabilityStatement", "rest": [{"mode": "client"}]},
            "no rest entry with mode 'server'",
        ),
    ],
)
def test_not_a_server_statement_is_an_error(statement: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        targets_for("generic", statement)


def test_unknown_profile_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no write-back plan for vendor profile 'meditech'"):
        targets_for("meditech", recorded("hapi"))


def test_everything_assumes_every_interaction() -> None:
    targets = Targets.everything("oracle", ehr="o", provenance=False)
    assert targets.style == "oracle"
    assert not targets.enabled(Purpose.PROVENANCE)
    assert targets.enabled(Purpose.REFERRAL_TASK)
    assert targets.access("Encounter").conditional_create


def test_discover_targets_reads_metadata(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(method="GET", url=f"{BASE}/metadata", json=recorded("oracle"))
    with EhrClient(EhrConfig(name="oracle-prod", base_url=BASE, vendor="oracle")) as client:
        targets = discover_targets(client)
    assert targets.style == "oracle"
    assert targets.ehr == "oracle-prod"
    assert targets.require(Purpose.ABSENT) == "Appointment"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"resourceType": "OperationOutcome", "issue": []}, "not a CapabilityStatement"),
        ({"resourceType": "CapabilityStatement", "rest": []}, "no rest entry with mode 'server'"),
    ],
)
def test_discover_targets_refuses_what_is_not_a_server_statement(
    httpx_mock: HTTPXMock, body: dict[str, Any], message: str
) -> None:
    httpx_mock.add_response(method="GET", url=f"{BASE}/metadata", json=body)
    with EhrClient(EhrConfig(name="e", base_url=BASE)) as client, pytest.raises(EhrError, match=message):
        discover_targets(client)


def test_creates_without_a_server_side_guard_are_named() -> None:
    assert targets_for("oracle", recorded("oracle")).unguarded_creates() == []
    assert targets_for("epic", recorded("epic")).unguarded_creates() == []
    statement = _without(recorded("oracle"), "Appointment", "search-type")
    assert targets_for("oracle", statement).unguarded_creates() == ["Appointment"]


@pytest.fixture
def default_logging() -> Iterator[None]:
    """structlog's defaults for this test (a CLI test run earlier may have configured a level filter)."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**saved)


@pytest.mark.usefixtures("default_logging")
def test_discover_targets_logs_the_plan_and_what_is_off(httpx_mock: HTTPXMock) -> None:
    statement = _without(recorded("oracle"), "Appointment", "create")
    httpx_mock.add_response(method="GET", url=f"{BASE}/metadata", json=statement)
    with capture_logs() as logs, EhrClient(EhrConfig(name="o", base_url=BASE, vendor="oracle")) as client:
        discover_targets(client)
    chosen = next(e for e in logs if e["event"] == "writeback_targets")
    assert chosen["off"] == ["absent"]
    assert chosen["plan"]["attended"] == "Encounter"
    assert [e["purpose"] for e in logs if e["event"] == "writeback_target_off"] == ["absent"]

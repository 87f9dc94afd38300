"""Deletes end to end on the real HAPI sandbox and Kafka: an Encounter deleted on the server, or turned
``entered-in-error``, stops counting as a session and the corrected episode is republished."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from sync.cli import main
from sync.config import load_settings
from sync.kafka import ensure_topics
from sync.service import Service
from tests.integration.fhir_fixtures import unique_id

pytestmark = pytest.mark.integration

AS_OF = datetime(2026, 6, 1, 23, 59, tzinfo=UTC)
EHR = "harbor-deletes"
JOURNEY = """
programs:
  mh-iop: {name: "Harbor Behavioral Health IOP", level: iop, code: S9480, location_code: "OF"}
payers:
  bcbs: {name: "Blue Cross Blue Shield", type: commercial}
patients:
  - key: iop
    story: "An IOP episode still going on"
    gender: female
    born: 2001
    payer: bcbs
    diagnosis: F43.10
    steps:
      - {level: iop, program: mh-iop, day: -21, weeks: 3, per_week: 3, hours: 3}
"""


@pytest.fixture
def service(fhir_base_url: str, kafka_bootstrap: str, tmp_path: Path) -> Iterator[Service]:
    prefix = unique_id("del") + "."
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[store]
url = "sqlite:///{tmp_path / "state.db"}"
[kafka]
bootstrap_servers = "{kafka_bootstrap}"
topic_prefix = "{prefix}"
group_id = "{prefix}writeback"
[service]
out_dir = "{tmp_path / "out"}"
metrics_port = 0
[[ehr]]
name = "{EHR}"
base_url = "{fhir_base_url}"
vendor = "hapi"
resource_types = ["Patient", "Encounter", "Condition", "Coverage", "Location", "Organization"]
"""
    )
    settings = load_settings(config)
    ensure_topics(settings.kafka)
    with Service(settings, as_of=AS_OF) as running:
        yield running


def _episode(service: Service, patient_id: str) -> dict[str, Any]:
    (record,) = [
        r
        for r in service.state.published_ids(EHR, "episode", patient_id).values()
        if r["status"] != "cancelled"
    ]
    return record


def test_a_deleted_or_entered_in_error_encounter_stops_counting_as_a_session(
    service: Service, fhir_base_url: str, tmp_path: Path
) -> None:
    journeys = tmp_path / "journeys.yaml"
    journeys.write_text(JOURNEY)
    prefix = unique_id("del") + "-"
    since = (datetime.now(UTC) - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    seed = ["--log-level", "WARNING", "seed", "--anchor", "2026-06-01", "--prefix", prefix]
    assert main([*seed, "--journeys", str(journeys), "--fhir-url", fhir_base_url]) == 0
    patient_id = f"pt-{prefix}iop"
    (ehr,) = service.settings.ehr
    service.cycle_ehr(ehr, since=since)  # only what changed since just before the seed: this patient
    first = _episode(service, patient_id)
    sessions = [s["reference"] for s in first["sessions"]]
    assert len(sessions) == 9

    with httpx.Client(base_url=fhir_base_url + "/", timeout=60) as fhir:
        assert fhir.delete(sessions[-1]).status_code in (200, 204)
        service.cycle_ehr(ehr)
        second = _episode(service, patient_id)
        assert second["episode_id"] == first["episode_id"]
        assert [s["reference"] for s in second["sessions"]] == sessions[:-1]

        encounter = fhir.get(sessions[-2], headers={"Accept": "application/fhir+json"}).json()
        encounter["status"] = "entered-in-error"
        put = fhir.put(sessions[-2], json=encounter, headers={"Content-Type": "application/fhir+json"})
        assert put.status_code == 200
        service.cycle_ehr(ehr)
        third = _episode(service, patient_id)
        assert [s["reference"] for s in third["sessions"]] == sessions[:-2]

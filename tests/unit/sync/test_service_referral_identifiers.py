"""The service maps referrals with the EHR's ``patient_identifier_systems``, as it maps episodes
(minimum necessary, issue 10 item 10)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.config import EhrConfig
from sync.config import Settings, StoreConfig
from sync.service import CycleReport, Service

SNOMED = "http://snomed.info/sct"
PATIENT = {
    "resourceType": "Patient",
    "id": "p",
    "identifier": [
        {"system": "urn:hospital:mrn", "value": "M1"},
        {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789"},
        {"system": "urn:oid:9.9.other", "value": "O1"},
    ],
}
REQUEST = {
    "resourceType": "ServiceRequest",
    "id": "sr1",
    "status": "active",
    "intent": "order",
    "category": [{"coding": [{"system": SNOMED, "code": "3457005"}]}],
    "subject": {"reference": "Patient/p"},
}


def test_referrals_carry_only_the_ehrs_configured_identifier_systems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ehr = EhrConfig(
        name="h", base_url="http://127.0.0.1:1/fhir", patient_identifier_systems=("urn:hospital:mrn",)
    )
    settings = Settings(store=StoreConfig(url=f"sqlite:///{tmp_path / 'state.db'}"), ehr=(ehr,))
    with Service(settings) as service:
        resources: list[dict[str, Any]] = [PATIENT, REQUEST]
        monkeypatch.setattr(service.store, "patient_resources", lambda ehr_name, patient_id: resources)
        staged = service._map_and_stage(ehr, ["p"], datetime(2026, 1, 1, tzinfo=UTC), CycleReport(ehr="h"))

    (referral,) = [item.record for item in staged if item.kind == "referral"]
    assert referral["patient"]["identifier"] == [{"system": "urn:hospital:mrn", "value": "M1"}]

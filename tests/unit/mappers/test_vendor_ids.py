"""Ids that break FHIR's id rule but that vendor profiles keep (Oracle's underscores, Epic's long ids)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mappers import default_rules, map_episodes
from schemas.contracts import validate

HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"


@pytest.mark.parametrize("patient_id", ["LIFETIME_PROVIDER-4169494-0", "e" + "X" * 80])
def test_a_vendor_id_maps_to_a_contract_valid_episode(patient_id: str) -> None:
    sessions = [
        {
            "resourceType": "Encounter",
            "id": f"{patient_id}_enc_{day}",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [{"coding": [{"system": HCPCS, "code": "S9480"}]}],
            "subject": {"reference": f"Patient/{patient_id}"},
            "period": {"start": f"2026-03-{day:02d}T09:00:00Z", "end": f"2026-03-{day:02d}T12:00:00Z"},
        }
        for day in (2, 4, 6)
    ]
    result = map_episodes(
        [{"resourceType": "Patient", "id": patient_id}, *sessions],
        ehr="oracle",
        as_of=datetime(2026, 3, 7, tzinfo=UTC),
        rules=default_rules(),
    )
    assert result.rejects == []
    (episode,) = result.episodes
    assert episode["patient"]["reference"] == f"Patient/{patient_id}"
    validate("episode", 1, episode)

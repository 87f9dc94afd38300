"""The service maps referrals with the same Part 2 settings as episodes (42 CFR Part 2, issue 10 item 8)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.config import EhrConfig
from mappers import EpisodeSettings
from mappers import referrals as referral_mapper
from sync import service as service_module
from sync.config import Settings, StoreConfig
from sync.service import CycleReport, Service

SNOMED = "http://snomed.info/sct"


def test_a_part2_program_marks_referrals_part2_in_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ehr = EhrConfig(name="h", base_url="http://127.0.0.1:1/fhir")
    settings = Settings(store=StoreConfig(url=f"sqlite:///{tmp_path / 'state.db'}"), ehr=(ehr,))
    service = Service(settings, episode_settings=EpisodeSettings(part2_program=True))
    request: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": "sr1",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": SNOMED, "code": "3457005"}]}],
        "subject": {"reference": "Patient/p"},
    }
    monkeypatch.setattr(service.store, "patient_resources", lambda ehr_name, patient_id: [request])
    seen: list[referral_mapper.ReferralResult] = []

    def spy(*args: Any, **kwargs: Any) -> referral_mapper.ReferralResult:
        result = referral_mapper.map_referrals(*args, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(service_module, "map_referrals", spy)
    service._map_and_stage(ehr, ["p"], datetime(2026, 1, 1, tzinfo=UTC), CycleReport(ehr="h"))
    assert [r["part2"] for result in seen for r in result.referrals] == [True]

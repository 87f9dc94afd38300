"""A change of rules or episode settings re-maps every patient once and stages only what changed
(issue 13, "Settings per EHR"). The pull is replaced by a replica filled here; nothing is sent."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.config import EhrConfig
from connectors.pull import PullSummary
from connectors.store import StateStore
from sync import service as service_module
from sync.config import Settings, StoreConfig
from sync.episode_config import EpisodeConfig
from sync.service import Service

DATA = Path(__file__).resolve().parents[2] / "data"
AS_OF = datetime(2025, 4, 28, 15, tzinfo=UTC)
#: An IOP for depression (revenue 0905) and one for substance use (0906): a new 0905 changes one.
CASES = ("active_episode", "substance_use_iop_part2")


def _fill_replica(url: str) -> None:
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for case in CASES:
        for line in (DATA / case / "input.ndjson").read_text(encoding="utf-8").splitlines():
            if line.strip():
                resource = json.loads(line)
                by_type[resource["resourceType"]].append(resource)
    store = StateStore(url)
    try:
        for resource_type, resources in by_type.items():
            store.commit_increment("h", resource_type, resources, None)
    finally:
        store.close()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull that brings nothing new, and an outbox that is not drained (no broker here)."""
    monkeypatch.setattr(service_module, "pull", lambda ehr, *a, **k: PullSummary(ehr=ehr.name, mode="search"))
    monkeypatch.setattr(service_module, "drain_outbox", lambda *a, **k: 0)


def _settings(url: str, episode: EpisodeConfig) -> Settings:
    ehr = EhrConfig(name="h", base_url="http://127.0.0.1:1/fhir", write_back=False)
    return Settings(store=StoreConfig(url=url), episode=episode, ehr=(ehr,))


def test_a_settings_change_remaps_every_patient_once_and_stages_only_changed_records(
    tmp_path: Path, offline: None
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    _fill_replica(url)
    with Service(_settings(url, EpisodeConfig()), as_of=AS_OF) as service:
        (first,) = service.cycle()  # a pull with nothing new, but no fingerprint yet: everyone
        (again,) = service.cycle()
    assert first.remapped_for_settings == 2
    assert first.staged >= 2
    assert (again.remapped_for_settings, again.patients_mapped, again.staged) == (0, 0, 0)

    changed = EpisodeConfig(iop_revenue_code="0907")
    with Service(_settings(url, changed), as_of=AS_OF) as service:
        (report,) = service.cycle()
        (after,) = service.cycle()
        outbox = service.state.outbox_batch(limit=1000)
    assert report.remapped_for_settings == 2
    assert report.patients_mapped == 2
    assert report.staged == 1  # the depression IOP's record; the SUD IOP bills 0906 as before
    staged = [m.value for m in outbox[-report.staged :]]
    assert [r["billing"]["revenue_code"] for r in staged] == ["0907"]
    assert (after.remapped_for_settings, after.staged) == (0, 0)


def test_a_changed_rules_file_remaps_once(tmp_path: Path, offline: None) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    _fill_replica(url)
    rules = tmp_path / "rules.toml"
    rules.write_text('version = "local-1"\n', encoding="utf-8")
    with Service(_settings(url, EpisodeConfig(rules=str(rules))), as_of=AS_OF) as service:
        service.cycle()
    rules.write_text('version = "local-2"\n', encoding="utf-8")
    with Service(_settings(url, EpisodeConfig(rules=str(rules))), as_of=AS_OF) as service:
        (report,) = service.cycle()
    assert report.remapped_for_settings == 2
    assert report.staged >= 2  # every record carries the rules version

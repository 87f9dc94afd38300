"""A changed episode setting re-maps every patient once and republishes only the records whose content
changed, on the real broker with HAPI as the EHR (issue 13, "Settings per EHR")."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sync.cli import main
from sync.config import Settings, load_settings
from sync.kafka import ensure_topics
from sync.service import Service
from tests.integration.fhir_fixtures import unique_id
from tests.integration.kafka_fixtures import records_to_end

pytestmark = pytest.mark.integration

AS_OF = datetime(2026, 6, 1, 23, 59, tzinfo=UTC)
PREFIX = unique_id("cfg") + "-"


def _config(tmp: Path, fhir_base_url: str, kafka_bootstrap: str, prefix: str, episode: str) -> Settings:
    path = tmp / "config.toml"
    path.write_text(
        f"""
[store]
url = "sqlite:///{tmp / "state.db"}"
[kafka]
bootstrap_servers = "{kafka_bootstrap}"
topic_prefix = "{prefix}"
[service]
out_dir = "{tmp / "out"}"
metrics_port = 0
{episode}
[[ehr]]
name = "cfg"
base_url = "{fhir_base_url}"
vendor = "hapi"
write_back = false
# Not EpisodeOfCare: other tests' services write theirs for every patient of the shared sandbox, and
# those would (rightly) change our records between the cycles.
resource_types = ["Patient", "Encounter", "CarePlan", "ServiceRequest", "Condition", "Procedure",
                  "Coverage", "Location", "Organization", "Task", "Appointment"]
""",
        encoding="utf-8",
    )
    return load_settings(path, environ={})


def _ours(bootstrap: str, topic: str) -> list[dict[str, object]]:
    return [json.loads(r.value) for r in records_to_end(bootstrap, topic) if PREFIX in r.key.decode()]


def test_a_new_revenue_code_republishes_only_the_episodes_it_changes(
    fhir_base_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    seed = ["--log-level", "WARNING", "seed", "--anchor", "2026-06-01", "--prefix", PREFIX]
    assert main([*seed, "--fhir-url", fhir_base_url]) == 0
    prefix = unique_id("cfg") + "."
    before = _config(tmp_path, fhir_base_url, kafka_bootstrap, prefix, "")
    ensure_topics(before.kafka)
    with Service(before, as_of=AS_OF) as service:
        (first,) = service.cycle()
    assert first.published == first.staged
    episodes = _ours(kafka_bootstrap, service.topics.episodes)
    referrals = _ours(kafka_bootstrap, service.topics.referrals)
    part2 = _ours(kafka_bootstrap, service.topics.episodes_part2)
    affected = {str(e["episode_id"]) for e in episodes if e["billing"]["revenue_code"] == "0905"}  # type: ignore[index]
    assert affected, "the journeys hold IOP episodes billed 0905"
    assert len(affected) < len(episodes)  # PHP and residential episodes keep their codes

    after = _config(
        tmp_path, fhir_base_url, kafka_bootstrap, prefix, '[episode]\niop_revenue_code = "0907"\n'
    )
    with Service(after, as_of=AS_OF) as service:
        (changed,) = service.cycle()
        (settled,) = service.cycle()
    assert changed.remapped_for_settings == changed.patients_mapped > 0
    assert changed.published == changed.staged
    seen = {json.dumps(e, sort_keys=True) for e in episodes}
    republished = [
        e
        for e in _ours(kafka_bootstrap, service.topics.episodes)
        if json.dumps(e, sort_keys=True) not in seen
    ]
    assert Counter(str(e["episode_id"]) for e in republished) == Counter(affected)  # each once
    assert {e["billing"]["revenue_code"] for e in republished} == {"0907"}  # type: ignore[index]
    assert len(_ours(kafka_bootstrap, service.topics.referrals)) == len(referrals)
    assert len(_ours(kafka_bootstrap, service.topics.episodes_part2)) == len(part2)
    assert (settled.remapped_for_settings, settled.staged) == (0, 0)

"""Our own EpisodeOfCare resources, written from the episodes and pulled back, change nothing."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import yaml

from mappers import default_rules, episode_of_care, map_episodes
from sync.journeys import build_resources, parse_book

ROOT = Path(__file__).resolve().parents[3]
AS_OF = datetime(2026, 6, 1, 23, 59, tzinfo=UTC)


def _map(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return map_episodes(
        resources, ehr="harbor", as_of=AS_OF, rules=default_rules(), timezone="America/Chicago"
    ).episodes


def test_written_episodes_of_care_pulled_back_change_no_episode() -> None:
    book = parse_book(yaml.safe_load((ROOT / "examples" / "journeys.yaml").read_text()))
    resources = list(build_resources(book, anchor=date(2026, 6, 1), timezone="America/Chicago"))
    first = _map(resources)
    exits = {e["exit"]["reason"] for e in first if e["exit"]}
    assert {"lost_to_follow_up", "stepped_up", "stepped_down", "discharged"} <= exits  # every kind is tested

    written = []
    for n, episode in enumerate(first):
        resource = episode_of_care(episode)
        resource["id"] = f"server-{n}"  # the EHR's own id, as the service writes it
        resource["meta"] = {
            **resource.get("meta", {}),
            "versionId": "1",
            "lastUpdated": "2026-06-02T00:00:00Z",
        }
        written.append(resource)

    assert _map(resources + written) == first

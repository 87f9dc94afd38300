"""Episode and referral records of the demo's journeys, made by the real mappers (pure, no I/O).

Shared by the simulator and report tests: the journeys cover direct admissions, step-ups, step-downs,
an active episode, lost to follow-up, Medicare line items and a 42 CFR Part 2 episode.
"""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from mappers import default_rules, map_episodes, map_referrals
from sync.journeys import build_resources, parse_book

ROOT = Path(__file__).resolve().parents[3]
ANCHOR = date(2026, 6, 1)
#: The demo's timing: day 0 a week before "now", so the program has a week the EHR has not seen.
SINCE = ANCHOR
AS_OF = datetime(2026, 6, 8, 0, 0, tzinfo=UTC)
EHR = "harbor-general"


@cache
def _mapped() -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    book = parse_book(yaml.safe_load((ROOT / "examples" / "journeys.yaml").read_text(encoding="utf-8")))
    resources = list(build_resources(book, anchor=ANCHOR, timezone="America/Chicago", seed=7))
    rules = default_rules()
    episodes = map_episodes(resources, ehr=EHR, as_of=AS_OF, rules=rules, timezone="America/Chicago")
    referrals = map_referrals(resources, ehr=EHR, rules=rules, timezone="America/Chicago")
    return (
        tuple(dict(e) for e in episodes.episodes),
        tuple(dict(r) for r in referrals.referrals),
    )


def episodes() -> list[dict[str, Any]]:
    """Fresh copies (tests may change them)."""
    return copy.deepcopy(list(_mapped()[0]))


def referrals() -> list[dict[str, Any]]:
    return copy.deepcopy(list(_mapped()[1]))

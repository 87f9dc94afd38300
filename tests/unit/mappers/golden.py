"""The golden-case helper: load ``tests/data/<case>/`` (input, case.toml, expected) and compare.

A case folder holds the FHIR input (``input.ndjson`` and/or ``*.bundle.json``), ``case.toml`` (``ehr``,
``as_of``, ``timezone``, optional ``without`` and ``[previous_anchors]``), ``expected_episodes.json`` and
optionally ``expected_rejects.json``. Expectations name only the keys they check (see make_cases.py).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mappers import MappingResult, default_rules, map_episodes

DATA = Path(__file__).resolve().parents[2] / "data"


@dataclass(frozen=True)
class Case:
    name: str
    resources: list[dict[str, Any]]
    ehr: str
    as_of: datetime
    timezone: str
    without: tuple[str, ...]
    previous_anchors: dict[str, str]
    expected: list[dict[str, Any]]
    expected_rejects: list[dict[str, Any]] | None

    def run(self, resources: list[dict[str, Any]] | None = None, **kwargs: Any) -> MappingResult:
        return map_episodes(
            self.resources if resources is None else resources,
            ehr=self.ehr,
            as_of=self.as_of,
            rules=default_rules(),
            timezone=self.timezone,
            previous_anchors=self.previous_anchors or None,
            **kwargs,
        )


def case_names() -> list[str]:
    return sorted(p.name for p in DATA.iterdir() if (p / "case.toml").is_file())


def _resources(folder: Path) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.ndjson")):
        found.extend(json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip())
    for path in sorted(folder.glob("*.bundle.json")):
        bundle = json.loads(path.read_text("utf-8"))
        found.extend(entry["resource"] for entry in bundle.get("entry", []))
    return found


def load_case(name: str) -> Case:
    folder = DATA / name
    config = tomllib.loads((folder / "case.toml").read_text("utf-8"))
    rejects = folder / "expected_rejects.json"
    return Case(
        name=name,
        resources=_resources(folder),
        ehr=config["ehr"],
        as_of=datetime.fromisoformat(config["as_of"]),
        timezone=config.get("timezone", "UTC"),
        without=tuple(config.get("without", ())),
        previous_anchors=dict(config.get("previous_anchors", {})),
        expected=json.loads((folder / "expected_episodes.json").read_text("utf-8")),
        expected_rejects=json.loads(rejects.read_text("utf-8")) if rejects.is_file() else None,
    )


def project(record: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """The parts of an emitted record that an expectation names."""
    shown: dict[str, Any] = {}
    for key, value in expected.items():
        if key == "session_refs":
            shown[key] = [s["reference"] for s in record["sessions"]]
        elif key in ("billing", "attendance") and isinstance(value, dict):
            shown[key] = {k: record[key].get(k) for k in value}
        else:
            shown[key] = record.get(key, "<missing>")
    return shown

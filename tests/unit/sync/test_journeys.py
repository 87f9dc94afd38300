"""Journey definitions become valid, deterministic FHIR R4 resources."""

from __future__ import annotations

from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from fhir.resources.R4B import get_fhir_model_class

from sync.cli import main
from sync.journeys import JourneyError, build_resources, parse_book, scaled, transaction_bundle

ROOT = Path(__file__).resolve().parents[3]
BOOK = parse_book(yaml.safe_load((ROOT / "examples" / "journeys.yaml").read_text()))
ANCHOR = date(2026, 6, 1)


def _resources(**kwargs: Any) -> list[dict[str, Any]]:
    return list(build_resources(BOOK, anchor=ANCHOR, timezone="America/Chicago", **kwargs))


def test_every_resource_is_valid_r4() -> None:
    for resource in _resources():
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def test_the_book_covers_a_dozen_journeys_with_every_level() -> None:
    assert len(BOOK.journeys) >= 12
    levels = {step.level for journey in BOOK.journeys for step in journey.steps}
    assert levels >= {"inpatient", "emergency", "residential", "php", "iop", "outpatient", "surgery"}


def test_same_inputs_same_resources_and_ids_are_unique() -> None:
    first, second = _resources(), _resources()
    assert first == second
    keys = [(r["resourceType"], r["id"]) for r in first]
    assert len(keys) == len(set(keys))
    assert all(len(r["id"]) <= 64 for r in first)
    assert _resources(seed=8) != first  # names differ with another seed


def test_sessions_follow_the_definition() -> None:
    resources = _resources()
    sessions = [
        r for r in resources if r["resourceType"] == "Encounter" and r["id"].startswith("enc-noise-0-")
    ]
    statuses = Counter(r["status"] for r in sessions)
    # 4 weeks x 3 sessions: sessions 2 and 5 cancelled, 7 entered in error
    assert statuses == {"finished": 9, "cancelled": 2, "entered-in-error": 1}
    first = next(r for r in sessions if r["id"] == "enc-noise-0-1")
    assert first["period"] == {"start": "2026-03-23T09:00:00-05:00", "end": "2026-03-23T12:00:00-05:00"}
    future = [r for r in resources if r["resourceType"] == "Appointment" and r["status"] == "booked"]
    assert future
    assert all(r["start"] > "2026-06-01T23:59" for r in future)


def test_scaled_book_makes_distinct_patients() -> None:
    book = scaled(BOOK, 40, seed=3)
    resources = list(build_resources(book, anchor=ANCHOR))
    patients = [r for r in resources if r["resourceType"] == "Patient"]
    assert len(patients) == 40
    assert len({p["id"] for p in patients}) == 40


def test_transaction_puts_each_resource_at_its_id() -> None:
    bundle = transaction_bundle(_resources()[:3])
    get_fhir_model_class("Bundle").model_validate(bundle)
    assert [e["request"] for e in bundle["entry"]] == [
        {"method": "PUT", "url": f"{e['resource']['resourceType']}/{e['resource']['id']}"}
        for e in bundle["entry"]
    ]


@pytest.mark.parametrize(
    ("patient", "message"),
    [
        (
            {"key": "x", "payer": "bcbs", "steps": [{"level": "spa", "day": 1}]},
            "journey 'x' step 1: unknown level",
        ),
        ({"key": "x", "payer": "bcbs", "steps": [{"level": "iop", "day": 1}]}, "sessions need weeks"),
        ({"key": "x", "payer": "nope", "steps": []}, "unknown payer 'nope'"),
        ({"key": "x", "payer": "bcbs", "steps": [{"level": "iop"}]}, "'day' is required"),
    ],
)
def test_bad_definitions_name_the_journey_and_step(patient: dict[str, Any], message: str) -> None:
    with pytest.raises(JourneyError, match=message):
        parse_book({"payers": {"bcbs": {}}, "patients": [patient]})


def test_seed_command_writes_ndjson(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "seed",
            "--journeys",
            str(ROOT / "examples" / "journeys.yaml"),
            "--anchor",
            "2026-06-01",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    patients = (tmp_path / "Patient.ndjson").read_bytes().splitlines()
    assert len(patients) == len(BOOK.journeys)
    assert orjson.loads(patients[0])["resourceType"] == "Patient"
    assert "day 0 = 2026-06-01" in capsys.readouterr().out


def test_seed_command_rejects_a_bad_anchor(tmp_path: Path) -> None:
    assert main(["seed", "--anchor", "June", "--out", str(tmp_path)]) == 2

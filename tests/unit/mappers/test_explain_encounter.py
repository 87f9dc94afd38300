"""``mappers.explain`` and ``iop-bridge explain-encounter``: which rule made an Encounter its level, with
the qualifier evidence, or why it has none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from connectors.store import StateStore
from mappers.explain import explain_encounter_in
from mappers.rules import default_rules
from sync.cli import main

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SNOMED = "http://snomed.info/sct"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"


def enc(eid: str, cls: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": ACT, "code": cls},
        "subject": {"reference": "Patient/p"},
        "period": {"start": "2025-03-01T09:00:00Z", "end": "2025-03-01T10:00:00Z"},
        **extra,
    }


def resources() -> list[dict[str, Any]]:
    overdose = {"coding": [{"system": SNOMED, "code": "55680006"}]}
    return [
        enc("ed", "EMER", reasonCode=[overdose]),
        enc("detox", "AMB", type=[{"coding": [{"system": SNOMED, "code": "56876005"}]}]),
        enc("checkup", "AMB", type=[{"coding": [{"system": SNOMED, "code": "185349003"}]}]),
        {
            "resourceType": "Condition",
            "id": "dx",
            "code": {"coding": [{"system": ICD, "code": "F32.1"}]},
            "subject": {"reference": "Patient/p"},
            "encounter": {"reference": "Encounter/checkup"},
        },
        enc("lab", "AMB"),
        enc("unknown-class", "FLD"),
    ]


def test_the_rule_that_fired_its_source_and_the_qualifier_evidence() -> None:
    explanation = explain_encounter_in(resources(), "ed", default_rules())
    assert explanation is not None
    assert explanation.level == "emergency"
    assert explanation.rule == "emergency-class-bh"
    assert explanation.rule_source == default_rules().rule("emergency-class-bh").source  # type: ignore[union-attr]
    assert explanation.qualifier_purpose == "bh-snomed-disorders: reason snomed 55680006"
    assert [(c.rule, c.verdict) for c in explanation.candidates] == [("emergency-class-bh", "fired")]


def test_a_type_rule_that_needs_another_class_says_so() -> None:
    explanation = explain_encounter_in(resources(), "detox", default_rules())
    assert explanation is not None
    assert explanation.level == "outpatient"
    verdicts = {c.rule: c.verdict for c in explanation.candidates}
    assert verdicts["outpatient-bh-service-type"] == "fired"
    assert verdicts["inpatient-detox-rehab-type"].startswith("needs class ACUTE, IMP")
    assert verdicts["residential-detox-rehab-type"].startswith("needs class NONAC")


def test_a_check_up_recording_a_bh_diagnosis_is_none_for_want_of_purpose() -> None:
    explanation = explain_encounter_in(resources(), "checkup", default_rules())
    assert explanation is not None
    assert explanation.level is None
    assert explanation.rule is None
    assert explanation.qualifier_any == "bh-icd10-f01-f99: diagnosis icd10cm F321"
    assert explanation.qualifier_purpose is None
    (candidate,) = explanation.candidates
    assert candidate.rule == "outpatient-class-bh-purpose"
    assert candidate.verdict == "needs a BH qualifier of purpose; the Encounter only records a BH diagnosis"


def test_an_encounter_no_rule_names_and_an_absent_one() -> None:
    explanation = explain_encounter_in(resources(), "unknown-class", default_rules())
    assert explanation is not None
    assert explanation.reason == "no rule matched"
    assert explanation.candidates == ()
    assert "write one" in explanation.lines()[-1]
    assert explain_encounter_in(resources(), "absent", default_rules()) is None


def test_cli_explains_one_encounter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "in.ndjson"
    data.write_text("".join(json.dumps(r) + "\n" for r in resources()), encoding="utf-8")
    assert main(["explain-encounter", str(data), "--encounter", "Encounter/ed"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Encounter/ed: level emergency")
    assert "rule emergency-class-bh source: " in text
    assert main(["explain-encounter", str(data), "--encounter", "checkup", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["level"] == "none"
    assert document["qualifier"]["any"].startswith("bh-icd10-f01-f99")
    assert main(["explain-encounter", str(data), "--encounter", "absent"]) == 2
    assert "Encounter/absent is not in the input" in capsys.readouterr().err


def test_cli_explains_from_the_services_replica(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = StateStore(url)
    for resource_type in ("Encounter", "Condition"):
        chosen = [r for r in resources() if r["resourceType"] == resource_type]
        store.commit_increment("general", resource_type, chosen, None)
    store.close()
    args = ["explain-encounter", "--store", url, "--ehr", "general", "--encounter", "checkup", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["qualifier"]["any"].startswith("bh-icd10-f01-f99")

"""The shipped rule table and how a hospital's file extends it."""

from __future__ import annotations

import pytest

from mappers import RulesError, default_rules, load_rules
from mappers.rules import LEVEL_RANK


def test_default_table_is_versioned_and_every_entry_has_a_source() -> None:
    rules = default_rules()
    assert rules.version == "2026.12.1"
    assert rules.rules
    assert rules.qualifiers
    for entry in (*rules.rules, *rules.qualifiers):
        assert entry.source.strip()
    assert {r.level for r in rules.rules} == {*LEVEL_RANK, "none"}


def test_no_text_gives_the_base() -> None:
    assert load_rules() is default_rules()
    assert load_rules(None, base=default_rules()) is default_rules()


def test_hospital_file_overrides_by_id_adds_and_disables() -> None:
    text = """
version = "st-mary-3"

[[rule]]
id = "php-pos-52"
level = "iop"
on = "location_type"
system = "pos"
codes = ["52"]
source = "St Mary runs its IOP in the POS 52 building"

[[rule]]
id = "st-mary-iop-dept"
level = "iop"
on = "location"
ids = ["Location/iop-wing"]
source = "St Mary IOP wing"

[[rule]]
id = "residential-class-nonac"
disabled = true
"""
    rules = load_rules(text)
    assert rules.version == "2026.12.1+st-mary-3"
    by_id = {r.id: r for r in rules.rules}
    assert by_id["php-pos-52"].level == "iop"
    assert "residential-class-nonac" not in by_id
    assert rules.rules[0].id == "st-mary-iop-dept"  # new entries are tried first
    assert len(rules.rules) == len(default_rules().rules)  # one added, one removed
    assert rules.location_rules("Location/iop-wing")[0].id == "st-mary-iop-dept"


def test_ranges_are_matched_inclusively() -> None:
    rules = default_rules()
    hits = [r.id for r in rules.candidates("code", "cpt", "90838")]
    assert hits == ["outpatient-psychotherapy-cpt"]
    assert rules.candidates("code", "cpt", "90839") == ()
    assert [r.id for r in rules.candidates("code", "cpt", "99215")] == ["outpatient-em-medication-management"]
    assert rules.candidates("code", "cpt", "99211") == ()


def _one_rule(**fields: str) -> str:
    """A rules file with one [[rule]] whose values are given as TOML literals."""
    lines = [f"{key} = {value}" for key, value in fields.items()]
    return "version = '1'\n[[rule]]\n" + "\n".join(lines) + "\n"


GOOD = {"id": "'a'", "level": "'iop'", "on": "'code'", "system": "'cpt'", "codes": "['1']", "source": "'s'"}


def _without(key: str) -> dict[str, str]:
    return {k: v for k, v in GOOD.items() if k != key}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version = ", "not valid TOML"),
        ("[[rule]]\nid = 'x'", "needs a version"),
        ("version = '1'\nextra = 1", "unknown keys: extra"),
        ("version = '1'\nrule = 3", "array of tables"),
        (_one_rule(**_without("id")), "needs an id"),
        (_one_rule(**{**GOOD, "level": "'icu'"}), "level must be"),
        (_one_rule(**_without("source")), "needs a source"),
        (_one_rule(**_without("system")), "needs a system"),
        (_one_rule(**_without("codes")), "needs codes or ranges"),
        (_one_rule(**{**_without("codes"), "on": "'location'"}), "needs ids"),
        (_one_rule(**{**GOOD, "on": "'ward'"}), "on must be one of"),
        (_one_rule(**{**GOOD, "ranges": "['9-10']"}), "equal-length"),
        (_one_rule(**{**GOOD, "qualifier": "'yes'"}), "qualifier must be"),
        (
            "version = '1'\n[[rule]]\n"
            + "\n".join(f"{k} = {v}" for k, v in GOOD.items()) * 1
            + "\n[[rule]]\n"
            + "\n".join(f"{k} = {v}" for k, v in GOOD.items()),
            "duplicate id",
        ),
    ],
)
def test_malformed_files_name_the_entry_and_the_problem(text: str, message: str) -> None:
    with pytest.raises(RulesError, match=message):
        load_rules(text)

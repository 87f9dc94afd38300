"""The TOML examples of docs/rules-recipes.md load as rules files: a recipe that does not parse helps
no one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mappers.rules import load_rules

DOC = Path(__file__).resolve().parents[2] / "docs" / "rules-recipes.md"
VALUE_SET = json.dumps(
    {
        "resourceType": "ValueSet",
        "expansion": {"contains": [{"system": "http://snomed.info/sct", "code": "1"}]},
    }
)
BLOCKS = re.findall(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_the_doc_has_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS)
def test_each_example_loads(block: str) -> None:
    text = block if "version" in block else f'version = "doc"\n{block}'
    rules = load_rules(text, value_sets=lambda _name: VALUE_SET)
    assert "+" in rules.version

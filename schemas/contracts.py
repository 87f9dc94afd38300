"""Loading and checking the event contracts.

Each contract is a JSON Schema (draft 2020-12) file ``schemas/<name>.v<version>.json`` shipped with
the package. ``validate(name, version, record)`` raises ``ContractError`` naming the contract, the path
of the offending field and what is wrong; ``errors(...)`` returns all problems instead.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError


class ContractError(ValueError):
    """A record does not satisfy its contract."""

    def __init__(self, contract: str, problems: list[str]) -> None:
        super().__init__(f"{contract}: " + "; ".join(problems))
        self.contract = contract
        self.problems = problems


def contract_name(name: str, version: int) -> str:
    return f"{name}.v{version}"


@cache
def load_schema(name: str, version: int) -> dict[str, Any]:
    """The parsed JSON Schema of a contract (cached)."""
    text = resources.files("schemas").joinpath(f"{contract_name(name, version)}.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return schema


@cache
def _validator(name: str, version: int) -> Draft202012Validator:
    return Draft202012Validator(
        load_schema(name, version), format_checker=Draft202012Validator.FORMAT_CHECKER
    )


_SIZES = {"maxLength": "characters", "maxItems": "items", "maxProperties": "properties"}


def _describe(error: ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    unit = _SIZES.get(str(error.validator))
    if unit is not None and hasattr(error.instance, "__len__"):  # never echo an oversized value
        return f"{where}: {len(error.instance)} {unit}, over {error.validator} {error.validator_value}"
    return f"{where}: {error.message}"


def errors(name: str, version: int, record: Any) -> list[str]:
    """Every way the record breaks the contract, as short lines (empty when it is valid)."""
    found = sorted(_validator(name, version).iter_errors(record), key=lambda e: list(e.absolute_path))
    return [_describe(e) for e in found]


def validate(name: str, version: int, record: Any) -> None:
    """Raise ``ContractError`` unless the record satisfies ``<name>.v<version>``."""
    problems = errors(name, version, record)
    if problems:
        raise ContractError(contract_name(name, version), problems)

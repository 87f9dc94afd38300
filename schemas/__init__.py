"""Event contracts: JSON Schema files (draft 2020-12) and the Python models checked against them."""

from schemas.contracts import ContractError, contract_name, errors, load_schema, validate

__all__ = ["ContractError", "contract_name", "errors", "load_schema", "validate"]

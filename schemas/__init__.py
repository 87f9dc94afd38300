"""Event contracts: JSON Schema files (draft 2020-12) and the Python models checked against them."""

from schemas.contracts import ContractError, contract_name, errors, load_schema, validate
from schemas.identifiers import EPISODE_ID_SYSTEM, EVENT_ID_SYSTEM, SESSION_ID_SYSTEM, token

__all__ = [
    "EPISODE_ID_SYSTEM",
    "EVENT_ID_SYSTEM",
    "SESSION_ID_SYSTEM",
    "ContractError",
    "contract_name",
    "errors",
    "load_schema",
    "token",
    "validate",
]

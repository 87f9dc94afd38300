"""Event contracts: JSON Schema files (draft 2020-12) and the Python models checked against them."""

__all__: list[str] = []

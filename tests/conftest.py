"""Test-suite wide set-up.

Fixtures for the real services live in plugin modules of their own (one owner each):
``tests/integration/kafka_fixtures.py`` (the Kafka broker) and ``tests/integration/fhir_fixtures.py``
(the HAPI FHIR sandbox) and ``tests/integration/postgres_fixtures.py`` (PostgreSQL). Each is loaded
once it exists.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

_HERE = Path(__file__).parent
pytest_plugins = [
    f"tests.integration.{name}"
    for name in ("kafka_fixtures", "fhir_fixtures", "postgres_fixtures")
    if (_HERE / "integration" / f"{name}.py").exists()
]


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """CLI tests configure logging for the process (as the entry point does); undo it after each test so
    ``structlog.testing.capture_logs`` elsewhere sees every level."""
    yield
    structlog.reset_defaults()

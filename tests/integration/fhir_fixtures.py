"""pytest plugin: the real HAPI FHIR sandbox for integration tests (never an in-memory stand-in).

- ``fhir_base_url`` (session): the sandbox's FHIR base (``http://127.0.0.1:8080/fhir`` by default).
  Uses ``IOP_BRIDGE_TEST_FHIR`` when ``scripts/test`` started the sandbox; otherwise runs
  ``deploy/fhir-sandbox/run start`` itself and, at the end of the session, ``stop`` — but only if the
  sandbox was not already running before.
- ``fhir`` (per test): an ``httpx.Client`` on that base that speaks FHIR JSON.
- ``unique_id(label)``: an id/identifier value no other test (or earlier run against the same,
  persistent sandbox) uses. The sandbox is shared by every test: make your own data with these.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "deploy" / "fhir-sandbox" / "run"
ENV_BASE_URL = "IOP_BRIDGE_TEST_FHIR"
#: Long enough for a cold first start (Maven downloads ~350 MB, the build, HAPI's start-up).
LAUNCHER_TIMEOUT_S = 1200
FHIR_JSON = "application/fhir+json"


def _launcher(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LAUNCHER), command],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        timeout=LAUNCHER_TIMEOUT_S,
    )


@pytest.fixture(scope="session")
def fhir_base_url() -> Iterator[str]:
    """The real sandbox's FHIR base URL, without a trailing slash."""
    given = os.environ.get(ENV_BASE_URL, "").strip()
    if given:
        yield given.rstrip("/")
        return
    was_running = _launcher("status").returncode == 0
    started = _launcher("start")
    if started.returncode != 0 or not started.stdout.strip():
        pytest.fail(f"deploy/fhir-sandbox/run start failed (exit {started.returncode}); see its output above")
    base_url = started.stdout.strip().splitlines()[-1].rstrip("/")
    try:
        yield base_url
    finally:
        if not was_running:
            _launcher("stop")


@pytest.fixture
def fhir(fhir_base_url: str) -> Iterator[httpx.Client]:
    """A client on the sandbox: relative URLs are resolved against the FHIR base."""
    headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
    with httpx.Client(base_url=fhir_base_url + "/", headers=headers, timeout=60.0) as client:
        yield client


def unique_id(label: str = "t") -> str:
    """A FHIR-id-safe value (letters, digits, '-', at most 64 characters) unique to this call."""
    return f"{label}-{uuid.uuid4().hex[:16]}"

"""`iop-bridge pull` against the real HAPI FHIR sandbox: open, behind SMART Backend Services, and bulk.

The sandbox is seeded with the example journeys (PUT at fixed ids, so seeding again changes nothing).
Other tests write to the same server, so assertions are about our seeded patients.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sync.cli import main
from tests.integration.fhir_fixtures import unique_id
from tests.integration.smart_proxy import SmartProxy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ANCHOR = "2026-06-01"
AS_OF = "2026-06-01T23:59:59Z"
TYPES = (
    "Patient,Encounter,CarePlan,ServiceRequest,Task,Condition,Coverage,Location,Organization,EpisodeOfCare"
)


#: This module's own copy of the journeys: the sandbox is shared, other tests seed other days.
PREFIX = unique_id("pull") + "-"


@pytest.fixture(scope="module")
def seeded(fhir_base_url: str) -> list[str]:
    """Seed the journeys once; returns the seeded patients' ids."""
    command = [
        "--log-level",
        "WARNING",
        "seed",
        "--anchor",
        ANCHOR,
        "--prefix",
        PREFIX,
        "--fhir-url",
        fhir_base_url,
    ]
    assert main(command) == 0
    book = yaml.safe_load((REPO / "examples" / "journeys.yaml").read_text())
    return [f"pt-{PREFIX}{p['key']}" for p in book["patients"]]


@pytest.fixture(scope="module")
def smart(fhir_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SmartProxy, Path]]:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = tmp_path_factory.mktemp("keys") / "client.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    proxy = SmartProxy(upstream=fhir_base_url, client_id="iop-bridge-test", public_key_pem=public).start()
    try:
        yield proxy, pem
    finally:
        proxy.stop()


def _config(tmp: Path, base_url: str, auth: str = "", mode: str = "search") -> Path:
    path = tmp / f"config-{mode}.toml"
    path.write_text(
        f"""
[store]
url = "sqlite:///{tmp / (mode + ".db")}"

[[ehr]]
name = "sandbox"
base_url = "{base_url}"
vendor = "hapi"
page_size = 100
mode = "{mode}"
bulk_poll_max_seconds = 1  # the sandbox asks Retry-After: 120 but finishes a small export in seconds
{auth}
"""
    )
    return path


def _pull(config: Path, out: Path, *extra: str) -> None:
    code = main(
        [
            "--log-level",
            "WARNING",
            "pull",
            "--config",
            str(config),
            "--ehr",
            "sandbox",
            "--out",
            str(out),
            "--since",
            "2000-01-01T00:00:00Z",
            "--types",
            TYPES,
            *extra,
        ]
    )
    assert code == 0


def _lines(folder: Path) -> dict[str, list[str]]:
    return {f.name: sorted(f.read_text().splitlines()) for f in sorted(folder.glob("*.ndjson"))}


def _episodes(folder: Path, tmp: Path, patients: list[str]) -> list[dict[str, Any]]:
    out = tmp / f"{folder.name}-episodes.ndjson"
    assert (
        main(
            [
                "--log-level",
                "WARNING",
                "map",
                str(folder),
                "--as-of",
                AS_OF,
                "--ehr",
                "sandbox",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    wanted = {f"Patient/{p}" for p in patients}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return sorted((r for r in records if r["patient"]["reference"] in wanted), key=lambda r: r["episode_id"])


def test_open_and_smart_pulls_give_identical_output(
    seeded: list[str], fhir_base_url: str, smart: tuple[SmartProxy, Path], tmp_path: Path
) -> None:
    proxy, pem = smart
    open_out, smart_out = tmp_path / "open", tmp_path / "smart"
    (tmp_path / "a").mkdir()
    _pull(_config(tmp_path / "a", fhir_base_url), open_out)
    auth = (
        f'[ehr.auth]\nkind = "smart"\nclient_id = "iop-bridge-test"\nprivate_key = "{pem}"\nalg = "ES384"\n'
    )
    (tmp_path / "b").mkdir()
    _pull(_config(tmp_path / "b", proxy.base_url, auth), smart_out)

    assert _lines(open_out) == _lines(smart_out)
    pulled = {json.loads(line)["id"] for line in (open_out / "Patient.ndjson").read_text().splitlines()}
    assert set(seeded) <= pulled
    assert proxy.token_requests == 1  # one token, cached for the whole pull
    assert proxy.rejected == 0


def test_search_and_bulk_pulls_give_the_same_episodes(
    seeded: list[str], fhir_base_url: str, tmp_path: Path
) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "b").mkdir()
    search_out, bulk_out = tmp_path / "search", tmp_path / "bulk"
    _pull(_config(tmp_path / "s", fhir_base_url), search_out)
    _pull(_config(tmp_path / "b", fhir_base_url, mode="bulk"), bulk_out, "--mode", "bulk")

    search_episodes = _episodes(search_out, tmp_path, seeded)
    bulk_episodes = _episodes(bulk_out, tmp_path, seeded)
    assert len(search_episodes) >= 16  # every journey's episodes (see examples/journeys.yaml)
    assert search_episodes == bulk_episodes
    levels = sorted((e["patient"]["reference"], e["level"], e["entry"]["direction"]) for e in search_episodes)
    assert (f"Patient/pt-{PREFIX}stepup-php", "php", "step_up") in levels
    assert (f"Patient/pt-{PREFIX}php-to-iop", "iop", "step_down") in levels

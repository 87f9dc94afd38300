"""``iop-bridge pull`` end to end through ``sync.cli.main`` against a fake FHIR server (pytest-httpx)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric import rsa
from pytest_httpx import HTTPXMock

from sync.cli import main
from tests.unit.connectors.conftest import BASE, pem_of
from tests.unit.connectors.test_pull import FakeFhirServer, _encounter, _patient

TOKEN_URL = "https://auth.example.org/oauth2/token"
TYPES = "Patient,Encounter"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # main() configures logging onto this test's captured stderr


@pytest.fixture
def server(httpx_mock: HTTPXMock) -> FakeFhirServer:
    fake = FakeFhirServer()
    for p in range(3):
        fake.put(_patient(f"p{p}"))
    for e in range(7):
        fake.put(_encounter(f"e{e}", f"p{e % 3}"))
    fake.put({**_encounter("bad", "p1"), "period": {"start": "2026-02-30"}})
    httpx_mock.add_callback(fake, url=re.compile(re.escape(BASE) + "/.*"), is_reusable=True, is_optional=True)
    return fake


@pytest.fixture
def key_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "key.pem"
    path.write_text(pem_of(rsa_key), encoding="utf-8")
    return path


def _requires_token(token: str) -> Any:
    def check(request: httpx.Request) -> httpx.Response | None:
        if request.headers.get("Authorization") != f"Bearer {token}":
            return httpx.Response(401, json={"resourceType": "OperationOutcome", "issue": []})
        return None

    return check


def _token(httpx_mock: HTTPXMock, status: int = 200) -> None:
    body = (
        {"access_token": "tok-1", "token_type": "bearer", "expires_in": 300}
        if status == 200
        else {"error": "invalid_client", "error_description": "unknown key"}
    )
    httpx_mock.add_response(method="POST", url=TOKEN_URL, status_code=status, json=body, is_reusable=True)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")}


def test_plain_and_smart_servers_give_identical_output(
    server: FakeFhirServer,
    httpx_mock: HTTPXMock,
    key_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("IOP_BRIDGE_STORE__URL", f"sqlite:///{tmp_path / 'plain.db'}")
    assert main(["pull", "--base-url", BASE, "--out", str(tmp_path / "plain"), "--types", TYPES]) == 0
    plain_stdout = capsys.readouterr().out
    assert not any("Authorization" in r.headers for r in server.requests)

    server.fail = _requires_token("tok-1")
    _token(httpx_mock)
    monkeypatch.setenv("IOP_BRIDGE_STORE__URL", f"sqlite:///{tmp_path / 'smart.db'}")
    smart_args = ["--client-id", "iop-bridge", "--private-key", str(key_file), "--token-url", TOKEN_URL]
    code = main(["pull", "--base-url", BASE, "--out", str(tmp_path / "smart"), "--types", TYPES, *smart_args])
    assert code == 0
    assert _files(tmp_path / "smart") == _files(tmp_path / "plain")
    assert set(_files(tmp_path / "plain")) == {"Encounter.ndjson", "Patient.ndjson", "_rejected.ndjson"}
    assert len(httpx_mock.get_requests(url=TOKEN_URL)) == 1  # one token for the whole pull
    assert "Encounter  7" in plain_stdout
    assert "Patient    3" in plain_stdout
    assert "rejected 1" in plain_stdout


def test_config_file_with_env_override_of_the_private_key(
    server: FakeFhirServer,
    httpx_mock: HTTPXMock,
    key_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "iop-bridge.toml"
    config.write_text(
        f"""
[store]
url = "sqlite:///{tmp_path / "state.db"}"

[[ehr]]
name = "general-hospital"
base_url = "{BASE}"
resource_types = ["Encounter"]

[ehr.auth]
kind = "smart"
client_id = "iop-bridge"
private_key = "/nowhere/old-key.pem"
token_url = "{TOKEN_URL}"
""",
        encoding="utf-8",
    )
    server.fail = _requires_token("tok-1")
    _token(httpx_mock)
    monkeypatch.setenv("IOP_BRIDGE_EHR__GENERAL_HOSPITAL__AUTH__PRIVATE_KEY", str(key_file))
    out = tmp_path / "out"
    assert main(["pull", "--config", str(config), "--ehr", "general-hospital", "--out", str(out)]) == 0
    assert len((out / "Encounter.ndjson").read_bytes().splitlines()) == 7
    assert (tmp_path / "state.db").exists()
    # The cursor was stored: the next run asks only for what changed since.
    assert main(["pull", "--config", str(config), "--out", str(out)]) == 0
    assert "_lastUpdated" in server.searches("Encounter")[-1].url.params
    assert "Encounter  0" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "{tmp}/missing.toml"], "config file not found"),
        (["--config", "{tmp}/cfg.toml", "--ehr", "elsewhere"], "no [[ehr]] named 'elsewhere'"),
        (["--base-url", BASE, "--since", "last tuesday"], "since must be an ISO date"),
        (["--base-url", "ftp://ehr.example.org"], "base_url must be an http(s) URL"),
        (["--base-url", BASE, "--client-id", "x"], "needs client_id and private_key"),
        ([], "say which EHR to pull with --ehr"),
    ],
)
def test_usage_and_config_errors_exit_2(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.toml").write_text(f'[[ehr]]\nname = "h"\nbase_url = "{BASE}"\n', encoding="utf-8")
    argv = ["pull", "--out", str(tmp_path / "out"), *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("iop-bridge: error:") == 1


def test_a_bad_environment_value_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOP_BRIDGE_EHR__H__BASE_URL", BASE)
    monkeypatch.setenv("IOP_BRIDGE_EHR__H__PAGE_SIZE", "lots")
    assert main(["pull", "--ehr", "h", "--out", str(tmp_path / "out")]) == 2


def test_auth_failure_exits_3_and_ehr_failure_exits_4(
    server: FakeFhirServer,
    httpx_mock: HTTPXMock,
    key_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("IOP_BRIDGE_STORE__URL", f"sqlite:///{tmp_path / 'state.db'}")
    _token(httpx_mock, status=400)
    smart = ["--client-id", "iop-bridge", "--private-key", str(key_file), "--token-url", TOKEN_URL]
    assert main(["pull", "--base-url", BASE, "--out", str(tmp_path / "out"), *smart]) == 3
    assert "unknown key" in capsys.readouterr().err
    server.fail = lambda r: httpx.Response(
        400,
        json={
            "resourceType": "OperationOutcome",
            "issue": [{"code": "invalid", "diagnostics": "bad _count"}],
        },
    )
    assert main(["pull", "--base-url", BASE, "--out", str(tmp_path / "out")]) == 4
    err = capsys.readouterr().err
    assert "invalid" in err
    assert "bad _count" not in err  # the server's free text stays out unless log_server_text
    assert not (tmp_path / "out" / "Patient.ndjson").exists()  # nothing published from a failed pull

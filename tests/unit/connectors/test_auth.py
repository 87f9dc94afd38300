"""SMART Backend Services auth: the signed assertion, discovery, token cache and renewal, 401, secrets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pytest_httpx import HTTPXMock
from structlog.testing import capture_logs

from connectors.auth import ASSERTION_TYPE, BearerAuth, SmartBackendAuth, authenticator_for
from connectors.config import EhrConfig
from connectors.errors import AuthError
from connectors.http import EhrClient
from tests.unit.connectors.conftest import BASE, FakeClock, Sleeps, pem_of

TOKEN_URL = "https://auth.example.org/oauth2/token"


def _smart(make_ehr: Callable[..., EhrConfig], key: Any, **auth: Any) -> EhrConfig:
    values = {"kind": "smart", "client_id": "iop-bridge-client", "private_key": pem_of(key), **auth}
    return make_ehr(auth=values)


def _token(httpx_mock: HTTPXMock, access_token: str = "tok-1", expires_in: int = 300) -> None:
    httpx_mock.add_response(
        method="POST",
        url=TOKEN_URL,
        json={"access_token": access_token, "token_type": "bearer", "expires_in": expires_in},
    )


def _form(request: httpx.Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.content.decode()).items()}


@pytest.mark.parametrize(("key_name", "alg"), [("rsa_key", "RS384"), ("ec_key", "ES384")])
def test_assertion_is_signed_and_verifiable_with_the_public_key(
    request: pytest.FixtureRequest,
    key_name: str,
    alg: str,
    httpx_mock: HTTPXMock,
    make_ehr: Callable[..., EhrConfig],
    clock: FakeClock,
) -> None:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = request.getfixturevalue(key_name)
    ehr = _smart(make_ehr, key, token_url=TOKEN_URL, kid="key-2026")
    _token(httpx_mock, "tok-1")
    _token(httpx_mock, "tok-2")
    with httpx.Client() as http:
        auth = authenticator_for(ehr, http, clock=clock)
        assert auth.auth_headers() == {"Authorization": "Bearer tok-1"}
        auth.invalidate()
        assert auth.auth_headers() == {"Authorization": "Bearer tok-2"}
    first, second = (_form(r) for r in httpx_mock.get_requests())
    assert first["grant_type"] == "client_credentials"
    assert first["client_assertion_type"] == ASSERTION_TYPE
    assert first["scope"] == "system/*.read"
    header = jwt.get_unverified_header(first["client_assertion"])
    assert header == {"alg": alg, "kid": "key-2026", "typ": "JWT"}
    claims = jwt.decode(
        first["client_assertion"],
        key.public_key(),
        algorithms=[alg],
        audience=TOKEN_URL,
        options={"verify_exp": False},  # checked against the fake clock below
    )
    assert claims["iss"] == claims["sub"] == "iop-bridge-client"
    assert claims["aud"] == TOKEN_URL
    assert clock.now < claims["exp"] <= clock.now + 300
    other = jwt.decode(
        second["client_assertion"],
        key.public_key(),
        algorithms=[alg],
        audience=TOKEN_URL,
        options={"verify_exp": False},
    )
    assert other["jti"] != claims["jti"]


def test_token_endpoint_is_discovered_from_smart_configuration(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    httpx_mock.add_response(
        url=f"{BASE}/.well-known/smart-configuration",
        json={"token_endpoint": TOKEN_URL, "token_endpoint_auth_methods_supported": ["private_key_jwt"]},
    )
    _token(httpx_mock)
    with httpx.Client() as http:
        auth = authenticator_for(_smart(make_ehr, rsa_key), http, clock=clock)
        auth.auth_headers()
    assertion = _form(httpx_mock.get_requests()[1])["client_assertion"]
    assert (
        jwt.decode(assertion, rsa_key.public_key(), algorithms=["RS384"], audience=TOKEN_URL)["aud"]
        == TOKEN_URL
    )


def test_discovery_without_token_endpoint_is_an_auth_error(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    httpx_mock.add_response(url=f"{BASE}/.well-known/smart-configuration", status_code=404)
    with (
        httpx.Client() as http,
        pytest.raises(AuthError, match=r"no token_endpoint.*configure auth.token_url"),
    ):
        authenticator_for(_smart(make_ehr, rsa_key), http, clock=clock).auth_headers()


def test_oauth_refusal_raises_auth_error_with_description(
    httpx_mock: HTTPXMock,
    make_ehr: Callable[..., EhrConfig],
    ec_key: ec.EllipticCurvePrivateKey,
    clock: FakeClock,
) -> None:
    httpx_mock.add_response(
        method="POST",
        url=TOKEN_URL,
        status_code=400,
        json={"error": "invalid_client", "error_description": "Client not mapped to a user"},
    )
    ehr = _smart(make_ehr, ec_key, token_url=TOKEN_URL)
    with httpx.Client() as http, pytest.raises(AuthError) as caught:
        authenticator_for(ehr, http, clock=clock).auth_headers()
    assert "invalid_client: Client not mapped to a user" in str(caught.value)
    assert "test-ehr" in str(caught.value)
    assert caught.value.exit_code == 3


def test_token_is_cached_and_renewed_before_it_expires(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    _token(httpx_mock, "tok-1", expires_in=300)
    _token(httpx_mock, "tok-2", expires_in=300)
    with httpx.Client() as http:
        auth = authenticator_for(_smart(make_ehr, rsa_key, token_url=TOKEN_URL), http, clock=clock)
        assert auth.auth_headers()["Authorization"] == "Bearer tok-1"
        clock.now += 200
        assert auth.auth_headers()["Authorization"] == "Bearer tok-1"
        assert len(httpx_mock.get_requests()) == 1
        clock.now += 50  # 250 s: inside the renewal margin, still 50 s before expiry
        assert auth.auth_headers()["Authorization"] == "Bearer tok-2"
    assert len(httpx_mock.get_requests()) == 2


def test_a_401_reauthorises_once_without_spending_a_retry(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], rsa_key: rsa.RSAPrivateKey, sleeps: Sleeps
) -> None:
    _token(httpx_mock, "revoked")
    httpx_mock.add_response(
        url=f"{BASE}/Patient/1", status_code=401, match_headers={"Authorization": "Bearer revoked"}
    )
    _token(httpx_mock, "fresh")
    httpx_mock.add_response(
        url=f"{BASE}/Patient/1",
        json={"resourceType": "Patient"},
        match_headers={"Authorization": "Bearer fresh"},
    )
    ehr = _smart(make_ehr, rsa_key, token_url=TOKEN_URL)
    with EhrClient(ehr, sleep=sleeps, clock=sleeps.clock) as client:
        assert client.get_json("Patient/1")["resourceType"] == "Patient"
        assert client.stats.retries == 0
    assert sleeps.slept == []


def test_a_second_401_is_an_auth_error(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], rsa_key: rsa.RSAPrivateKey, sleeps: Sleeps
) -> None:
    _token(httpx_mock, "a")
    _token(httpx_mock, "b")
    httpx_mock.add_response(url=f"{BASE}/Patient/1", status_code=401, is_reusable=True)
    ehr = _smart(make_ehr, rsa_key, token_url=TOKEN_URL)
    with EhrClient(ehr, sleep=sleeps, clock=sleeps.clock) as client, pytest.raises(AuthError):
        client.get_json("Patient/1")
    assert len(httpx_mock.get_requests(url=f"{BASE}/Patient/1")) == 2


def test_a_temporary_token_endpoint_failure_is_retried(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], rsa_key: rsa.RSAPrivateKey, sleeps: Sleeps
) -> None:
    httpx_mock.add_response(method="POST", url=TOKEN_URL, status_code=503)
    _token(httpx_mock, "tok")
    httpx_mock.add_response(url=f"{BASE}/Patient/1", json={"resourceType": "Patient"})
    with EhrClient(
        _smart(make_ehr, rsa_key, token_url=TOKEN_URL), sleep=sleeps, clock=sleeps.clock
    ) as client:
        client.get_json("Patient/1")
        assert client.stats.retries == 1


def test_key_and_alg_must_agree(make_ehr: Callable[..., EhrConfig], rsa_key: rsa.RSAPrivateKey) -> None:
    with httpx.Client() as http, pytest.raises(AuthError, match="ES384 but the private key is for RS384"):
        authenticator_for(_smart(make_ehr, rsa_key, alg="ES384"), http)


def test_unreadable_key_file_is_an_auth_error(make_ehr: Callable[..., EhrConfig], tmp_path: Path) -> None:
    ehr = make_ehr(auth={"kind": "smart", "client_id": "c", "private_key": str(tmp_path / "missing.pem")})
    with httpx.Client() as http, pytest.raises(AuthError, match="cannot read private key"):
        authenticator_for(ehr, http)


def test_key_from_a_pem_file_and_default_kid_is_stable(
    make_ehr: Callable[..., EhrConfig], ec_key: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    path = tmp_path / "key.pem"
    path.write_text(pem_of(ec_key))
    ehr = make_ehr(auth={"kind": "smart", "client_id": "c", "private_key": str(path), "token_url": TOKEN_URL})
    with httpx.Client() as http:
        first, second = authenticator_for(ehr, http), authenticator_for(ehr, http)
    assert isinstance(first, SmartBackendAuth)
    assert isinstance(second, SmartBackendAuth)
    assert first.alg == "ES384"
    assert first.kid == second.kid
    assert len(first.kid) == 43  # base64url of a SHA-256 thumbprint


def test_secrets_never_show_in_repr_or_logs(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    _token(httpx_mock, "very-secret-token")
    ehr = _smart(make_ehr, rsa_key, token_url=TOKEN_URL)
    pem = pem_of(rsa_key)
    with httpx.Client() as http, capture_logs() as logs:
        auth = authenticator_for(ehr, http, clock=clock)
        auth.auth_headers()
    shown = repr(auth) + repr(ehr) + repr(ehr.auth) + str(logs)
    assert "very-secret-token" not in shown
    assert pem.splitlines()[1] not in shown
    assert any(entry["event"] == "ehr_token_issued" for entry in logs)
    bearer = BearerAuth("static-secret")
    assert "static-secret" not in repr(bearer)
    assert "static-secret" not in repr(make_ehr(auth={"kind": "bearer", "token": "static-secret"}))


# -- the token endpoint must be https (issue 10, item 12) -------------------------------------------


def test_a_configured_cleartext_token_url_is_refused_at_config(
    make_ehr: Callable[..., EhrConfig], rsa_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(ValueError, match=r"auth\.token_url .*http://auth\.example\.org.* https"):
        _smart(make_ehr, rsa_key, token_url="http://auth.example.org/oauth2/token")


def test_a_cleartext_token_url_passes_on_loopback_or_with_allow_insecure_http(
    make_ehr: Callable[..., EhrConfig], rsa_key: rsa.RSAPrivateKey
) -> None:
    assert _smart(make_ehr, rsa_key, token_url="http://127.0.0.1:9000/token").auth.token_url
    values = {
        "kind": "smart",
        "client_id": "c",
        "private_key": pem_of(rsa_key),
        "token_url": "http://t.test/t",
    }
    assert make_ehr(auth=values, allow_insecure_http=True).auth.token_url == "http://t.test/t"


@pytest.mark.parametrize("insecure", [False, True])
def test_a_discovered_cleartext_token_endpoint_on_another_origin_is_refused_and_gets_nothing(
    httpx_mock: HTTPXMock,
    make_ehr: Callable[..., EhrConfig],
    rsa_key: rsa.RSAPrivateKey,
    clock: FakeClock,
    insecure: bool,
) -> None:
    httpx_mock.add_response(
        url=f"{BASE}/.well-known/smart-configuration", json={"token_endpoint": "http://evil.example/token"}
    )
    values = {"kind": "smart", "client_id": "c", "private_key": pem_of(rsa_key)}
    ehr = make_ehr(auth=values, allow_insecure_http=insecure)
    with (
        httpx.Client() as http,
        pytest.raises(AuthError, match=r"token_endpoint .*evil\.example.* not https"),
    ):
        authenticator_for(ehr, http, clock=clock).auth_headers()
    assert [r.method for r in httpx_mock.get_requests()] == ["GET"]  # no assertion went out


def test_a_discovered_cleartext_token_endpoint_on_the_ehrs_own_loopback_origin_is_used(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], rsa_key: rsa.RSAPrivateKey, clock: FakeClock
) -> None:
    base = "http://127.0.0.1:8080/fhir"
    httpx_mock.add_response(
        url=f"{base}/.well-known/smart-configuration", json={"token_endpoint": "http://127.0.0.1:8080/token"}
    )
    httpx_mock.add_response(method="POST", url="http://127.0.0.1:8080/token", json={"access_token": "t"})
    values = {"kind": "smart", "client_id": "c", "private_key": pem_of(rsa_key)}
    with httpx.Client() as http:
        auth = authenticator_for(make_ehr(base_url=base, auth=values), http, clock=clock)
        assert auth.auth_headers() == {"Authorization": "Bearer t"}


@pytest.mark.parametrize("endpoint", ["/oauth2/token", "ftp://auth.example.org/token", "https://"])
def test_a_discovered_token_endpoint_that_is_not_an_absolute_url_is_refused(
    httpx_mock: HTTPXMock,
    make_ehr: Callable[..., EhrConfig],
    rsa_key: rsa.RSAPrivateKey,
    clock: FakeClock,
    endpoint: str,
) -> None:
    httpx_mock.add_response(url=f"{BASE}/.well-known/smart-configuration", json={"token_endpoint": endpoint})
    with httpx.Client() as http, pytest.raises(AuthError, match=r"token_endpoint"):
        authenticator_for(_smart(make_ehr, rsa_key), http, clock=clock).auth_headers()
    assert [r.method for r in httpx_mock.get_requests()] == ["GET"]


@pytest.mark.parametrize("where", ["discovery", "token"])
def test_an_oversized_answer_from_discovery_or_the_token_endpoint_is_refused(
    httpx_mock: HTTPXMock,
    make_ehr: Callable[..., EhrConfig],
    rsa_key: rsa.RSAPrivateKey,
    clock: FakeClock,
    where: str,
) -> None:
    padding = "x" * (2 << 20)
    discovery: dict[str, Any] = {"token_endpoint": TOKEN_URL}
    if where == "discovery":
        discovery["padding"] = padding
    httpx_mock.add_response(url=f"{BASE}/.well-known/smart-configuration", json=discovery)
    if where == "token":
        httpx_mock.add_response(method="POST", url=TOKEN_URL, json={"access_token": "t", "padding": padding})
    with (
        httpx.Client() as http,
        pytest.raises(AuthError, match=r"(discovery|token endpoint) answer is over 1048576 bytes"),
    ):
        authenticator_for(_smart(make_ehr, rsa_key), http, clock=clock).auth_headers()

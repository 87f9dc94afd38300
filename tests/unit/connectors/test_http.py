"""EhrClient: retry classification, Retry-After, budget, error messages, credentials per origin."""

from __future__ import annotations

import email.utils
import gzip
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import time_machine
from pytest_httpx import HTTPXMock, IteratorStream

from connectors.config import EhrConfig
from connectors.errors import EhrError, TemporaryEhrError, TlsError
from connectors.http import MAX_ATTEMPTS, RETRY_AFTER_CAP, SLEEP_BUDGET, EhrClient, parse_retry_after
from tests.unit.connectors.conftest import BASE, FakeClock, Sleeps

OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "invalid", "diagnostics": "Unknown search parameter 'foo'"}],
}


def _client(ehr: EhrConfig, sleeps: Sleeps) -> EhrClient:
    return EhrClient(ehr, sleep=sleeps, clock=sleeps.clock)


def test_relative_urls_keep_the_tenant_path(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/Patient/7", json={"resourceType": "Patient", "id": "7"})
    with _client(make_ehr(vendor="oracle"), sleeps) as client:
        assert client.get_json("Patient/7")["id"] == "7"
    assert httpx_mock.get_requests()[0].headers["Accept"] == "application/fhir+json"


def test_503_then_success_is_retried_once_with_jittered_backoff(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/metadata", status_code=503)
    httpx_mock.add_response(url=f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    with _client(make_ehr(), sleeps) as client:
        body = client.get_json("metadata")
        assert body["resourceType"] == "CapabilityStatement"
        assert (client.stats.requests, client.stats.retries) == (2, 1)
    assert len(sleeps.slept) == 1
    assert 1.0 <= sleeps.slept[0] <= 2.0  # initial 1 s plus up to 1 s of jitter


def test_429_retry_after_seconds_is_honoured(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/Patient", status_code=429, headers={"Retry-After": "7"})
    httpx_mock.add_response(url=f"{BASE}/Patient", json={"resourceType": "Bundle"})
    with _client(make_ehr(), sleeps) as client:
        client.get_json("Patient")
    assert sleeps.slept == [7.0]


def test_429_retry_after_http_date_is_honoured_in_a_non_utc_zone(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig]
) -> None:
    # Frozen just before a DST change in New York: a local-time reading of the date would be off by hours.
    frozen = datetime(2026, 3, 8, 1, 59, 50, tzinfo=ZoneInfo("America/New_York"))
    slept: list[float] = []
    with time_machine.travel(frozen, tick=False):
        later = email.utils.formatdate(time.time() + 42, usegmt=True)
        httpx_mock.add_response(url=f"{BASE}/Patient", status_code=429, headers={"Retry-After": later})
        httpx_mock.add_response(url=f"{BASE}/Patient", json={"resourceType": "Bundle"})
        with EhrClient(make_ehr(), sleep=slept.append) as client:
            client.get_json("Patient")
    assert slept == [42.0]


def test_retry_after_is_capped_by_our_policy(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/Patient", status_code=503, headers={"Retry-After": "14400"})
    httpx_mock.add_response(url=f"{BASE}/Patient", json={"resourceType": "Bundle"})
    with _client(make_ehr(), sleeps) as client:
        client.get_json("Patient")
    assert sleeps.slept == [RETRY_AFTER_CAP]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("Wed, 21 Oct 2026 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2026 07:27:00 GMT", 0.0),  # already past
        ("soon", None),
        ("-5", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    now = datetime(2026, 10, 21, 7, 28, 0, tzinfo=ZoneInfo("UTC")).timestamp()
    assert parse_retry_after(header, now) == expected


def test_a_fatal_400_is_not_retried_and_names_ehr_method_path_and_diagnostics(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(status_code=400, json=OUTCOME)
    with _client(make_ehr(), sleeps) as client, pytest.raises(EhrError) as caught:
        client.get_json("Encounter", params={"identifier": "MRN-12345"})
    assert len(httpx_mock.get_requests()) == 1
    assert sleeps.slept == []
    assert not isinstance(caught.value, TemporaryEhrError)
    message = str(caught.value)
    assert "test-ehr" in message
    assert "GET /r4/tenant-1/Encounter" in message
    assert "error invalid" in message  # severity and code; the free text only when opted in
    assert "Unknown search parameter" not in message
    assert "MRN-12345" not in message  # query strings may hold identifiers
    assert caught.value.status == 400
    assert caught.value.response is not None


def test_exhausted_attempts_raise_temporary_error(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/Patient", status_code=502, is_reusable=True)
    with _client(make_ehr(), sleeps) as client, pytest.raises(TemporaryEhrError) as caught:
        client.get_json("Patient")
    assert len(httpx_mock.get_requests()) == MAX_ATTEMPTS
    assert len(sleeps.slept) == MAX_ATTEMPTS - 1
    assert client.stats.retries == MAX_ATTEMPTS - 1
    assert caught.value.status == 502


def test_the_sleep_budget_stops_retries_before_the_attempt_limit(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(
        url=f"{BASE}/Patient", status_code=429, headers={"Retry-After": "60"}, is_reusable=True
    )
    with _client(make_ehr(), sleeps) as client, pytest.raises(TemporaryEhrError):
        client.get_json("Patient")
    assert sum(sleeps.slept) <= SLEEP_BUDGET
    assert sleeps.slept == [60.0, 60.0, 60.0]
    assert len(httpx_mock.get_requests()) == 4


def test_connect_errors_are_temporary(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=f"{BASE}/Patient")
    httpx_mock.add_exception(httpx.ReadTimeout("slow"), url=f"{BASE}/Patient")
    httpx_mock.add_response(url=f"{BASE}/Patient", json={"resourceType": "Bundle"})
    with _client(make_ehr(), sleeps) as client:
        client.get_json("Patient")
        assert client.stats.retries == 2


def test_connect_errors_exhausted_raise_temporary_error(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=f"{BASE}/Patient", is_reusable=True)
    with _client(make_ehr(), sleeps) as client, pytest.raises(TemporaryEhrError, match="ConnectError"):
        client.get_json("Patient")
    assert len(httpx_mock.get_requests()) == MAX_ATTEMPTS


def test_credentials_go_only_to_the_ehr_origin(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/Patient", json={"resourceType": "Bundle"})
    httpx_mock.add_response(url="https://files.example.net/out/1", json={"resourceType": "Bundle"})
    ehr = make_ehr(auth={"kind": "bearer", "token": "s3cret-token"})
    with _client(ehr, sleeps) as client:
        client.get_json("Patient")
        client.get_json("https://files.example.net/out/1")
    own, foreign = httpx_mock.get_requests()
    assert own.headers["Authorization"] == "Bearer s3cret-token"
    assert "Authorization" not in foreign.headers


def test_non_json_body_is_an_ehr_error(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/Patient", text="<html>maintenance</html>")
    with _client(make_ehr(), sleeps) as client, pytest.raises(EhrError, match="not JSON"):
        client.get_json("Patient")


def test_epic_client_id_header_is_sent(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    with _client(make_ehr(vendor="epic", epic_client_id="abc-123"), sleeps) as client:
        client.get_json("metadata")
    assert httpx_mock.get_requests()[0].headers["Epic-Client-ID"] == "abc-123"


def test_one_client_serves_many_threads(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], clock: FakeClock
) -> None:
    for n in range(20):
        httpx_mock.add_response(url=f"{BASE}/Patient/{n}", json={"resourceType": "Patient", "id": str(n)})
    with EhrClient(make_ehr(concurrency=4), sleep=lambda s: None, clock=clock) as client:
        with ThreadPoolExecutor(max_workers=4) as pool:
            ids = list(pool.map(lambda n: client.get_json(f"Patient/{n}")["id"], range(20)))
        assert ids == [str(n) for n in range(20)]
        assert client.stats.requests == 20


def test_stream_makes_one_attempt_and_classifies_failures(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/a.ndjson", status_code=503)
    httpx_mock.add_response(url=f"{BASE}/b.ndjson", status_code=404)
    httpx_mock.add_response(url=f"{BASE}/c.ndjson", content=b'{"id":"1"}\n')
    with _client(make_ehr(), sleeps) as client:
        with pytest.raises(TemporaryEhrError, match="HTTP 503"), client.stream("GET", "a.ndjson"):
            pass
        with pytest.raises(EhrError, match="HTTP 404") as caught, client.stream("GET", "b.ndjson"):
            pass
        assert not isinstance(caught.value, TemporaryEhrError)
        with client.stream("GET", "c.ndjson") as response:
            assert b"".join(response.iter_bytes()) == b'{"id":"1"}\n'
    assert sleeps.slept == []
    assert len(httpx_mock.get_requests()) == 3


@pytest.mark.parametrize(
    ("failure", "resent"),
    [
        ({"status_code": 500}, False),
        ({"status_code": 502}, False),
        ({"exception": httpx.ReadTimeout("slow")}, False),
        ({"status_code": 429}, True),
        ({"status_code": 503}, True),
        ({"exception": httpx.ConnectError("refused")}, True),
    ],
)
def test_a_post_is_resent_only_when_the_server_surely_did_not_act(
    httpx_mock: HTTPXMock,
    make_ehr: Callable[..., EhrConfig],
    sleeps: Sleeps,
    failure: dict[str, Any],
    resent: bool,
) -> None:
    url = f"{BASE}/DocumentReference"
    if "exception" in failure:
        httpx_mock.add_exception(failure["exception"], url=url, method="POST")
    else:
        httpx_mock.add_response(url=url, method="POST", status_code=failure["status_code"])
    httpx_mock.add_response(
        url=url, method="POST", status_code=201, json={"id": "d1"}, is_optional=not resent
    )
    with _client(make_ehr(), sleeps) as client:
        if resent:
            assert client.request(
                "POST", "DocumentReference", json={"resourceType": "DocumentReference"}
            ).json() == {"id": "d1"}
        else:
            with pytest.raises(TemporaryEhrError, match="not resent"):
                client.request("POST", "DocumentReference", json={"resourceType": "DocumentReference"})
    assert len(httpx_mock.get_requests()) == (2 if resent else 1)


def test_a_post_declared_idempotent_is_resent(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/", method="POST", status_code=502)
    httpx_mock.add_response(url=f"{BASE}/", method="POST", json={"resourceType": "Bundle"})
    with _client(make_ehr(), sleeps) as client:
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": []}
        assert client.request("POST", "", json=bundle, idempotent=True).json()["resourceType"] == "Bundle"
        assert client.stats.retries == 1


def test_a_tls_verification_failure_is_permanent_and_says_so(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    failure = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    failure.__cause__ = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")
    httpx_mock.add_exception(failure, url=f"{BASE}/Patient")
    with _client(make_ehr(), sleeps) as client, pytest.raises(TlsError) as caught:
        client.get_json("Patient")
    assert len(httpx_mock.get_requests()) == 1
    assert sleeps.slept == []
    assert not isinstance(caught.value, TemporaryEhrError)
    assert "TLS certificate verification failed" in str(caught.value)


def test_a_tls_verification_failure_on_a_stream_is_permanent_too(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    failure = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    httpx_mock.add_exception(failure, url=f"{BASE}/file.ndjson")
    with (
        _client(make_ehr(), sleeps) as client,
        pytest.raises(TlsError, match="TLS certificate"),
        client.stream("GET", "file.ndjson"),
    ):
        pass


PHI_OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "processing",
            "details": {"coding": [{"code": "MSG_ERROR"}], "text": "Jane Roe 1970-02-03 relapsed on alcohol"},
            "diagnostics": "Jane Roe 1970-02-03 relapsed on alcohol",
        }
    ],
}


def test_server_free_text_stays_out_of_errors_by_default(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/Encounter", status_code=422, json=PHI_OUTCOME)
    httpx_mock.add_response(url=f"{BASE}/Patient", status_code=400, text="no Patient Jane Roe here")
    with _client(make_ehr(), sleeps) as client:
        with pytest.raises(EhrError) as outcome:
            client.get_json("Encounter")
        with pytest.raises(EhrError) as plain:
            client.get_json("Patient")
    assert "error processing MSG_ERROR" in str(outcome.value)
    assert "Jane" not in str(outcome.value) + str(plain.value)
    assert "Bad Request" in str(plain.value)


def test_server_free_text_is_kept_when_opted_in(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/Encounter", status_code=422, json=PHI_OUTCOME)
    with (
        _client(make_ehr(log_server_text=True), sleeps) as client,
        pytest.raises(EhrError, match="relapsed on alcohol"),
    ):
        client.get_json("Encounter")


# -- page caps (issue 10, item 16) ------------------------------------------------------------------


def _big_bundle(size: int) -> bytes:
    return b'{"resourceType":"Bundle","type":"searchset","entry":[],"pad":"' + b"x" * size + b'"}'


def test_a_response_over_max_page_bytes_is_refused_naming_ehr_path_and_size(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    body = _big_bundle(10_000)
    pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    httpx_mock.add_response(url=f"{BASE}/Encounter?patient=p1", stream=IteratorStream(pieces))
    with (
        _client(make_ehr(max_page_bytes=4096), sleeps) as client,
        pytest.raises(EhrError, match=r"test-ehr: GET /r4/tenant-1/Encounter: the response is over "
                      r"max_page_bytes \(4096 bytes") as caught,
    ):  # fmt: skip
        client.get_json("Encounter", params={"patient": "p1"})
    assert not caught.value.retriable
    assert client.stats.requests == 1  # refused, not retried
    assert "p1" not in str(caught.value)


def test_a_content_length_over_the_cap_is_refused_before_reading_and_names_the_size(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/Encounter", content=_big_bundle(10_000))
    with (
        _client(make_ehr(max_page_bytes=4096), sleeps) as client,
        pytest.raises(EhrError, match=r"Content-Length 10\d\d\d"),
    ):
        client.get_json("Encounter")


def test_a_gzip_page_is_capped_on_its_decompressed_size(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    packed = gzip.compress(_big_bundle(1_000_000))  # ~1 MB of JSON in ~1 kB on the wire
    httpx_mock.add_response(
        url=f"{BASE}/Encounter", stream=IteratorStream([packed]), headers={"Content-Encoding": "gzip"}
    )
    with (
        _client(make_ehr(max_page_bytes=64 * 1024), sleeps) as client,
        pytest.raises(EhrError, match=r"over max_page_bytes \(65536 bytes"),
    ):
        client.get_json("Encounter")


def test_a_page_up_to_the_cap_is_read_whole(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    body = _big_bundle(3000)
    httpx_mock.add_response(url=f"{BASE}/Encounter", content=body)
    with _client(make_ehr(max_page_bytes=len(body)), sleeps) as client:
        assert client.get_json("Encounter")["resourceType"] == "Bundle"


def test_an_error_body_over_the_cap_keeps_its_status_class(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/Encounter", status_code=403, content=b"x" * 20_000)
    with (
        _client(make_ehr(max_page_bytes=4096), sleeps) as client,
        pytest.raises(EhrError, match=r"HTTP 403") as caught,
    ):
        client.get_json("Encounter")
    assert caught.value.status == 403


def test_a_streamed_download_error_body_is_cut_at_the_cap(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/files/1.ndjson", status_code=404, content=b"x" * 20_000)
    with (
        _client(make_ehr(max_page_bytes=4096), sleeps) as client,
        pytest.raises(EhrError, match=r"HTTP 404") as caught,
        client.stream("GET", "files/1.ndjson"),
    ):
        pass
    assert caught.value.response is not None
    assert len(caught.value.response.content) == 4096

"""Bulk Data $export: kick-off, polling, manifest, streamed and retried downloads, error files, DELETE."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pytest_httpx import HTTPXMock, IteratorStream
from structlog.testing import capture_logs

from connectors.bulk import POLL_FRACTION, POLL_MIN, POLL_START, _copy_lines, bulk_export
from connectors.config import EhrConfig
from connectors.errors import BulkExportError
from connectors.http import EhrClient
from tests.unit.connectors.conftest import BASE, Sleeps

STATUS = f"{BASE}/bulkstatus/job-1"
FILES = "https://files.example.net/exports/job-1"
KICKOFF = f"{BASE}/$export?_type=Patient%2CEncounter&_since=2026-01-01T00%3A00%3A00Z"


def _ndjson(*resources: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in resources)


PATIENTS = _ndjson({"resourceType": "Patient", "id": "p1"}, {"resourceType": "Patient", "id": "p2"})
# A line break inside a JSON string (U+2028) must not split a line; CRLF line ends are accepted.
ENCOUNTERS_A = _ndjson({"resourceType": "Encounter", "id": "e1", "text": {"div": "a\u2028b"}})
ENCOUNTERS_B = b'{"resourceType":"Encounter","id":"e2"}\r\n\r\n{"resourceType":"Encounter","id":"e3"}'
ERRORS = _ndjson(
    {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "processing", "diagnostics": "Encounter e9 could not be exported"}
        ],
    }
)


def _manifest(**extra: Any) -> dict[str, Any]:
    return {
        "transactionTime": "2026-03-08T06:59:50.123Z",
        "request": KICKOFF,
        "requiresAccessToken": True,
        "output": [
            {"type": "Patient", "url": f"{FILES}/Patient-1.ndjson", "count": 2},
            {"type": "Encounter", "url": f"{FILES}/Encounter-1.ndjson", "count": 1},
            {"type": "Encounter", "url": f"{FILES}/Encounter-2.ndjson", "count": 2},
        ],
        "error": [{"type": "OperationOutcome", "url": f"{FILES}/errors.ndjson"}],
        **extra,
    }


def _chunks(data: bytes, size: int) -> IteratorStream:
    return IteratorStream([data[i : i + size] for i in range(0, len(data), size)])


def _kickoff(httpx_mock: HTTPXMock, url: str = KICKOFF) -> None:
    httpx_mock.add_response(
        url=url,
        status_code=202,
        headers={"Content-Location": STATUS},
        match_headers={"Prefer": "respond-async", "Accept": "application/fhir+json"},
    )


def _client(make_ehr: Callable[..., EhrConfig], sleeps: Sleeps) -> EhrClient:
    ehr = make_ehr(
        auth={"kind": "bearer", "token": "tok"}, concurrency=2, bulk_file_hosts=["files.example.net"]
    )
    return EhrClient(ehr, sleep=sleeps, clock=sleeps.clock)


def test_the_whole_export_flow(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    _kickoff(httpx_mock)
    httpx_mock.add_response(url=STATUS, status_code=202, headers={"Retry-After": "5", "X-Progress": "10%"})
    httpx_mock.add_response(url=STATUS, status_code=202, headers={"X-Progress": "50% (Encounter)"})
    httpx_mock.add_response(url=STATUS, json=_manifest())
    auth = {"Authorization": "Bearer tok"}
    httpx_mock.add_response(url=f"{FILES}/Patient-1.ndjson", stream=_chunks(PATIENTS, 7), match_headers=auth)
    httpx_mock.add_response(
        url=f"{FILES}/Encounter-1.ndjson", stream=_chunks(ENCOUNTERS_A, 5), match_headers=auth
    )
    httpx_mock.add_response(url=f"{FILES}/Encounter-2.ndjson", status_code=503)
    httpx_mock.add_response(
        url=f"{FILES}/Encounter-2.ndjson", stream=_chunks(ENCOUNTERS_B, 9), match_headers=auth
    )
    httpx_mock.add_response(url=f"{FILES}/errors.ndjson", content=ERRORS, match_headers=auth)
    httpx_mock.add_response(url=STATUS, method="DELETE", status_code=202)
    progress: list[str] = []

    with _client(make_ehr, sleeps) as client, capture_logs() as logs:
        result = bulk_export(
            client,
            resource_types=["Patient", "Encounter"],
            since="2026-01-01T00:00:00Z",
            out_dir=tmp_path / "out",
            on_progress=progress.append,
        )

    assert progress == ["10%", "50% (Encounter)"]
    # The server's 5 s is longer than our schedule early on (the schedule wins).
    assert sleeps.slept[:2] == [POLL_START, POLL_START]
    assert len(sleeps.slept) == 3  # the 503 on one file, retried on its own
    assert 1.0 <= sleeps.slept[2] <= 2.0
    assert result.transaction_time == "2026-03-08T06:59:50.123Z"
    assert result.request_url == KICKOFF
    assert sorted(result.files) == ["Encounter", "Patient"]
    assert result.files["Patient"][0].read_bytes() == PATIENTS
    encounter_a, encounter_b = result.files["Encounter"]
    assert encounter_a.read_bytes() == ENCOUNTERS_A
    assert [orjson.loads(line)["id"] for line in encounter_b.read_bytes().splitlines()] == ["e2", "e3"]
    assert result.lines == {"Patient": 2, "Encounter": 3}
    assert result.error_files == [tmp_path / "out" / "_errors.000.ndjson"]
    assert result.error_files[0].read_bytes() == ERRORS
    assert result.errors == 1
    assert not list((tmp_path / "out").glob("*.part"))
    # Error files: severity and code only; the server's free text may name a patient.
    outcomes = [str(e.get("outcome")) for e in logs if e["event"] == "bulk_export_error"]
    assert outcomes == ["error processing"]
    assert "could not be exported" not in str(logs)
    assert httpx_mock.get_requests()[-1].method == "DELETE"


def test_group_export_without_since_and_files_without_token(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    _kickoff(httpx_mock, url=f"{BASE}/Group/iop-panel/$export?_type=Encounter")
    httpx_mock.add_response(
        url=STATUS,
        json={
            "transactionTime": "2026-03-08T07:00:00Z",
            "requiresAccessToken": False,
            "output": [{"type": "Encounter", "url": f"{FILES}/e.ndjson"}],
        },
    )
    httpx_mock.add_response(url=f"{FILES}/e.ndjson", content=ENCOUNTERS_A)
    httpx_mock.add_response(url=STATUS, method="DELETE")
    with _client(make_ehr, sleeps) as client:
        result = bulk_export(
            client, resource_types=["Encounter"], since=None, out_dir=tmp_path, group_id="iop-panel"
        )
    assert result.lines == {"Encounter": 1}
    assert result.error_files == []
    download = httpx_mock.get_requests(url=f"{FILES}/e.ndjson")[0]
    assert "Authorization" not in download.headers


def test_429_while_polling_backs_off(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    _kickoff(httpx_mock)
    httpx_mock.add_response(url=STATUS, status_code=429, headers={"Retry-After": "30"})
    httpx_mock.add_response(url=STATUS, status_code=202)
    httpx_mock.add_response(url=STATUS, json={"transactionTime": "2026-03-08T07:00:00Z", "output": []})
    httpx_mock.add_response(url=STATUS, method="DELETE")
    with _client(make_ehr, sleeps) as client:
        result = bulk_export(
            client, resource_types=["Patient", "Encounter"], since="2026-01-01T00:00:00Z", out_dir=tmp_path
        )
    assert result.files == {}
    # The server's wait, then our schedule (a tenth of the 30 s so far) doubled after the push-back.
    assert sleeps.slept == [30.0, POLL_FRACTION * 30.0 * 2]


def test_a_failed_job_raises_with_diagnostics(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    _kickoff(httpx_mock)
    httpx_mock.add_response(
        url=STATUS,
        status_code=500,
        json={
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "fatal", "code": "exception", "diagnostics": "Export job aborted"}],
        },
    )
    with (
        _client(make_ehr, sleeps) as client,
        pytest.raises(BulkExportError, match=r"job failed.*HTTP 500.*fatal exception") as caught,
    ):
        bulk_export(
            client, resource_types=["Patient", "Encounter"], since="2026-01-01T00:00:00Z", out_dir=tmp_path
        )
    assert "Export job aborted" not in str(caught.value)
    assert sleeps.slept == []  # a 500 that is not "transient" ends the job at once


def test_a_transient_status_error_keeps_polling(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    _kickoff(httpx_mock)
    httpx_mock.add_response(
        url=STATUS,
        status_code=500,
        json={"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient"}]},
    )
    httpx_mock.add_response(url=STATUS, json={"transactionTime": "2026-03-08T07:00:00Z", "output": []})
    httpx_mock.add_response(url=STATUS, method="DELETE")
    with _client(make_ehr, sleeps) as client:
        bulk_export(
            client, resource_types=["Patient", "Encounter"], since="2026-01-01T00:00:00Z", out_dir=tmp_path
        )
    assert len(sleeps.slept) == 1


def test_a_download_that_fails_for_good_still_deletes_the_job(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    _kickoff(httpx_mock)
    manifest = _manifest(output=[{"type": "Patient", "url": f"{FILES}/gone.ndjson"}], error=[])
    httpx_mock.add_response(url=STATUS, json=manifest)
    httpx_mock.add_response(url=f"{FILES}/gone.ndjson", status_code=404)
    httpx_mock.add_response(url=STATUS, method="DELETE")
    with (
        _client(make_ehr, sleeps) as client,
        pytest.raises(BulkExportError, match=r"Patient.000.ndjson \(Patient\) could not be downloaded.*404"),
    ):
        bulk_export(
            client, resource_types=["Patient", "Encounter"], since="2026-01-01T00:00:00Z", out_dir=tmp_path
        )
    assert httpx_mock.get_requests()[-1].method == "DELETE"
    assert not list(tmp_path.glob("*.ndjson*"))


def test_a_download_broken_half_way_is_restarted(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    def broken() -> Iterator[bytes]:
        yield PATIENTS[:10]
        raise httpx.ReadError("connection reset")

    _kickoff(httpx_mock)
    httpx_mock.add_response(
        url=STATUS, json=_manifest(output=[{"type": "Patient", "url": f"{FILES}/p.ndjson"}], error=[])
    )
    httpx_mock.add_response(url=f"{FILES}/p.ndjson", stream=IteratorStream(broken()))
    httpx_mock.add_response(url=f"{FILES}/p.ndjson", content=PATIENTS)
    httpx_mock.add_response(url=STATUS, method="DELETE")
    with _client(make_ehr, sleeps) as client:
        result = bulk_export(
            client, resource_types=["Patient", "Encounter"], since="2026-01-01T00:00:00Z", out_dir=tmp_path
        )
    assert result.files["Patient"][0].read_bytes() == PATIENTS


def test_kickoff_without_status_url_is_an_error(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    httpx_mock.add_response(url=KICKOFF, status_code=202)
    with _client(make_ehr, sleeps) as client, pytest.raises(BulkExportError, match="Content-Location"):
        bulk_export(
            client, resource_types=["Patient", "Encounter"], since="2026-01-01T00:00:00Z", out_dir=tmp_path
        )


def test_an_export_that_never_finishes_is_cancelled(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    _kickoff(httpx_mock)
    httpx_mock.add_response(url=STATUS, status_code=202, headers={"Retry-After": "60"}, is_reusable=True)
    httpx_mock.add_response(url=STATUS, method="DELETE")
    with _client(make_ehr, sleeps) as client, pytest.raises(BulkExportError, match="still running"):
        bulk_export(
            client,
            resource_types=["Patient", "Encounter"],
            since="2026-01-01T00:00:00Z",
            out_dir=tmp_path,
            poll_timeout=300,
        )
    # Our schedule (a tenth of the time so far, 1 s at least, 60 s at most), never the server's 60 s.
    expected: list[float] = []
    elapsed = 0.0
    while True:
        wait = min(60.0, max(POLL_START, POLL_FRACTION * elapsed))
        if elapsed + wait > 300:
            break
        expected.append(wait)
        elapsed += wait
    assert sleeps.slept == pytest.approx(expected)
    assert expected[:10] == [POLL_START] * 10
    assert 20 < max(expected) < 30
    assert httpx_mock.get_requests()[-1].method == "DELETE"


@given(
    lines=st.lists(st.text(alphabet=st.characters(codec="utf-8"), min_size=1), max_size=8),
    size=st.integers(min_value=1, max_value=17),
)
def test_copy_lines_is_independent_of_chunk_boundaries(lines: list[str], size: int) -> None:
    data = b"".join(orjson.dumps({"text": line}) + b"\n" for line in lines)  # raw U+2028 etc. stay inside
    sink = io.BytesIO()
    written = _copy_lines(iter([data[i : i + size] for i in range(0, len(data), size)]), sink).written
    assert written == len(lines)
    assert sink.getvalue() == data


def test_a_refused_kickoff_is_a_bulk_export_error_with_diagnostics(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    httpx_mock.add_response(
        url=f"{BASE}/Group/g1/$export?_type=Encounter",
        status_code=400,
        json={
            "resourceType": "OperationOutcome",
            "issue": [
                {"severity": "error", "code": "processing", "diagnostics": "Group requested too recently"}
            ],
        },
    )
    with (
        _client(make_ehr, sleeps) as client,
        pytest.raises(BulkExportError, match=r"kick-off refused.*error processing"),
    ):
        bulk_export(client, resource_types=["Encounter"], since=None, out_dir=tmp_path, group_id="g1")
    assert len(httpx_mock.get_requests()) == 1


def test_poll_wait_is_capped_by_the_connection_setting(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    _kickoff(httpx_mock)
    polls: list[int] = []

    def status(request: httpx.Request) -> httpx.Response:
        polls.append(1)
        if len(polls) <= 40:
            return httpx.Response(202, headers={"Retry-After": "120"})
        return httpx.Response(200, json={"transactionTime": "2026-03-08T07:00:00Z", "output": []})

    httpx_mock.add_callback(status, url=STATUS, method="GET", is_reusable=True)
    httpx_mock.add_response(url=STATUS, method="DELETE")
    ehr = make_ehr(auth={"kind": "bearer", "token": "tok"}, bulk_poll_max_seconds=5)
    with EhrClient(ehr, sleep=sleeps, clock=sleeps.clock) as client:
        bulk_export(
            client, resource_types=["Patient", "Encounter"], since="2026-01-01T00:00:00Z", out_dir=tmp_path
        )
    # HAPI asks for 120 s on every poll; we follow our schedule, and the connection allows at most 5.
    assert len(sleeps.slept) == 40
    assert sleeps.slept[:10] == [1.0] * 10
    assert max(sleeps.slept) == 5.0
    assert sleeps.slept[-5:] == [5.0] * 5


def test_a_retry_after_shorter_than_the_schedule_is_honoured_but_never_below_the_minimum(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    _kickoff(httpx_mock, f"{BASE}/$export?_type=Encounter")
    for asked in ("0", "1", "1"):
        httpx_mock.add_response(url=STATUS, status_code=202, headers={"Retry-After": asked})
    httpx_mock.add_response(url=STATUS, json={"transactionTime": "2026-03-08T07:00:00Z", "output": []})
    httpx_mock.add_response(url=STATUS, method="DELETE")
    with _client(make_ehr, sleeps) as client:
        bulk_export(client, resource_types=["Encounter"], since=None, out_dir=tmp_path)
    assert sleeps.slept == [POLL_MIN, 1.0, 1.0]


def test_each_finished_file_is_announced_while_the_export_runs(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    _kickoff(httpx_mock)
    httpx_mock.add_response(url=STATUS, json=_manifest())
    httpx_mock.add_response(url=f"{FILES}/Patient-1.ndjson", content=PATIENTS)
    httpx_mock.add_response(url=f"{FILES}/Encounter-1.ndjson", content=ENCOUNTERS_A)
    httpx_mock.add_response(url=f"{FILES}/Encounter-2.ndjson", content=ENCOUNTERS_B)
    httpx_mock.add_response(url=f"{FILES}/errors.ndjson", content=ERRORS)
    httpx_mock.add_response(url=STATUS, method="DELETE", status_code=202)
    announced: list[tuple[str, bytes]] = []
    with _client(make_ehr, sleeps) as client:
        result = bulk_export(
            client,
            resource_types=["Patient", "Encounter"],
            since="2026-01-01T00:00:00Z",
            out_dir=tmp_path,
            on_file=lambda kind, path: announced.append((kind, path.read_bytes())),
        )
    # Every output file, complete on disk when announced; never the error file.
    expected = [(kind, path.read_bytes()) for kind, paths in result.files.items() for path in paths]
    assert sorted(announced) == sorted(expected)
    assert len(announced) == 3


def test_a_failing_file_callback_stops_the_export_and_still_deletes_the_job(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    _kickoff(httpx_mock, f"{BASE}/$export?_type=Patient")
    httpx_mock.add_response(url=STATUS, json=_manifest(output=[_manifest()["output"][0]], error=[]))
    httpx_mock.add_response(url=f"{FILES}/Patient-1.ndjson", content=PATIENTS)
    httpx_mock.add_response(url=STATUS, method="DELETE", status_code=202)

    def refuse(kind: str, path: Path) -> None:
        raise RuntimeError("the consumer gave up")

    with _client(make_ehr, sleeps) as client, pytest.raises(RuntimeError, match="gave up"):
        bulk_export(client, resource_types=["Patient"], since=None, out_dir=tmp_path, on_file=refuse)
    assert httpx_mock.get_requests()[-1].method == "DELETE"


def test_a_caller_that_gives_up_cancels_the_export_and_deletes_the_job(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    _kickoff(httpx_mock, f"{BASE}/$export?_type=Encounter")
    httpx_mock.add_response(url=STATUS, status_code=202, is_reusable=True)
    httpx_mock.add_response(url=STATUS, method="DELETE", status_code=202)
    asked: list[int] = []

    def stop_on_third_look() -> bool:
        asked.append(1)
        return len(asked) >= 3

    with _client(make_ehr, sleeps) as client, pytest.raises(BulkExportError, match="cancelled"):
        bulk_export(
            client, resource_types=["Encounter"], since=None, out_dir=tmp_path, should_stop=stop_on_third_look
        )
    polls = [r for r in httpx_mock.get_requests() if r.method == "GET" and r.url == STATUS]
    assert len(polls) == 2
    assert httpx_mock.get_requests()[-1].method == "DELETE"


# -- where the access token goes (issue 10, item 11) ---------------------------------------------


def _export_with(
    httpx_mock: HTTPXMock,
    client: EhrClient,
    tmp_path: Path,
    manifest: dict[str, Any],
    status_url: str = STATUS,
) -> Any:
    httpx_mock.add_response(url=KICKOFF, status_code=202, headers={"Content-Location": status_url})
    httpx_mock.add_response(url=status_url, json=manifest)
    httpx_mock.add_response(url=status_url, method="DELETE", is_optional=True)
    return bulk_export(
        client, resource_types=["Patient", "Encounter"], since="2026-01-01T00:00:00Z", out_dir=tmp_path
    )


def _token_client(make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, **overrides: Any) -> EhrClient:
    ehr = make_ehr(auth={"kind": "bearer", "token": "tok"}, **overrides)
    return EhrClient(ehr, sleep=sleeps, clock=sleeps.clock)


def _one_file(url: str, requires: object = True) -> dict[str, Any]:
    return {
        "transactionTime": "2026-03-08T07:00:00Z",
        "requiresAccessToken": requires,
        "output": [{"type": "Patient", "url": url}],
    }


def test_the_token_never_goes_to_a_file_host_outside_the_allow_list(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    with (
        _token_client(make_ehr, sleeps) as client,
        pytest.raises(BulkExportError, match=r"files\.example\.net.*bulk_file_hosts"),
    ):
        _export_with(httpx_mock, client, tmp_path, _one_file(f"{FILES}/p.ndjson"))
    assert httpx_mock.get_requests(url=f"{FILES}/p.ndjson") == []


def test_the_token_never_goes_over_plain_http_even_to_an_allowed_host(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    url = "http://files.example.net/exports/p.ndjson"
    with (
        _token_client(make_ehr, sleeps, bulk_file_hosts=["files.example.net"]) as client,
        pytest.raises(BulkExportError, match=r"https"),
    ):
        _export_with(httpx_mock, client, tmp_path, _one_file(url))
    assert httpx_mock.get_requests(url=url) == []


def test_an_allow_listed_https_file_host_gets_the_token(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    httpx_mock.add_response(url=f"{FILES}/p.ndjson", content=PATIENTS)
    with _token_client(make_ehr, sleeps, bulk_file_hosts=["Files.Example.Net"]) as client:
        result = _export_with(httpx_mock, client, tmp_path, _one_file(f"{FILES}/p.ndjson"))
    assert result.lines == {"Patient": 2}
    assert httpx_mock.get_requests(url=f"{FILES}/p.ndjson")[0].headers["Authorization"] == "Bearer tok"


@pytest.mark.parametrize("requires", ["false", "true", 1, None])
def test_only_json_true_asks_for_the_token(
    httpx_mock: HTTPXMock,
    make_ehr: Callable[..., EhrConfig],
    sleeps: Sleeps,
    tmp_path: Path,
    requires: object,
) -> None:
    httpx_mock.add_response(url=f"{FILES}/p.ndjson", content=PATIENTS)
    with _token_client(make_ehr, sleeps, bulk_file_hosts=["files.example.net"]) as client:
        _export_with(httpx_mock, client, tmp_path, _one_file(f"{FILES}/p.ndjson", requires))
    assert "Authorization" not in httpx_mock.get_requests(url=f"{FILES}/p.ndjson")[0].headers


def test_a_status_url_on_a_foreign_host_is_refused(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    foreign = "https://status.attacker.example/job-1"
    httpx_mock.add_response(url=KICKOFF, status_code=202, headers={"Content-Location": foreign})
    with (
        _token_client(make_ehr, sleeps, bulk_file_hosts=["files.example.net"]) as client,
        pytest.raises(BulkExportError, match=r"status URL.*status\.attacker\.example"),
    ):
        bulk_export(
            client, resource_types=["Patient", "Encounter"], since="2026-01-01T00:00:00Z", out_dir=tmp_path
        )
    assert [r.url.host for r in httpx_mock.get_requests()] == ["ehr.example.org"]


# -- line caps (issue 10, item 16) ------------------------------------------------------------------


def test_a_line_over_the_cap_is_skipped_and_named_with_its_size_and_the_rest_is_kept() -> None:
    chunks = iter([b'{"a":1}\n', b"x" * 40, b"y" * 40, b"\n", b'{"b":2}\n'])
    sink = io.BytesIO()
    copied = _copy_lines(chunks, sink, max_line_bytes=64)
    assert copied.written == 2
    assert copied.oversized == [(2, 80)]
    assert sink.getvalue() == b'{"a":1}\n{"b":2}\n'


def test_a_last_line_without_newline_over_the_cap_is_skipped_with_its_size() -> None:
    copied = _copy_lines(iter([b"x" * 5, b"x" * 5]), io.BytesIO(), max_line_bytes=8)
    assert (copied.written, copied.oversized) == (0, [(1, 10)])


def test_an_oversized_line_is_measured_to_its_end_across_many_chunks() -> None:
    chunks = (b"x" * 1000 for _ in range(10_000))  # one 10 MB line in 1 kB chunks
    copied = _copy_lines(chunks, io.BytesIO(), max_line_bytes=4096)
    assert copied.oversized == [(1, 10_000_000)]


def test_lines_up_to_the_cap_pass_whatever_the_chunking() -> None:
    sink = io.BytesIO()
    assert _copy_lines(iter([b"abcd", b"efgh\nij", b"kl\r\n"]), sink, max_line_bytes=8).written == 2
    assert sink.getvalue() == b"abcdefgh\nijkl\n"


def test_a_bulk_file_with_a_line_over_the_cap_keeps_the_rest_and_reports_the_line(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps, tmp_path: Path
) -> None:
    content = (
        b'{"resourceType":"Patient","id":"a"}\n' + b"x" * 5000 + b'\n{"resourceType":"Patient","id":"b"}\n'
    )
    httpx_mock.add_response(url=f"{FILES}/p.ndjson", content=content)
    with _token_client(
        make_ehr, sleeps, bulk_file_hosts=["files.example.net"], max_line_bytes=4096
    ) as client:
        result = _export_with(httpx_mock, client, tmp_path, _one_file(f"{FILES}/p.ndjson"))
    assert result.lines == {"Patient": 2}
    assert [(o.file, o.resource_type, o.line, o.size) for o in result.oversized] == [
        ("Patient.000.ndjson", "Patient", 2, 5000)
    ]
    assert "line 2 of Patient.000.ndjson (Patient) is 5000 bytes, over max_line_bytes (4096)" in (
        result.oversized[0].reason(4096)
    )
    assert (tmp_path / "Patient.000.ndjson").read_bytes().count(b"\n") == 2
    assert not list(tmp_path.glob("*.part"))

"""Search: queries as values, paging with absolute next links, OperationOutcome entries, failing pages."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pytest_httpx import HTTPXMock
from structlog.testing import capture_logs

from connectors.config import EhrConfig
from connectors.errors import EhrError
from connectors.http import EhrClient
from connectors.search import SearchQuery, search_pages
from tests.unit.connectors.conftest import BASE, Sleeps


def _bundle(*entries: dict[str, Any], next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "self", "url": "ignored"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {"resourceType": "Bundle", "type": "searchset", "link": links, "entry": list(entries)}


def _match(resource: dict[str, Any]) -> dict[str, Any]:
    return {"resource": resource, "search": {"mode": "match"}}


# -- SearchQuery ---------------------------------------------------------------------------------


def test_refinements_return_new_queries() -> None:
    base = SearchQuery("Encounter")
    refined = base.where(status="finished").param("subject:Patient", "p1").count(50).count(20)
    assert base.params == ()
    assert refined.params == (("status", "finished"), ("subject:Patient", "p1"), ("_count", "20"))
    assert refined.value("_count") == "20"
    assert refined.has("status")
    assert not refined.without("status").has("status")


def test_since_needs_a_zone() -> None:
    assert SearchQuery("Encounter").since("2026-03-01T10:00:00Z").params == (
        ("_lastUpdated", "gt2026-03-01T10:00:00Z"),
    )
    aware = datetime(2026, 3, 1, 10, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert SearchQuery("Encounter").since(aware).value("_lastUpdated") == "gt2026-03-01T10:00:00-05:00"
    assert SearchQuery("Encounter").since("2026-03-01").value("_lastUpdated") == "gt2026-03-01"
    with pytest.raises(ValueError, match="zone"):
        SearchQuery("Encounter").since("2026-03-01T10:00:00")
    with pytest.raises(ValueError, match="timezone-aware"):
        SearchQuery("Encounter").since(datetime(2026, 3, 1, 10, 0))  # naive on purpose


@given(st.lists(st.tuples(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.text(max_size=8)), max_size=6))
def test_params_keep_order_and_repeats(pairs: list[tuple[str, str]]) -> None:
    query = SearchQuery("Patient")
    for name, value in pairs:
        query = query.param(name, value)
    assert query.params == tuple(pairs)


# -- paging --------------------------------------------------------------------------------------


def test_pages_follow_absolute_next_links_as_given(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    next_url = "https://ehr.example.org/r4/tenant-1?_getpages=c0ffee&_getpagesoffset=2&_count=2&_bundletype=searchset"
    httpx_mock.add_response(
        url=f"{BASE}/Encounter?status=finished&_count=2",
        json=_bundle(
            _match({"resourceType": "Encounter", "id": "e1"}),
            _match({"resourceType": "Encounter", "id": "e2"}),
            next_url=next_url,
        ),
    )
    httpx_mock.add_response(url=next_url, json=_bundle(_match({"resourceType": "Encounter", "id": "e3"})))
    with EhrClient(make_ehr(page_size=2), sleep=sleeps, clock=sleeps.clock) as client:
        pages = list(search_pages(client, SearchQuery("Encounter").where(status="finished")))
        assert client.stats.pages == 2
    assert [[r["id"] for r in p.resources] for p in pages] == [["e1", "e2"], ["e3"]]
    assert str(httpx_mock.get_requests()[1].url) == next_url
    assert pages[0].url == f"{BASE}/Encounter?status=finished&_count=2"
    assert pages[1].url == next_url


def test_vendor_required_params_and_count_are_added(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=f"{BASE}/CarePlan?patient=p1&category=assess-plan&_count=100", json=_bundle())
    httpx_mock.add_response(url=f"{BASE}/CarePlan?category=other&patient=p1&_count=5", json=_bundle())
    with EhrClient(make_ehr(vendor="epic", page_size=100), sleep=sleeps, clock=sleeps.clock) as client:
        implicit = list(search_pages(client, SearchQuery("CarePlan").for_patient("p1")))
        explicit = SearchQuery("CarePlan").where(category="other").for_patient("p1").count(5)
        assert len(implicit) == len(list(search_pages(client, explicit))) == 1


def test_operation_outcome_entries_are_not_data(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    warning = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "warning",
                "code": "processing",
                "details": {"coding": [{"code": "MSG_NO_MATCH"}]},
                "diagnostics": "1 resource omitted",
            }
        ],
    }
    inline = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational"}],
    }
    httpx_mock.add_response(
        json=_bundle(
            _match({"resourceType": "Encounter", "id": "e1"}),
            {"resource": warning, "search": {"mode": "outcome"}},
            {"resource": inline},
        )
    )
    with (
        EhrClient(make_ehr(), sleep=sleeps, clock=sleeps.clock) as client,
        capture_logs() as logs,
    ):
        (page,) = search_pages(client, SearchQuery("Encounter"))
    assert [r["id"] for r in page.resources] == ["e1"]
    assert page.outcomes == [warning, inline]
    logged = [e for e in logs if e["event"] == "search_outcome"]
    assert logged[0]["code"] == "processing"
    assert logged[0]["details"] == ["MSG_NO_MATCH"]
    assert "1 resource omitted" not in str(logged)  # free text only with log_server_text
    assert logged[0]["resource"] == "Encounter"


def test_a_failing_page_names_ehr_type_and_diagnostics(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    next_url = f"{BASE}?_getpages=x&_getpagesoffset=1"
    httpx_mock.add_response(url=f"{BASE}/Encounter?_count=200", json=_bundle(next_url=next_url))
    httpx_mock.add_response(
        url=next_url,
        status_code=410,
        json={
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "not-found", "diagnostics": "Search id expired"}],
        },
    )
    with EhrClient(make_ehr(), sleep=sleeps, clock=sleeps.clock) as client:
        pages = search_pages(client, SearchQuery("Encounter"))
        next(pages)
        with pytest.raises(EhrError) as caught:
            next(pages)
    message = str(caught.value)
    assert "Encounter search, page 2" in message
    assert "test-ehr" in message
    assert "error not-found" in message
    assert "Search id expired" not in message
    assert caught.value.status == 410


def test_a_non_bundle_answer_is_an_error(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    httpx_mock.add_response(
        json={"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "too-costly"}]}
    )
    with (
        EhrClient(make_ehr(), sleep=sleeps, clock=sleeps.clock) as client,
        pytest.raises(EhrError, match=r"Encounter search, page 1: expected a Bundle.*too-costly"),
    ):
        list(search_pages(client, SearchQuery("Encounter")))


def test_a_next_link_back_to_the_first_page_is_stopped(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    first = f"{BASE}/Patient?_count=200"
    httpx_mock.add_response(url=first, json=_bundle(next_url=first))
    with (
        EhrClient(make_ehr(), sleep=sleeps, clock=sleeps.clock) as client,
        pytest.raises(EhrError, match="paging loop"),
    ):
        list(search_pages(client, SearchQuery("Patient")))


def test_a_next_link_loop_is_stopped(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    page2 = f"{BASE}?page=2"
    httpx_mock.add_response(url=f"{BASE}/Patient?_count=200", json=_bundle(next_url=page2))
    httpx_mock.add_response(url=page2, json=_bundle(next_url=page2))
    with (
        EhrClient(make_ehr(), sleep=sleeps, clock=sleeps.clock) as client,
        pytest.raises(EhrError, match="paging loop"),
    ):
        list(search_pages(client, SearchQuery("Patient")))


def test_queries_are_hashable_values() -> None:
    one = SearchQuery("Encounter").since(datetime(2026, 1, 1, tzinfo=UTC))
    two = SearchQuery("Encounter").since(datetime(2026, 1, 1, tzinfo=UTC))
    assert one == two
    assert hash(one) == hash(two)


def test_a_page_over_max_page_bytes_stops_the_search_naming_type_page_and_cap(
    httpx_mock: HTTPXMock, make_ehr: Callable[..., EhrConfig], sleeps: Sleeps
) -> None:
    next_url = f"{BASE}?_getpages=abc&_getpagesoffset=2"
    httpx_mock.add_response(
        url=f"{BASE}/Encounter?_count=2",
        json=_bundle(_match({"resourceType": "Encounter", "id": "e1"}), next_url=next_url),
    )
    big = [
        _match({"resourceType": "Encounter", "id": f"e{i}", "text": {"div": "x" * 100}}) for i in range(60)
    ]
    httpx_mock.add_response(url=next_url, json=_bundle(*big))
    with EhrClient(make_ehr(page_size=2, max_page_bytes=4096), sleep=sleeps, clock=sleeps.clock) as client:
        pages = search_pages(client, SearchQuery("Encounter"))
        assert [r["id"] for r in next(pages).resources] == ["e1"]
        with pytest.raises(
            EhrError, match=r"Encounter search, page 2: test-ehr: GET .*max_page_bytes \(4096"
        ):
            next(pages)

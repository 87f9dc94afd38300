"""FHIR search: queries as immutable values, and paging through a searchset.

``search_pages`` adds the vendor's required parameters and ``_count``, then follows
``Bundle.link[relation=next]`` exactly as the server gives it (absolute URLs, opaque tokens). Entries
with ``search.mode = outcome`` and OperationOutcome resources are warnings from the server, not data:
they go to ``SearchPage.outcomes`` and are logged with their codes (diagnostics only with
``log_server_text``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import httpx
import structlog

from connectors.errors import EhrError
from connectors.http import EhrClient, outcome_codes, outcome_diagnostics

__all__ = ["SearchPage", "SearchQuery", "search_pages"]

log = structlog.get_logger()

# A FHIR dateTime with a time part must carry a zone: the server would read a naive one in its own.
_NAIVE_TIME = re.compile(r"T\d{2}:\d{2}(:\d{2}(\.\d+)?)?$")


@dataclass(frozen=True)
class SearchQuery:
    """A search on one resource type; every refinement returns a new query."""

    resource_type: str
    params: tuple[tuple[str, str], ...] = ()

    def where(self, **params: str) -> SearchQuery:
        """Add parameters (repeats are kept: ``_lastUpdated`` may appear twice)."""
        return replace(self, params=self.params + tuple(params.items()))

    def param(self, name: str, value: str) -> SearchQuery:
        """Add one parameter whose name is not a Python identifier (``subject:Patient``, ``_has:…``)."""
        return replace(self, params=(*self.params, (name, value)))

    def without(self, name: str) -> SearchQuery:
        return replace(self, params=tuple(p for p in self.params if p[0] != name))

    def count(self, n: int) -> SearchQuery:
        """Page size (replaces any earlier ``_count``)."""
        if n < 1:
            raise ValueError("_count must be at least 1")
        return self.without("_count").param("_count", str(n))

    def since(self, instant: str | datetime) -> SearchQuery:
        """Only resources changed after ``instant`` (``_lastUpdated=gt…``); the instant must carry a zone."""
        if isinstance(instant, datetime):
            if instant.tzinfo is None or instant.utcoffset() is None:
                raise ValueError("since() needs a timezone-aware datetime")
            value = instant.isoformat()
        else:
            value = instant.strip()
            if _NAIVE_TIME.search(value):
                raise ValueError(f"since() needs a zone (Z or ±hh:mm) on {value!r}")
        return self.param("_lastUpdated", f"gt{value}")

    def for_patient(self, patient_id: str) -> SearchQuery:
        return self.param("patient", patient_id)

    def has(self, name: str) -> bool:
        return any(p[0] == name for p in self.params)

    def value(self, name: str) -> str | None:
        """The first value of parameter ``name``."""
        return next((v for k, v in self.params if k == name), None)


@dataclass
class SearchPage:
    """One page of a searchset: its URL, the data, and the server's OperationOutcomes."""

    url: str
    #: The data, as sent: an entry whose ``resource`` is not a JSON object stays here too, so the
    #: pull's validation rejects it with its reason instead of it vanishing.
    resources: list[Any] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)


def search_pages(client: EhrClient, query: SearchQuery) -> Iterator[SearchPage]:
    """Every page of ``query`` on the client's EHR, in server order."""
    query = _complete(client, query)
    url: str | None = client.url(query.resource_type)
    params: tuple[tuple[str, str], ...] | None = query.params
    seen: set[str] = set()
    number = 0
    while url is not None:
        number += 1
        bundle = _fetch(client, query.resource_type, url, params, number)
        page = _split(bundle, url if params is None else str(httpx.URL(url).copy_merge_params(params)))
        client.count("pages")
        _log_outcomes(client, query.resource_type, page.outcomes)
        log.debug(
            "search_page",
            ehr=client.ehr.name,
            resource=query.resource_type,
            page=number,
            count=len(page.resources),
        )
        yield page
        seen.add(page.url)
        url, params = next_link(bundle), None
        if url is not None and url in seen:
            raise EhrError(
                f"{client.ehr.name}: {query.resource_type} search: the next link of page {number} "
                "repeats an earlier page (paging loop)",
                ehr=client.ehr.name,
            )


def _complete(client: EhrClient, query: SearchQuery) -> SearchQuery:
    for name, value in client.profile.params_for(query.resource_type):
        if not query.has(name):
            query = query.param(name, value)
    if not query.has("_count"):
        query = query.count(client.ehr.page_size)
    return query


def _fetch(
    client: EhrClient,
    resource_type: str,
    url: str,
    params: tuple[tuple[str, str], ...] | None,
    number: int,
) -> dict[str, Any]:
    try:
        bundle = client.get_json(url, params=params)
    except EhrError as exc:
        raise type(exc)(
            f"{resource_type} search, page {number}: {exc}",
            ehr=exc.ehr,
            status=exc.status,
            response=exc.response,
        ) from exc
    if bundle.get("resourceType") != "Bundle":
        found = bundle.get("resourceType")
        detail = outcome_diagnostics(bundle, free_text=client.ehr.log_server_text)
        raise EhrError(
            f"{client.ehr.name}: {resource_type} search, page {number}: expected a Bundle, got {found!r}"
            + (f": {detail}" if detail else ""),
            ehr=client.ehr.name,
        )
    return bundle


def _split(bundle: dict[str, Any], url: str) -> SearchPage:
    page = SearchPage(url=url)
    for entry in bundle.get("entry") or []:
        if not isinstance(entry, dict):
            page.resources.append(entry)  # not an entry at all: rejected downstream with its reason
            continue
        resource = entry.get("resource")
        mode = (entry.get("search") or {}).get("mode")
        if not isinstance(resource, dict):
            page.resources.append(resource)
            continue
        if mode == "outcome" or resource.get("resourceType") == "OperationOutcome":
            page.outcomes.append(resource)
        else:
            page.resources.append(resource)
    return page


def next_link(bundle: Mapping[str, Any]) -> str | None:
    """The URL of a Bundle's ``next`` page, exactly as the server gave it, or None on the last page."""
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


def _log_outcomes(client: EhrClient, resource_type: str, outcomes: list[dict[str, Any]]) -> None:
    for outcome in outcomes:
        for issue in outcome.get("issue") or []:
            if not isinstance(issue, dict):
                continue
            text = (
                {"diagnostics": str(issue.get("diagnostics") or "")[:300]}
                if client.ehr.log_server_text
                else {}
            )
            log.warning(
                "search_outcome",
                ehr=client.ehr.name,
                resource=resource_type,
                severity=issue.get("severity"),
                code=issue.get("code"),
                details=outcome_codes(issue.get("details")),
                **text,
            )

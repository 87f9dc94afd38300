"""Deletions the server reports: Bulk Data ``deleted`` files and type-level ``_history``.

Both speak the same shape: Bundle entries whose ``request.method`` is ``DELETE`` and whose
``request.url`` names the resource (``Type/id``, optionally ``/_history/version``, relative or absolute).

- Bulk Data (``_since`` exports): the manifest's ``deleted`` array lists NDJSON files, one Bundle a line.
  The spec gives no time per entry; the deletion happened before the export's ``transactionTime``.
- Search mode: ``GET [base]/Type/_history?_since=…`` where the vendor profile allows it
  (``VendorProfile.reads_history_deletes``) and the CapabilityStatement offers ``history-type`` for the
  type. A DELETE entry's ``response.lastModified`` (where the server sends it; HAPI does not) stamps the
  deletion. Only the newest entry of an id counts: a resource deleted and re-created is not deleted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
import structlog

from connectors.errors import EhrError
from connectors.http import EhrClient
from connectors.search import next_link
from connectors.store import Deletion

__all__ = ["bundle_file_deletions", "history_deletions", "offers_history_type"]

log = structlog.get_logger()

_TARGET = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/?#]*)?(?:[?#].*)?$")
_VERSION = re.compile(r"/_history/(\d{1,18})(?:[?#].*)?$")
_ETAG = re.compile(r'^(?:W/)?"(\d{1,18})"$')
_DIGITS = re.compile(r"^(\d{1,18})$")
_MAX_PAGES = 10_000  # a paging loop that never repeats a URL still ends


def offers_history_type(capability: Mapping[str, Any], resource_type: str) -> bool:
    """Whether ``rest[mode=server].resource[type]`` lists the ``history-type`` interaction."""
    for rest in capability.get("rest") or []:
        if not isinstance(rest, dict) or rest.get("mode") not in (None, "server"):
            continue
        for resource in rest.get("resource") or []:
            if isinstance(resource, dict) and resource.get("type") == resource_type:
                codes = {i.get("code") for i in resource.get("interaction") or [] if isinstance(i, dict)}
                return "history-type" in codes
    return False


def _entry_deletion(entry: object, resource_type: str | None, when: str | None) -> Deletion | None:
    """The deletion an entry reports, or None (not a DELETE, or a URL naming no resource)."""
    if not isinstance(entry, dict):
        return None
    request = entry.get("request")
    if not isinstance(request, dict) or str(request.get("method", "")).upper() != "DELETE":
        return None
    match = _TARGET.search(str(request.get("url") or "").strip())
    if match is None or (resource_type is not None and match.group(1) != resource_type):
        return None
    response = entry.get("response")
    modified = response.get("lastModified") if isinstance(response, dict) else None
    return Deletion(match.group(1), match.group(2), modified if isinstance(modified, str) else when)


def _newest(entries: Iterable[tuple[str, Deletion | None, int | None]]) -> list[Deletion]:
    """Per id, its newest entry, kept only when it is a DELETE.

    A history lists the newest versions first (FHIR R4 3.1.0.5.3), so the first entry of an id is its
    newest; a higher version number (``…/_history/N``, else the ETag) seen later still wins.
    """
    newest: dict[str, tuple[int | None, Deletion | None]] = {}
    for resource_id, deletion, version in entries:
        held = newest.get(resource_id)
        if held is None or (version is not None and held[0] is not None and version > held[0]):
            newest[resource_id] = (version, deletion)
    return [d for _, d in newest.values() if d is not None]


def _version_of(entry: Mapping[str, Any]) -> int | None:
    request = entry.get("request")
    match = _VERSION.search(str(request.get("url") or "")) if isinstance(request, dict) else None
    if match is None:
        response = entry.get("response")
        match = _ETAG.match(str(response.get("etag") or "")) if isinstance(response, dict) else None
    if match is None:
        resource = entry.get("resource")
        meta = resource.get("meta") if isinstance(resource, dict) else None
        match = _DIGITS.match(str(meta.get("versionId") or "")) if isinstance(meta, dict) else None
    return int(match.group(1)) if match else None


def history_deletions(client: EhrClient, resource_type: str, since: str) -> list[Deletion]:
    """The ids of ``resource_type`` whose newest change since ``since`` is a deletion."""
    url: str | None = client.url(f"{resource_type}/_history")
    params: list[tuple[str, str]] | None = [("_since", since), ("_count", str(client.ehr.page_size))]
    seen: set[str] = set()
    found: list[tuple[str, Deletion | None, int | None]] = []
    for number in range(1, _MAX_PAGES + 1):
        if url is None:
            break
        bundle = client.get_json(url, params=params)
        if bundle.get("resourceType") != "Bundle":
            raise EhrError(
                f"{client.ehr.name}: {resource_type}/_history page {number}: expected a Bundle, "
                f"got {bundle.get('resourceType')!r}",
                ehr=client.ehr.name,
            )
        client.count("pages")
        for entry in bundle.get("entry") or []:
            if not isinstance(entry, dict):
                continue
            deletion = _entry_deletion(entry, resource_type, None)
            resource = entry.get("resource")
            if deletion is not None:
                found.append((deletion.id, deletion, _version_of(entry)))
            elif isinstance(resource, dict) and isinstance(resource.get("id"), str):
                found.append((resource["id"], None, _version_of(entry)))
        seen.add(url if params is None else url + "?" + "&".join(f"{k}={v}" for k, v in params))
        url, params = next_link(bundle), None
        if url is not None and url in seen:
            raise EhrError(
                f"{client.ehr.name}: {resource_type}/_history: the next link of page {number} repeats "
                "an earlier page (paging loop)",
                ehr=client.ehr.name,
            )
    return _newest(found)


def bundle_file_deletions(path: Path, when: str) -> tuple[list[Deletion], int]:
    """The deletions of one Bulk Data ``deleted`` file (NDJSON of Bundles), each stamped ``when``.

    Returns them and how many lines or entries could not be read (counted, never logged with content).
    """
    deletions: list[Deletion] = []
    unreadable = 0
    with path.open("rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                bundle = orjson.loads(line)
            except orjson.JSONDecodeError:
                unreadable += 1
                continue
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                unreadable += 1
                continue
            for entry in bundle.get("entry") or []:
                deletion = _entry_deletion(entry, None, None)
                if deletion is None:
                    unreadable += 1
                else:
                    deletions.append(Deletion(deletion.resource_type, deletion.id, when))
    return deletions, unreadable

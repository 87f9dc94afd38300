"""Bulk Data ``$export`` (system or Group level): kick-off, status polling, NDJSON downloads.

Flow: kick-off with ``Prefer: respond-async`` -> ``202`` and ``Content-Location``; poll that status URL
(``202`` while running, passing ``X-Progress`` on; ``200`` with the manifest when done; ``4xx``/``5xx``
when the job failed); stream each output file to disk line by line, each download retried on its own
(``on_file`` hears of each finished file, so the caller can validate it while the others download);
fetch the manifest's ``error`` files (OperationOutcome NDJSON) and log what they say; ``DELETE`` the job
at the end so the server can free it (Oracle allows one export at a time per client). The next
``_since`` is the returned ``transaction_time``.

Polling schedule: every wait is a tenth of the time since the first poll, at least ``POLL_START`` (1 s)
and at most ``bulk_poll_max_seconds`` (60 s by default): an export that takes 4 s is seen done within
~1 s, one that takes an hour is polled about once a minute, and a poll never comes more than ~10% after
the job finished. A server's ``Retry-After`` can shorten a wait but lengthens it only up to that
schedule: servers give one fixed value whatever the job's size (HAPI says 120 s for an export done in
3), so honouring the first one blindly turned a 4-second export into a 60-second one. A 429 or 503 on a
poll doubles the schedule from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import orjson
import structlog

from connectors.errors import BulkExportError, EhrError, TemporaryEhrError
from connectors.http import (
    RETRY_AFTER_CAP,
    TEMPORARY_STATUSES,
    EhrClient,
    outcome_diagnostics,
    parse_retry_after,
)
from connectors.private import make_private_dir, open_private
from schemas.identifiers import resource_path

__all__ = ["BulkResult", "OversizedLine", "bulk_export"]

log = structlog.get_logger()

POLL_START = 1.0  # the shortest scheduled wait between status polls
POLL_FRACTION = 0.1  # each wait is this fraction of the time since the first poll (see the module docstring)
POLL_MIN = 0.5  # the shortest wait, even when a server says Retry-After: 0
POLL_MAX = RETRY_AFTER_CAP  # longest wait between polls, whatever the server asks
POLL_TIMEOUT = 12 * 3600.0  # Epic exports run on the operational database and can take hours
_NDJSON = "application/fhir+ndjson"


@dataclass
class BulkResult:
    """A finished export: where each type's NDJSON landed, and the server's error files."""

    transaction_time: str
    files: dict[str, list[Path]] = field(default_factory=dict)
    error_files: list[Path] = field(default_factory=list)
    deleted_files: list[Path] = field(default_factory=list)  # the manifest's ``deleted`` (Bundles of DELETEs)
    request_url: str = ""
    lines: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # OperationOutcome lines in the error files
    oversized: list[OversizedLine] = field(default_factory=list)  # lines over max_line_bytes, skipped


def bulk_export(
    client: EhrClient,
    *,
    resource_types: Sequence[str],
    since: str | None,
    out_dir: Path,
    group_id: str | None = None,
    on_progress: Callable[[str], None] | None = None,
    poll_timeout: float = POLL_TIMEOUT,
    on_file: Callable[[str, Path], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> BulkResult:
    """Run one export to completion and download its files into ``out_dir``.

    ``on_file(resource_type, path)`` is called (from a download thread) as each output file is complete
    on disk; an exception it raises stops the export (the job is still deleted). ``should_stop`` is asked
    before every status poll and every download: True cancels the export (``BulkExportError``, job
    deleted), so a caller that gave up does not wait for a long export to finish.
    """
    kickoff = f"{resource_path('Group', group_id)}/$export" if group_id else "$export"
    params = [("_type", ",".join(resource_types))]
    if since:
        params.append(("_since", since))
    try:
        response = client.request(
            "GET",
            kickoff,
            params=params,
            headers={"Prefer": "respond-async", "Accept": "application/fhir+json"},
        )
    except TemporaryEhrError:
        raise
    except EhrError as exc:  # e.g. Epic's "Group requested too recently", Oracle's one-export-at-a-time
        raise BulkExportError(
            f"$export kick-off refused: {exc}", ehr=exc.ehr, status=exc.status, response=exc.response
        ) from exc
    status_url = response.headers.get("Content-Location")
    if response.status_code != 202 or not status_url:
        raise BulkExportError(
            f"{client.ehr.name}: $export kick-off answered HTTP {response.status_code} "
            "without a Content-Location status URL",
            ehr=client.ehr.name,
            status=response.status_code,
            response=response,
        )
    refusal = client.token_refusal(status_url)
    if refusal is not None:  # its manifest would decide where the token goes: never trust a foreign one
        raise BulkExportError(
            f"{client.ehr.name}: $export status URL refused: {refusal}", ehr=client.ehr.name
        )
    log.info("bulk_export_started", ehr=client.ehr.name, types=len(resource_types), group=group_id)
    manifest = _poll(client, status_url, on_progress, poll_timeout, should_stop)
    try:
        return _download_all(client, manifest, out_dir, str(response.request.url), on_file, should_stop)
    finally:
        _delete_job(client, status_url)


def _poll(
    client: EhrClient,
    status_url: str,
    on_progress: Callable[[str], None] | None,
    timeout: float,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    started = client.clock()
    deadline = started + timeout
    cap = min(POLL_MAX, client.ehr.bulk_poll_max_seconds)
    pushback = 1.0
    while True:
        if should_stop is not None and should_stop():
            _delete_job(client, status_url)
            raise BulkExportError(f"{client.ehr.name}: $export cancelled", ehr=client.ehr.name)
        retries_before = client.stats.retries
        try:
            response = client.request(
                "GET",
                status_url,
                headers={"Accept": "application/json"},
                temporary=_poll_failure_is_temporary,
            )
        except EhrError as exc:
            raise BulkExportError(
                f"{client.ehr.name}: $export job failed: {exc}",
                ehr=client.ehr.name,
                status=exc.status,
                response=exc.response,
            ) from exc
        if response.status_code == 200:
            return _manifest(client, response.content)
        if response.status_code != 202:
            raise BulkExportError(
                f"{client.ehr.name}: $export status answered HTTP {response.status_code}",
                ehr=client.ehr.name,
                status=response.status_code,
                response=response,
            )
        progress = response.headers.get("X-Progress")
        if progress and on_progress is not None:
            on_progress(progress)
        if client.stats.retries > retries_before:
            pushback *= 2  # the server pushed back (429/503): poll less often from now on
        schedule = min(cap, max(POLL_START, POLL_FRACTION * (client.clock() - started)) * pushback)
        asked = parse_retry_after(response.headers.get("Retry-After"), client.clock())
        wait = max(POLL_MIN, min(asked, schedule) if asked is not None else schedule)
        if client.clock() + wait > deadline:
            _delete_job(client, status_url)
            raise BulkExportError(
                f"{client.ehr.name}: $export still running after {timeout:.0f}s; job cancelled",
                ehr=client.ehr.name,
            )
        log.debug("bulk_export_waiting", ehr=client.ehr.name, progress=progress, wait=wait, asked=asked)
        client.sleep(wait)


def _poll_failure_is_temporary(response: httpx.Response) -> bool:
    """Whether an error answer to a status poll is worth polling again.

    The spec: an error status means the job failed, unless its OperationOutcome says ``transient``.
    429 is always back-off; a 502/503/504 without an OperationOutcome comes from a proxy, not the job.
    """
    status = response.status_code
    if status == 429:
        return True
    if status not in TEMPORARY_STATUSES:
        return False
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = body.get("issue") or []
        return any(isinstance(i, dict) and i.get("code") == "transient" for i in issues)
    return status != 500


def _manifest(client: EhrClient, content: bytes) -> dict[str, Any]:
    try:
        manifest = orjson.loads(content)
    except orjson.JSONDecodeError:
        manifest = None
    if (
        not isinstance(manifest, dict)
        or not isinstance(manifest.get("transactionTime"), str)
        or not isinstance(manifest.get("output"), list)
    ):
        raise BulkExportError(
            f"{client.ehr.name}: $export manifest is not a JSON object with transactionTime and output",
            ehr=client.ehr.name,
        )
    return manifest


def _download_all(
    client: EhrClient,
    manifest: dict[str, Any],
    out_dir: Path,
    kickoff_url: str,
    on_file: Callable[[str, Path], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> BulkResult:
    make_private_dir(out_dir)  # downloads hold PHI: folder 0700, files 0600
    needs_token = manifest.get("requiresAccessToken") is True  # JSON true only: "false" is not true
    result = BulkResult(
        transaction_time=manifest["transactionTime"], request_url=str(manifest.get("request") or kickoff_url)
    )
    jobs: list[tuple[str, str, Path, int | None]] = []
    per_type: dict[str, int] = {}
    for item in manifest["output"]:
        kind, url = _item(client, item, needs_token)
        index = per_type.get(kind, 0)
        per_type[kind] = index + 1
        path = out_dir / f"{kind}.{index:03d}.ndjson"
        result.files.setdefault(kind, []).append(path)
        count = item.get("count")
        jobs.append((kind, url, path, count if isinstance(count, int) else None))
    for index, item in enumerate(manifest.get("error") or []):
        _, url = _item(client, item, needs_token)
        path = out_dir / f"_errors.{index:03d}.ndjson"
        result.error_files.append(path)
        jobs.append(("OperationOutcome", url, path, None))
    for index, item in enumerate(manifest.get("deleted") or []):
        _, url = _item(client, item, needs_token)
        path = out_dir / f"_deleted.{index:03d}.ndjson"
        result.deleted_files.append(path)
        jobs.append(("Bundle", url, path, None))

    def fetch(job: tuple[str, str, Path, int | None]) -> int:
        kind, url, path, expected = job
        if should_stop is not None and should_stop():
            raise BulkExportError(f"{client.ehr.name}: $export cancelled", ehr=client.ehr.name)
        try:
            copied = _download(client, url, path, needs_token)
        except EhrError as exc:
            raise BulkExportError(
                f"{client.ehr.name}: $export file {path.name} ({kind}) could not be downloaded: {exc}",
                ehr=client.ehr.name,
                status=exc.status,
                response=exc.response,
            ) from exc
        written = copied.written
        for number, size in copied.oversized:
            if path not in result.error_files:  # a server message lost is logged; data lost is a reject
                result.oversized.append(OversizedLine(path.name, kind, number, size))  # append: atomic
            log.warning("bulk_line_too_long", ehr=client.ehr.name, file=path.name, line=number, size=size)
        if expected is not None and expected != written + len(copied.oversized):
            log.warning(
                "bulk_count_mismatch", ehr=client.ehr.name, resource=kind, expected=expected, got=written
            )
        if on_file is not None and not path.name.startswith(("_errors.", "_deleted.")):
            on_file(kind, path)
        return written

    with ThreadPoolExecutor(max_workers=client.ehr.concurrency) as pool:
        counts = list(pool.map(fetch, jobs))
    for (kind, _, path, _), written in zip(jobs, counts, strict=True):
        if path in result.error_files:
            result.errors += written
        elif path not in result.deleted_files:
            result.lines[kind] = result.lines.get(kind, 0) + written
    for path in result.error_files:
        _log_error_file(client, path)
    log.info(
        "bulk_export_downloaded",
        ehr=client.ehr.name,
        files=sum(len(p) for p in result.files.values()),
        lines=sum(result.lines.values()),
        error_lines=result.errors,
    )
    return result


def _item(client: EhrClient, item: object, needs_token: bool) -> tuple[str, str]:
    if not isinstance(item, dict) or not isinstance(item.get("url"), str):
        raise BulkExportError(f"{client.ehr.name}: $export manifest entry without a url", ehr=client.ehr.name)
    refusal = client.token_refusal(item["url"]) if needs_token else None
    if refusal is not None:
        raise BulkExportError(
            f"{client.ehr.name}: $export file needs the access token, not sent: {refusal}",
            ehr=client.ehr.name,
        )
    kind = item.get("type")
    if not isinstance(kind, str) or not kind.isalnum():
        raise BulkExportError(
            f"{client.ehr.name}: $export manifest entry with an unusable type", ehr=client.ehr.name
        )
    return kind, item["url"]


def _download(client: EhrClient, url: str, path: Path, needs_token: bool) -> CopiedLines:
    """Stream one NDJSON file to ``path`` (via a ``.part`` file); the whole download is retried."""
    partial = path.with_name(path.name + ".part")
    try:
        for attempt in client.retrying():
            with attempt:
                with (
                    client.stream("GET", url, headers={"Accept": _NDJSON}, authorize=needs_token) as response,
                    open_private(partial) as sink,
                ):
                    copied = _copy_lines(response.iter_bytes(), sink, client.ehr.max_line_bytes)
                partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return copied


@dataclass(frozen=True)
class OversizedLine:
    """An NDJSON line of an export file longer than ``max_line_bytes``: skipped, the rest of the file
    kept. The pull records it as a reject naming the file, the line and its size (never its content)."""

    file: str
    resource_type: str
    line: int
    size: int

    def reason(self, cap: int) -> str:
        return (
            f"line {self.line} of {self.file} ({self.resource_type}) is {self.size} bytes, "
            f"over max_line_bytes ({cap})"
        )

    def to_dict(self) -> dict[str, object]:
        return {"resourceType": self.resource_type, "file": self.file, "line": self.line, "bytes": self.size}


@dataclass
class CopiedLines:
    """What ``_copy_lines`` did: lines written, and ``(line number, size)`` of each line skipped."""

    written: int = 0
    oversized: list[tuple[int, int]] = field(default_factory=list)


def _copy_lines(
    chunks: Iterator[bytes], sink: BinaryIO, max_line_bytes: int = 64 * 1024 * 1024
) -> CopiedLines:
    """Write the non-blank lines of a byte stream, one at a time.

    Splits on ``\\n`` only: JSON strings may hold U+2028 and other characters ``str.splitlines`` breaks on.
    Linear in the line's length (a long line is gathered in a bytearray, each chunk searched once) and
    bounded: a line over ``max_line_bytes`` is dropped as soon as it passes the cap (nothing more of it
    is held) and only counted to its end; its number and size go to ``oversized``.
    """
    copied = CopiedLines()
    number = 1  # of the line being gathered, blank lines counted
    pending = bytearray()
    skipping = 0  # bytes of the current line seen so far, once it is over the cap (0: not skipping)

    def emit(line: bytes | bytearray) -> None:
        if line.strip():
            sink.write(bytes(line).rstrip(b"\r") + b"\n")
            copied.written += 1

    def end_line(tail: bytes | bytearray) -> None:
        nonlocal skipping, number
        if skipping:
            copied.oversized.append((number, skipping + len(tail)))
            skipping = 0
        elif len(pending) + len(tail) > max_line_bytes:
            copied.oversized.append((number, len(pending) + len(tail)))
        elif pending:
            pending.extend(tail)
            emit(pending)
        else:
            emit(tail)
        pending.clear()
        number += 1

    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            end_line(chunk[start:end])
            start = end + 1
        rest = chunk[start:]
        if skipping:
            skipping += len(rest)
        elif len(pending) + len(rest) > max_line_bytes:
            skipping = len(pending) + len(rest)
            pending.clear()
        else:
            pending += rest
    if skipping or pending:
        end_line(b"")
    return copied


def _log_error_file(client: EhrClient, path: Path, limit: int = 20) -> None:
    """Log the first ``limit`` OperationOutcomes of an error file (severity and codes; the free text
    only with ``log_server_text``)."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines):
            if number >= limit:
                log.warning("bulk_export_more_errors", ehr=client.ehr.name, file=path.name)
                return
            try:
                outcome = orjson.loads(line)
            except orjson.JSONDecodeError:
                outcome = None
            log.warning(
                "bulk_export_error",
                ehr=client.ehr.name,
                file=path.name,
                outcome=outcome_diagnostics(outcome, free_text=client.ehr.log_server_text)[:300],
            )


def _delete_job(client: EhrClient, status_url: str) -> None:
    """Ask the server to drop the job and its files; a failure here is logged, never raised."""
    try:
        client.request("DELETE", status_url)
    except EhrError as exc:
        log.warning("bulk_export_delete_failed", ehr=client.ehr.name, status=exc.status)
    else:
        log.info("bulk_export_deleted", ehr=client.ehr.name)

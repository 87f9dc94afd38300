"""Incremental pull of one EHR into ``<out>/<ResourceType>.ndjson`` and the state store's replica.

Modes
-----
- ``search``: per resource type ``_lastUpdated=gt<cursor - overlap>``; ``since`` overrides the cursor.
  Types the vendor refuses to search without a patient (``profile.patient_scoped_types``) fan out over
  the configured panel (a Group's members or a file of ids), ``panel.concurrency`` patients at a time.
  With a panel, such vendors' Patients are read by ``_id`` (an open Patient search is refused too).
  A patient new to the panel is searched without ``_lastUpdated`` (their history predates the cursor);
  the store remembers who was pulled in full, in the same transaction as the cursors. A patient the
  EHR refuses for good (403, 404, ...) is skipped, counted, and forgotten by the store, so a later pull
  fetches their whole history; temporary and auth failures stop the pull.
- ``bulk``: one ``$export`` with ``_since`` = the oldest stored cursor of the types asked for; the next
  cursor of every type is the manifest's ``transactionTime`` (the server's own safe point).

Overlap de-duplication: a resource whose (id, ``meta.versionId``) — else (id, ``meta.lastUpdated``), else
(id, content hash) when the server sends no meta — is already in the replica was delivered by an earlier
run and is skipped.
With an explicit ``since`` nothing is skipped: the caller asked for everything after that instant.

Validation: every resource goes through ``check_resource`` with the vendor's tolerated deviations.
Small pulls validate in-process; past ``inline_limit`` resources a process pool takes chunks, with a
bounded number in flight, while this thread keeps downloading, so the network never waits on the parser.
The pool's processes start in the background (importing ``fhir.resources`` takes them a second or two)
while this thread goes on validating inline, so the download never stalls on the pool's start-up. Search
mode keeps one core for the download (the pool has the others); bulk mode gives the pool every core, and
validates each export file as soon as it is on disk while the other files download. Results are
consumed in submission order. Rejects go to ``_rejected.ndjson`` as ``{"resource": …, "error": …}``;
kept-with-warning resources are counted and logged (id + class only).

Crash safety (a pull killed at any point and re-run leaves no gap and no duplicate in its output)
----------------------------------------------------------------------------------------------------
1. All of a run's files are written as ``.part`` files (``connectors.output``); nothing final changes.
2. At the end they are fsynced and renamed into place (atomic per file), the folder fsynced.
3. THEN one database transaction upserts every resource into the replica and advances every cursor.

For a large pull (past ``inline_limit`` resources) the transaction of step 3 is opened early: a thread
upserts the validated resources into the replica as they come, so the pull does not end with a long
stretch of database work, but it advances the cursors and COMMITS only after step 2, and a failure
anywhere rolls it back. (On SQLite that transaction holds the store's write lock while the pull runs:
another writer waits up to the busy timeout. A SQLite store in memory, which a second connection cannot
see, always gets the upsert after step 2.)

Replica and cursors move only together, in step 3, and after the output is durable. A run killed before
step 3 committed leaves the cursors (and the replica, which the overlap de-duplication reads) exactly
as the last complete run left them, so the re-run fetches the same window again (plus anything newer)
and its files REPLACE whatever the killed run managed to write: never appended, so no duplicate; the
window starts at the old cursor, so no gap. A run killed after step 3 is complete. Because all types
commit in one transaction, the output folder never mixes a committed type with an uncommitted one.
A run's folder is its increment once ``pull`` has returned: readers (the map step, the service) take it
then. One pull at a time per folder (a lock file, ``.pull.lock``).

Cursor choice (clock skew)
--------------------------
The server evaluates ``_lastUpdated`` against its OWN clock, so the cursor must be in the server's clock
domain: the highest ``meta.lastUpdated`` seen, never our clock (if our clock ran ahead of the server's,
a cursor taken from it would skip resources the server stamps "earlier"). Resources committed on the
server with a stamp a little below that maximum (long transactions, replicas catching up) are what the
overlap re-reads. One stamp from the future (bad data or a broken server clock) would otherwise push the
cursor past resources still to come: the cursor is capped at our search start + overlap, which, after
the next pull subtracts the overlap again, is never later than our search start. A type that brought
nothing keeps its cursor. Cursors never move backwards.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import queue
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple

import orjson
import structlog

from connectors.bulk import BulkResult, bulk_export
from connectors.config import EhrConfig
from connectors.deletions import bundle_file_deletions, history_deletions, offers_history_type
from connectors.errors import ConnectorError, EhrError, TemporaryEhrError
from connectors.http import EhrClient
from connectors.output import OutputBusyError, RunOutput
from connectors.panel import load_panel
from connectors.replica_feed import ReplicaFeed
from connectors.search import SearchPage, SearchQuery, search_pages
from connectors.store import Deletion, StateStore, parse_instant, version_token
from connectors.validation import check_resource

__all__ = ["PullError", "PullSummary", "pull"]

log = structlog.get_logger()

Mode = Literal["search", "bulk"]
Progress = Callable[[str, int], None]
_CHUNK = 250  # resources per validation task: large enough to amortise pickling, small enough to spread
_INLINE_LIMIT = 2_000  # a pull smaller than this validates in-process (no pool start-up cost)
_STAGING = ".bulk-staging"
_IDS_PER_SEARCH = 50  # Patient?_id=a,b,… : short enough for any server's URL limit


class PullError(ConnectorError):
    """The pull cannot run as configured (e.g. a panel file that cannot be read)."""

    exit_code = 2


@dataclass
class PullSummary:
    """What one pull did."""

    ehr: str
    mode: str
    counts: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    warnings: int = 0
    duplicates: int = 0  # already delivered by an earlier run (overlap) and skipped
    pages: int = 0
    requests: int = 0
    retries: int = 0
    bulk_error_lines: int = 0
    deleted: int = 0  # resources the server reported deleted, now marked deleted in the replica
    patients: int = 0
    patients_failed: int = 0  # panel patients the EHR refused; fetched whole on a later pull
    duration_seconds: float = 0.0
    validated: int = 0  # resources validated (inline or in the pool)
    validation_seconds: float = 0.0  # wall time from the first validation to the last verdict
    validation_workers: int = 0  # processes of the validation pool (0: all inline)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))  # patients_touched(ehr, this)
    cursors: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    deviations: Counter[str] = field(default_factory=Counter)


def pull(
    ehr: EhrConfig,
    store: StateStore,
    out_dir: Path,
    *,
    since: str | None = None,
    mode: Mode | None = None,
    resource_types: Sequence[str] | None = None,
    client_factory: Callable[[EhrConfig], EhrClient] = EhrClient,
    progress: Progress | None = None,
    workers: int | None = None,
    inline_limit: int = _INLINE_LIMIT,
    clock: Callable[[], float] = time.time,
) -> PullSummary:
    """Pull ``ehr`` into ``out_dir`` and the store (see the module docstring for the guarantees).

    ``progress(resource_type, n)`` is called as resources arrive (the CLI draws a bar with it).
    ``workers`` is the validation pool size (default: the cores but one; 0 validates in-process).
    The pool starts processes with ``spawn``: a script calling ``pull`` needs the usual
    ``if __name__ == "__main__":`` guard (the ``iop-bridge`` console script has it).
    """
    started = time.monotonic()
    chosen: Mode = mode or ehr.mode
    types = tuple(resource_types or ehr.resource_types)
    unusable = [t for t in types if not (t[:1].isupper() and t.isalnum())]
    if unusable or not types:
        raise PullError(f"{ehr.name}: not resource types: {', '.join(map(repr, unusable)) or 'none given'}")
    if since is not None:
        _check_instant(since, "since")
    summary = PullSummary(ehr=ehr.name, mode=chosen)
    try:
        output = RunOutput(out_dir)
    except OutputBusyError as exc:
        raise PullError(f"{ehr.name}: {exc}") from exc
    try:
        run = _Run(ehr, store, output, summary, since, progress, clock)
        run.execute(client_factory, types, workers, inline_limit)
    finally:
        output.close()
    summary.duration_seconds = time.monotonic() - started
    log.info(
        "pull_done",
        ehr=ehr.name,
        mode=chosen,
        resources=sum(summary.counts.values()),
        rejected=summary.rejected,
        warnings=summary.warnings,
        deviations=dict(summary.deviations),
        duplicates=summary.duplicates,
        pages=summary.pages,
        retries=summary.retries,
        seconds=round(summary.duration_seconds, 3),
    )
    return summary


# -- the run --------------------------------------------------------------------------------------


class _Run:
    def __init__(
        self,
        ehr: EhrConfig,
        store: StateStore,
        output: RunOutput,
        summary: PullSummary,
        since: str | None,
        progress: Progress | None,
        clock: Callable[[], float],
    ) -> None:
        self.ehr = ehr
        self.store = store
        self.client: EhrClient
        self.output = output
        self.summary = summary
        self.since = since
        self.progress = progress
        self.clock = clock
        self.validator: _Validator | None = None
        self.feed: ReplicaFeed
        self.new_cursors: dict[str, str] = {}
        self.panel_added: list[str] = []
        self.panel_failed: set[str] = set()
        self._failed_lock = threading.Lock()
        self._max_seen: dict[str, tuple[datetime, str]] = {}  # per type: newest stamp, as the server wrote it
        self.deletions: dict[str, list[Deletion]] = {}  # reported by the server, settled in _new_deletions
        self._capability: dict[str, Any] | None = None

    def execute(
        self,
        client_factory: Callable[[EhrConfig], EhrClient],
        types: tuple[str, ...],
        workers: int | None,
        inline_limit: int,
    ) -> None:
        """Steps 1-3 of the module docstring: download and validate, publish the files, then commit."""
        output, summary = self.output, self.summary
        self.feed = ReplicaFeed(self.store, self.ehr.name, stream_after=inline_limit)
        try:
            with client_factory(self.ehr) as client:
                self.client = client
                tolerate = client.profile.tolerated_deviations
                if workers is None:
                    cores = os.cpu_count() or 2
                    # Search keeps one core for the download; bulk downloads are I/O waits.
                    workers = cores if summary.mode == "bulk" else max(1, cores - 1)
                with _Validator(self.take, tolerate, workers, inline_limit) as validator:
                    self.validator = validator
                    if summary.mode == "bulk":
                        self.bulk(types)
                    else:
                        self.search(types)
                    summary.validated = validator.seen
                    summary.validation_seconds = validator.busy_seconds()
                    summary.validation_workers = validator.pool_size
                summary.pages = client.stats.pages
                summary.requests = client.stats.requests
                summary.retries = client.stats.retries
            summary.rejected = output.rejected
            summary.files = output.publish()
            summary.counts = output.counts()  # exact once the repeats are settled
        except BaseException:
            output.discard()
            self.feed.abort()
            raise
        summary.patients_failed = len(self.panel_failed)
        deletions = self._new_deletions()
        summary.deleted = sum(len(d) for d in deletions.values())
        self.feed.finish(
            output,
            {kind: self.new_cursors.get(kind) if kind in types else None for kind in output.types()},
            panel_added=[p for p in self.panel_added if p not in self.panel_failed],
            panel_removed=sorted(self.panel_failed),
            deletions=deletions,
        )
        summary.cursors = {k: v for k in types if (v := self.store.get_cursor(self.ehr.name, k)) is not None}

    # search mode

    def search(self, types: Sequence[str]) -> None:
        scoped = [t for t in types if t in self.client.profile.patient_scoped_types]
        panel: list[str] | None = None
        known: set[str] = set()
        if scoped and self.ehr.panel is not None:
            try:
                panel = load_panel(self.client, self.ehr.panel)
            except ValueError as exc:
                raise PullError(f"{self.ehr.name}: {exc}") from exc
            self.summary.patients = len(panel)
            known = self.store.panel_known(self.ehr.name, panel)
            self.panel_added = [p for p in panel if p not in known]
        elif scoped:
            log.warning("patient_scoped_without_panel", ehr=self.ehr.name, types=len(scoped))
        for kind in types:
            self.output.open_type(kind)
            started = self.clock()
            query = SearchQuery(kind)
            lower = self._lower_bound(kind)
            if lower is not None:
                query = query.since(lower)
            concurrency = self.ehr.panel.concurrency if self.ehr.panel else 1
            if panel is not None and kind in scoped:
                # A patient new to the panel gets their whole history: the cursor only covers the others.
                whole = SearchQuery(kind) if self.since is None else query
                jobs = [(p, (query if p in known else whole).for_patient(p)) for p in panel]
                pages = _fan_out(self.client, jobs, concurrency, self._patient_failed)
            elif panel is not None and kind == "Patient":
                # Vendors that scope searches by patient refuse an open Patient search too: read the panel
                # by _id, a batch at a time (unchanged ones are skipped by the de-duplication).
                batches = [panel[i : i + _IDS_PER_SEARCH] for i in range(0, len(panel), _IDS_PER_SEARCH)]
                pages = _fan_out(
                    self.client,
                    [(None, SearchQuery(kind).param("_id", ",".join(b))) for b in batches],
                    concurrency,
                )
            else:
                pages = search_pages(self.client, query)
            for page in pages:
                self._page(kind, page.resources)
            if lower is not None and self._offers_history(kind):
                # After the search: a deletion newer than what the search saw is read again next time.
                self.deletions.setdefault(kind, []).extend(history_deletions(self.client, kind, lower))
            self._advance(kind, started)
        assert self.validator is not None
        self.validator.drain(block=True)

    def _offers_history(self, kind: str) -> bool:
        """Whether deletions of ``kind`` can be read from ``_history`` (vendor profile, then /metadata)."""
        if not self.client.profile.reads_history_deletes:
            return False
        if self._capability is None:
            try:
                body = self.client.get_json("metadata")
            except TemporaryEhrError:
                raise
            except EhrError as exc:
                log.warning("history_deletes_unavailable", ehr=self.ehr.name, status=exc.status)
                body = {}
            self._capability = body if body.get("resourceType") == "CapabilityStatement" else {}
        return offers_history_type(self._capability, kind)

    def _new_deletions(self) -> dict[str, list[Deletion]]:
        """The reported deletions that change the replica: one per id, of a resource we hold live.

        A deletion of a resource we never held, or hold already deleted, changes nothing (de-duplication
        across overlapping windows); the newest report of an id wins.
        """
        settled: dict[str, list[Deletion]] = {}
        for kind, reported in sorted(self.deletions.items()):
            latest: dict[str, Deletion] = {}
            for deletion in reported:
                latest[deletion.id] = deletion
            for resource_id, deletion in sorted(latest.items()):
                row = self.store.replica_row(self.ehr.name, kind, resource_id)
                held_live = row is not None and not row.deleted
                if held_live or self.output.holds(kind, resource_id):
                    settled.setdefault(kind, []).append(deletion)
        return settled

    def _patient_failed(self, patient_id: str, error: EhrError) -> None:
        # Called from the fan-out threads. The patient counts as new next time: their whole history is
        # fetched again once the EHR lets us, so skipping them now leaves no gap.
        with self._failed_lock:
            self.panel_failed.add(patient_id)
        log.warning("patient_search_refused", ehr=self.ehr.name, patient=patient_id, status=error.status)

    def _lower_bound(self, kind: str) -> str | None:
        if self.since is not None:
            return self.since
        cursor = self.store.get_cursor(self.ehr.name, kind)
        if cursor is None:
            return None
        instant = parse_instant(cursor)
        if instant is None:
            return cursor
        return _fhir_instant(instant - timedelta(seconds=self.ehr.overlap_seconds))

    def _page(self, kind: str, resources: list[dict[str, Any]]) -> None:
        if self.progress is not None:
            self.progress(kind, len(resources))
        fresh = self._not_seen_before(kind, resources)
        for resource in fresh:
            self._note_stamp(kind, resource)
        assert self.validator is not None
        self.validator.submit([orjson.dumps(r) for r in fresh])

    def _not_seen_before(self, kind: str, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.since is not None or not resources:
            return resources
        ids = [r["id"] for r in resources if isinstance(r.get("id"), str)]
        known = self.store.seen_versions(self.ehr.name, kind, ids) if ids else {}
        fresh: list[dict[str, Any]] = []
        for resource in resources:
            resource_id = resource.get("id")
            if (
                isinstance(resource_id, str)
                and resource.get("resourceType") == kind
                and known.get(resource_id) == version_token(resource)
            ):
                self.summary.duplicates += 1
                continue
            fresh.append(resource)
        return fresh

    def _note_stamp(self, kind: str, resource: dict[str, Any]) -> None:
        if resource.get("resourceType") != kind:
            return
        meta = resource.get("meta")
        text = meta.get("lastUpdated") if isinstance(meta, dict) else None
        stamp = parse_instant(text)
        if stamp is not None and (kind not in self._max_seen or stamp > self._max_seen[kind][0]):
            self._max_seen[kind] = (stamp, str(text).strip())

    def _advance(self, kind: str, started: float) -> None:
        newest = self._max_seen.get(kind)
        if newest is None:
            return
        seen, text = newest
        cap = datetime.fromtimestamp(started, UTC) + timedelta(seconds=self.ehr.overlap_seconds)
        if seen > cap:
            log.warning("future_last_updated", ehr=self.ehr.name, resource=kind, capped_at=_fhir_instant(cap))
            seen, text = cap, _fhir_instant(cap)
        old = parse_instant(self.store.get_cursor(self.ehr.name, kind))
        if old is not None and old > seen:
            return
        self.new_cursors[kind] = text

    # bulk mode

    def bulk(self, types: Sequence[str]) -> None:
        since = self.since
        if since is None:
            cursors = [self.store.get_cursor(self.ehr.name, kind) for kind in types]
            known = [c for c in cursors if c is not None]
            # One _since for every type: the oldest cursor; a type never pulled means a full export.
            if len(known) == len(cursors) and known:
                since = min(known, key=lambda c: parse_instant(c) or datetime.min.replace(tzinfo=UTC))
        staging = self.output.out_dir / _STAGING
        shutil.rmtree(staging, ignore_errors=True)
        for kind in types:
            self.output.open_type(kind)
        # The export runs in a thread; each file it finishes is validated here while the others download.
        finished: queue.Queue[tuple[str, Path] | None] = queue.Queue()
        stop = threading.Event()
        outcome: list[BulkResult | BaseException] = []

        def on_file(kind: str, path: Path) -> None:
            if stop.is_set():
                raise PullError(f"{self.ehr.name}: bulk pull stopped")
            finished.put((kind, path))

        def export() -> None:
            try:
                outcome.append(
                    bulk_export(
                        self.client,
                        resource_types=types,
                        since=since,
                        out_dir=staging,
                        group_id=self.ehr.bulk_group_id,
                        on_progress=lambda text: log.info(
                            "bulk_progress", ehr=self.ehr.name, progress=text[:100]
                        ),
                        on_file=on_file,
                        should_stop=stop.is_set,
                    )
                )
            except BaseException as exc:  # re-raised in the pull's thread
                outcome.append(exc)
            finally:
                finished.put(None)

        exporter = threading.Thread(target=export, name="bulk-export", daemon=True)
        exporter.start()
        try:
            assert self.validator is not None
            while (item := finished.get()) is not None:
                kind, path = item
                for chunk in _ndjson_chunks(path, _CHUNK):
                    if self.progress is not None:
                        self.progress(kind, len(chunk))
                    self.validator.submit(self._bulk_fresh(kind, chunk))
                path.unlink(missing_ok=True)  # its lines are in the run's output now: free the disk
            exporter.join()
            if isinstance(outcome[0], BaseException):
                raise outcome[0]
            result = outcome[0]
            self.summary.bulk_error_lines = result.errors
            self.validator.drain(block=True)
            for line in result.oversized:  # skipped at download: each a reject naming file, line, size
                reason = line.reason(self.ehr.max_line_bytes)
                log.warning("resource_rejected", ehr=self.ehr.name, error=reason)
                self.output.reject(line.to_dict(), reason)
            self._bulk_deletions(result)  # after the drain: the output holds every resource by now
        finally:
            stop.set()
            exporter.join()
            shutil.rmtree(staging, ignore_errors=True)
        if parse_instant(result.transaction_time) is None:
            raise PullError(f"{self.ehr.name}: $export transactionTime is not an instant")
        for kind in types:
            self.new_cursors[kind] = result.transaction_time

    def _bulk_deletions(self, result: BulkResult) -> None:
        """The manifest's ``deleted`` files; an id this export also brought back (re-created) stays."""
        unreadable = 0
        for path in result.deleted_files:
            found, bad = bundle_file_deletions(path, result.transaction_time)
            unreadable += bad
            for deletion in found:
                if not self.output.holds(deletion.resource_type, deletion.id):
                    self.deletions.setdefault(deletion.resource_type, []).append(deletion)
        if unreadable:
            log.warning("bulk_deleted_entries_unreadable", ehr=self.ehr.name, count=unreadable)

    def _bulk_fresh(self, kind: str, lines: list[bytes]) -> list[bytes]:
        if self.since is not None:
            return lines
        parsed: list[tuple[bytes, dict[str, Any] | None]] = []
        for line in lines:
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                value = None
            parsed.append((line, value if isinstance(value, dict) else None))
        dicts = [v for _, v in parsed if v is not None]
        fresh = {id(v) for v in self._not_seen_before(kind, dicts)}
        return [line for line, v in parsed if v is None or id(v) in fresh]

    # validated results, in submission order

    def take(self, lines: list[bytes], verdicts: list[_Verdict]) -> None:
        kept: dict[str, list[bytes]] = {}
        for line, verdict in zip(lines, verdicts, strict=True):
            if verdict.kept is None:
                self._reject(line, verdict.error or "rejected")
                continue
            if verdict.warnings:
                self.summary.warnings += 1
                classes = sorted({w.split(" ", 1)[0] for w in verdict.warnings})
                self.summary.deviations.update(classes)
                log.debug(  # per resource at debug: Oracle data shows one in nine; pull_done has the counts
                    "resource_kept_with_deviation",
                    ehr=self.ehr.name,
                    resource=verdict.resource_type,
                    id=verdict.id,
                    classes=classes,
                )
            self.output.write(verdict.resource_type, verdict.id, verdict.kept)
            kept.setdefault(verdict.resource_type, []).append(verdict.kept)
        for kind, batch in kept.items():
            self.feed.add(kind, batch)

    def _reject(self, line: bytes, error: str) -> None:
        try:
            raw: object = orjson.loads(line)
        except orjson.JSONDecodeError:
            raw = line.decode("utf-8", errors="replace")
        log.warning("resource_rejected", ehr=self.ehr.name, error=error[:300])
        self.output.reject(raw, error)


# -- fan-out over a panel -------------------------------------------------------------------------


def _fan_out(
    client: EhrClient,
    jobs: Sequence[tuple[str | None, SearchQuery]],
    concurrency: int,
    on_patient_error: Callable[[str, EhrError], None] | None = None,
) -> Iterator[SearchPage]:
    """Every page of each (patient, query), ``concurrency`` at a time, in the given order.

    A patient whose search the EHR refuses for good (403 not accessible, 404 merged away, ...) goes to
    ``on_patient_error`` and the others go on; temporary and auth failures stop the pull.
    """

    def one(job: tuple[str | None, SearchQuery]) -> list[SearchPage]:
        patient_id, query = job
        try:
            return list(search_pages(client, query))
        except TemporaryEhrError:
            raise
        except EhrError as exc:
            if patient_id is None or on_patient_error is None:
                raise
            on_patient_error(patient_id, exc)
            return []

    window = max(1, concurrency) * 2  # patients fetched ahead of the consumer: bounds memory
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="panel") as pool:
        pending: deque[concurrent.futures.Future[list[SearchPage]]] = deque()
        try:
            for job in jobs:
                pending.append(pool.submit(one, job))
                if len(pending) >= window:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


# -- validation beside the download ---------------------------------------------------------------


class _Verdict(NamedTuple):
    """One line's outcome: the JSON to keep (None when rejected) and what the main thread needs of it."""

    kept: bytes | None
    warnings: list[str]
    error: str | None
    resource_type: str = ""
    id: str = ""


def validate_lines(lines: list[bytes], tolerate: frozenset[str]) -> list[_Verdict]:
    """Validate NDJSON lines (runs in the worker processes, so the main thread parses nothing twice)."""
    verdicts: list[_Verdict] = []
    for line in lines:
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            verdicts.append(_Verdict(None, [], f"not JSON: {str(exc).split(':', 1)[0]}"))
            continue
        checked = check_resource(raw, tolerate=tolerate)
        resource = checked.resource
        if checked.error is not None or resource is None:
            verdicts.append(_Verdict(None, [], checked.error or "rejected"))
            continue
        kind = str(resource["resourceType"])
        resource_id = resource.get("id")
        if not isinstance(resource_id, str) or not resource_id:
            verdicts.append(_Verdict(None, [], f"{kind}/?: id is missing (cannot be de-duplicated or kept)"))
            continue
        kept = line if resource is raw else orjson.dumps(resource)
        verdicts.append(_Verdict(kept, checked.warnings, None, kind, resource_id))
    return verdicts


def _warm_up() -> int:
    """A first task for each pool process: by the time it returns, the process has imported the
    validation code (unpickling this function imports ``connectors.pull`` and ``fhir.resources``)."""
    return os.getpid()


class _Validator:
    """Runs ``validate_lines`` inline or in a process pool; hands results to ``sink`` in order.

    Past ``inline_limit`` resources the pool's processes are started, each with a warm-up task; until
    the first of them is ready, chunks are still validated here, so the download does not stall for
    the seconds a spawned process needs to import ``fhir.resources``.
    """

    def __init__(
        self,
        sink: Callable[[list[bytes], list[_Verdict]], None],
        tolerate: frozenset[str],
        workers: int,
        inline_limit: int,
    ) -> None:
        self.sink = sink
        self.tolerate = tolerate
        self.workers = workers
        self.inline_limit = inline_limit
        self.seen = 0
        self.pool_size = 0
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._warm: list[concurrent.futures.Future[int]] = []
        self._pending: deque[tuple[list[bytes], concurrent.futures.Future[list[_Verdict]]]] = deque()
        self._buffer: list[bytes] = []
        self._first: float | None = None
        self._last: float | None = None

    def __enter__(self) -> _Validator:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def busy_seconds(self) -> float:
        """Wall time from the first chunk handed over to the last verdict taken."""
        if self._first is None or self._last is None:
            return 0.0
        return self._last - self._first

    def submit(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self._buffer.append(line)
            if len(self._buffer) >= _CHUNK:
                self._flush()
        self.drain(block=False)

    def drain(self, *, block: bool) -> None:
        if block:
            self._flush()
        while self._pending and (block or self._pending[0][1].done()):
            lines, future = self._pending.popleft()
            self._take(lines, future.result())

    def _take(self, lines: list[bytes], verdicts: list[_Verdict]) -> None:
        self.sink(lines, verdicts)
        self._last = time.monotonic()

    def _flush(self) -> None:
        if not self._buffer:
            return
        chunk, self._buffer = self._buffer, []
        if self._first is None:
            self._first = time.monotonic()
        self.seen += len(chunk)
        if self.workers > 0 and self.seen > self.inline_limit and self._pool is None:
            self._start_pool()
        if not any(f.done() for f in self._warm):
            # In-process (a small pull, or while the pool starts): keep the order with what is pending.
            self.drain(block=not self._warm)
            if not self._pending:
                self._take(chunk, validate_lines(chunk, self.tolerate))
                return
        assert self._pool is not None
        self._pending.append((chunk, self._pool.submit(validate_lines, chunk, self.tolerate)))
        # Bounded in flight: the download waits only when the workers are this far behind.
        while len(self._pending) > 4 * self.pool_size:
            lines, future = self._pending.popleft()
            self._take(lines, future.result())

    def _start_pool(self) -> None:
        self.pool_size = max(1, self.workers)
        # spawn, not fork: the download threads (panel fan-out, httpx) must not be forked mid-flight.
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.pool_size, mp_context=multiprocessing.get_context("spawn")
        )
        # One warm-up per process: the pool spawns a process for each task that finds none idle.
        self._warm = [self._pool.submit(_warm_up) for _ in range(self.pool_size)]


# -- helpers --------------------------------------------------------------------------------------


def _ndjson_chunks(path: Path, size: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    with path.open("rb") as lines:
        for line in lines:
            stripped = line.strip()
            if not stripped:
                continue
            chunk.append(stripped)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _check_instant(value: str, name: str) -> None:
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise PullError(f"{name} must be an ISO date or instant with a zone, got {value!r}") from exc
    if "T" in text and parsed.tzinfo is None:
        raise PullError(f"{name} needs a zone (Z or ±hh:mm): {value!r}")


def _fhir_instant(moment: datetime) -> str:
    moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond // 1000:03d}"
    return text + "Z"

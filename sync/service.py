"""The running service: pull -> map -> publish for each EHR, and the write-back consumers.

A cycle for one EHR:

1. drain what an earlier run left in the outbox (a crash between mapping and producing loses nothing);
2. pull the increment (``connectors.pull``: cursor, replica, quarantine);
3. re-map only the patients the increment touched, plus those whose active episode's gap deadline
   passed (time alone finishes an episode), each from its whole history in the replica — so a cycle
   costs in proportion to what changed, not to the size of the hospital;
4. stage changed episodes and referrals (by content hash) in the outbox, in one transaction, then
   produce them (Part 2 records only to the Part 2 topics);
5. where the vendor allows it, write each changed episode's ``EpisodeOfCare`` to the EHR (conditional
   update on ``urn:iop-bridge:episode-id``) so that write-backs can reference it.

Write-back consumes ``iop.attendance.v1`` and ``iop.discharges.v1``, and their 42 CFR Part 2 twins
``iop.attendance.part2.v1`` and ``iop.discharges.part2.v1``, and hands each event to the ``WriteBack`` of
its EHR; permanent failures go to the dead-letter topic (``iop.deadletter.part2.v1`` for the events of
Part 2 topics or Part 2 episodes, ``sync.part2_events``), temporary ones pause the partition and are
retried. A Part 2 episode's event that came on a general topic is still written, and counted
(``iop_bridge_part2_on_general_topic``, a warning with ids only) so the program can be fixed.
``service.writeback_concurrency`` events run at once (different patients; one
patient's in order, see ``sync.kafka``), on an HTTP client whose connection pool holds that many.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from connectors.config import EhrConfig
from connectors.errors import EhrError
from connectors.http import EhrClient
from connectors.pull import PullSummary, pull
from mappers import (
    EpisodeSettings,
    Rules,
    anchor_key,
    episode_of_care,
    map_episodes,
    map_referrals,
    review_after,
)
from schemas.identifiers import EPISODE_ID_SYSTEM, is_fhir_id, resource_path, token
from schemas.topics import Topics
from sync import event_authority, fhir_writes, part2_events, writeback
from sync.capabilities import discover_targets
from sync.config import Settings, open_store
from sync.episode_config import settings_fingerprint
from sync.errors import ConfigError, PermanentEventError
from sync.kafka import Event, EventConsumer, EventProducer, PollStats
from sync.metrics import Metrics
from sync.publisher import drain_outbox, stage_records
from sync.rules_files import load_rules_file, read_rules_text
from sync.state import Staged, SyncState

log = structlog.get_logger()

#: Types that belong to no patient but give patients' resources their meaning (location types, payers).
SHARED_TYPES = ("Location", "Organization")
#: Patients mapped together: the shared resources are indexed once per batch.
MAP_BATCH = 200
#: ``patients_touched`` since this instant: every patient the replica holds.
_EVERY_PULL = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class CycleReport:
    """What one pull-map-publish cycle did for one EHR (counts only: no PHI)."""

    ehr: str
    pulled: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    patients_mapped: int = 0
    episodes: int = 0
    referrals: int = 0
    map_rejects: int = 0
    staged: int = 0
    published: int = 0
    episode_of_care_written: int = 0
    #: Patients re-mapped because the EHR's rules or episode settings changed (0 when they did not).
    remapped_for_settings: int = 0


def _read_rules(path: str | None) -> tuple[Rules, str | None]:
    """The rules of ``path`` (value set files it names read beside it; the shipped rules when None) and
    the file's text (for the fingerprint)."""
    if not path:
        return load_rules_file(None), None
    return load_rules_file(path), read_rules_text(Path(path))


class Service:
    """One process: the pull-map-publish cycles and the write-back consumers (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        as_of: datetime | None = None,
        metrics: Metrics | None = None,
        episode_settings: EpisodeSettings | None = None,
        client_factory: Callable[[EhrConfig], EhrClient] = EhrClient,
        retry_pause_s: float | None = None,
    ) -> None:
        if not settings.ehr:
            raise ConfigError("no [[ehr]] configured: nothing to pull")
        self.settings = settings
        self.store = open_store(settings.store.url)
        self.state = SyncState(self.store.engine)
        self.topics = Topics(settings.kafka.topic_prefix)
        self.metrics = metrics or Metrics()
        # Per EHR: the episode settings and rules its patients are mapped with, and their fingerprint
        # (``settings_fingerprint``); every rule file is read once, at start-up (a bad one stops it).
        self._mapping: dict[str, tuple[EpisodeSettings, Rules, str]] = {}
        read: dict[str | None, tuple[Rules, str | None]] = {}
        for ehr in settings.ehr:
            path = settings.rules_file(ehr.name)
            if path not in read:
                read[path] = _read_rules(path)
            rules, text = read[path]
            chosen = settings.episode_settings(ehr)
            if episode_settings is not None:  # a caller's (tests') settings, with the EHR's identifiers
                chosen = replace(episode_settings, patient_identifier_systems=ehr.patient_identifier_systems)
            self._mapping[ehr.name] = (chosen, rules, settings_fingerprint(chosen, rules.version, text))
        self._fixed_as_of = as_of
        self._client_factory = client_factory
        self._retry_pause_s = (  # how long a partition waits after a temporary EHR failure
            settings.service.retry_pause_seconds if retry_pause_s is None else retry_pause_s
        )
        self._producer: EventProducer | None = None
        self._clients: dict[str, EhrClient] = {}
        self._writebacks: dict[str, writeback.WriteBack] = {}
        self._writeback_clients: list[EhrClient] = []
        self._lock = threading.Lock()
        self._writeback_lock = threading.Lock()  # the consumer's workers build a WriteBack only once
        #: Provenance of EpisodeOfCare writes that landed while their Provenance did not, by EHR: sent
        #: first in the next cycle (the EpisodeOfCare itself is not written again for it).
        self._unproven: dict[str, list[dict[str, Any]]] = {}

    # -- resources ------------------------------------------------------------------------------------

    def as_of(self) -> datetime:
        return self._fixed_as_of or datetime.now(UTC)

    @property
    def producer(self) -> EventProducer:
        if self._producer is None:
            self._producer = EventProducer(self.settings.kafka)
        return self._producer

    def client(self, ehr: EhrConfig) -> EhrClient:
        with self._lock:
            if ehr.name not in self._clients:
                self._clients[ehr.name] = self._client_factory(ehr)
            return self._clients[ehr.name]

    def close(self) -> None:
        for client in [*self._clients.values(), *self._writeback_clients]:
            client.close()
        if self._producer is not None:
            self._producer.close()
        self.store.close()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- pull, map, publish ---------------------------------------------------------------------------

    def cycle(self) -> list[CycleReport]:
        """One pull-map-publish cycle for every configured EHR."""
        return [self.cycle_ehr(ehr) for ehr in self.settings.ehr]

    def cycle_ehr(self, ehr: EhrConfig, *, since: str | None = None) -> CycleReport:
        report = CycleReport(ehr=ehr.name)
        report.published += drain_outbox(self.state, self.producer, metrics=self.metrics)  # an earlier crash
        out_dir = Path(self.settings.service.out_dir) / ehr.name
        try:
            summary: PullSummary = pull(
                ehr, self.store, out_dir, since=since, client_factory=self._client_factory
            )
        except Exception:
            self.metrics.pulls.labels(ehr=ehr.name, result="failed").inc()
            raise
        self.metrics.pulls.labels(ehr=ehr.name, result="ok").inc()
        for resource_type, count in summary.counts.items():
            self.metrics.resources_pulled.labels(ehr=ehr.name, resource_type=resource_type).inc(count)
        report.pulled = dict(summary.counts)
        report.rejected = summary.rejected

        as_of = self.as_of()
        touched = set(self.store.patients_touched(ehr.name, summary.started_at))
        due = set(self.state.patients_due(ehr.name, as_of.date().isoformat()))
        fingerprint = self._mapping[ehr.name][2]
        before = self.state.mapping_fingerprint(ehr.name)
        settings_changed = before != fingerprint
        if settings_changed:  # new rules or settings: every patient once, not only the increment's
            touched |= set(self.store.patients_touched(ehr.name, _EVERY_PULL))
        patients = sorted(touched | due)
        changed = self._map_and_stage(ehr, patients, as_of, report)
        report.staged = len(changed)
        if settings_changed:
            self.state.set_mapping_fingerprint(ehr.name, fingerprint)
            report.remapped_for_settings = len(patients)
            log.info(
                "settings_changed_remapped",
                ehr=ehr.name,
                first_mapping=before is None,
                patients=len(patients),
                records_changed=len(changed),
            )
        report.published += drain_outbox(self.state, self.producer, metrics=self.metrics)
        if ehr.write_back and self.client(ehr).profile.can_write_episode_of_care:
            report.episode_of_care_written = self._write_episodes_of_care(ehr, changed)
        log.info(
            "cycle_done",
            ehr=ehr.name,
            pulled=sum(report.pulled.values()),
            patients=report.patients_mapped,
            staged=report.staged,
            published=report.published,
            episode_of_care_written=report.episode_of_care_written,
        )
        return report

    def _map_and_stage(
        self, ehr: EhrConfig, patients: list[str], as_of: datetime, report: CycleReport
    ) -> list[Staged]:
        if not patients:
            return []
        shared = self.store.resources_of_type(ehr.name, SHARED_TYPES)
        episode_settings, rules, _ = self._mapping[ehr.name]
        changed: list[Staged] = []
        for start in range(0, len(patients), MAP_BATCH):
            batch = patients[start : start + MAP_BATCH]
            resources: list[dict[str, Any]] = list(shared)
            previous: dict[str, str] = {}
            for patient_id in batch:
                resources.extend(self.store.patient_resources(ehr.name, patient_id))
                for record_id, record in self.state.published_ids(ehr.name, "episode", patient_id).items():
                    if record.get("status") != "cancelled":
                        previous[record_id] = anchor_key(record)
            mapped = map_episodes(
                resources,
                ehr=ehr.name,
                as_of=as_of,
                rules=rules,
                settings=episode_settings,
                timezone=ehr.timezone,
                previous_anchors=previous,
            )
            referrals = map_referrals(
                resources,
                ehr=ehr.name,
                rules=rules,
                local_codes=episode_settings.referral_local_codes,
                part2_program=episode_settings.part2_program,
                timezone=ehr.timezone,
                patient_identifier_systems=ehr.patient_identifier_systems,
            )
            report.patients_mapped += len(batch)
            report.episodes += len(mapped.episodes)
            report.referrals += len(referrals.referrals)
            report.map_rejects += len(mapped.rejects) + len(referrals.rejects)
            for reject in [*mapped.rejects, *referrals.rejects]:
                log.warning("map_reject", ehr=ehr.name, resource_type=reject.resource_type, id=reject.id)
            staged = stage_records(
                ehr.name,
                self.topics,
                episodes=mapped.episodes,
                referrals=[dict(r) for r in referrals.referrals],
            )
            staged = [
                _with_review(item, episode_settings) if item.kind == "episode" else item for item in staged
            ]
            changed.extend(self.state.stage_changes(ehr.name, staged))
        return changed

    def _write_episodes_of_care(self, ehr: EhrConfig, changed: Iterable[Staged]) -> int:
        """Conditional update of each changed episode's EpisodeOfCare; returns how many were written."""
        client = self.client(ehr)
        self._send_unproven(ehr.name, client)
        written = 0
        for item in changed:
            if item.kind != "episode":
                continue
            resource = episode_of_care(item.record)
            resource.pop("id", None)  # the server keeps its own id; the identifier is the key
            query = token(EPISODE_ID_SYSTEM, item.record_id)
            try:
                response = client.request(
                    "PUT",
                    "EpisodeOfCare",
                    params={"identifier": query},
                    json=resource,
                    headers={"Content-Type": "application/fhir+json", "Prefer": "return=representation"},
                )
            except EhrError as exc:
                # The episode is published; the EHR copy is a convenience for write-backs, retried the
                # next time the episode changes. Never stop the cycle for it.
                log.warning(
                    "episode_of_care_not_written", ehr=ehr.name, episode_id=item.record_id, status=exc.status
                )
                continue
            body = response.json() if response.content else {}
            fhir_id = body.get("id") if isinstance(body, Mapping) else None
            if fhir_id is not None and not is_fhir_id(fhir_id):
                # Never kept: write-backs would put it in a URL path (the value itself is not logged).
                log.warning(
                    "episode_of_care_invalid_id",
                    ehr=ehr.name,
                    episode_id=item.record_id,
                    length=len(str(fhir_id)),
                )
                continue
            if fhir_id:
                self.state.set_episode_fhir_id(ehr.name, item.record_id, str(fhir_id))
                self._unproven.setdefault(ehr.name, []).append(
                    self._episode_provenance(item, str(fhir_id), response)
                )
                self._send_unproven(ehr.name, client)
            written += 1
        return written

    def _episode_provenance(self, item: Staged, fhir_id: str, response: Any) -> dict[str, Any]:
        """The Provenance of one EpisodeOfCare write: its source is the episode id (an id of ours)."""
        record = item.record
        security = [dict(s) for s in record.get("security") or []] if record.get("part2") else []
        return fhir_writes.provenance(
            fhir_writes.versioned(
                resource_path("EpisodeOfCare", fhir_id), writeback.written_version(response)
            ),
            recorded=datetime.now(UTC).isoformat(timespec="seconds"),
            created=response.status_code == 201,
            security=security,
            source=(EPISODE_ID_SYSTEM, item.record_id),
            agent=self.settings.service.provenance_agent,
        )

    def _send_unproven(self, ehr_name: str, client: EhrClient) -> None:
        """POST the EpisodeOfCare Provenance not yet sent; a temporary failure keeps it for the next
        cycle, a refusal (the server takes no Provenance) drops it with a warning. Never stops a cycle."""
        pending = self._unproven.get(ehr_name, [])
        while pending:
            try:
                client.request("POST", "Provenance", json=pending[0])
            except EhrError as exc:
                if exc.status not in writeback.PERMANENT_STATUSES:
                    log.warning(
                        "provenance_not_written", ehr=ehr_name, pending=len(pending), status=exc.status
                    )
                    return
                log.warning("provenance_refused", ehr=ehr_name, reference="EpisodeOfCare", status=exc.status)
            pending.pop(0)

    # -- write-back -----------------------------------------------------------------------------------

    def _writeback_for(self, ehr_name: str) -> writeback.WriteBack:
        known = self._writebacks.get(ehr_name)
        if known is not None:
            return known
        with self._writeback_lock:
            if ehr_name not in self._writebacks:
                ehr = next((e for e in self.settings.ehr if e.name == ehr_name), None)
                if ehr is None:
                    raise PermanentEventError(f"event for EHR {ehr_name!r}, which is not configured")
                if not ehr.write_back:
                    raise PermanentEventError(f"write-back to EHR {ehr_name!r} is turned off")
                client = self._writeback_client(ehr)
                # What this EHR lets us write, from its CapabilityStatement (a temporary failure here
                # pauses the partition like any other).
                targets = discover_targets(client)
                self._writebacks[ehr_name] = writeback.WriteBack(
                    client,
                    self.state,
                    ehr=ehr_name,
                    targets=targets,
                    agent=self.settings.service.provenance_agent,
                )
            return self._writebacks[ehr_name]

    def _writeback_client(self, ehr: EhrConfig) -> EhrClient:
        """The EHR's client, or, when its pool (``ehr.concurrency``) is smaller than the write-back's
        concurrency, a client of its own with a pool that large, so no worker waits for a connection."""
        wanted = self.settings.service.writeback_concurrency
        if ehr.concurrency >= wanted:
            return self.client(ehr)
        client = self._client_factory(ehr.model_copy(update={"concurrency": wanted}))
        self._writeback_clients.append(client)
        return client

    def handle_event(self, event: Event) -> None:
        """The write-back consumer's handler: route one validated event to its EHR."""
        ehr_name = str(event.value.get("ehr", ""))
        try:
            # The key is checked against the body before the EHR is asked anything.
            event_authority.require_key(event.key, event.value)
        except PermanentEventError:
            self.metrics.dead_letters.labels(topic=event.topic).inc()
            raise
        target = self._writeback_for(ehr_name)
        self._flag_misrouted_part2(event, ehr_name)
        try:
            if event.topic in (self.topics.attendance, self.topics.attendance_part2):
                result = target.attendance(event.value, topic=event.topic, key=event.key)
            elif event.topic in (self.topics.discharges, self.topics.discharges_part2):
                result = target.discharge(event.value, topic=event.topic, key=event.key)
            else:
                raise PermanentEventError(f"no write-back for topic {event.topic}")
        except PermanentEventError:
            self.metrics.writebacks.labels(ehr=ehr_name, outcome="dead_letter").inc()
            self.metrics.dead_letters.labels(topic=event.topic).inc()
            raise
        self.metrics.writebacks.labels(ehr=ehr_name, outcome=str(result.outcome)).inc()

    def _flag_misrouted_part2(self, event: Event, ehr_name: str) -> None:
        """A Part 2 episode's event on a general topic: written all the same (nothing lost), but counted
        and logged (ids only), since general consumers of that topic may have read it."""
        if self.topics.is_part2(event.topic):
            return
        lookup = part2_events.published_episode_part2(self.state)
        if part2_events.event_is_part2(self.topics, event.topic, event.value, lookup):
            self.metrics.part2_on_general_topic.labels(ehr=ehr_name, topic=event.topic).inc()
            log.warning(
                "part2_event_on_general_topic",
                ehr=ehr_name,
                topic=event.topic,
                event_id=event.event_id,
                episode_id=str(event.value.get("episode_id", "")),
            )

    def consumer(self) -> EventConsumer:
        lookup = part2_events.published_episode_part2(self.state)
        return EventConsumer(
            self.settings.kafka,
            list(self.topics.writeback_topics()),
            self.producer,
            part2=lambda record: part2_events.record_is_part2(self.topics, record, lookup),
            permanent=(PermanentEventError,),
            retry_pause_s=self._retry_pause_s,
            retry_max_attempts=self.settings.service.retry_max_attempts,
            retry_max_seconds=self.settings.service.retry_max_seconds,
            concurrency=self.settings.service.writeback_concurrency,
        )

    def drain_writebacks(self, max_seconds: float = 120.0) -> PollStats:
        """Consume attendance and discharge events (general and Part 2) until the topics are idle
        (``run --once``)."""
        with self.consumer() as consumer:
            return consumer.drain(self.handle_event, max_seconds=max_seconds)


def _with_review(item: Staged, settings: EpisodeSettings) -> Staged:
    day = review_after(item.record, settings)
    return replace(item, review_after=day.isoformat() if day else None)

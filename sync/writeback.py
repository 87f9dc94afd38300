"""Attendance and discharge events written back to the EHR: once, in order, with nothing lost.

Idempotency has three locks, because servers' conditional create is racy (HAPI #3141, Azure #1382):

1. the ledger: an ``event_id`` already processed is a no-op (redelivery, or the same event produced twice);
2. the session table: a later event for the same IOP session updates the resource written for it
   (``If-Match``, re-reading on a version conflict: 412 per the spec, 409 from HAPI); an older one is stale;
3. the server: creates are conditional (``If-None-Exist`` on our identifier), so a crash between the
   write and the ledger entry finds the resource on the next try instead of creating a second one.

Errors are classified for the consumer: ``PermanentEventError`` (the event can never be written:
schema-invalid, unknown episode, or the EHR answered 400/404/405/410/422) goes to the dead-letter topic;
``TemporaryEhrError`` and ``AuthError`` propagate, so the consumer pauses and retries later (never
dead-letters them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import httpx
import structlog

from connectors.errors import EhrError
from schemas.identifiers import EPISODE_ID_SYSTEM, EVENT_ID_SYSTEM, SESSION_ID_SYSTEM, token
from sync import fhir_writes
from sync.errors import PermanentEventError
from sync.state import SessionResource, SyncState

log = structlog.get_logger()

#: EHR answers that no retry will change: the event goes to the dead-letter topic.
PERMANENT_STATUSES = frozenset({400, 404, 405, 410, 422})
#: Version conflicts on ``If-Match`` (412 per the spec; HAPI answers 409): re-read and try again.
CONFLICT_STATUSES = frozenset({409, 412})
MAX_CONFLICT_RETRIES = 5
MAX_SUPERSEDED_HOPS = 10


class Outcome(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    DUPLICATE = "duplicate"
    STALE = "stale"
    VOIDED = "voided"
    NOTHING_TO_VOID = "nothing_to_void"
    DISCHARGED = "discharged"


class FhirClient(Protocol):
    """What write-back needs of ``connectors.http.EhrClient``."""

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Any = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        content: Any = None,
        idempotent: bool | None = None,
    ) -> httpx.Response: ...


@dataclass(frozen=True)
class Targets:
    """What this EHR lets us write (from its vendor profile and CapabilityStatement)."""

    encounter: bool = True
    appointment: bool = True
    episode_of_care: bool = True
    document_reference: bool = True
    task: bool = True
    provenance: bool = True


@dataclass
class WriteBackResult:
    outcome: Outcome
    references: list[str] = field(default_factory=list)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version_of(response: httpx.Response, body: Mapping[str, Any]) -> str | None:
    etag = response.headers.get("ETag")
    if etag:
        return str(etag)
    version = (body.get("meta") or {}).get("versionId")
    return f'W/"{version}"' if version else None


def _id_from(response: httpx.Response, resource_type: str) -> str:
    """The server id of a resource we created, from the body or the Location header."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("resourceType") == resource_type and body.get("id"):
        return str(body["id"])
    location = response.headers.get("Location") or response.headers.get("Content-Location") or ""
    parts = location.split("/")
    if resource_type in parts:
        index = parts.index(resource_type)
        if index + 1 < len(parts):
            return parts[index + 1]
    raise EhrError(f"created {resource_type} but the server returned no id", status=response.status_code)


class WriteBack:
    """Writes one EHR's attendance and discharge events as FHIR resources."""

    def __init__(
        self,
        client: FhirClient,
        state: SyncState,
        *,
        ehr: str,
        targets: Targets | None = None,
        clock: Callable[[], str] = _now,
    ) -> None:
        self.client = client
        self.state = state
        self.ehr = ehr
        self.targets = targets or Targets()
        self.clock = clock

    # -- entry points -----------------------------------------------------------------------------

    def attendance(self, event: Mapping[str, Any], *, topic: str) -> WriteBackResult:
        """Write one ``attendance.v1`` event (already validated against its contract)."""
        return self._once(event, topic, self._attendance)

    def discharge(self, event: Mapping[str, Any], *, topic: str) -> WriteBackResult:
        """Write one ``discharge.v1`` event (already validated against its contract)."""
        return self._once(event, topic, self._discharge)

    def _once(
        self,
        event: Mapping[str, Any],
        topic: str,
        write: Callable[[Mapping[str, Any], dict[str, Any]], WriteBackResult],
    ) -> WriteBackResult:
        event_id = str(event["event_id"])
        if self.state.event_outcome(event_id) is not None:
            log.info("event_duplicate", event_id=event_id, topic=topic)
            return WriteBackResult(Outcome.DUPLICATE)
        if event.get("ehr") not in (None, self.ehr):
            raise PermanentEventError(f"event {event_id} is for EHR {event.get('ehr')!r}, not {self.ehr!r}")
        episode = self._episode(str(event["episode_id"]))
        self._check_patient(event, episode)
        result = write(event, episode)
        self.state.record_event(
            event_id, topic=topic, outcome=result.outcome, detail={"references": result.references}
        )
        log.info("event_written", event_id=event_id, topic=topic, outcome=str(result.outcome))
        return result

    # -- lookups ----------------------------------------------------------------------------------

    def _episode(self, episode_id: str) -> dict[str, Any]:
        """The published episode, following ``superseded_by`` from a superseded one."""
        seen = []
        current = episode_id
        for _ in range(MAX_SUPERSEDED_HOPS):
            record = self.state.published_record(self.ehr, "episode", current)
            if record is None:
                raise PermanentEventError(f"unknown episode {current} at EHR {self.ehr!r}")
            successor = record.get("superseded_by")
            if record.get("status") != "cancelled" or not successor:
                return record
            seen.append(current)
            current = str(successor)
        raise PermanentEventError(f"episode {episode_id} is superseded in a loop: {seen}")

    @staticmethod
    def _check_patient(event: Mapping[str, Any], episode: Mapping[str, Any]) -> None:
        given = (event.get("patient") or {}).get("reference")
        expected = (episode.get("patient") or {}).get("reference")
        if given and expected and given != expected:
            raise PermanentEventError(
                f"event {event['event_id']} names {given} but episode {episode['episode_id']} is {expected}"
            )

    @staticmethod
    def _security(episode: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [dict(s) for s in episode.get("security") or []] if episode.get("part2") else []

    # -- HTTP with classification -----------------------------------------------------------------

    def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.client.request(method, url, **kwargs)
        except EhrError as exc:
            if exc.status in PERMANENT_STATUSES:
                raise PermanentEventError(f"EHR refused {method} {url.split('?')[0]}: {exc}") from exc
            raise

    def _read(self, reference: str) -> tuple[dict[str, Any], str | None]:
        response = self._call("GET", reference)
        body: dict[str, Any] = response.json()
        return body, _version_of(response, body)

    def _find(self, resource_type: str, system: str, value: str) -> dict[str, Any] | None:
        response = self._call("GET", resource_type, params={"identifier": token(system, value)})
        bundle = response.json()
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") or {}
            if resource.get("resourceType") == resource_type:
                return dict(resource)
        return None

    def _create(
        self, resource: dict[str, Any], system: str, value: str, security: list[dict[str, Any]]
    ) -> tuple[str, bool]:
        """Conditional create; returns (id, created). A match means an earlier try already wrote it."""
        resource_type = str(resource["resourceType"])
        response = self._call(
            "POST",
            resource_type,
            json=resource,
            headers={
                "If-None-Exist": f"identifier={token(system, value)}",
                "Prefer": "return=representation",
            },
        )
        resource_id = _id_from(response, resource_type)
        created = response.status_code == 201
        if created:
            self._provenance(f"{resource_type}/{resource_id}", created=True, security=security)
        return resource_id, created

    def _update(
        self,
        reference: str,
        change: Callable[[dict[str, Any]], dict[str, Any]],
        security: list[dict[str, Any]],
    ) -> bool:
        """Read, change, ``If-Match`` update; re-read on a version conflict. False when nothing changed."""
        for _ in range(MAX_CONFLICT_RETRIES):
            current, version = self._read(reference)
            wanted = change(current)
            if _same_content(current, wanted):
                return False
            headers = {"If-Match": version} if version else {}
            try:
                self.client.request("PUT", reference, json=wanted, headers=headers)
            except EhrError as exc:
                if exc.status in CONFLICT_STATUSES:
                    log.info("version_conflict", reference=reference, status=exc.status)
                    continue
                if exc.status in PERMANENT_STATUSES:
                    raise PermanentEventError(f"EHR refused PUT {reference}: {exc}") from exc
                raise
            self._provenance(reference, created=False, security=security)
            return True
        raise EhrError(f"PUT {reference}: still a version conflict after {MAX_CONFLICT_RETRIES} tries")

    def _provenance(self, reference: str, *, created: bool, security: list[dict[str, Any]]) -> None:
        if not self.targets.provenance:
            return
        resource = fhir_writes.provenance(
            reference, recorded=self.clock(), created=created, security=security
        )
        try:
            self.client.request("POST", "Provenance", json=resource)
        except EhrError as exc:
            if exc.status not in PERMANENT_STATUSES:
                raise
            # The server does not take Provenance for this resource: the write itself stands.
            log.warning("provenance_refused", reference=reference.split("/")[0], status=exc.status)

    # -- attendance -------------------------------------------------------------------------------

    def _attendance(self, event: Mapping[str, Any], episode: dict[str, Any]) -> WriteBackResult:
        session = event["session"]
        session_id = str(session["id"])
        status = str(session["status"])
        occurred_at = str(event["occurred_at"])
        known = self.state.session_resource(self.ehr, session_id)
        if known is not None and _instant(known.occurred_at) >= _instant(occurred_at):
            return WriteBackResult(Outcome.STALE, [f"{known.resource_type}/{known.resource_id}"])
        security = self._security(episode)
        patient = str(episode["patient"]["reference"])

        if status == "cancelled":
            return self._void_session(session_id, known, occurred_at, security)

        if status == "attended":
            if not self.targets.encounter:
                raise PermanentEventError(f"EHR {self.ehr!r} does not accept Encounter writes")
            resource = fhir_writes.attendance_encounter(
                event,
                patient_reference=patient,
                episode_id=str(episode["episode_id"]),
                episode_fhir_id=self.state.episode_fhir_id(self.ehr, str(episode["episode_id"])),
                security=security,
            )
        else:  # absent
            if not self.targets.appointment:
                raise PermanentEventError(f"EHR {self.ehr!r} does not accept Appointment writes")
            resource = fhir_writes.noshow_appointment(event, patient_reference=patient, security=security)

        resource_type = str(resource["resourceType"])
        if known is not None and known.resource_type != resource_type:
            # attended <-> absent: the old record of the session is voided, the new one written.
            self._update(f"{known.resource_type}/{known.resource_id}", fhir_writes.voided, security)
            known = None
        if known is None:
            resource_id, created = self._create(resource, SESSION_ID_SYSTEM, session_id, security)
            outcome = Outcome.CREATED
            if not created:  # written by an earlier try: make it match this event
                changed = self._update(f"{resource_type}/{resource_id}", _replace_with(resource), security)
                outcome = Outcome.UPDATED if changed else Outcome.UNCHANGED
        else:
            resource_id = known.resource_id
            changed = self._update(f"{resource_type}/{resource_id}", _replace_with(resource), security)
            outcome = Outcome.UPDATED if changed else Outcome.UNCHANGED
        self.state.put_session_resource(
            self.ehr, session_id, SessionResource(resource_type, resource_id, occurred_at, status)
        )
        return WriteBackResult(outcome, [f"{resource_type}/{resource_id}"])

    def _void_session(
        self,
        session_id: str,
        known: SessionResource | None,
        occurred_at: str,
        security: list[dict[str, Any]],
    ) -> WriteBackResult:
        references: list[str] = []
        if known is not None:
            references.append(f"{known.resource_type}/{known.resource_id}")
        else:  # an earlier try may have written it before the crash: ask the server
            for resource_type in ("Encounter", "Appointment"):
                found = self._find(resource_type, SESSION_ID_SYSTEM, session_id)
                if found is not None:
                    references.append(f"{resource_type}/{found['id']}")
        if not references:
            self.state.put_session_resource(
                self.ehr, session_id, SessionResource("none", "", occurred_at, "cancelled")
            )
            return WriteBackResult(Outcome.NOTHING_TO_VOID)
        for reference in references:
            self._update(reference, fhir_writes.voided, security)
        resource_type, resource_id = references[0].split("/", 1)
        self.state.put_session_resource(
            self.ehr, session_id, SessionResource(resource_type, resource_id, occurred_at, "cancelled")
        )
        return WriteBackResult(Outcome.VOIDED, references)

    # -- discharge --------------------------------------------------------------------------------

    def _discharge(self, event: Mapping[str, Any], episode: dict[str, Any]) -> WriteBackResult:
        discharge = event["discharge"]
        security = self._security(episode)
        episode_id = str(episode["episode_id"])
        patient = str(episode["patient"]["reference"])
        references: list[str] = []

        eoc_id = self.state.episode_fhir_id(self.ehr, episode_id)
        if eoc_id is None and self.targets.episode_of_care:
            found = self._find("EpisodeOfCare", EPISODE_ID_SYSTEM, episode_id)
            eoc_id = str(found["id"]) if found else None
            if eoc_id:
                self.state.set_episode_fhir_id(self.ehr, episode_id, eoc_id)
        if eoc_id is not None and self.targets.episode_of_care:
            end_date = str(discharge["date"])
            self._update(
                f"EpisodeOfCare/{eoc_id}",
                lambda current: fhir_writes.finished_episode_of_care(current, end_date=end_date),
                security,
            )
            references.append(f"EpisodeOfCare/{eoc_id}")

        if self.targets.document_reference:
            document = fhir_writes.discharge_document(
                event,
                patient_reference=patient,
                episode_start=episode.get("start"),
                episode_fhir_id=eoc_id,
                security=security,
            )
            document_id, _ = self._create(document, EVENT_ID_SYSTEM, str(event["event_id"]), security)
            references.append(f"DocumentReference/{document_id}")

        referral = (episode.get("referral") or {}).get("reference")
        if referral and self.targets.task:
            response = self._call("GET", "Task", params={"focus": referral})
            reason = str(discharge.get("reason", "other"))

            def close_task(current: dict[str, Any]) -> dict[str, Any]:
                return fhir_writes.task_after_discharge(current, reason=reason)

            for entry in response.json().get("entry") or []:
                task = entry.get("resource") or {}
                if task.get("resourceType") != "Task":
                    continue
                self._update(f"Task/{task['id']}", close_task, security)
                references.append(f"Task/{task['id']}")
        return WriteBackResult(Outcome.DISCHARGED, references)


def _instant(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


_SERVER_FIELDS = ("id", "meta", "text")


def _same_content(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    def strip(resource: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in resource.items() if k not in _SERVER_FIELDS}

    return strip(current) == strip(wanted) and (current.get("meta") or {}).get("security") == (
        wanted.get("meta") or {}
    ).get("security")


def _replace_with(resource: Mapping[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A change that makes the server's copy equal to ``resource`` (keeping its id)."""

    def change(current: dict[str, Any]) -> dict[str, Any]:
        wanted = dict(resource)
        wanted["id"] = current["id"]
        return wanted

    return change

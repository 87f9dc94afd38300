"""Attendance and discharge events written back to the EHR: once, in order, with nothing lost.

Idempotency has three locks, because servers' conditional create is racy (HAPI #3141, Azure #1382):

1. the ledger: an event already processed (its ``event_id`` on its topic at its EHR, with the same content)
   is a no-op (redelivery, or the same event produced twice); the same id with other content is a
   conflict, dead-lettered;
2. the session table: a later event for the same IOP session updates the resource written for it
   (``If-Match``, re-reading on a version conflict: 412 per the spec, 409 from HAPI); an older one is stale;
3. the server: creates are conditional (``If-None-Exist`` on our identifier), or preceded by a look-up
   for our identifier where the server has no conditional create, so a crash between the write and the
   ledger entry finds the resource on the next try instead of creating a second one.

What is written depends on the EHR (``sync.capabilities``: the vendor profile's plan checked against the
server's CapabilityStatement): an Encounter / Appointment on generic servers and Oracle, a progress note on
Epic; a resource is changed with PUT where the server has ``update`` and with a JSON Patch where it has only
``patch`` (Oracle), both under ``If-Match``. Where a server has no conditional create, the resource is
looked up by our identifier before it is created (or, when it cannot search by identifier either, by
patient and date, filtered by our identifier); such a create is never resent by the HTTP client, and a
retry of the event finds what an unanswered one wrote.

Before the ledger is read, an event must have authority over what it writes (``sync.event_authority``):
its patient, by reference or identifier, is its episode's patient, and its message key names its EHR and
that patient; otherwise it is refused with nothing written.

Errors are classified for the consumer: ``PermanentEventError`` (the event can never be written:
schema-invalid, unknown episode, or the EHR answered 400/404/405/410/422) goes to the dead-letter topic;
``TemporaryEhrError`` and ``AuthError`` propagate, so the consumer pauses and retries later (never
dead-letters them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import httpx
import orjson
import structlog

from connectors.errors import EhrError
from schemas.identifiers import (
    EPISODE_ID_SYSTEM,
    EVENT_ID_SYSTEM,
    SESSION_ID_SYSTEM,
    InvalidIdError,
    checked_id,
    resource_path,
    session_key,
    token,
)
from sync import event_authority, fhir_writes
from sync.capabilities import JSON_PATCH, Purpose, Targets
from sync.errors import PermanentEventError
from sync.state import PublishedEntry, SessionResource, SessionWrite, SyncState, content_hash

log = structlog.get_logger()

#: EHR answers that no retry will change: the event goes to the dead-letter topic.
PERMANENT_STATUSES = frozenset({400, 404, 405, 410, 422})
#: Version conflicts on ``If-Match`` (412 per the spec; HAPI answers 409): re-read and try again.
CONFLICT_STATUSES = frozenset({409, 412})
MAX_CONFLICT_RETRIES = 5
MAX_SUPERSEDED_HOPS = 10
#: Pages read when looking for our resource by patient and date (a server without identifier search).
MAX_LOOKUP_PAGES = 10

__all__ = ["FhirClient", "Outcome", "PermanentEventError", "Targets", "WriteBack", "WriteBackResult"]


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


@dataclass
class WriteBackResult:
    outcome: Outcome
    references: list[str] = field(default_factory=list)
    #: The session-table row this write leaves, recorded in the same transaction as the ledger entry.
    session: SessionWrite | None = field(default=None, repr=False)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version_of(response: httpx.Response, body: Mapping[str, Any]) -> str | None:
    etag = response.headers.get("ETag")
    if etag:
        return str(etag)
    version = (body.get("meta") or {}).get("versionId")
    return f'W/"{version}"' if version else None


def written_version(response: httpx.Response) -> str | None:
    """The version a write made, from its ETag, its body's ``meta.versionId`` or a ``_history`` Location."""
    etag = response.headers.get("ETag")
    if etag:
        return str(etag)
    try:
        body = response.json() if response.content else None
    except ValueError:
        body = None
    if isinstance(body, dict) and (body.get("meta") or {}).get("versionId"):
        return str(body["meta"]["versionId"])
    location = response.headers.get("Location") or response.headers.get("Content-Location") or ""
    parts = location.split("/")
    if "_history" in parts[:-1]:
        return parts[parts.index("_history") + 1] or None
    return None


def _id_from(response: httpx.Response, resource_type: str) -> str:
    """The server id of a resource we created, from the body or the Location header."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("resourceType") == resource_type and body.get("id"):
        return checked_id(resource_type, body["id"])
    location = response.headers.get("Location") or response.headers.get("Content-Location") or ""
    parts = location.split("/")
    if resource_type in parts:
        index = parts.index(resource_type)
        if index + 1 < len(parts):
            return checked_id(resource_type, parts[index + 1])
    raise EhrError(f"created {resource_type} but the server returned no id", status=response.status_code)


class WriteBack:
    """Writes one EHR's attendance and discharge events as FHIR resources.

    Thread-safe when its client and state are (``EhrClient`` and ``SyncState`` are): the write-back
    consumer runs events of different message keys (patients) at once, those of one key in order.
    """

    def __init__(
        self,
        client: FhirClient,
        state: SyncState,
        *,
        ehr: str,
        targets: Targets | None = None,
        clock: Callable[[], str] = _now,
        agent: str = fhir_writes.AGENT_NAME,
    ) -> None:
        self.client = client
        self.state = state
        self.ehr = ehr
        self.targets = targets if targets is not None else Targets.everything(ehr=ehr)
        self.clock = clock
        self.agent = agent
        #: Provenance of writes that landed while their Provenance did not (a temporary failure), by
        #: event id: sent first when the event is retried, whose writes are then no-ops.
        self._unproven: dict[str, list[dict[str, Any]]] = {}
        self._unproven_lock = threading.Lock()

    # -- entry points -----------------------------------------------------------------------------

    def attendance(self, event: Mapping[str, Any], *, topic: str, key: str | None = None) -> WriteBackResult:
        """Write one ``attendance.v1`` event (already validated against its contract); ``key``: its
        message key, which must name the event's EHR and its episode's patient."""
        return self._once(event, topic, self._attendance, key)

    def discharge(self, event: Mapping[str, Any], *, topic: str, key: str | None = None) -> WriteBackResult:
        """Write one ``discharge.v1`` event (already validated against its contract); ``key`` as for
        ``attendance``."""
        return self._once(event, topic, self._discharge, key)

    def _once(
        self,
        event: Mapping[str, Any],
        topic: str,
        write: Callable[[Mapping[str, Any], PublishedEntry], WriteBackResult],
        key: str | None,
    ) -> WriteBackResult:
        event_id = str(event["event_id"])
        if event.get("ehr") not in (None, self.ehr):
            raise PermanentEventError(f"event {event_id} is for EHR {event.get('ehr')!r}, not {self.ehr!r}")
        # Authority before the ledger: a copy of a written event under another key or patient is
        # refused, never reported as a harmless duplicate.
        episode = self._episode(str(event["episode_id"]))
        event_authority.check_patient(event, episode.record)
        if key is not None:
            event_authority.check_key_episode(event_authority.parse_key(key, event_id), event, episode.record)
        digest = content_hash(event)
        seen = self.state.event_entry(self.ehr, topic, event_id)
        if seen is not None:
            if seen.content_hash and seen.content_hash != digest:
                raise PermanentEventError(
                    f"event {event_id} on {topic}: conflict: an event with this id and other content was "
                    f"already processed ({seen.outcome}); nothing written"
                )
            log.info("event_duplicate", event_id=event_id, topic=topic)
            return WriteBackResult(Outcome.DUPLICATE)
        self._send_unproven(event_id)
        try:
            result = write(event, episode)
        except InvalidIdError as exc:  # an id that must not reach a URL path: never retried
            raise PermanentEventError(f"event {event_id}: {exc}; nothing more written") from exc
        self.state.record_event(
            event_id,
            topic=topic,
            outcome=result.outcome,
            detail={"references": result.references},
            session=result.session,
            ehr=self.ehr,
            content_hash=digest,
        )
        log.info("event_written", event_id=event_id, topic=topic, outcome=str(result.outcome))
        return result

    # -- lookups ----------------------------------------------------------------------------------

    def _episode(self, episode_id: str) -> PublishedEntry:
        """The published episode (with its EpisodeOfCare's server id when we know it), following
        ``superseded_by`` from a superseded one."""
        seen = []
        current = episode_id
        for _ in range(MAX_SUPERSEDED_HOPS):
            entry = self.state.published_entry(self.ehr, "episode", current)
            if entry is None:
                raise PermanentEventError(f"unknown episode {current} at EHR {self.ehr!r}")
            successor = entry.record.get("superseded_by")
            if entry.record.get("status") != "cancelled" or not successor:
                return entry
            seen.append(current)
            current = str(successor)
        raise PermanentEventError(f"episode {episode_id} is superseded in a loop: {seen}")

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

    def _lookup(
        self, resource_type: str, system: str, value: str, like: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Our resource keyed ``system|value``, as the server has it; None when it has none (or we cannot
        tell: a server that can search neither by identifier nor by patient and date)."""
        access = self.targets.access(resource_type)
        if access.searchable_by("identifier"):
            return self._find(resource_type, system, value)
        window = fhir_writes.search_window(like) if like is not None else None
        patient = str(((like or {}).get("subject") or {}).get("reference") or "")
        if like is not None and resource_type == "Appointment":
            actors = [p.get("actor") or {} for p in like.get("participant") or []]
            patient = next((str(a["reference"]) for a in actors if "reference" in a), "")
        if (
            window is None
            or not patient.startswith("Patient/")
            or not access.searchable_by("patient", "date")
        ):
            return None
        params: list[tuple[str, str]] | None = [
            ("patient", patient.removeprefix("Patient/")),
            ("date", f"ge{window[0]}"),
            ("date", f"le{window[1]}"),
        ]
        url: str | None = resource_type
        for _ in range(MAX_LOOKUP_PAGES):
            if url is None:
                break
            bundle = self._call("GET", url, params=params).json()
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource") or {}
                if resource.get("resourceType") == resource_type and fhir_writes.has_identifier(
                    resource, system, value
                ):
                    return dict(resource)
            url = next(
                (link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None
            )
            params = None  # a next link carries its own query
        return None

    def _create(
        self,
        resource: dict[str, Any],
        system: str,
        value: str,
        security: list[dict[str, Any]],
        *,
        event_id: str,
    ) -> tuple[str, bool]:
        """Create once; returns (id, created). False: an earlier try already wrote it (found, not made).

        Conditional create (``If-None-Exist``) where the server has it, which also makes the POST safe
        to resend; elsewhere a look-up first, and a plain POST that is never resent.
        """
        resource_type = str(resource["resourceType"])
        headers = {"Prefer": "return=representation"}
        conditional = self.targets.access(resource_type).conditional_create
        if conditional:
            headers["If-None-Exist"] = f"identifier={token(system, value)}"
        else:
            found = self._lookup(resource_type, system, value, resource)
            if found is not None:
                resource_id = checked_id(resource_type, found.get("id"))
                if system == EVENT_ID_SYSTEM and value == event_id:
                    self._provenance_if_missing(resource_path(resource_type, resource_id), security, event_id)
                return resource_id, False
        response = self._call("POST", resource_type, json=resource, headers=headers, idempotent=conditional)
        resource_id = _id_from(response, resource_type)
        created = response.status_code == 201 or not conditional
        target = fhir_writes.versioned(resource_path(resource_type, resource_id), written_version(response))
        if created:
            self._provenance(target, created=True, security=security, event_id=event_id)
        elif system == EVENT_ID_SYSTEM and value == event_id:
            self._provenance_if_missing(resource_path(resource_type, resource_id), security, event_id)
        return resource_id, created

    def _provenance_if_missing(self, reference: str, security: list[dict[str, Any]], event_id: str) -> None:
        """The create found a resource keyed by this very event id (the discharge summary): an earlier try
        made it and may have died before its Provenance. Write the CREATE Provenance unless the server
        already holds one naming this event; where Provenance cannot be searched by target, write none
        rather than a second one. (A session's resource is keyed by the session, which several events
        share: found, it gets no Provenance in this event's name.)"""
        if not self.targets.enabled(Purpose.PROVENANCE):
            return
        if not self.targets.access("Provenance").searchable_by("target"):
            return
        bundle = self._call("GET", "Provenance", params={"target": reference}).json()
        for entry in bundle.get("entry") or []:
            for entity in (entry.get("resource") or {}).get("entity") or []:
                identifier = (entity.get("what") or {}).get("identifier") or {}
                if identifier.get("system") == EVENT_ID_SYSTEM and identifier.get("value") == event_id:
                    return
        self._provenance(reference, created=True, security=security, event_id=event_id)

    def _change_method(self, resource_type: str) -> str:
        method = self.targets.access(resource_type).change_method
        if method is None:
            raise PermanentEventError(f"EHR {self.ehr!r} does not support update or patch on {resource_type}")
        return method

    def _update(
        self,
        reference: str,
        change: Callable[[dict[str, Any]], dict[str, Any]],
        security: list[dict[str, Any]],
        *,
        patient: str,
        event_id: str,
    ) -> bool:
        """Read, check it is ``patient``'s, change, write under ``If-Match`` (PUT, or a JSON Patch where
        the server has only patch); re-read on a version conflict. False when nothing changed."""
        method = self._change_method(reference.split("/", 1)[0])
        for _ in range(MAX_CONFLICT_RETRIES):
            current, version = self._read(reference)
            _check_owner(current, reference, patient, event_id)
            wanted = change(current)
            if _same_content(current, wanted):
                return False
            headers = {"If-Match": version} if version else {}
            if method == "PUT":
                kwargs: dict[str, Any] = {"json": wanted}
            else:
                operations = fhir_writes.json_patch(current, wanted)
                if not operations:
                    return False
                headers["Content-Type"] = JSON_PATCH
                # Under If-Match a resent patch that was applied meets a version conflict, never a double.
                kwargs = {"content": orjson.dumps(operations), "idempotent": bool(version)}
            try:
                response = self.client.request(method, reference, headers=headers, **kwargs)
            except EhrError as exc:
                if exc.status in CONFLICT_STATUSES:
                    log.info("version_conflict", reference=reference, status=exc.status)
                    continue
                if exc.status in PERMANENT_STATUSES:
                    raise PermanentEventError(f"EHR refused {method} {reference}: {exc}") from exc
                raise
            target = fhir_writes.versioned(reference, written_version(response))
            self._provenance(target, created=False, security=security, event_id=event_id)
            return True
        raise EhrError(
            f"{method} {reference}: still a version conflict after {MAX_CONFLICT_RETRIES} tries",
            retriable=True,
        )

    def _provenance(
        self, target: str, *, created: bool, security: list[dict[str, Any]], event_id: str
    ) -> None:
        """POST the Provenance of a write that landed. On a temporary failure the Provenance is kept and
        the error raised: the event is retried, its Provenance sent first (``_send_unproven``) and its
        writes, already on the server, found unchanged instead of made twice."""
        if not self.targets.enabled(Purpose.PROVENANCE):
            return
        resource = fhir_writes.provenance(
            target,
            recorded=self.clock(),
            created=created,
            security=security,
            source=(EVENT_ID_SYSTEM, event_id),
            agent=self.agent,
        )
        try:
            self._post_provenance(resource)
        except EhrError:
            with self._unproven_lock:
                self._unproven.setdefault(event_id, []).append(resource)
            raise

    def _post_provenance(self, resource: dict[str, Any]) -> None:
        try:
            self.client.request("POST", "Provenance", json=resource)
        except EhrError as exc:
            if exc.status not in PERMANENT_STATUSES:
                raise
            # The server does not take Provenance for this resource: the write itself stands.
            target = str(resource["target"][0]["reference"])
            log.warning("provenance_refused", reference=target.split("/")[0], status=exc.status)

    def _send_unproven(self, key: str) -> None:
        """Send the Provenance an earlier try of this event could not (kept until each is sent)."""
        with self._unproven_lock:
            pending = self._unproven.pop(key, [])
        while pending:
            try:
                self._post_provenance(pending[0])
            except EhrError:
                with self._unproven_lock:
                    self._unproven.setdefault(key, [])[:0] = pending
                raise
            pending.pop(0)

    # -- attendance -------------------------------------------------------------------------------

    def _session_resource(
        self,
        resource_type: str,
        event: Mapping[str, Any],
        entry: PublishedEntry,
        security: list[dict[str, Any]],
    ) -> dict[str, Any]:
        episode = entry.record
        patient = str(episode["patient"]["reference"])
        episode_id = str(episode["episode_id"])
        key = _session_key(event)
        if resource_type == "Encounter":
            return fhir_writes.attendance_encounter(
                event,
                patient_reference=patient,
                episode_id=episode_id,
                episode_fhir_id=entry.fhir_id,
                security=security,
                session_key=key,
            )
        if resource_type == "Appointment":
            return fhir_writes.noshow_appointment(
                event, patient_reference=patient, security=security, session_key=key
            )
        if resource_type == "DocumentReference":
            return fhir_writes.attendance_note(
                event, patient_reference=patient, episode_id=episode_id, security=security, session_key=key
            )
        raise PermanentEventError(f"EHR {self.ehr!r}: no attendance builder for {resource_type}")

    def _attendance(self, event: Mapping[str, Any], entry: PublishedEntry) -> WriteBackResult:
        session = event["session"]
        session_id = _session_key(event)
        status = str(session["status"])
        occurred_at = str(event["occurred_at"])
        owner = {"patient": str(entry.record["patient"]["reference"]), "event_id": str(event["event_id"])}
        known = self.state.session_resource(self.ehr, session_id)
        if known is not None and _instant(known.occurred_at) >= _instant(occurred_at):
            return WriteBackResult(Outcome.STALE, [resource_path(known.resource_type, known.resource_id)])
        security = self._security(entry.record)

        if status == "cancelled":
            return self._void_session(event, entry, known, security)

        resource_type = self.targets.require(Purpose.ATTENDED if status == "attended" else Purpose.ABSENT)
        resource = self._session_resource(resource_type, event, entry, security)
        if known is not None and known.resource_type not in (resource_type, "none"):
            # attended <-> absent: the old record of the session is voided, the new one written.
            self._update(
                resource_path(known.resource_type, known.resource_id), fhir_writes.voided, security, **owner
            )
            known = None
        if known is None or known.resource_type == "none":
            resource_id, created = self._create(
                resource, SESSION_ID_SYSTEM, session_id, security, event_id=owner["event_id"]
            )
            outcome = Outcome.CREATED
            if not created:  # written by an earlier try (or found): make it match this event
                changed = self._update(
                    resource_path(resource_type, resource_id), _replace_with(resource), security, **owner
                )
                outcome = Outcome.UPDATED if changed else Outcome.UNCHANGED
        else:
            resource_id = known.resource_id
            changed = self._update(
                resource_path(resource_type, resource_id), _replace_with(resource), security, **owner
            )
            outcome = Outcome.UPDATED if changed else Outcome.UNCHANGED
        written = SessionResource(resource_type, resource_id, occurred_at, status)
        return WriteBackResult(
            outcome, [resource_path(resource_type, resource_id)], SessionWrite(self.ehr, session_id, written)
        )

    def _void_session(
        self,
        event: Mapping[str, Any],
        entry: PublishedEntry,
        known: SessionResource | None,
        security: list[dict[str, Any]],
    ) -> WriteBackResult:
        session_id = _session_key(event)
        occurred_at = str(event["occurred_at"])
        patient, event_id = str(entry.record["patient"]["reference"]), str(event["event_id"])
        references: list[str] = []
        if known is not None and known.resource_type != "none":
            references.append(resource_path(known.resource_type, known.resource_id))
        elif known is None:  # an earlier try may have written it before the crash: ask the server
            for resource_type in self._session_types():
                like = self._session_resource(resource_type, _as_attended(event), entry, security)
                found = self._lookup(resource_type, SESSION_ID_SYSTEM, session_id, like)
                if found is not None:
                    reference = resource_path(resource_type, found["id"])
                    _check_owner(found, reference, patient, event_id)  # all checked before the first write
                    references.append(reference)
        if not references:
            nothing = SessionResource("none", "", occurred_at, "cancelled")
            return WriteBackResult(Outcome.NOTHING_TO_VOID, [], SessionWrite(self.ehr, session_id, nothing))
        for reference in references:
            self._update(reference, fhir_writes.voided, security, patient=patient, event_id=event_id)
        resource_type, resource_id = references[0].split("/", 1)
        voided = SessionResource(resource_type, resource_id, occurred_at, "cancelled")
        return WriteBackResult(Outcome.VOIDED, references, SessionWrite(self.ehr, session_id, voided))

    def _session_types(self) -> list[str]:
        """The resource types a session of this EHR may have been written as (in plan order)."""
        types: list[str] = []
        for purpose in (Purpose.ATTENDED, Purpose.ABSENT):
            resource_type = self.targets.resource_type(purpose)
            if resource_type and self.targets.enabled(purpose) and resource_type not in types:
                types.append(resource_type)
        return types

    # -- discharge --------------------------------------------------------------------------------

    def _discharge(self, event: Mapping[str, Any], entry: PublishedEntry) -> WriteBackResult:
        """Finish the EpisodeOfCare (where the EHR has ours), write the summary, update the referral
        Task. Everything is looked up and checked before the first write, so an EHR that cannot take a
        part makes the event permanent without writing half of it."""
        discharge = event["discharge"]
        episode = entry.record
        security = self._security(episode)
        episode_id = str(episode["episode_id"])
        patient = str(episode["patient"]["reference"])
        document_type = self.targets.require(Purpose.DISCHARGE_SUMMARY)

        eoc_id = self._episode_of_care_id(episode_id, entry.fhir_id)
        if eoc_id is not None:
            self.targets.require(Purpose.EPISODE_OF_CARE)
        tasks = self._referral_tasks(episode)
        if tasks:
            self.targets.require(Purpose.REFERRAL_TASK)

        references: list[str] = []
        if eoc_id is not None:
            end_date = str(discharge["date"])
            self._update(
                resource_path("EpisodeOfCare", eoc_id),
                lambda current: fhir_writes.finished_episode_of_care(current, end_date=end_date),
                security,
                patient=patient,
                event_id=str(event["event_id"]),
            )
            references.append(resource_path("EpisodeOfCare", eoc_id))

        document = fhir_writes.discharge_document(
            event,
            patient_reference=patient,
            episode_start=episode.get("start"),
            episode_fhir_id=eoc_id,
            security=security,
        )
        if document["resourceType"] != document_type:
            raise PermanentEventError(f"EHR {self.ehr!r}: no discharge builder for {document_type}")
        event_id = str(event["event_id"])
        document_id, _ = self._create(document, EVENT_ID_SYSTEM, event_id, security, event_id=event_id)
        references.append(resource_path("DocumentReference", document_id))

        reason = str(discharge.get("reason", "other"))

        def close_task(current: dict[str, Any]) -> dict[str, Any]:
            return fhir_writes.task_after_discharge(current, reason=reason)

        for task_id in tasks:
            self._update(
                resource_path("Task", task_id),
                close_task,
                security,
                patient=patient,
                event_id=str(event["event_id"]),
            )
            references.append(resource_path("Task", task_id))
        return WriteBackResult(Outcome.DISCHARGED, references)

    def _episode_of_care_id(self, episode_id: str, known: str | None) -> str | None:
        """The server id of the episode's EpisodeOfCare, where this EHR's write-back keeps one."""
        if self.targets.resource_type(Purpose.EPISODE_OF_CARE) is None:
            return None
        eoc_id = known
        if eoc_id is None and self.targets.access("EpisodeOfCare").searchable_by("identifier"):
            found = self._find("EpisodeOfCare", EPISODE_ID_SYSTEM, episode_id)
            eoc_id = checked_id("EpisodeOfCare", found.get("id")) if found else None
            if eoc_id:
                self.state.set_episode_fhir_id(self.ehr, episode_id, eoc_id)
        return eoc_id

    def _referral_tasks(self, episode: Mapping[str, Any]) -> list[str]:
        """Ids of the Tasks whose focus is the episode's referral (none when this EHR updates no Task)."""
        referral = (episode.get("referral") or {}).get("reference")
        if not referral or self.targets.resource_type(Purpose.REFERRAL_TASK) is None:
            return []
        if not self.targets.access("Task").searchable_by("focus"):
            self.targets.require(Purpose.REFERRAL_TASK)  # off: say why
            raise PermanentEventError(f"EHR {self.ehr!r} cannot search Task by focus")
        response = self._call("GET", "Task", params={"focus": referral})
        return [
            checked_id("Task", entry["resource"].get("id"))
            for entry in response.json().get("entry") or []
            if (entry.get("resource") or {}).get("resourceType") == "Task"
        ]


def _patients_of(resource: Mapping[str, Any]) -> list[str] | None:
    """The ``Patient/<id>`` references a resource we write belongs to; None for a type (Task) whose
    patient element is optional and absent."""
    kind = resource.get("resourceType")
    if kind == "Appointment":
        values = [(p.get("actor") or {}).get("reference") for p in resource.get("participant") or []]
    elif kind == "EpisodeOfCare":
        values = [(resource.get("patient") or {}).get("reference")]
    elif kind == "Task":
        if not resource.get("for"):
            return None
        values = [(resource.get("for") or {}).get("reference")]
    else:
        values = [(resource.get("subject") or {}).get("reference")]
    patients = []
    for value in values:
        parts = str(value or "").split("/")
        if "Patient" in parts[:-1]:  # relative or absolute, with or without _history
            index = len(parts) - 1 - parts[::-1].index("Patient")
            if index + 1 < len(parts):
                patients.append(f"Patient/{parts[index + 1]}")
    return patients


def _check_owner(resource: Mapping[str, Any], reference: str, patient: str, event_id: str) -> None:
    """Refuse to change a resource that is not the episode's patient's (nothing is written)."""
    owners = _patients_of(resource)
    if owners is not None and patient not in owners:
        raise PermanentEventError(
            f"event {event_id}: {reference} on the server is not the episode's patient's ({patient}); "
            "nothing written"
        )


def _session_key(event: Mapping[str, Any]) -> str:
    """The session's identity: the EHR (the table's other key), the episode the program named, the
    program (``program``, optional in the contract) and the program's session id."""
    program = event.get("program")
    return session_key(
        str(event["episode_id"]), str(program) if program else None, str(event["session"]["id"])
    )


def _as_attended(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event as if attended or absent, to build the resource a cancelled session may have had."""
    result = dict(event)
    result["session"] = {**event["session"], "status": "attended"}
    return result


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

"""The FHIR R4 resources iop-bridge writes back to the EHR, built from events as plain dicts.

Pure builders (no I/O, no clock: every time is an argument) so that what we write is testable alone and
validated with ``fhir.resources.R4B`` in the tests. ``sync.writeback`` decides which of them to send, and
how (conditional create, ``If-Match`` update), per vendor profile.

- attended session  -> ``Encounter`` (finished; class AMB, or VR for telehealth), keyed by the session key
                       (``schemas.identifiers.session_key``: episode, program, session id)
- absent session    -> ``Appointment`` (noshow), keyed by the session id
- either, on an EHR that cannot write those (Epic) -> a progress-note ``DocumentReference`` (LOINC 11506-3)
                       keyed by the session id, saying whether the patient attended
- cancelled session -> the session's resource voided, never deleted: status ``cancelled`` (Encounter,
                       Appointment) or ``entered-in-error`` (a note)
- discharge         -> the episode's ``EpisodeOfCare`` finished (period end, status history), plus a
                       discharge-summary ``DocumentReference`` keyed by the event id, and the referral
                       ``Task`` (when there is one) with the BSeR business status
- every write       -> a ``Provenance`` naming this service as the transmitter

Part 2 episodes give every resource the security labels of the episode. ``json_patch`` turns a change into
the JSON Patch a server without ``update`` takes (Oracle), and ``search_window`` / ``has_identifier``
let write-back find a resource it wrote on a server that cannot search by identifier.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping, Sequence
from typing import Any

from schemas.identifiers import (
    EPISODE_ID_SYSTEM,
    EVENT_ID_SYSTEM,
    EXIT_REASON_SYSTEM,
    SESSION_ID_SYSTEM,
    resource_path,
)

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
LOINC = "http://loinc.org"
US_CORE_DOCUMENT_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"
BSER_BUSINESS_STATUS = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
AGENT_NAME = "iop-bridge"

_CLASS_BY_MODALITY = {
    "telehealth": ("VR", "virtual"),
    "in-person": ("AMB", "ambulatory"),
}

# BSeR Task.businessStatus for each discharge reason, and the Task.status that goes with it.
_TASK_STATUS_BY_REASON: Mapping[str, tuple[str, str, str]] = {
    "completed": ("completed", "7.0", "Fulfillment completed"),
    "stepped_down": ("completed", "7.0", "Fulfillment completed"),
    "stepped_up": ("completed", "7.0", "Fulfillment completed"),
    "transferred": ("completed", "7.0", "Fulfillment completed"),
    "left_against_advice": ("cancelled", "6.0", "Fulfillment cancelled"),
    "other": ("completed", "7.0", "Fulfillment completed"),
}


def _meta(security: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"security": [dict(label) for label in security]} if security else {}


def _with_meta(resource: dict[str, Any], security: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    meta = _meta(security)
    if meta:
        resource["meta"] = meta
    return resource


def _identifier(system: str, value: str) -> dict[str, str]:
    return {"system": system, "value": value}


def episode_reference(episode_id: str, fhir_id: str | None) -> dict[str, Any]:
    """A reference to the episode's EpisodeOfCare: literal when we know its server id, else logical."""
    if fhir_id:
        return {"reference": resource_path("EpisodeOfCare", fhir_id)}
    return {"identifier": _identifier(EPISODE_ID_SYSTEM, episode_id)}


def _period(start: str | None, end: str | None) -> dict[str, str]:
    period = {}
    if start:
        period["start"] = start
    if end:
        period["end"] = end
    return period


def attendance_encounter(
    event: Mapping[str, Any],
    *,
    patient_reference: str,
    episode_id: str,
    episode_fhir_id: str | None = None,
    security: Sequence[Mapping[str, Any]] = (),
    session_key: str | None = None,
) -> dict[str, Any]:
    """The finished Encounter for an attended session of the episode ``episode_id``.

    The episode is an argument, not the event's: an event for a superseded episode is written to the
    episode that replaced it.
    """
    session = event["session"]
    code, display = _CLASS_BY_MODALITY.get(str(session.get("modality", "in-person")), ("AMB", "ambulatory"))
    encounter: dict[str, Any] = {
        "resourceType": "Encounter",
        "identifier": [_identifier(SESSION_ID_SYSTEM, session_key or str(session["id"]))],
        "status": "finished",
        "class": {"system": ACT_CODE, "code": code, "display": display},
        "subject": {"reference": patient_reference},
        "episodeOfCare": [episode_reference(episode_id, episode_fhir_id)],
    }
    services = [dict(c) for c in session.get("services") or []]
    if services:
        encounter["type"] = [{"coding": services}]
    period = _period(session.get("start"), session.get("end"))
    if period:
        encounter["period"] = period
    return _with_meta(encounter, security)


def noshow_appointment(
    event: Mapping[str, Any],
    *,
    patient_reference: str,
    security: Sequence[Mapping[str, Any]] = (),
    session_key: str | None = None,
) -> dict[str, Any]:
    """The Appointment marked ``noshow`` for a session the patient missed."""
    session = event["session"]
    appointment: dict[str, Any] = {
        "resourceType": "Appointment",
        "identifier": [_identifier(SESSION_ID_SYSTEM, session_key or str(session["id"]))],
        "status": "noshow",
        "participant": [{"actor": {"reference": patient_reference}, "status": "accepted"}],
    }
    services = [dict(c) for c in session.get("services") or []]
    if services:
        appointment["serviceType"] = [{"coding": services}]
    if session.get("start"):
        appointment["start"] = session["start"]
    if session.get("end"):
        appointment["end"] = session["end"]
    return _with_meta(appointment, security)


def attendance_note(
    event: Mapping[str, Any],
    *,
    patient_reference: str,
    episode_id: str,
    security: Sequence[Mapping[str, Any]] = (),
    session_key: str | None = None,
) -> dict[str, Any]:
    """A progress note (LOINC 11506-3) for an attended or missed session, keyed by the session id.

    For EHRs that cannot write Encounter or Appointment (Epic): the note says whether the patient
    attended, when, how (in person or telehealth) and which services were delivered.
    """
    session = event["session"]
    attended = session["status"] == "attended"
    modality = str(session.get("modality", "in-person"))
    lines = [
        f"IOP session {session['id']}: {'attended' if attended else 'not attended (no-show)'}",
    ]
    if attended:
        lines.append(f"Modality: {modality}")
    if session.get("start") or session.get("end"):
        lines.append(f"Scheduled: {session.get('start', '?')} to {session.get('end', '?')}")
    codes = [f"{c.get('system', '')}|{c['code']}" for c in session.get("services") or []]
    if attended and codes:
        lines.append("Services: " + ", ".join(codes))
    lines.append(f"IOP episode: {episode_id}")
    note: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "identifier": [_identifier(SESSION_ID_SYSTEM, session_key or str(session["id"]))],
        "status": "current",
        "docStatus": "final",
        "type": {"coding": [{"system": LOINC, "code": "11506-3", "display": "Progress note"}]},
        "category": [
            {
                "coding": [
                    {"system": US_CORE_DOCUMENT_CATEGORY, "code": "clinical-note", "display": "Clinical Note"}
                ]
            }
        ],
        "subject": {"reference": patient_reference},
        "date": event["occurred_at"],
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode("\n".join(lines).encode("utf-8")).decode("ascii"),
                    "title": "IOP session attendance",
                }
            }
        ],
    }
    period = _period(session.get("start"), session.get("end"))
    if period:
        note["context"] = {"period": period}
    return _with_meta(note, security)


def voided(resource: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a session resource, voided: ``cancelled`` (Encounter, Appointment) or, for a note,
    ``entered-in-error`` (a DocumentReference has no cancelled status)."""
    result = copy.deepcopy(dict(resource))
    result["status"] = (
        "entered-in-error" if result.get("resourceType") == "DocumentReference" else "cancelled"
    )
    return result


_SERVER_OWNED = frozenset({"resourceType", "id", "meta", "text"})


def _pointer(key: str) -> str:
    return "/" + key.replace("~", "~0").replace("/", "~1")


def json_patch(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The JSON Patch (RFC 6902) that makes ``current`` carry ``wanted``'s elements.

    Only elements we write are touched (one ``add``/``replace`` per changed top-level element, the
    security labels under ``/meta/security``): elements the server added, and ``id``/``meta``/``text``,
    are left alone, so the patch is as small as Millennium's PATCH support wants. Empty: nothing changed.
    """
    ops: list[dict[str, Any]] = []
    for key, value in wanted.items():
        if key in _SERVER_OWNED or current.get(key) == value:
            continue
        ops.append({"op": "replace" if key in current else "add", "path": _pointer(key), "value": value})
    security = (wanted.get("meta") or {}).get("security")
    current_meta = current.get("meta") or {}
    if security and current_meta.get("security") != security:
        if "meta" in current:
            op = "replace" if "security" in current_meta else "add"
            ops.append({"op": op, "path": "/meta/security", "value": security})
        else:
            ops.append({"op": "add", "path": "/meta", "value": {"security": security}})
    return ops


def has_identifier(resource: Mapping[str, Any], system: str, value: str) -> bool:
    return any(
        isinstance(i, Mapping) and i.get("system") == system and i.get("value") == value
        for i in resource.get("identifier") or []
    )


def search_window(resource: Mapping[str, Any]) -> tuple[str, str] | None:
    """The days (``YYYY-MM-DD``, first and last) a resource we write is dated on, for ``date`` searches."""
    kind = resource.get("resourceType")
    if kind == "Appointment":
        start, end = resource.get("start"), resource.get("end")
    elif kind == "Encounter":
        period = resource.get("period") or {}
        start, end = period.get("start"), period.get("end")
    else:
        start = end = resource.get("date")
    start = start or end
    end = end or start
    if not start or not end:
        return None
    return str(start)[:10], str(end)[:10]


def finished_episode_of_care(existing: Mapping[str, Any], *, end_date: str) -> dict[str, Any]:
    """The EpisodeOfCare closed on ``end_date``: finished, period end, the old status kept in history."""
    result = copy.deepcopy(dict(existing))
    previous = str(result.get("status", "active"))
    period = dict(result.get("period") or {})
    if previous != "finished":
        history = list(result.get("statusHistory") or [])
        history.append({"status": previous, "period": _period(period.get("start"), end_date)})
        result["statusHistory"] = history
    result["status"] = "finished"
    # A discharge the program reports is a recorded discharge: our own derived exit reason no longer holds.
    meta = dict(result.get("meta") or {})
    if meta.get("tag"):
        meta["tag"] = [t for t in meta["tag"] if t.get("system") != EXIT_REASON_SYSTEM]
        if not meta["tag"]:
            del meta["tag"]
        result["meta"] = meta
    period["end"] = end_date
    result["period"] = period
    return result


def discharge_document(
    event: Mapping[str, Any],
    *,
    patient_reference: str,
    episode_start: str | None,
    episode_fhir_id: str | None = None,
    security: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The discharge summary as a DocumentReference (LOINC 18842-5), keyed by the event id."""
    discharge = event["discharge"]
    summary = str(discharge.get("summary") or "")
    lines = [f"Discharge reason: {discharge.get('reason', 'other')}"]
    if discharge.get("to_level"):
        lines.append(f"Next level of care: {discharge['to_level']}")
    disposition = discharge.get("disposition")
    if disposition:
        lines.append(f"Disposition: {disposition.get('system', '')}|{disposition.get('code', '')}")
    if summary:
        lines.append("")
        lines.append(summary)
    text = "\n".join(lines)
    document: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "identifier": [_identifier(EVENT_ID_SYSTEM, str(event["event_id"]))],
        "status": "current",
        "docStatus": "final",
        "type": {"coding": [{"system": LOINC, "code": "18842-5", "display": "Discharge summary"}]},
        "subject": {"reference": patient_reference},
        "date": event["occurred_at"],
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                    "title": "IOP discharge summary",
                }
            }
        ],
        "context": {"period": _period(episode_start, str(discharge["date"]))},
    }
    if episode_fhir_id:
        document["context"]["related"] = [{"reference": resource_path("EpisodeOfCare", episode_fhir_id)}]
    return _with_meta(document, security)


def task_after_discharge(task: Mapping[str, Any], *, reason: str) -> dict[str, Any]:
    """The referral Task with the status and BSeR business status that the discharge reason implies."""
    status, code, display = _TASK_STATUS_BY_REASON.get(reason, _TASK_STATUS_BY_REASON["other"])
    result = copy.deepcopy(dict(task))
    result["status"] = status
    result["businessStatus"] = {
        "coding": [{"system": BSER_BUSINESS_STATUS, "code": code, "display": display}]
    }
    return result


def provenance(
    target_reference: str,
    *,
    recorded: str,
    created: bool,
    security: Sequence[Mapping[str, Any]] = (),
    source: tuple[str, str] | None = None,
    agent: str = AGENT_NAME,
) -> dict[str, Any]:
    """A Provenance for one write: this service (a Device named ``agent``) as transmitter, CREATE or
    UPDATE, of ``target_reference`` (versioned where the server told us the version).

    ``source`` is the ``(system, value)`` identifier of what caused the write (the event id, or the
    episode id for the cycle's EpisodeOfCare): an id of ours, never PHI.
    """
    operation = "CREATE" if created else "UPDATE"
    resource: dict[str, Any] = {
        "resourceType": "Provenance",
        "target": [{"reference": target_reference}],
        "recorded": recorded,
        "activity": {"coding": [{"system": DATA_OPERATION, "code": operation}]},
        "agent": [
            {
                "type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "transmitter"}]},
                "who": {"type": "Device", "display": agent},
            }
        ],
    }
    if source is not None:
        system, value = source
        resource["entity"] = [{"role": "source", "what": {"identifier": _identifier(system, value)}}]
    return _with_meta(resource, security)


def versioned(reference: str, version: str | None) -> str:
    """``Type/id/_history/v`` when the server gave a version (an ETag ``W/"v"`` or a bare ``v``)."""
    if not version:
        return reference
    bare = version.removeprefix("W/").strip('"')
    return f"{reference}/_history/{bare}" if bare else reference

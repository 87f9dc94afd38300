"""Event authority: a write-back event speaks only for its own episode's patient (issue 10, item 3).

An attendance or discharge event names its EHR, its episode and its patient, and travels under the
message key ``{ehr}|Patient/{id}``. Before anything is written, all of them must agree:

- the patient the body names is the episode's: its ``reference`` is the episode's patient reference,
  and every ``identifier`` it gives is one of the identifiers the episode carries (same ``system``,
  same ``value``). An identifier of the episode's identifier system with another value names another
  patient (``patient_mismatch``); one that cannot be tied to the episode's patient (no system, a system
  the episode does not carry, or an episode that carries no identifiers) is refused too
  (``patient_unverified``): an identifier we cannot check is no evidence of whose event it is;
- the key names the body's EHR and the episode's patient (``key_mismatch``); a key that is not
  ``{ehr}|Patient/{id}`` is ``key_invalid``, a record without one ``key_missing`` (see
  ``require_key``).

Every refusal is a ``PermanentEventError`` (the consumer dead-letters the record) whose message starts
with its code and names the event, episode, EHR, patient ids and identifier systems, never an
identifier's value, an identifier system the episode does not carry, nor the text of a malformed key
(any of them may be PHI).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from schemas.topics import parse_message_key
from sync.errors import PermanentEventError

PATIENT_MISMATCH: Final = "patient_mismatch"
PATIENT_UNVERIFIED: Final = "patient_unverified"
KEY_MISMATCH: Final = "key_mismatch"
KEY_INVALID: Final = "key_invalid"
KEY_MISSING: Final = "key_missing"


def _refuse(code: str, text: str) -> PermanentEventError:
    return PermanentEventError(f"{code}: {text}; nothing written")


def parse_key(key: str, event_id: str) -> tuple[str, str]:
    """``(ehr, "Patient/<id>")`` of a message key; ``key_invalid`` when it is not ours."""
    try:
        ehr, patient_id = parse_message_key(key)
    except ValueError:
        raise _refuse(
            KEY_INVALID, f"event {event_id}: the message key is not '{{ehr}}|Patient/{{id}}'"
        ) from None
    return ehr, f"Patient/{patient_id}"


def require_key(key: str | None, event: Mapping[str, Any]) -> tuple[str, str]:
    """The record's key, checked against what its body says (before the EHR is asked anything).

    A write-back record must be keyed: the key is the contract (``attendance.v1``, ``discharge.v1``)
    and what keeps one patient's events in order on one partition; a keyless producer spreads a
    patient's events over partitions, where they race. So a missing key is refused, not trusted.
    """
    event_id = str(event.get("event_id"))
    if key is None:
        raise _refuse(KEY_MISSING, f"event {event_id} has no message key ('{{ehr}}|Patient/{{id}}')")
    parsed = parse_key(key, event_id)
    check_key_body(parsed, event)
    return parsed


def check_key_body(key: tuple[str, str], event: Mapping[str, Any]) -> None:
    """The key names the body's EHR, and the body's patient reference where it gives one."""
    ehr, patient = key
    event_id = str(event.get("event_id"))
    body_ehr = str(event.get("ehr"))
    if ehr != body_ehr:
        raise _refuse(KEY_MISMATCH, f"event {event_id}: the key names EHR {ehr!r}, the body {body_ehr!r}")
    reference = (event.get("patient") or {}).get("reference")
    if reference is not None and reference != patient:
        raise _refuse(KEY_MISMATCH, f"event {event_id}: the key names {patient}, the body {reference}")


def check_key_episode(key: tuple[str, str], event: Mapping[str, Any], episode: Mapping[str, Any]) -> None:
    """The key names the episode's patient (the body may give only identifiers, resolved to it)."""
    check_key_body(key, event)
    expected = (episode.get("patient") or {}).get("reference")
    if key[1] != expected:
        raise _refuse(
            KEY_MISMATCH,
            f"event {event.get('event_id')}: the key names {key[1]}, "
            f"but episode {episode.get('episode_id')} is {expected}",
        )


def _pairs(identifiers: Any) -> list[tuple[str | None, str | None]]:
    result: list[tuple[str | None, str | None]] = []
    for identifier in identifiers if isinstance(identifiers, list) else []:
        if isinstance(identifier, Mapping):
            system, value = identifier.get("system"), identifier.get("value")
            result.append(
                (system if isinstance(system, str) else None, value if isinstance(value, str) else None)
            )
    return result


def check_patient(event: Mapping[str, Any], episode: Mapping[str, Any]) -> None:
    """The body's patient (reference and identifiers) is the episode's own patient."""
    event_id = event.get("event_id")
    episode_id = episode.get("episode_id")
    given: Mapping[str, Any] = event.get("patient") or {}
    owner: Mapping[str, Any] = episode.get("patient") or {}
    expected = owner.get("reference")
    reference = given.get("reference")
    if reference is not None and reference != expected:
        raise _refuse(
            PATIENT_MISMATCH, f"event {event_id} names {reference} but episode {episode_id} is {expected}"
        )
    known = set(_pairs(owner.get("identifier")))
    known_systems = {system for system, _ in known if system is not None}
    for index, (system, value) in enumerate(_pairs(given.get("identifier"))):
        where = f"event {event_id}: patient.identifier[{index}]"
        if system is None:
            raise _refuse(
                PATIENT_UNVERIFIED, f"{where} has no system: it cannot be tied to episode {episode_id}"
            )
        if (system, value) in known:
            continue
        if system in known_systems:
            raise _refuse(
                PATIENT_MISMATCH, f"{where} ({system}) names another patient than episode {episode_id}'s"
            )
        raise _refuse(  # the system is the sender's text, not one of ours: not echoed
            PATIENT_UNVERIFIED,
            f"{where} is of an identifier system episode {episode_id} does not carry: "
            "it cannot be tied to the episode's patient",
        )
    if reference is None and not known & set(_pairs(given.get("identifier"))):
        raise _refuse(PATIENT_UNVERIFIED, f"event {event_id} names no patient of episode {episode_id}")

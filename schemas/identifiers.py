"""Identifier systems of the resources iop-bridge writes, and the idempotency keys they carry.

They live beside the event contracts because they are part of the contract with the EHR: a resource we
wrote comes back on the next pull, and the mappers must recognise it by these systems, never mistake it
for new care. Each is a URN of ours, so no EHR identifier can collide with it.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import quote

#: The episode an EpisodeOfCare we wrote stands for: value = episode_id (uuid5). Conditional
#: create/update of that EpisodeOfCare is keyed on it.
EPISODE_ID_SYSTEM: Final = "urn:iop-bridge:episode-id"
#: One IOP session: value = ``session_key(episode_id, program, session.id)`` of the attendance event
#: (programs number their sessions alike, so the program's session id alone names no session). The
#: attendance Encounter/Appointment for a session is keyed on it, so a later event for the same session
#: updates the resource instead of creating a second one.
SESSION_ID_SYSTEM: Final = "urn:iop-bridge:session-id"
#: Any other resource we create carries the ``event_id`` of the event that caused it (idempotency key).
EVENT_ID_SYSTEM: Final = "urn:iop-bridge:event-id"
#: A ``meta.tag`` on a finished EpisodeOfCare we wrote: the exit reason we derived (``lost_to_follow_up``,
#: ``stepped_up``, …). Read back, it tells our own conclusion apart from a recorded discharge.
EXIT_REASON_SYSTEM: Final = "urn:iop-bridge:exit-reason"


#: The program part of a session key when the event names no program.
NO_PROGRAM: Final = "-"


def session_key(episode_id: str, program: str | None, session_id: str) -> str:
    """``{episode_id}:{program}:{session_id}``: one program's session of one episode.

    Unambiguous: an episode id is a uuid and a program name has no ``:`` (``attendance.v1``), so the
    first two ``:`` end them; ``-`` (no program) is no valid program name.
    """
    return f"{episode_id}:{program or NO_PROGRAM}:{session_id}"


def token(system: str, value: str) -> str:
    """The FHIR search token ``system|value`` (for ``identifier=`` and ``If-None-Exist``)."""
    return f"{system}|{value}"


#: A FHIR ``id`` (R4 ``id`` datatype): 1 to 64 of ``A-Z a-z 0-9 - .``; ``.`` and ``..`` alone are refused too
#: (they are path segments, not ids).
_FHIR_ID: Final = re.compile(r"[A-Za-z0-9\-.]{1,64}")


#: What a server's id may be, strict FHIR aside, and still be one path segment: RFC 3986 unreserved
#: characters (Oracle sends ``_``; pulls tolerate that), never ``.`` or ``..`` alone.
_PATH_SEGMENT: Final = re.compile(r"[A-Za-z0-9\-._~]+")


def bad_id_reason(value: object) -> str:
    """Why ``value`` is refused as an id, by its length (or type) only: the value itself may be PHI."""
    if not isinstance(value, str):
        return f"invalid id (a {type(value).__name__}, not a string)"
    return f"invalid id ({len(value)} characters)"


class InvalidIdError(ValueError):
    """An id that cannot be a FHIR id, so must never reach a URL path. The message names the resource
    type and the length only (``bad_id_reason``)."""

    def __init__(self, resource_type: str, value: object) -> None:
        super().__init__(bad_id_reason(value).replace("invalid id", f"invalid {resource_type} id", 1))
        self.resource_type = resource_type


def is_fhir_id(value: object) -> bool:
    """True for a valid FHIR id that is not ``.`` or ``..``."""
    return isinstance(value, str) and _FHIR_ID.fullmatch(value) is not None and value.strip(".") != ""


def is_path_safe_id(value: object) -> bool:
    """True for an id that is one URL path segment as it stands (``is_fhir_id``, or a vendor's id with
    ``_``/``~`` or over 64 characters); what a pull keeps, under its ``id-format`` tolerance."""
    return isinstance(value, str) and _PATH_SEGMENT.fullmatch(value) is not None and value.strip(".") != ""


def checked_id(resource_type: str, value: object) -> str:
    """``value`` when it is a FHIR id (``is_fhir_id``), else ``InvalidIdError``."""
    if not is_fhir_id(value):
        raise InvalidIdError(resource_type, value)
    return str(value)


def resource_path(resource_type: str, value: object) -> str:
    """``{resource_type}/{id}`` for a URL path or a reference: the id checked and percent-encoded (the
    one way an id from the server, the state or an event is put in a path)."""
    return f"{resource_type}/{quote(checked_id(resource_type, value), safe='')}"

"""A FHIR R4 ``EpisodeOfCare`` per episode record (episode-model.md "Outputs" 2), validated.

The resource is what iop-bridge writes back to an EHR and what ``iop-bridge map --format fhir`` prints:

- ``identifier`` ``urn:iop-bridge:episode-id|<episode_id>`` (so it is recognised as ours when it comes
  back on the next pull, and so conditional writes are keyed on it); ``id`` is the episode id too;
- ``status`` active / finished / cancelled, and ``statusHistory`` (active over the episode's span, then
  finished from its end);
- ``type`` = the level, coded in ``urn:iop-bridge:level-of-care`` with a readable text;
- ``period`` from the episode's first to its last day;
- ``diagnosis``: the billing diagnoses, principal first (rank 1), each referencing its Condition, or a
  contained Condition when the diagnosis is only a code;
- ``referralRequest``, ``patient``, ``managingOrganization`` (when the caller knows the program's
  Organization) and ``meta.security`` (ETH, R, 42CFRPart2) for Part 2 episodes;
- ``meta.tag`` ``urn:iop-bridge:exit-reason|<reason>`` on a finished episode: when the resource comes
  back on the next pull, its ``finished`` status then says how it ended (``discharged``, or a derived
  ``lost_to_follow_up`` / ``stepped_up`` / ``stepped_down``), so a reader need not take every finished
  EpisodeOfCare of ours for a discharge.

Every resource is checked with ``fhir.resources.R4B`` before it is returned; a record that cannot make a
valid EpisodeOfCare raises ``EpisodeOfCareError`` naming the episode and what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from pydantic import ValidationError

from mappers.codes import LEVEL_SYSTEM
from schemas.identifiers import EPISODE_ID_SYSTEM, EXIT_REASON_SYSTEM

__all__ = [
    "DIAGNOSIS_ROLE_SYSTEM",
    "EXIT_REASON_SYSTEM",
    "LEVEL_DISPLAY",
    "EpisodeOfCareError",
    "episode_of_care",
]

#: Readable names of the program levels (EpisodeOfCare.type display and text).
LEVEL_DISPLAY: Final[Mapping[str, str]] = {
    "iop": "Intensive outpatient program",
    "php": "Partial hospitalization program",
    "residential": "Residential treatment program",
}
DIAGNOSIS_ROLE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/diagnosis-role"
#: ``meta.tag`` system carrying a finished episode's exit reason (code = episode.v1 ``exit.reason``).
_STATUSES: Final = frozenset({"active", "finished", "cancelled"})


class EpisodeOfCareError(ValueError):
    """An episode record cannot become a valid FHIR R4 EpisodeOfCare."""

    def __init__(self, episode_id: str, problem: str) -> None:
        super().__init__(f"EpisodeOfCare for episode {episode_id}: {problem}")
        self.episode_id = episode_id
        self.problem = problem


def _reference(value: Any) -> dict[str, str] | None:
    if isinstance(value, (dict, Mapping)) and isinstance(value.get("reference"), str) and value["reference"]:
        return {"reference": value["reference"]}
    return None


def _period(start: Any, end: Any) -> dict[str, str]:
    period = {}
    if isinstance(start, str) and start:
        period["start"] = start
    if isinstance(end, str) and end:
        period["end"] = end
    return period


def _status_history(status: str, start: Any, end: Any) -> list[dict[str, Any]]:
    if status == "cancelled" or not start:
        return []
    history: list[dict[str, Any]] = [{"status": "active", "period": _period(start, end)}]
    if status == "finished" and end:
        history.append({"status": "finished", "period": _period(end, None)})
    return history


def _diagnoses(
    episode: Mapping[str, Any], patient: Mapping[str, str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(diagnosis entries, contained Conditions)`` from the record's billing diagnoses."""
    billing = episode.get("billing") or {}
    entries: list[dict[str, Any]] = []
    contained: list[dict[str, Any]] = []
    for rank, diagnosis in enumerate(billing.get("diagnoses") or [], start=1):
        condition = _reference(diagnosis.get("condition"))
        if condition is None:
            local_id = f"dx{len(contained) + 1}"
            coding = {"system": diagnosis["system"], "code": diagnosis["code"]}
            contained.append(
                {
                    "resourceType": "Condition",
                    "id": local_id,
                    "subject": dict(patient),
                    "code": {"coding": [coding]},
                }
            )
            condition = {"reference": f"#{local_id}"}
        entries.append(
            {
                "condition": condition,
                "role": {
                    "coding": [{"system": DIAGNOSIS_ROLE_SYSTEM, "code": "billing", "display": "Billing"}]
                },
                "rank": rank,
            }
        )
    return entries, contained


def episode_of_care(
    episode: Mapping[str, Any], *, managing_organization: str | None = None
) -> dict[str, Any]:
    """The FHIR R4 EpisodeOfCare (a dict, validated with ``fhir.resources.R4B``) of an episode.v1 record.

    ``managing_organization`` is a reference such as ``"Organization/iop-north"`` (the program's
    Organization in the EHR, from the connection's config), left out when None.
    """
    episode_id = str(episode.get("episode_id") or "(no episode_id)")
    try:
        resource = _build(episode, episode_id, managing_organization)
    except (KeyError, TypeError, AttributeError) as exc:
        raise EpisodeOfCareError(
            episode_id, f"malformed episode record ({type(exc).__name__}: {exc})"
        ) from exc
    # fhir.resources loads here, on the first EpisodeOfCare: mapping episodes alone never needs it.
    from fhir.resources.R4B.episodeofcare import EpisodeOfCare

    try:
        EpisodeOfCare.model_validate(resource)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(root)'}: {error['msg']}" for error in exc.errors()
        )
        raise EpisodeOfCareError(episode_id, problems) from exc
    return resource


def _build(episode: Mapping[str, Any], episode_id: str, managing_organization: str | None) -> dict[str, Any]:
    status = episode["status"]
    if status not in _STATUSES:
        raise EpisodeOfCareError(episode_id, f"status {status!r} is not one of active, finished, cancelled")
    level = episode["level"]
    if level not in LEVEL_DISPLAY:
        raise EpisodeOfCareError(episode_id, f"level {level!r} is not one of {', '.join(LEVEL_DISPLAY)}")
    patient = _reference(episode["patient"])
    if patient is None:
        raise EpisodeOfCareError(episode_id, "the episode has no patient reference")
    resource: dict[str, Any] = {"resourceType": "EpisodeOfCare", "id": episode_id}
    meta: dict[str, Any] = {}
    security = [dict(label) for label in episode.get("security") or []]
    if security:
        meta["security"] = security
    exit_reason = (episode.get("exit") or {}).get("reason") if status == "finished" else None
    if isinstance(exit_reason, str) and exit_reason:
        meta["tag"] = [{"system": EXIT_REASON_SYSTEM, "code": exit_reason}]
    if meta:
        resource["meta"] = meta
    diagnoses, contained = _diagnoses(episode, patient)
    if contained:
        resource["contained"] = contained
    resource["identifier"] = [{"system": EPISODE_ID_SYSTEM, "value": episode_id}]
    resource["status"] = status
    history = _status_history(status, episode.get("start"), episode.get("end"))
    if history:
        resource["statusHistory"] = history
    display = LEVEL_DISPLAY[level]
    resource["type"] = [
        {"coding": [{"system": LEVEL_SYSTEM, "code": level, "display": display}], "text": display}
    ]
    if diagnoses:
        resource["diagnosis"] = diagnoses
    resource["patient"] = patient
    if managing_organization:
        resource["managingOrganization"] = {"reference": managing_organization}
    period = _period(episode.get("start"), episode.get("end"))
    if period:
        resource["period"] = period
    referral = _reference(episode.get("referral"))
    if referral is not None:
        resource["referralRequest"] = [referral]
    return resource

"""Encounters and EpisodeOfCare resources read once into small typed records the engine sorts and groups.

A ``Visit`` is one Encounter with its times in the EHR's zone, its own classification and, once grouping
hints are applied, its effective level. A ``Grouping`` is one EpisodeOfCare: an EHR's own (a grouping hint
that anchors an episode) or ours (carrying ``urn:iop-bridge:episode-id``: never an anchor).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from typing import Any, Final

from mappers.fhir import FhirValueError, element, items, parse_datetime
from mappers.index import Reject, resolve
from mappers.levels import Classification, Classifier, References, classify_encounter, service_codes
from mappers.rules import Rules
from schemas.identifiers import EPISODE_ID_SYSTEM, EXIT_REASON_SYSTEM, SESSION_ID_SYSTEM

ATTENDED: Final = frozenset({"finished", "arrived", "triaged", "in-progress", "onleave"})
GROUPING_STATUSES: Final = frozenset({"active", "onhold", "finished"})


@dataclass(slots=True, eq=False)
class Visit:
    key: str
    resource: Mapping[str, Any]
    status: str
    attended: bool
    start: datetime
    end: datetime | None
    day: date
    classification: Classification
    level: str | None
    part_of: str | None
    episodes_of_care: list[str]
    session_id: str | None
    disposition: dict[str, Any] | None
    codes: list[tuple[str, str]] = field(default_factory=list)  # type/serviceType (system key, code)
    is_admission: bool = False
    hint: str | None = None  # key of the Grouping or admission Encounter that groups it
    day_zone: tzinfo | None = None

    last_moment: datetime = field(init=False)
    last_day: date = field(init=False)

    def __post_init__(self) -> None:
        self.last_moment = self.end if self.end is not None and self.end >= self.start else self.start
        if self.day_zone is None or self.last_moment is self.start:
            self.last_day = self.day  # the start's own day (``day`` is the start in ``day_zone``)
        else:
            self.last_day = self.last_moment.astimezone(self.day_zone).date()


@dataclass
class Grouping:
    key: str
    resource: Mapping[str, Any]
    status: str
    ours: str | None  # our episode id when we wrote it
    #: On our own EpisodeOfCare: the exit reason we derived when we wrote it finished
    #: (``urn:iop-bridge:exit-reason`` tag). Anything but "discharged" means the finished status is our
    #: own conclusion coming back, not a discharge the EHR or the program recorded.
    exit_reason: str | None
    start: datetime | None
    end: datetime | None
    level: str | None
    classification: Classification
    members: list[str] = field(default_factory=list)


def _identifier_value(resource: Mapping[str, Any], system: str) -> str | None:
    for identifier in items(resource, "identifier"):
        if isinstance(identifier, (dict, Mapping)) and identifier.get("system") == system:
            value = identifier.get("value")
            return value if isinstance(value, str) else ""
    return None


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def _period(
    resource: Mapping[str, Any], zone: tzinfo, rejects: list[Reject]
) -> tuple[datetime | None, datetime | None, bool]:
    period = resource.get("period")
    if period is None:
        return None, None, True
    if not isinstance(period, (dict, Mapping)):
        period = {}
    start = end = None
    try:
        if (text := period.get("start")) is not None:
            start = parse_datetime(text, zone)
        if (text := period.get("end")) is not None:
            end = parse_datetime(text, zone)
    except FhirValueError as exc:
        rejects.append(Reject(str(resource["resourceType"]), str(resource.get("id")), f"period: {exc}"))
        return None, None, False
    return start, end, True


def read_visit(
    encounter: Mapping[str, Any],
    *,
    zone: tzinfo,
    context: References,
    shared: Mapping[str, Mapping[str, Any]],
    rules: Rules,
    rejects: list[Reject],
    unplaced: list[str | None],
    classifier: Classifier | None = None,
) -> Visit | None:
    """One Encounter as a Visit, or None (a Reject, or its level added to ``unplaced``)."""
    status = str(encounter.get("status") or "unknown")
    attended = status in ATTENDED
    start, end, ok = _period(encounter, zone, rejects)
    if not ok:
        return None
    codes = service_codes(encounter)
    if classifier is not None:
        classification = classifier.classify(encounter, codes)
    else:
        classification = classify_encounter(encounter, context, rules, codes=codes)
    if start is None:
        # Attended level-of-care care we cannot place in time is a reject; anything else without a time
        # (a planned visit, a lab encounter) is only counted by its level.
        if attended and classification.level is not None:
            rejects.append(Reject("Encounter", str(encounter.get("id")), "no period.start"))
        else:
            unplaced.append(classification.level)
        return None
    hospitalization = encounter.get("hospitalization")
    disposition = None
    if hospitalization is not None and isinstance(hospitalization, (dict, Mapping)):
        coding = element(hospitalization, "dischargeDisposition").get("coding") or []
        coding = coding if isinstance(coding, list) else []
        first = next(
            (
                c
                for c in coding
                if isinstance(c, (dict, Mapping)) and c.get("code") and isinstance(c["code"], str)
            ),
            None,
        )
        if first is not None:  # strings only: a number where FHIR says string is not carried into records
            disposition = {
                k: first[k]
                for k in ("system", "code", "display")
                if first.get(k) and isinstance(first[k], str)
            }
        elif hospitalization.get("dischargeDisposition"):
            disposition = {}
    part_of = resolve(encounter.get("partOf"), shared) if encounter.get("partOf") is not None else None
    episodes = (
        [key for ref in items(encounter, "episodeOfCare") if (key := _episode_key(ref, shared)) is not None]
        if encounter.get("episodeOfCare") is not None
        else []
    )
    identified = encounter.get("identifier") is not None
    return Visit(
        key=f"Encounter/{encounter['id']}",
        resource=encounter,
        status=status,
        attended=attended,
        start=start,
        end=end,
        day=start.astimezone(zone).date(),
        classification=classification,
        level=classification.level,
        part_of=part_of if part_of and part_of.startswith("Encounter/") else None,
        episodes_of_care=sorted(set(episodes)) if episodes else episodes,
        session_id=(_identifier_value(encounter, SESSION_ID_SYSTEM) or None) if identified else None,
        disposition=disposition,
        codes=codes,
        day_zone=zone,
    )


def _episode_key(reference: Any, shared: Mapping[str, Mapping[str, Any]]) -> str | None:
    """``EpisodeOfCare/<id>`` for a literal reference, ``ours:<episode id>`` for our logical one."""
    if isinstance(reference, (dict, Mapping)) and not reference.get("reference"):
        identifier = reference.get("identifier")
        if isinstance(identifier, (dict, Mapping)) and identifier.get("system") == EPISODE_ID_SYSTEM:
            return f"ours:{identifier.get('value')}"
        return None
    key = resolve(reference, shared)
    return key if key and key.startswith("EpisodeOfCare/") else None


def _exit_reason_tag(resource: Mapping[str, Any]) -> str | None:
    meta = resource.get("meta")
    for tag in items(meta, "tag") if isinstance(meta, (dict, Mapping)) else ():
        if (
            isinstance(tag, (dict, Mapping))
            and tag.get("system") == EXIT_REASON_SYSTEM
            and isinstance(tag.get("code"), str)
        ):
            return str(tag["code"])
    return None


def read_grouping(
    resource: Mapping[str, Any], *, zone: tzinfo, rules: Rules, rejects: list[Reject]
) -> Grouping | None:
    start, end, ok = _period(resource, zone, rejects)
    if not ok:
        return None
    ours = _identifier_value(resource, EPISODE_ID_SYSTEM)
    if ours is not None and not _is_uuid(ours):
        rejects.append(
            Reject("EpisodeOfCare", str(resource["id"]), f"{EPISODE_ID_SYSTEM} value is not a UUID")
        )
        return None
    classification = classify_encounter({"type": resource.get("type")}, {}, rules)
    return Grouping(
        key=f"EpisodeOfCare/{resource['id']}",
        resource=resource,
        status=str(resource.get("status") or "unknown"),
        ours=ours,
        exit_reason=_exit_reason_tag(resource) if ours is not None else None,
        start=start,
        end=end,
        level=classification.level,
        classification=classification,
    )

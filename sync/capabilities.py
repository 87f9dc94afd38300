"""What one EHR lets write-back do, read from its CapabilityStatement (``[base]/metadata``) at start-up.

Each vendor profile has a plan: for every *purpose* (an attended session, an absent one, the discharge
summary, ...) the resource type it writes and the interactions that needs (``domain.md`` §3.6, §3.7, §4.5):

============================  ==========================  ===========================  ====================
purpose                       generic (and hapi)          epic                         oracle
============================  ==========================  ===========================  ====================
attended session              Encounter                   DocumentReference (note)     Encounter
absent session                Appointment (noshow)        DocumentReference (note)     Appointment (noshow)
finish the EpisodeOfCare      EpisodeOfCare               -                            -
discharge summary             DocumentReference           DocumentReference            DocumentReference
referral Task business status Task                        Task                         Task, if offered
Provenance of each write      Provenance, if offered      Provenance, if offered       Provenance, if offered
============================  ==========================  ===========================  ====================

Epic cannot write Encounter, Appointment or EpisodeOfCare (read/search only), so its attendance is a
progress note; Oracle has no EpisodeOfCare and its Task is not writable in the published statement, so its
Task update is used only where a tenant offers it. "Change" means ``update`` (PUT) or, where the server
has only ``patch``, a JSON Patch (Oracle's Encounter and Appointment).

The plan is checked against the server's statement (``rest[mode=server].resource[type]``: its
``interaction`` codes, ``conditionalCreate``, ``conditionalUpdate``, ``versioning``, ``searchParam`` and
the statement's ``patchFormat``). A required purpose the server cannot serve is *off*: an event needing it
is permanent, with a reason naming the EHR and the missing interaction. An optional one is simply not
written. How each resource is kept idempotent follows from the same statement: ``If-None-Exist`` where
``conditionalCreate`` is true, else a search by our identifier before the create (§6.16), else a search
by patient and date filtered by our identifier.

Provenance goes *after* its write, as its own POST, not in one transaction Bundle with the resource: of
the recorded servers only HAPI offers ``transaction`` (Oracle: ``batch``, not atomic; Epic takes no
Provenance), a JSON Patch (Oracle's only way to change an Encounter) cannot go in a Bundle, and on HAPI a
conditional create in a transaction that matches the resource an earlier try wrote still creates the
Bundle's Provenance, once per try. Sent after, the Provenance targets the exact version the write made;
one that fails is kept and sent first when the event is retried, while the write itself is then found
already done (``sync.writeback``), so a resource is never written twice for its Provenance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import structlog

from connectors.errors import EhrError
from connectors.http import EhrClient
from sync.errors import ConfigError, PermanentEventError

__all__ = [
    "ALL_INTERACTIONS",
    "JSON_PATCH",
    "Purpose",
    "ResourceAccess",
    "Targets",
    "discover_targets",
    "fetch_capability",
    "resource_access",
    "targets_for",
]

log = structlog.get_logger()

JSON_PATCH = "application/json-patch+json"
#: The RESTful interactions of a resource type (R4 ``TypeRestfulInteraction``).
ALL_INTERACTIONS = frozenset(
    {
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    }
)
_CHANGE = "update|patch"


class Purpose(StrEnum):
    """One thing write-back does at the EHR."""

    ATTENDED = "attended"
    ABSENT = "absent"
    EPISODE_OF_CARE = "episode_of_care"
    DISCHARGE_SUMMARY = "discharge_summary"
    REFERRAL_TASK = "referral_task"
    PROVENANCE = "provenance"


@dataclass(frozen=True)
class ResourceAccess:
    """What one server lets us do with one resource type."""

    interactions: frozenset[str] = ALL_INTERACTIONS
    conditional_create: bool = True
    conditional_update: bool = False
    versioning: str = "versioned"
    #: The search parameters the server lists; None when it lists none (then any is assumed).
    search_params: frozenset[str] | None = None

    def can(self, interaction: str) -> bool:
        """True when the server offers ``interaction``; ``"update|patch"`` is either of the two."""
        if interaction == _CHANGE:
            return bool({"update", "patch"} & self.interactions)
        return interaction in self.interactions

    def searchable_by(self, *params: str) -> bool:
        if "search-type" not in self.interactions:
            return False
        return self.search_params is None or all(p in self.search_params for p in params)

    @property
    def change_method(self) -> str | None:
        """How we change a resource here: PUT (a whole new version), else PATCH (JSON Patch), else None."""
        if "update" in self.interactions:
            return "PUT"
        if "patch" in self.interactions:
            return "PATCH"
        return None


_NO_ACCESS = ResourceAccess(interactions=frozenset(), conditional_create=False, search_params=frozenset())


@dataclass(frozen=True)
class _Want:
    resource_type: str
    interactions: tuple[str, ...]
    required: bool = True


_PLANS: Mapping[str, Mapping[Purpose, _Want]] = MappingProxyType(
    {
        "generic": MappingProxyType(
            {
                Purpose.ATTENDED: _Want("Encounter", ("create", "read", _CHANGE)),
                Purpose.ABSENT: _Want("Appointment", ("create", "read", _CHANGE)),
                Purpose.EPISODE_OF_CARE: _Want("EpisodeOfCare", ("read", _CHANGE)),
                Purpose.DISCHARGE_SUMMARY: _Want("DocumentReference", ("create",)),
                Purpose.REFERRAL_TASK: _Want("Task", ("search-type", "read", _CHANGE)),
                Purpose.PROVENANCE: _Want("Provenance", ("create",), required=False),
            }
        ),
        "epic": MappingProxyType(
            {
                Purpose.ATTENDED: _Want("DocumentReference", ("create", "read", _CHANGE)),
                Purpose.ABSENT: _Want("DocumentReference", ("create", "read", _CHANGE)),
                Purpose.DISCHARGE_SUMMARY: _Want("DocumentReference", ("create",)),
                Purpose.REFERRAL_TASK: _Want("Task", ("search-type", "read", _CHANGE)),
                Purpose.PROVENANCE: _Want("Provenance", ("create",), required=False),
            }
        ),
        "oracle": MappingProxyType(
            {
                Purpose.ATTENDED: _Want("Encounter", ("create", "read", _CHANGE)),
                Purpose.ABSENT: _Want("Appointment", ("create", "read", _CHANGE)),
                Purpose.DISCHARGE_SUMMARY: _Want("DocumentReference", ("create",)),
                Purpose.REFERRAL_TASK: _Want("Task", ("search-type", "read", _CHANGE), required=False),
                Purpose.PROVENANCE: _Want("Provenance", ("create",), required=False),
            }
        ),
    }
)
_STYLE_BY_PROFILE = {"generic": "generic", "hapi": "generic", "epic": "epic", "oracle": "oracle"}


def _style(profile_name: str) -> str:
    try:
        return _STYLE_BY_PROFILE[profile_name]
    except KeyError:
        known = ", ".join(sorted(_STYLE_BY_PROFILE))
        raise ConfigError(
            f"no write-back plan for vendor profile {profile_name!r} (known: {known})"
        ) from None


def _full_plan(style: str) -> Mapping[Purpose, str]:
    return MappingProxyType({p: w.resource_type for p, w in _PLANS[style].items()})


@dataclass(frozen=True)
class Targets:
    """What write-back writes at one EHR, and how.

    ``plan`` maps each purpose this EHR takes part in to its resource type; ``off`` holds the purposes of
    the plan the server cannot serve, with the reason an event needing one is permanent. ``resources``
    is what the server offers per type (None: not read from a server, so everything is assumed).
    """

    style: str = "generic"
    ehr: str = ""
    plan: Mapping[Purpose, str] = field(default_factory=lambda: _full_plan("generic"))
    off: Mapping[Purpose, str] = field(default_factory=lambda: MappingProxyType({}))
    resources: Mapping[str, ResourceAccess] | None = None

    @classmethod
    def everything(cls, profile_name: str = "generic", *, ehr: str = "", provenance: bool = True) -> Targets:
        """The vendor's whole plan with every interaction assumed (no CapabilityStatement read)."""
        style = _style(profile_name)
        plan = dict(_full_plan(style))
        if not provenance:
            plan.pop(Purpose.PROVENANCE, None)
        return cls(style=style, ehr=ehr, plan=MappingProxyType(plan))

    def access(self, resource_type: str) -> ResourceAccess:
        if self.resources is None:
            return ResourceAccess()
        return self.resources.get(resource_type, _NO_ACCESS)

    def resource_type(self, purpose: Purpose) -> str | None:
        """The resource type written for ``purpose``; None when this EHR's write-back has no such part."""
        return self.plan.get(purpose)

    def enabled(self, purpose: Purpose) -> bool:
        return purpose in self.plan and purpose not in self.off

    def require(self, purpose: Purpose) -> str:
        """The resource type for ``purpose``, or ``PermanentEventError`` saying why this EHR cannot."""
        if purpose in self.off:
            raise PermanentEventError(self.off[purpose])
        resource_type = self.plan.get(purpose)
        if resource_type is None:
            raise PermanentEventError(f"EHR {self.ehr!r} ({self.style}) takes no {purpose} write-back")
        return resource_type

    def unguarded_creates(self) -> list[str]:
        """Types we create here that the server can neither create conditionally nor search for by
        identifier or by patient and date: only our ledger and session table keep those creates single."""
        types = {t for p, t in self.plan.items() if p not in self.off and p is not Purpose.EPISODE_OF_CARE}
        types -= {"Task", "Provenance"}  # a Task is only updated; a Provenance is one per write, not keyed
        return sorted(
            t
            for t in types
            if not (
                self.access(t).conditional_create
                or self.access(t).searchable_by("identifier")
                or self.access(t).searchable_by("patient", "date")
            )
        )

    def describe(self) -> dict[str, Any]:
        """A log-friendly summary: purpose -> resource type, the purposes that are off, unguarded creates."""
        return {
            "style": self.style,
            "plan": {str(p): t for p, t in self.plan.items() if p not in self.off},
            "off": sorted(str(p) for p in self.off),
            "unguarded": self.unguarded_creates(),
        }


def _server_rest(capability: Mapping[str, Any]) -> Mapping[str, Any]:
    if capability.get("resourceType") != "CapabilityStatement":
        raise ValueError(f"expected a CapabilityStatement, got {capability.get('resourceType')!r}")
    for rest in capability.get("rest") or []:
        if isinstance(rest, Mapping) and rest.get("mode") == "server":
            return rest
    raise ValueError("the CapabilityStatement has no rest entry with mode 'server'")


def _codes(items: Iterable[Any]) -> set[str]:
    return {str(i["code"]) for i in items if isinstance(i, Mapping) and i.get("code")}


def resource_access(capability: Mapping[str, Any]) -> dict[str, ResourceAccess]:
    """What the server offers per resource type, from ``rest[mode=server].resource``.

    ``patch`` counts only when the statement's ``patchFormat`` (if it has one) includes JSON Patch, the one
    format we send. Raises ``ValueError`` when this is not a server CapabilityStatement.
    """
    rest = _server_rest(capability)
    formats = capability.get("patchFormat")
    json_patch_ok = formats is None or JSON_PATCH in [str(f) for f in formats]
    result: dict[str, ResourceAccess] = {}
    for entry in rest.get("resource") or []:
        if not isinstance(entry, Mapping) or not entry.get("type"):
            continue
        interactions = _codes(entry.get("interaction") or [])
        if not json_patch_ok:
            interactions.discard("patch")
        params = entry.get("searchParam")
        result[str(entry["type"])] = ResourceAccess(
            interactions=frozenset(interactions),
            conditional_create=entry.get("conditionalCreate") is True,
            conditional_update=entry.get("conditionalUpdate") is True,
            versioning=str(entry.get("versioning") or "no-version"),
            search_params=None
            if params is None
            else frozenset(str(p["name"]) for p in params if isinstance(p, Mapping) and p.get("name")),
        )
    return result


def _missing(access: ResourceAccess, want: _Want) -> str | None:
    for interaction in want.interactions:
        if not access.can(interaction):
            return interaction.replace("|", " or ")
    return None


def targets_for(profile_name: str, capability: Mapping[str, Any], *, ehr: str | None = None) -> Targets:
    """The write-back targets of an EHR with vendor profile ``profile_name`` and this CapabilityStatement.

    Raises ``ConfigError`` for a profile without a plan and ``ValueError`` for a statement that is not a
    server CapabilityStatement.
    """
    style = _style(profile_name)
    name = ehr if ehr is not None else profile_name
    resources = resource_access(capability)
    plan: dict[Purpose, str] = {}
    off: dict[Purpose, str] = {}
    for purpose, want in _PLANS[style].items():
        missing = _missing(resources.get(want.resource_type, _NO_ACCESS), want)
        if missing is None:
            plan[purpose] = want.resource_type
        elif want.required:
            plan[purpose] = want.resource_type
            off[purpose] = (
                f"EHR {name!r} does not support {missing} on {want.resource_type} (needed for {purpose})"
            )
    return Targets(
        style=style,
        ehr=name,
        plan=MappingProxyType(plan),
        off=MappingProxyType(off),
        resources=MappingProxyType(resources),
    )


def fetch_capability(client: EhrClient) -> dict[str, Any]:
    """GET ``[base]/metadata``: the server's CapabilityStatement (``EhrError`` when it is not one)."""
    body = client.get_json("metadata")
    if body.get("resourceType") != "CapabilityStatement":
        raise EhrError(
            f"{client.ehr.name}: GET /metadata returned {body.get('resourceType')!r}, "
            "not a CapabilityStatement",
            ehr=client.ehr.name,
        )
    return body


def discover_targets(client: EhrClient) -> Targets:
    """Read the EHR's CapabilityStatement and choose its write-back targets (once, at start-up)."""
    capability = fetch_capability(client)
    try:
        targets = targets_for(client.profile.name, capability, ehr=client.ehr.name)
    except ValueError as exc:
        raise EhrError(f"{client.ehr.name}: GET /metadata: {exc}", ehr=client.ehr.name) from exc
    summary = targets.describe()
    log.info("writeback_targets", ehr=client.ehr.name, **summary)
    for purpose in summary["off"]:
        log.warning("writeback_target_off", ehr=client.ehr.name, purpose=purpose)
    for resource_type in summary["unguarded"]:
        log.warning("writeback_create_unguarded", ehr=client.ehr.name, resource=resource_type)
    return targets

"""Vendor profiles: the quirks of each EHR family, in one place.

A profile says which search parameters a server insists on, which resource types it refuses to search
without a patient (so the pull fans out over a panel), which spec deviations in its data we keep with a
warning instead of rejecting, and which extra headers it wants. Facts come from the vendors' published
CapabilityStatements and docs (``shared/docs/domain.md`` §4); check them against each customer's
``/metadata``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from connectors.config import EhrConfig
from schemas.deviations import DEVIATIONS, LOSSLESS

__all__ = ["DEVIATION_CLASSES", "VENDOR_NAMES", "VendorProfile", "profile_for", "profile_named"]

# The named deviations both readers know (``schemas.deviations`` says what each one means).
DEVIATION_CLASSES: frozenset[str] = frozenset(DEVIATIONS)

# Types both Epic and Oracle Millennium refuse to search without a patient (or an _id).
_PATIENT_SCOPED: frozenset[str] = frozenset(
    {
        "Encounter",
        "CarePlan",
        "ServiceRequest",
        "EpisodeOfCare",
        "Condition",
        "Procedure",
        "Coverage",
        "Task",
        "Appointment",
    }
)


def _no_headers(ehr: EhrConfig) -> dict[str, str]:
    return {}


def _epic_headers(ehr: EhrConfig) -> dict[str, str]:
    client_id = ehr.epic_client_id or ehr.auth.client_id
    return {"Epic-Client-ID": client_id} if client_id else {}


@dataclass(frozen=True)
class VendorProfile:
    """The quirks of one EHR family."""

    name: str
    required_params: Mapping[str, tuple[tuple[str, str], ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    patient_scoped_types: frozenset[str] = frozenset()
    tolerated_deviations: frozenset[str] = frozenset()
    can_write_episode_of_care: bool = True
    #: Whether search-mode pulls read deletions from type-level ``_history`` (where the server's
    #: CapabilityStatement offers ``history-type``). Epic and Oracle publish no ``_history``.
    reads_history_deletes: bool = True
    _headers: Callable[[EhrConfig], dict[str, str]] = field(default=_no_headers, repr=False)

    def headers(self, ehr: EhrConfig) -> dict[str, str]:
        """Extra headers this vendor wants on every request (e.g. ``Epic-Client-ID``)."""
        return self._headers(ehr)

    def params_for(self, resource_type: str) -> tuple[tuple[str, str], ...]:
        """The search parameters this vendor requires for ``resource_type``."""
        return self.required_params.get(resource_type, ())


_PROFILES: dict[str, VendorProfile] = {
    # Lossless normalisations only (a code's stray space, a number sent as a string or the reverse):
    # the value means the same after it; ids, uuids and base64 are identity and stay strict.
    "generic": VendorProfile(name="generic", tolerated_deviations=LOSSLESS),
    "hapi": VendorProfile(name="hapi", tolerated_deviations=LOSSLESS),
    "epic": VendorProfile(
        name="epic",
        # Epic's CarePlan.Search needs a category; "assess-plan" is the longitudinal care plan.
        required_params=MappingProxyType({"CarePlan": (("category", "assess-plan"),)}),
        patient_scoped_types=_PATIENT_SCOPED,
        # Epic ids can exceed 64 characters; the other classes are seen in real vendor payloads.
        tolerated_deviations=DEVIATION_CLASSES,
        can_write_episode_of_care=False,
        reads_history_deletes=False,
        _headers=_epic_headers,
    ),
    "oracle": VendorProfile(
        name="oracle",
        # Millennium CarePlan search is by patient and category (verify per tenant's /metadata).
        required_params=MappingProxyType({"CarePlan": (("category", "assess-plan"),)}),
        patient_scoped_types=_PATIENT_SCOPED,
        # Measured on Oracle's published examples: about 1 in 9 resources shows one of these.
        tolerated_deviations=DEVIATION_CLASSES,
        can_write_episode_of_care=False,
        reads_history_deletes=False,
    ),
}


#: The vendor profiles by name (``[ehr] vendor``, ``map --vendor``).
VENDOR_NAMES: tuple[str, ...] = tuple(_PROFILES)


def profile_named(name: str) -> VendorProfile:
    """The profile called ``name``; raises ``KeyError`` for an unknown one."""
    return _PROFILES[name]


def profile_for(ehr: EhrConfig) -> VendorProfile:
    """The profile of ``ehr.vendor``.

    Oracle's tenant lives in the base URL's path (``…/r4/{tenant}``); it needs nothing here because every
    relative URL (and the SMART discovery document) is resolved under the full base URL.
    """
    return _PROFILES[ehr.vendor]

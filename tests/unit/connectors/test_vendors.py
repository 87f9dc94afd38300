"""Vendor profiles: required parameters, patient-scoped types, tolerated deviations, headers."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from connectors.config import EhrConfig
from connectors.vendors import DEVIATION_CLASSES, profile_for
from schemas.deviations import LOSSLESS


def test_epic_needs_a_carplan_category_and_a_patient(make_ehr: Callable[..., EhrConfig]) -> None:
    epic = profile_for(make_ehr(vendor="epic"))
    assert epic.params_for("CarePlan") == (("category", "assess-plan"),)
    assert epic.params_for("Encounter") == ()
    assert {"Encounter", "CarePlan"} <= epic.patient_scoped_types
    assert "Patient" not in epic.patient_scoped_types
    assert not epic.can_write_episode_of_care


@pytest.mark.parametrize("vendor", ["generic", "hapi"])
def test_plain_servers_are_strict_and_unscoped(make_ehr: Callable[..., EhrConfig], vendor: str) -> None:
    profile = profile_for(make_ehr(vendor=vendor))
    assert profile.name == vendor
    assert profile.tolerated_deviations == LOSSLESS  # a code's stray space, numbers and strings swapped
    assert profile.patient_scoped_types == frozenset()
    assert profile.headers(make_ehr(vendor=vendor)) == {}
    assert profile.can_write_episode_of_care


def test_oracle_tolerates_the_deviations_seen_in_its_data(make_ehr: Callable[..., EhrConfig]) -> None:
    assert profile_for(make_ehr(vendor="oracle")).tolerated_deviations == DEVIATION_CLASSES


def test_epic_client_id_header(make_ehr: Callable[..., EhrConfig]) -> None:
    explicit = make_ehr(vendor="epic", epic_client_id="app-1")
    assert profile_for(explicit).headers(explicit) == {"Epic-Client-ID": "app-1"}
    from_auth = make_ehr(vendor="epic", auth={"kind": "bearer", "token": "t", "client_id": "app-2"})
    assert profile_for(from_auth).headers(from_auth) == {"Epic-Client-ID": "app-2"}
    assert profile_for(make_ehr(vendor="epic")).headers(make_ehr(vendor="epic")) == {}


def test_only_servers_with_a_history_read_deletions_from_it(make_ehr: Callable[..., EhrConfig]) -> None:
    reads = {
        v: profile_for(make_ehr(vendor=v)).reads_history_deletes
        for v in ("generic", "hapi", "epic", "oracle")
    }
    assert reads == {"generic": True, "hapi": True, "epic": False, "oracle": False}

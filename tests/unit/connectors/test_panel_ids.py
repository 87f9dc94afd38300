"""A panel's patient ids (Group members, the patients file, the Group id) are ids, never URL syntax."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pytest_httpx import HTTPXMock

from connectors.config import EhrConfig, PanelConfig
from connectors.http import EhrClient
from connectors.panel import load_panel, read_patient_file

BASE = "https://ehr.example.org/r4/tenant-1"


def test_group_members_whose_id_is_no_id_are_skipped(httpx_mock: HTTPXMock) -> None:
    members = ["Patient/p1", "Patient/p2,p3", "Patient/..", "Patient/p4?x=1", "Patient/LIFETIME_4"]
    httpx_mock.add_response(
        url=f"{BASE}/Group/g1",
        json={"resourceType": "Group", "id": "g1", "member": [{"entity": {"reference": r}} for r in members]},
    )
    with EhrClient(EhrConfig(name="x", base_url=BASE), sleep=lambda _s: None) as client:
        ids = load_panel(client, PanelConfig(group_id="g1"))

    assert ids == ["p1", "LIFETIME_4"]  # a comma would search two patients at once


@pytest.mark.parametrize("line", ["..", ".", "Patient/.."])
def test_a_patients_file_line_of_dots_is_refused(tmp_path: Path, line: str) -> None:
    path = tmp_path / "panel.txt"
    path.write_text(f"p1\n{line}\n")
    with pytest.raises(ValueError, match="line 2: not a patient id"):
        read_patient_file(path)


@pytest.mark.parametrize("bad", ["..", "g/1", "g1?x", "g 1"])
def test_a_group_id_in_the_config_must_be_an_id(bad: str) -> None:
    with pytest.raises(ValidationError, match="invalid Group id"):
        PanelConfig(group_id=bad)
    with pytest.raises(ValidationError, match="invalid Group id"):
        EhrConfig(name="x", base_url=BASE, bulk_group_id=bad)

"""The patient panel of a patient-scoped pull: the members of a FHIR Group, or a file of patient ids.

Epic and Oracle refuse Encounter/CarePlan/... searches without a patient, so the pull asks once per
patient of the panel (see ``connectors.pull``).
"""

from __future__ import annotations

import re
from pathlib import Path

import structlog

from connectors.config import PanelConfig
from connectors.errors import EhrError
from connectors.http import EhrClient
from schemas.identifiers import is_path_safe_id, resource_path

__all__ = ["load_panel", "read_patient_file"]

log = structlog.get_logger()

# Vendor ids break the spec's [A-Za-z0-9-.]{1,64} (underscores, longer ids): accept what is safe in a URL.
_PATIENT_ID = re.compile(r"^(?:Patient/)?([A-Za-z0-9\-._]{1,255})$")


def load_panel(client: EhrClient, panel: PanelConfig) -> list[str]:
    """Patient ids of the panel, in order, without repeats."""
    ids: list[str] = []
    if panel.group_id:
        ids.extend(_group_members(client, panel.group_id))
    if panel.patients_file:
        ids.extend(read_patient_file(Path(panel.patients_file)))
    unique = list(dict.fromkeys(ids))
    log.info("panel_loaded", ehr=client.ehr.name, patients=len(unique), group=panel.group_id)
    return unique


def read_patient_file(path: Path) -> list[str]:
    """One patient id per line (``123`` or ``Patient/123``); blank lines and ``#`` comments skipped."""
    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the panel file {path}: {exc.strerror or exc}") from exc
    ids: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _PATIENT_ID.match(line)
        if match is None or not is_path_safe_id(match.group(1)):
            raise ValueError(f"{path}, line {number}: not a patient id")
        ids.append(match.group(1))
    return ids


def _group_members(client: EhrClient, group_id: str) -> list[str]:
    group = client.get_json(resource_path("Group", group_id))
    if group.get("resourceType") != "Group":
        raise EhrError(
            f"{client.ehr.name}: Group/{group_id} is not a Group (got {group.get('resourceType')!r})",
            ehr=client.ehr.name,
        )
    ids: list[str] = []
    skipped = 0
    for member in group.get("member") or []:
        if not isinstance(member, dict):
            skipped += 1
            continue
        entity = member.get("entity")
        reference = entity.get("reference") if isinstance(entity, dict) else None
        if member.get("inactive") is True or not isinstance(reference, str):
            skipped += 1
            continue
        head, _, tail = reference.strip().rstrip("/").rpartition("/")
        if not head.endswith("Patient") or not is_path_safe_id(tail):
            skipped += 1
            continue
        ids.append(tail)
    if skipped:
        log.warning("panel_members_skipped", ehr=client.ehr.name, group=group_id, skipped=skipped)
    return ids

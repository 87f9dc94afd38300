"""The FHIR sandbox (a real HAPI FHIR 8.8.0 JPA server) offers what our connectors rely on.

Each test makes its own data with unique ids and identifiers: the sandbox is shared and persistent.
Where HAPI departs from the FHIR / Bulk Data specifications, the test pins HAPI's actual answer and
says so, so a change of server behaviour shows up here first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.integration.fhir_fixtures import FHIR_JSON, unique_id

pytestmark = pytest.mark.integration

SYSTEM = "urn:iop-bridge:test:mrn"
NDJSON = "application/fhir+ndjson"
#: How long an export of a handful of resources may take before the test gives up on it.
EXPORT_DEADLINE_S = 120.0
POLL_INTERVAL_S = 0.5


def _identifier() -> dict[str, str]:
    return {"system": SYSTEM, "value": unique_id("mrn")}


def _entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry["resource"] for entry in bundle.get("entry", [])]


def _link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((link["url"] for link in bundle.get("link", []) if link["relation"] == relation), None)


def _encounter(subject: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": subject},
        **extra,
    }


def _create(fhir: httpx.Client, resource: dict[str, Any]) -> dict[str, Any]:
    response = fhir.post(resource["resourceType"], json=resource)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def _transaction(fhir: httpx.Client, identifier: dict[str, str], encounters: int) -> tuple[str, list[str]]:
    """One transaction: a Patient (created once, by identifier) and its Encounters. Returns their ids."""
    patient_url = f"urn:uuid:{unique_id('p')}"
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": patient_url,
            "resource": {"resourceType": "Patient", "identifier": [identifier]},
            "request": {
                "method": "POST",
                "url": "Patient",
                "ifNoneExist": f"identifier={identifier['system']}|{identifier['value']}",
            },
        }
    ]
    entries += [
        {
            "fullUrl": f"urn:uuid:{unique_id('e')}",
            "resource": _encounter(patient_url),
            "request": {"method": "POST", "url": "Encounter"},
        }
        for _ in range(encounters)
    ]
    response = fhir.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["type"] == "transaction-response"
    results = [entry["response"] for entry in bundle["entry"]]
    assert [result["status"].split()[0] for result in results] == ["201"] * (1 + encounters)
    ids = [result["location"].split("/")[1] for result in results]
    return ids[0], ids[1:]


def test_metadata_is_r4_with_what_we_use(fhir: httpx.Client) -> None:
    response = fhir.get("metadata")

    assert response.status_code == 200
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["software"]["version"] == "8.8.0"
    rest = statement["rest"][0]
    assert {"export", "export-poll-status"} <= {op["name"] for op in rest["operation"]}
    assert "transaction" in {i["code"] for i in rest["interaction"]}
    by_type = {resource["type"]: resource for resource in rest["resource"]}
    for resource_type in ("Patient", "Encounter", "Group", "Binary", "EpisodeOfCare", "Appointment"):
        assert by_type[resource_type]["conditionalCreate"] is True
        assert by_type[resource_type]["versioning"] == "versioned-update"
    assert "_lastUpdated" in {param["name"] for param in by_type["Encounter"]["searchParam"]}


def test_transaction_creates_patient_and_encounters(fhir: httpx.Client) -> None:
    identifier = _identifier()

    patient_id, encounter_ids = _transaction(fhir, identifier, encounters=3)

    found = fhir.get("Encounter", params={"subject": f"Patient/{patient_id}"}).json()
    assert sorted(e["id"] for e in _entries(found)) == sorted(encounter_ids)
    patients = fhir.get("Patient", params={"identifier": f"{SYSTEM}|{identifier['value']}"}).json()
    assert [p["id"] for p in _entries(patients)] == [patient_id]


def test_search_pages_with_count_and_absolute_next_links(fhir: httpx.Client, fhir_base_url: str) -> None:
    patient_id, encounter_ids = _transaction(fhir, _identifier(), encounters=5)

    page = fhir.get(
        "Encounter", params={"subject": f"Patient/{patient_id}", "_count": 2, "_sort": "_lastUpdated"}
    ).json()
    sizes: list[int] = []
    seen: list[str] = []
    while True:
        resources = _entries(page)
        sizes.append(len(resources))
        seen += [r["id"] for r in resources]
        next_url = _link(page, "next")
        if next_url is None:
            break
        assert next_url.startswith(fhir_base_url + "?"), next_url
        response = fhir.get(next_url)
        assert response.status_code == 200, response.text
        page = response.json()

    assert sizes == [2, 2, 1]
    assert sorted(seen) == sorted(encounter_ids)


def test_last_updated_gt_sees_a_resource_updated_a_moment_ago(fhir: httpx.Client) -> None:
    identifier = _identifier()
    created = _create(fhir, {"resourceType": "Patient", "identifier": [identifier], "active": False})
    params = {
        "identifier": f"{SYSTEM}|{identifier['value']}",
        "_lastUpdated": f"gt{created['meta']['lastUpdated']}",
    }
    # The same search before and after the update: with HAPI's search-result cache on (its default),
    # the second would be answered from the first's cached (empty) result.
    before = fhir.get("Patient", params=params).json()
    updated = fhir.put(f"Patient/{created['id']}", json={**created, "active": True})
    assert updated.status_code == 200, updated.text

    after = fhir.get("Patient", params=params).json()

    assert _entries(before) == []
    assert [(p["id"], p["meta"]["versionId"], p["active"]) for p in _entries(after)] == [
        (created["id"], "2", True)
    ]


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "Patient"},
        {"resourceType": "Encounter", "status": "planned", "class": {"code": "AMB"}},
        {"resourceType": "Organization", "name": "Test clinic"},
        {"resourceType": "EpisodeOfCare", "status": "active"},
    ],
    ids=lambda resource: resource["resourceType"],
)
def test_conditional_create_creates_once_then_returns_the_existing_one(
    fhir: httpx.Client, resource: dict[str, Any]
) -> None:
    identifier = _identifier()
    body = resource | {"identifier": [identifier]}
    headers = {"If-None-Exist": f"identifier={SYSTEM}|{identifier['value']}"}
    resource_type = body["resourceType"]

    first = fhir.post(resource_type, json=body, headers=headers)
    second = fhir.post(resource_type, json=body, headers=headers)

    assert first.status_code == 201, first.text
    assert second.status_code == 200, second.text
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["meta"]["versionId"] == "1"
    matches = fhir.get(resource_type, params={"identifier": f"{SYSTEM}|{identifier['value']}"}).json()
    assert [r["id"] for r in _entries(matches)] == [first.json()["id"]]


def test_conditional_create_matching_several_is_refused_with_412(fhir: httpx.Client) -> None:
    identifier = _identifier()
    for _ in range(2):
        _create(fhir, {"resourceType": "Patient", "identifier": [identifier]})

    response = fhir.post(
        "Patient",
        json={"resourceType": "Patient", "identifier": [identifier]},
        headers={"If-None-Exist": f"identifier={SYSTEM}|{identifier['value']}"},
    )

    assert response.status_code == 412, response.text
    assert "HAPI-0958" in response.json()["issue"][0]["diagnostics"]


def test_an_update_that_changes_nothing_makes_no_new_version(fhir: httpx.Client) -> None:
    patient_id = unique_id("pt")
    body = {"resourceType": "Patient", "id": patient_id, "active": True}
    assert fhir.put(f"Patient/{patient_id}", json=body).status_code == 201

    again = fhir.put(f"Patient/{patient_id}", json=body)

    assert again.status_code == 200, again.text
    assert again.headers["ETag"] == 'W/"1"'
    assert again.json()["meta"]["versionId"] == "1"


def test_client_assigned_ids_alphanumeric_and_numeric(fhir: httpx.Client) -> None:
    numeric = str(int(unique_id("n").split("-")[1], 16))[:15]
    for resource_id in (unique_id("pt"), numeric):
        response = fhir.put(f"Patient/{resource_id}", json={"resourceType": "Patient", "id": resource_id})
        assert response.status_code == 201, response.text
        assert fhir.get(f"Patient/{resource_id}").json()["id"] == resource_id


def test_update_with_a_stale_if_match_is_refused_with_409(fhir: httpx.Client) -> None:
    patient_id = unique_id("pt")
    created = fhir.put(f"Patient/{patient_id}", json={"resourceType": "Patient", "id": patient_id})
    assert created.status_code == 201, created.text
    assert created.headers["ETag"] == 'W/"1"'

    right = fhir.put(
        f"Patient/{patient_id}",
        json={"resourceType": "Patient", "id": patient_id, "active": True},
        headers={"If-Match": 'W/"1"'},
    )
    stale = fhir.put(
        f"Patient/{patient_id}",
        json={"resourceType": "Patient", "id": patient_id, "active": False},
        headers={"If-Match": 'W/"1"'},
    )

    assert right.status_code == 200, right.text
    assert right.headers["ETag"] == 'W/"2"'
    # HAPI answers a version mismatch with 409 Conflict (HAPI-0989), not the 412 the FHIR spec names.
    assert stale.status_code == 409, stale.text
    assert "HAPI-0989" in stale.json()["issue"][0]["diagnostics"]
    current = fhir.get(f"Patient/{patient_id}").json()
    assert (current["meta"]["versionId"], current["active"]) == ("2", True)


# --- Bulk Data $export ---------------------------------------------------------------------------


def _kick_off(fhir: httpx.Client, fhir_base_url: str, path: str, params: dict[str, str]) -> str:
    response = fhir.get(path, params=params, headers={"Prefer": "respond-async", "Accept": FHIR_JSON})
    assert response.status_code == 202, response.text
    status_url = response.headers["Content-Location"]
    assert status_url.startswith(f"{fhir_base_url}/$export-poll-status?_jobId="), status_url
    return status_url


def _wait_for_manifest(fhir: httpx.Client, status_url: str) -> dict[str, Any]:
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while True:
        response = fhir.get(status_url)
        if response.status_code == 200:
            manifest: dict[str, Any] = response.json()
            return manifest
        assert response.status_code == 202, response.text
        assert "X-Progress" in response.headers
        assert time.monotonic() < deadline, f"export not finished within {EXPORT_DEADLINE_S}s"
        time.sleep(POLL_INTERVAL_S)


def _download(fhir: httpx.Client, manifest: dict[str, Any], fhir_base_url: str) -> dict[str, set[str]]:
    """Every output file as NDJSON; returns the ids found per resource type."""
    found: dict[str, set[str]] = {}
    for output in manifest["output"]:
        assert output["url"].startswith(f"{fhir_base_url}/Binary/"), output["url"]
        response = fhir.get(output["url"], headers={"Accept": NDJSON})
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith(NDJSON)
        resources = [orjson.loads(line) for line in response.text.splitlines() if line.strip()]
        assert {r["resourceType"] for r in resources} == {output["type"]}
        found.setdefault(output["type"], set()).update(r["id"] for r in resources)
    return found


@pytest.fixture
def finished_jobs(fhir: httpx.Client) -> Iterator[list[str]]:
    """Status URLs of exports a test started; deleted at the end whatever happened."""
    status_urls: list[str] = []
    yield status_urls
    for status_url in status_urls:
        fhir.delete(status_url)


def test_system_export_with_type_and_since(
    fhir: httpx.Client, fhir_base_url: str, finished_jobs: list[str]
) -> None:
    older = _create(fhir, {"resourceType": "Patient", "identifier": [_identifier()]})
    patient = _create(fhir, {"resourceType": "Patient", "identifier": [_identifier()]})
    encounter = _create(fhir, _encounter(f"Patient/{patient['id']}"))
    since = patient["meta"]["lastUpdated"]

    status_url = _kick_off(fhir, fhir_base_url, "$export", {"_type": "Patient,Encounter", "_since": since})
    finished_jobs.append(status_url)
    manifest = _wait_for_manifest(fhir, status_url)
    found = _download(fhir, manifest, fhir_base_url)

    assert manifest["requiresAccessToken"] is True
    assert manifest["error"] == []
    assert manifest["request"].startswith(f"{fhir_base_url}/$export?")
    assert patient["id"] in found["Patient"]
    assert older["id"] not in found["Patient"]
    assert encounter["id"] in found["Encounter"]
    assert set(found) <= {"Patient", "Encounter"}


def test_group_export_with_type_and_since(
    fhir: httpx.Client, fhir_base_url: str, finished_jobs: list[str]
) -> None:
    member = _create(fhir, {"resourceType": "Patient", "identifier": [_identifier()]})
    outsider = _create(fhir, {"resourceType": "Patient", "identifier": [_identifier()]})
    member_encounter = _create(fhir, _encounter(f"Patient/{member['id']}"))
    outsider_encounter = _create(fhir, _encounter(f"Patient/{outsider['id']}"))
    group = _create(
        fhir,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{member['id']}"}}],
        },
    )

    status_url = _kick_off(
        fhir,
        fhir_base_url,
        f"Group/{group['id']}/$export",
        {"_type": "Patient,Encounter", "_since": member["meta"]["lastUpdated"]},
    )
    finished_jobs.append(status_url)
    manifest = _wait_for_manifest(fhir, status_url)
    found = _download(fhir, manifest, fhir_base_url)

    assert manifest["requiresAccessToken"] is True
    assert found == {"Patient": {member["id"]}, "Encounter": {member_encounter["id"]}}
    assert outsider_encounter["id"] not in found["Encounter"]


def test_export_job_delete(fhir: httpx.Client, fhir_base_url: str) -> None:
    patient = _create(fhir, {"resourceType": "Patient", "identifier": [_identifier()]})
    since = patient["meta"]["lastUpdated"]
    finished = _kick_off(fhir, fhir_base_url, "$export", {"_type": "Patient", "_since": since})
    _wait_for_manifest(fhir, finished)
    running = _kick_off(fhir, fhir_base_url, "$export", {"_type": "Patient", "_since": since})

    cancelled = fhir.delete(running)
    after_cancel = fhir.get(running)
    delete_finished = fhir.delete(finished)

    assert cancelled.status_code == 202, cancelled.text
    assert after_cancel.status_code == 404, after_cancel.text
    # HAPI refuses to DELETE a job that has completed (the Bulk Data spec expects 202 there too);
    # its files stay until HAPI's own retention period ends.
    assert delete_finished.status_code == 404, delete_finished.text
    assert fhir.get(finished).status_code == 200

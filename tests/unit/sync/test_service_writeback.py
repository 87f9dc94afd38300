"""The service's write-back handler under the consumer's worker threads, the EHR faked at the transport."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
from pytest_httpx import HTTPXMock

from connectors.config import EhrConfig
from connectors.http import EhrClient
from schemas.topics import Topics
from sync.config import ServiceConfig, Settings, StoreConfig
from sync.kafka import Event
from sync.service import Service
from sync.state import Staged

BASE = "https://ehr.example.org/fhir"
EHR = "general"
CAPABILITY = Path(__file__).resolve().parents[2] / "data" / "capability"
WORKERS = 8


def _settings(tmp_path: Path, concurrency: int, ehr_concurrency: int = 4) -> Settings:
    return Settings(
        store=StoreConfig(url=f"sqlite:///{tmp_path / 'state.db'}"),
        service=ServiceConfig(writeback_concurrency=concurrency),
        ehr=(EhrConfig(name=EHR, base_url=BASE, vendor="hapi", concurrency=ehr_concurrency),),
    )


class Factory:
    """Builds real ``EhrClient``s (pytest-httpx fakes their transport) and remembers their configs."""

    def __init__(self) -> None:
        self.configs: list[EhrConfig] = []

    def __call__(self, ehr: EhrConfig) -> EhrClient:
        self.configs.append(ehr)
        return EhrClient(ehr, sleep=lambda _s: None)


def _publish(service: Service, patients: int) -> None:
    service.state.stage_changes(
        EHR,
        [
            Staged(
                kind="episode",
                record_id=f"ep-{n}",
                patient_id=f"p{n}",
                record={
                    "episode_id": f"ep-{n}",
                    "patient": {"reference": f"Patient/p{n}"},
                    "status": "active",
                },
                topic="iop.episodes.v1",
                message_key=f"{EHR}|Patient/p{n}",
                schema_name="episode",
                schema_version=1,
            )
            for n in range(patients)
        ],
    )


def _event(n: int) -> Event:
    value = {
        "event_id": f"evt-{n}",
        "occurred_at": "2026-03-02T18:00:00+00:00",
        "ehr": EHR,
        "episode_id": f"ep-{n}",
        "patient": {"reference": f"Patient/p{n}"},
        "session": {
            "id": f"S-{n}",
            "start": "2026-03-02T09:00:00+00:00",
            "end": "2026-03-02T12:00:00+00:00",
            "status": "attended",
        },
    }
    return Event(
        topic=Topics("").attendance,
        partition=0,
        offset=n,
        key=f"{EHR}|Patient/p{n}",
        value=value,
        schema="attendance",
        version=1,
        event_id=value["event_id"],
        traceparent=None,
        headers=(),
    )


def test_workers_share_one_writeback_built_once_on_a_pool_as_large_as_they_are(
    tmp_path: Path, httpx_mock: HTTPXMock
) -> None:
    capability = json.loads((CAPABILITY / "hapi.json").read_text())
    httpx_mock.add_response(method="GET", url=f"{BASE}/metadata", json=capability)  # once, not per worker
    created: list[str] = []
    lock = threading.Lock()

    def create(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        with lock:
            created.append(body["identifier"][0]["value"])
            resource_id = f"enc-{len(created)}"
        return httpx.Response(201, json={**body, "id": resource_id, "meta": {"versionId": "1"}})

    httpx_mock.add_callback(create, method="POST", url=f"{BASE}/Encounter", is_reusable=True)
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201, is_reusable=True)
    factory = Factory()
    start = threading.Barrier(WORKERS, timeout=30)
    failures: list[BaseException] = []

    with Service(_settings(tmp_path, WORKERS), client_factory=factory) as service:
        _publish(service, WORKERS)

        def worker(n: int) -> None:
            try:
                start.wait()  # all handle their first event at the same moment
                service.handle_event(_event(n))
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert failures == []
        assert sorted(created) == sorted(f"ep-{n}:-:S-{n}" for n in range(WORKERS))
        assert all(service.state.event_outcome(f"evt-{n}", ehr=EHR) == "created" for n in range(WORKERS))
        assert all(service.state.session_resource(EHR, f"ep-{n}:-:S-{n}") is not None for n in range(WORKERS))
        # the EHR's own client has a pool of 4: write-back got one of its own, pooling 8 connections
        assert [c.concurrency for c in factory.configs] == [WORKERS]
    assert len(httpx_mock.get_requests(url=f"{BASE}/metadata")) == 1


@pytest.mark.parametrize(("concurrency", "ehr_concurrency"), [(1, 4), (4, 4)])
def test_writeback_shares_the_ehr_client_when_its_pool_is_large_enough(
    tmp_path: Path, httpx_mock: HTTPXMock, concurrency: int, ehr_concurrency: int
) -> None:
    capability = json.loads((CAPABILITY / "hapi.json").read_text())
    httpx_mock.add_response(method="GET", url=f"{BASE}/metadata", json=capability)
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/Encounter",
        status_code=201,
        json={"resourceType": "Encounter", "id": "e1"},
    )
    httpx_mock.add_response(method="POST", url=f"{BASE}/Provenance", status_code=201)
    factory = Factory()
    with Service(_settings(tmp_path, concurrency, ehr_concurrency), client_factory=factory) as service:
        _publish(service, 1)
        service.handle_event(_event(0))
        assert service.client(service.settings.ehr[0]) is service._writeback_for(EHR).client
        assert [c.concurrency for c in factory.configs] == [ehr_concurrency]
        assert service.state.event_outcome("evt-0", ehr=EHR) == "created"
    assert len(httpx_mock.get_requests()) == 3

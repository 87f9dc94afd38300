"""The health and metrics endpoint answers as monitoring expects."""

from __future__ import annotations

import socket

import httpx

from sync.metrics import HealthServer, Metrics


def test_healthz_and_metrics() -> None:
    metrics = Metrics()
    healthy = [True]
    server = HealthServer(metrics, port=0, healthy=lambda: healthy[0]).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        metrics.writebacks.labels(ehr="general", outcome="created").inc(3)
        metrics.dead_letters.labels(topic="iop.attendance.v1").inc()

        assert httpx.get(f"{base}/healthz").status_code == 200
        body = httpx.get(f"{base}/metrics").text
        assert 'iop_bridge_writebacks_total{ehr="general",outcome="created"} 3.0' in body
        assert 'iop_bridge_dead_letters_total{topic="iop.attendance.v1"} 1.0' in body

        healthy[0] = False
        assert httpx.get(f"{base}/healthz").status_code == 503
        assert httpx.get(f"{base}/nope").status_code == 404
    finally:
        server.stop()


def test_healthz_answers_while_another_connection_sits_idle() -> None:
    """A client that opens a connection and sends nothing (a stuck probe, a port scanner) must not
    hold the liveness probe: each connection is served on its own thread."""
    server = HealthServer(Metrics(), port=0, healthy=lambda: True).start()
    idle = socket.create_connection(("127.0.0.1", server.port))
    half = socket.create_connection(("127.0.0.1", server.port))
    try:
        half.sendall(b"GET /healthz HTTP/1.1\r\n")  # a request line, then nothing more
        response = httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
        assert response.status_code == 200
        assert response.text == "ok\n"
    finally:
        idle.close()
        half.close()
        server.stop()

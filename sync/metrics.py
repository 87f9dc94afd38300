"""Prometheus metrics and the ``/healthz`` + ``/metrics`` endpoint of the running service.

Metric labels are EHR names, resource types, topics and outcome codes: never patient data.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app

StartResponse = Callable[..., Any]
Environ = dict[str, Any]


class Metrics:
    """The service's metrics, in a registry of their own (tests get a fresh one each)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.pulls = Counter(
            "iop_bridge_pulls", "Pull cycles by EHR and result", ["ehr", "result"], registry=self.registry
        )
        self.resources_pulled = Counter(
            "iop_bridge_resources_pulled",
            "Resources pulled by EHR and type",
            ["ehr", "resource_type"],
            registry=self.registry,
        )
        self.published = Counter(
            "iop_bridge_published", "Messages published by topic", ["topic"], registry=self.registry
        )
        self.writebacks = Counter(
            "iop_bridge_writebacks",
            "Write-back events by outcome",
            ["ehr", "outcome"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "iop_bridge_dead_letters",
            "Events sent to the dead-letter topic",
            ["topic"],
            registry=self.registry,
        )
        self.part2_on_general_topic = Counter(
            "iop_bridge_part2_on_general_topic",
            "Events of 42 CFR Part 2 episodes that came on a general write-back topic (written all the same)",
            ["ehr", "topic"],
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "iop_bridge_consumer_lag",
            "Records behind the end of each consumed partition",
            ["topic", "partition"],
            registry=self.registry,
        )
        self.outbox = Gauge(
            "iop_bridge_outbox_size", "Messages waiting in the outbox", registry=self.registry
        )


#: A connection that sends no complete request within this many seconds is closed (its thread ends).
IDLE_SECONDS: Final = 10.0


class _QuietHandler(WSGIRequestHandler):
    timeout = IDLE_SECONDS  # applied to each connection's socket

    def log_message(self, format: str, *args: Any) -> None:
        """Request lines are not logged (they carry nothing useful, and logs stay structured)."""


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per connection, so an idle or slow client never holds the liveness probe."""

    daemon_threads = True  # a connection in hand never keeps the process from exiting

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away is not an error of ours (and no traceback on stderr)."""


class HealthServer:
    """``/healthz`` (200 while ``healthy()`` is true, else 503) and ``/metrics``, on a daemon thread."""

    def __init__(self, metrics: Metrics, *, port: int, healthy: Callable[[], bool], host: str = "127.0.0.1"):
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._healthy = healthy
        self._server: WSGIServer = make_server(
            host, port, self._app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def _app(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            ok = self._healthy()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"unhealthy\n"]
        if path == "/metrics":
            body: Iterable[bytes] = self._metrics_app(environ, start_response)
            return body
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

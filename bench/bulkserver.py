"""A tiny Bulk Data server for one big NDJSON file: what a pull of a file far larger than memory meets.

``python -m bench.bulkserver FILE [--port N]`` answers, under ``http://127.0.0.1:N/fhir``:

- ``GET $export``: ``202`` with ``Content-Location: <base>/status``;
- ``GET status``: ``200`` with a manifest listing FILE as the one ``Encounter`` output;
- ``GET /files/<name>``: FILE, streamed in 1 MiB chunks (never read whole);
- ``DELETE status``: ``202``.

It prints its base URL on stdout once it listens. ``big_file(mb)`` writes the file: the 100k health
system's Encounters repeated with fresh ids until it is ``mb`` MiB.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson

from bench.generate import DATA, dataset

__all__ = ["big_file", "serve"]

_CHUNK = 1 << 20


def big_file(mb: int) -> Path:
    """``Encounter.ndjson`` of at least ``mb`` MiB (cached under ``.run/bench/data/big-<mb>mb/``)."""
    folder = DATA / f"big-{mb}mb"
    path = folder / "Encounter.ndjson"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    source = dataset(100_000) / "Encounter.ndjson"
    partial = path.with_suffix(".part")
    target = mb * _CHUNK
    written = 0
    with partial.open("wb") as sink:
        copy = 0
        while written < target:
            with source.open("rb") as lines:
                for line in lines:
                    # A distinct id per copy: the pull de-duplicates by id within a run.
                    fresh = line.replace(b'"id":"', f'"id":"c{copy}-'.encode(), 1)
                    sink.write(fresh)
                    written += len(fresh)
                    if written >= target:
                        break
            copy += 1
    partial.replace(path)
    return path


class _Handler(BaseHTTPRequestHandler):
    server: _BulkServer

    def log_message(self, format: str, *args: object) -> None:  # quiet: the bench's stderr is progress
        return

    def do_GET(self) -> None:
        base = self.server.base
        if self.path.startswith("/fhir/$export"):
            self._answer(202, b"", {"Content-Location": f"{base}/status"})
        elif self.path == "/fhir/status":
            manifest = {
                "transactionTime": self.server.started,
                "request": f"{base}/$export",
                "requiresAccessToken": False,
                "output": [
                    {"type": "Encounter", "url": f"{self.server.origin}/files/{self.server.file.name}"}
                ],
                "error": [],
            }
            self._answer(200, orjson.dumps(manifest), {"Content-Type": "application/json"})
        elif self.path == f"/files/{self.server.file.name}":
            size = self.server.file.stat().st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/fhir+ndjson")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            with self.server.file.open("rb") as source:
                while chunk := source.read(_CHUNK):
                    self.wfile.write(chunk)
        else:
            self._answer(404, b"", {})

    def do_DELETE(self) -> None:
        self._answer(202 if self.path == "/fhir/status" else 404, b"", {})

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _BulkServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, file: Path, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.file = file
        self.origin = f"http://127.0.0.1:{self.server_address[1]}"
        self.base = f"{self.origin}/fhir"
        self.started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def serve(file: Path, port: int = 0) -> None:
    with _BulkServer(file, port) as server:
        sys.stdout.write(server.base + "\n")
        sys.stdout.flush()
        server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="serve one NDJSON file as a Bulk Data export")
    parser.add_argument("file", type=Path)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    serve(args.file, args.port)


if __name__ == "__main__":
    main()

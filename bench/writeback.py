"""write-back: events per second through the real broker to the sandbox, and event-to-write latency.

Not measured yet: it needs the Kafka write-back consumer (events -> FHIR writes, issue 4) running against
the broker (``deploy/kafka/run``) and the FHIR sandbox. Until then this bench reports a placeholder row,
so the table shows the gap instead of hiding it. The intended floor: a bare httpx loop sending the same
HTTP sequence (conditional create, then Provenance) to the same server.
"""

from __future__ import annotations

from bench.harness import Row, Runner, unavailable

BENCH = "writeback"


def rows(runner: Runner, sizes: list[int]) -> list[Row]:
    del runner, sizes  # nothing to run yet
    return [
        unavailable(BENCH, "-", "events/s (100 events/s, p50/p99 latency)", "needs the write-back consumer"),
    ]

"""Load a generated health system (``bench/generate.py``'s folder of ``<Type>.ndjson``) into a FHIR server.

Fast enough for 100k Encounters (~130k resources) in minutes: each file is streamed into transaction
bundles of ``batch`` entries, ``concurrency`` bundles in flight at once. A type other resources refer to
is PUT at its id (``Type/id``: loading twice updates in place), so the references hold. A type nothing
refers to (Encounter, Task, ...) is POSTed: the server gives it its own id. That is what makes it fast:
HAPI on H2 resolves a client-assigned id with a scan of every resource of the type, so PUTting 100k
Encounters slowed from ~180/s to ~35/s as the table grew, while creates stay at the server's pace.

Resuming: a type is loaded from the line after the number the server already holds (an interrupted seed
goes on where it stopped; bundles finish in about file order, so at most a bundle or two is loaded twice
or skipped: this is bench data, counted, not compared id by id).

Types are loaded in dependency order, found by scanning the files' references: a server enforcing
referential integrity (HAPI's default) refuses an Encounter whose Patient it does not hold yet. A type
that references itself (Organization ``partOf``) is loaded one bundle at a time, in file order.

``seeded(base, folder)`` says whether the server already holds at least the folder's count of every
type, so a bench run seeds once and then reuses the server.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from bench.generate import manifest

__all__ = ["SeedReport", "load_order", "seed", "seeded", "server_counts"]

_FHIR_JSON = "application/fhir+json"
_REFERENCE = re.compile(rb'"reference":\s*"([A-Z][A-Za-z]+)/')
_ATTEMPTS = 4


@dataclass
class SeedReport:
    resources: int
    bundles: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.resources / self.seconds if self.seconds > 0 else 0.0


def server_counts(base: str, types: list[str], client: httpx.Client | None = None) -> dict[str, int]:
    """How many resources of each type the server holds (``_summary=count``)."""
    own = client or httpx.Client(timeout=120)
    try:
        counts = {}
        for kind in types:
            answer = own.get(f"{base}/{kind}", params={"_summary": "count"}, headers={"Accept": _FHIR_JSON})
            counts[kind] = int(orjson.loads(answer.raise_for_status().content).get("total", 0))
        return counts
    finally:
        if client is None:
            own.close()


def seeded(base: str, folder: Path) -> bool:
    """Whether the server holds at least as many resources of every type as the folder."""
    wanted: dict[str, int] = manifest(folder)["resources"]
    held = server_counts(base, sorted(wanted))
    return all(held[kind] >= count for kind, count in wanted.items())


def load_order(folder: Path) -> list[tuple[str, bool, bool]]:
    """The folder's types, each after the types it references, with (references itself, is referenced)."""
    refs: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.ndjson")):
        kind = path.stem
        found: set[str] = set()
        with path.open("rb") as lines:
            for line in lines:
                found.update(m.decode() for m in _REFERENCE.findall(line))
        refs[kind] = found
    referenced = set().union(*refs.values()) if refs else set()
    order: list[tuple[str, bool, bool]] = []
    placed: set[str] = set()
    while len(placed) < len(refs):
        ready = sorted(k for k in refs if k not in placed and (refs[k] - {k}) & refs.keys() <= placed)
        if not ready:  # a cycle between types: load the rest in name order and let the server judge
            ready = sorted(k for k in refs if k not in placed)
        for kind in ready:
            order.append((kind, kind in refs[kind], kind in referenced))
            placed.add(kind)
    return order


def _bundles(path: Path, batch: int, *, put: bool, skip: int = 0) -> Iterator[tuple[bytes, int]]:
    entries: list[bytes] = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines):
            line = raw.strip()
            if not line or number < skip:
                continue
            resource = orjson.loads(line)
            kind = resource["resourceType"]
            if put:
                request = b'{"method":"PUT","url":"' + f"{kind}/{resource['id']}".encode() + b'"}'
            else:
                resource.pop("id", None)
                line = orjson.dumps(resource)
                request = b'{"method":"POST","url":"' + kind.encode() + b'"}'
            entries.append(b'{"resource":' + line + b',"request":' + request + b"}")
            if len(entries) >= batch:
                yield _bundle(entries), len(entries)
                entries = []
    if entries:
        yield _bundle(entries), len(entries)


def _bundle(entries: list[bytes]) -> bytes:
    return b'{"resourceType":"Bundle","type":"transaction","entry":[' + b",".join(entries) + b"]}"


def _land_oldest(
    pending: deque[tuple[Future[None], int]], kind: str, progress: Callable[[str, int], None] | None
) -> int:
    """Wait for the oldest bundle in flight (its error is raised here); its resource count."""
    future, done = pending.popleft()
    future.result()
    if progress is not None:
        progress(kind, done)
    return done


def _post(client: httpx.Client, base: str, body: bytes) -> None:
    """POST one transaction; a transport error, a conflict between concurrent bundles or a 5xx is retried
    (a transaction is all or nothing, so resending it is safe)."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            answer = client.post(
                base, content=body, headers={"Content-Type": _FHIR_JSON, "Accept": _FHIR_JSON}
            )
        except httpx.TransportError:
            if attempt == _ATTEMPTS:
                raise
        else:
            if (answer.status_code not in (409, 429) and answer.status_code < 500) or attempt == _ATTEMPTS:
                answer.raise_for_status()
                return
        time.sleep(0.5 * attempt)


def seed(
    base: str,
    folder: Path,
    *,
    batch: int = 500,
    concurrency: int = 3,
    progress: Callable[[str, int], None] | None = None,
) -> SeedReport:
    """Load every resource of ``folder`` into the server at ``base`` (see the module docstring)."""
    started = time.perf_counter()
    resources = bundles = 0
    wanted: dict[str, int] = manifest(folder)["resources"]
    with (
        httpx.Client(timeout=httpx.Timeout(600, connect=15)) as client,
        ThreadPoolExecutor(max_workers=concurrency) as pool,
    ):
        order = load_order(folder)
        held = server_counts(base, [kind for kind, _, _ in order], client)
        for kind, self_referencing, referenced in order:
            if held[kind] >= wanted.get(kind, 0):
                continue
            window = 1 if self_referencing else concurrency
            pending: deque[tuple[Future[None], int]] = deque()
            skip = held[kind] if not referenced else 0  # PUTs may repeat; creates must not

            for body, count in _bundles(folder / f"{kind}.ndjson", batch, put=referenced, skip=skip):
                pending.append((pool.submit(_post, client, base, body), count))
                while len(pending) >= window:
                    resources += _land_oldest(pending, kind, progress)
                    bundles += 1
            while pending:  # every bundle of a type lands before a type referencing it starts
                resources += _land_oldest(pending, kind, progress)
                bundles += 1
    return SeedReport(resources=resources, bundles=bundles, seconds=time.perf_counter() - started)


def main() -> None:
    import argparse
    import sys

    from bench.generate import dataset, parse_size

    parser = argparse.ArgumentParser(description="load a generated health system into a FHIR server")
    parser.add_argument("size", help="Encounters, e.g. 100k")
    parser.add_argument("--fhir", required=True, help="FHIR base URL")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=3)
    args = parser.parse_args()
    base = args.fhir.rstrip("/")
    folder = dataset(parse_size(args.size))
    if seeded(base, folder):
        print("already seeded", file=sys.stderr)
        return
    totals: dict[str, int] = {}

    def show(kind: str, n: int) -> None:
        totals[kind] = totals.get(kind, 0) + n
        print(f"\r{kind}: {totals[kind]}", end="", file=sys.stderr)

    report = seed(base, folder, batch=args.batch, concurrency=args.concurrency, progress=show)
    print(
        f"\nseeded {report.resources} resources in {report.bundles} bundles, "
        f"{report.seconds:.1f}s ({report.per_second:.0f}/s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

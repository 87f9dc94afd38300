"""Time the bulk NDJSON line splitter on one long line (issue 10, item 16): not a test, a measurement.

Run: PYTHONPATH=$PWD .venv/bin/python bench/long_line.py [megabytes]
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterator

from connectors.bulk import _copy_lines

CHUNK = 64 * 1024  # about what httpx hands us per iter_bytes() step


def _chunks(size: int) -> Iterator[bytes]:
    piece = b"x" * CHUNK
    for _ in range(size // CHUNK):
        yield piece
    yield b"\n"


def main() -> None:
    megabytes = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    sink = io.BytesIO()
    started = time.perf_counter()
    copied = _copy_lines(_chunks(megabytes * 1024 * 1024), sink)
    skipped = ", ".join(f"line {n}: {size} bytes over the cap" for n, size in copied.oversized)
    outcome = f"{copied.written} line(s)" + (f"; skipped {skipped}" if skipped else "")
    print(f"{megabytes} MB line: {time.perf_counter() - started:.2f} s ({outcome})")


if __name__ == "__main__":
    main()

"""Peak memory of ``iop-bridge map`` on one big single-line Bundle (issue 11): not a test, a measurement.

Writes a searchset Bundle of about ``megabytes`` MB on one line (Patients, each with IOP Encounters that
carry a realistic amount of narrative) into a temporary folder, runs ``iop-bridge map`` on it in a
child process and samples the peak RSS of that process (``PeakSampler``).

Run: PYTHONPATH=$PWD .venv/bin/python bench/big_bundle.py [megabytes] [--suffix .json|.ndjson]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench.harness import PeakSampler

_HCPCS = "https://www.cms.gov/Medicare/Coding/HCPCS"
_NARRATIVE = "Group psychotherapy session; attended in full. " * 20  # ~1 kB of Encounter.text


def _entries(megabytes: int) -> list[bytes]:
    entries: list[bytes] = []
    size = 0
    patient = 0
    while size < megabytes * 1024 * 1024:
        pid = f"p{patient}"
        batch = [{"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1980-01-01"}]
        for day in range(1, 21):
            batch.append(
                {
                    "resourceType": "Encounter",
                    "id": f"{pid}-e{day}",
                    "status": "finished",
                    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                    "subject": {"reference": f"Patient/{pid}"},
                    "period": {
                        "start": f"2026-01-{day:02d}T15:00:00Z",
                        "end": f"2026-01-{day:02d}T18:00:00Z",
                    },
                    "type": [{"coding": [{"system": _HCPCS, "code": "S9480"}]}],
                    "text": {"status": "generated", "div": f"<div>{_NARRATIVE}</div>"},
                }
            )
        for resource in batch:
            entry = orjson.dumps({"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource})
            entries.append(entry)
            size += len(entry) + 1
        patient += 1
    return entries


def write_bundle(path: Path, megabytes: int) -> int:
    """Write the Bundle to ``path`` on one line; returns its size in bytes."""
    with path.open("wb") as sink:
        sink.write(b'{"resourceType":"Bundle","type":"searchset","entry":[')
        sink.write(b",".join(_entries(megabytes)))
        sink.write(b"]}\n")
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("megabytes", type=int, nargs="?", default=200)
    parser.add_argument("--suffix", default=".json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="iop-bench-bundle-") as folder:
        bundle = Path(folder) / f"bundle{args.suffix}"
        size = write_bundle(bundle, args.megabytes)
        command = [sys.executable, "-m", "sync.cli", "map", str(bundle), "--out", f"{folder}/out.ndjson"]
        started = time.perf_counter()
        child = subprocess.Popen(command, stderr=subprocess.PIPE, env={**os.environ, "LOG_LEVEL": "WARNING"})
        sampler = PeakSampler(child.pid)
        sampler.start()
        _, stderr = child.communicate()
        sampler.stop()
        seconds = time.perf_counter() - started
        tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
        print(
            f"{size / 1e6:.0f} MB single-line Bundle ({args.suffix}): "
            f"peak RSS {sampler.peak / 2**20:.0f} MiB, {seconds:.1f} s, exit {child.returncode}"
        )
        for line in tail:
            print("  " + line[:300])


if __name__ == "__main__":
    main()

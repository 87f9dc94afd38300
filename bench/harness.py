"""The measuring side of the benchmarks: timed sections, fresh processes, result rows.

Every measurement (ours or its floor) runs in a fresh ``python -m bench.child`` process, so imports,
caches and heap growth of one run never leak into the next. The parent samples the child's process tree
(the child and any worker processes it starts) with psutil and keeps the peak of their summed RSS; the
child also reports its own ``ru_maxrss``. Rates are given per core: items per CPU-second (user + system,
of the child and its workers), which holds up better than wall time on a machine others are using.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
_MB = 1024 * 1024
_SAMPLE_SECONDS = 0.02


@dataclass
class Measurement:
    """One timed section: ``items`` processed in ``wall`` seconds using ``cpu`` CPU-seconds."""

    items: int
    wall: float
    cpu: float
    peak_rss_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_core(self) -> float:
        return self.items / self.cpu if self.cpu > 0 else 0.0

    @property
    def per_second(self) -> float:
        return self.items / self.wall if self.wall > 0 else 0.0


@dataclass
class Row:
    """One line of the result table: our number beside the floor's, higher is better."""

    bench: str
    size: str
    metric: str
    ours: float | None = None
    floor: float | None = None
    rss_ours_mb: float | None = None
    rss_floor_mb: float | None = None
    note: str = ""
    load: float | None = None  # 1-minute load average when the row was measured
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.floor:
            return None
        return self.ours / self.floor

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        return data


def unavailable(bench: str, size: str, metric: str, why: str) -> Row:
    """A row saying what is missing, in place of a number."""
    return Row(bench=bench, size=size, metric=metric, note=why, load=os.getloadavg()[0])


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def timed(work: Callable[[], int], **extra: Any) -> Measurement:
    """Run ``work`` (returns how many items it processed) and time it, wall and CPU."""
    cpu = _cpu_seconds()
    start = time.perf_counter()
    items = work()
    wall = time.perf_counter() - start
    return Measurement(items=items, wall=wall, cpu=_cpu_seconds() - cpu, extra=dict(extra))


@dataclass(frozen=True)
class Runner:
    """Runs a task (``bench.<module>.<function>(**params) -> Measurement``), isolated or in-process.

    ``isolated=False`` runs it in this process (the smoke test: checks the harness, not the numbers).
    """

    isolated: bool = True
    timeout: float = 3600.0

    def run(self, module: str, function: str, **params: Any) -> Measurement:
        if not self.isolated:
            return _call(module, function, params)
        return _in_child(module, function, params, self.timeout)


def _call(module: str, function: str, params: dict[str, Any]) -> Measurement:
    import importlib

    task = getattr(importlib.import_module(f"bench.{module}"), function)
    result: Measurement = task(**params)
    return result


def _in_child(module: str, function: str, params: dict[str, Any], timeout: float) -> Measurement:
    spec = json.dumps({"module": module, "function": function, "params": params})
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with subprocess.Popen(
        [sys.executable, "-m", "bench.child", spec],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as child:
        sampler = PeakSampler(child.pid)
        sampler.start()
        try:
            out, err = child.communicate(timeout=timeout)
        finally:
            sampler.stop()
    if child.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"bench.{module}.{function} failed (exit {child.returncode}): " + " | ".join(tail))
    data = json.loads(out.decode().strip().splitlines()[-1])
    measurement = Measurement(**data)
    measurement.peak_rss_mb = max(measurement.peak_rss_mb, sampler.peak / _MB)
    return measurement


class PeakSampler(threading.Thread):
    """The peak of the summed RSS of a process and its descendants (bytes), sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._done.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self.peak = max(self.peak, total)
            self._done.wait(_SAMPLE_SECONDS)

    def stop(self) -> None:
        self._done.set()
        self.join()

"""Entry point of one isolated measurement: ``python -m bench.child '{"module":…,"function":…,"params":…}'``.

Prints the task's ``Measurement`` as JSON on its last line, with the process's own peak RSS
(``ru_maxrss``, the larger of this process and its largest worker).
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
from dataclasses import asdict

from sync.logs import configure_logging


def main() -> None:
    spec = json.loads(sys.argv[1])
    configure_logging("INFO")  # as the CLI does: JSON lines on stderr, stdout stays ours
    task = getattr(importlib.import_module(f"bench.{spec['module']}"), spec["function"])
    measurement = task(**spec["params"])
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    measurement.peak_rss_mb = max(own, workers) / 1024  # Linux reports kilobytes
    sys.stdout.write(json.dumps(asdict(measurement)) + "\n")


if __name__ == "__main__":
    main()

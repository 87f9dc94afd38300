"""The ``iop-bridge`` command line.

Each sub-command lives in ``sync/commands/<name>.py`` with ``register(subparsers)``, which adds its
parser and sets ``handler`` to a function ``(args) -> int``. Errors are printed once, in one line, here
at the boundary, with a stable exit code:

    0 done · 1 anything else · 2 usage or configuration · 3 authentication · 4 EHR error · 5 Kafka error
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import structlog

from sync.logs import configure_logging

COMMANDS: tuple[str, ...] = ("seed", "pull", "map", "coverage", "explain", "run", "dlq", "demo")

EXIT_OK = 0
EXIT_OTHER = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iop-bridge",
        description="Hospital EHR (FHIR R4) <-> Intensive Outpatient Program integration.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"sync.commands.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    configure_logging(args.log_level)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        print("iop-bridge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        exit_code = getattr(exc, "exit_code", EXIT_OTHER)
        if exit_code == EXIT_OTHER:
            structlog.get_logger().exception("unexpected_error", error_type=type(exc).__name__)
        print(f"iop-bridge: error: {exc}", file=sys.stderr)
        return int(exit_code)
    return code


if __name__ == "__main__":
    sys.exit(main())

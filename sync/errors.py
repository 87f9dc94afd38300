"""Errors of the running service and its CLI.

    SyncError                  base
     ├── ConfigError           bad or missing configuration, bad command line (exit 2)
     └── KafkaError            the broker cannot be reached or refused us (exit 5)

Connector errors (``connectors.errors``) carry their own exit codes: 3 auth, 4 EHR.
"""

from __future__ import annotations


class SyncError(Exception):
    exit_code = 1


class ConfigError(SyncError):
    exit_code = 2


class KafkaError(SyncError):
    exit_code = 5

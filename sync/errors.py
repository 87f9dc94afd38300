"""Errors of the running service and its CLI.

    SyncError                  base
     ├── ConfigError           bad or missing configuration, bad command line (exit 2)
     ├── KafkaError            the broker cannot be reached or refused us (exit 5)
     └── PermanentEventError   a consumed event that can never be processed: it is dead-lettered

Connector errors (``connectors.errors``) carry their own exit codes: 3 auth, 4 EHR.
"""

from __future__ import annotations


class SyncError(Exception):
    exit_code = 1


class ConfigError(SyncError):
    exit_code = 2


class KafkaError(SyncError):
    exit_code = 5


class PermanentEventError(SyncError):
    """This event can never be processed (invalid, unknown episode, refused by the EHR): dead-letter it.

    Raised by a consumer's handler; ``sync.kafka.EventConsumer`` sends the record to the dead-letter topic
    with ``str(error)`` as the reason and moves on. The message therefore becomes the dead-letter reason,
    read by operators and kept with the record: it must hold no PHI (ids, codes, statuses only).
    """

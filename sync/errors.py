"""Errors of the running service and its CLI.

    SyncError                  base
     ├── ConfigError           bad or missing configuration, bad command line (exit 2)
     ├── KafkaError            the broker cannot be reached or refused us (exit 5)
     └── PermanentEventError   a consumed event that can never be processed: it is dead-lettered

Connector errors (``connectors.errors``) carry their own exit codes: 3 auth, 4 EHR.

Every error of ours carries ``retriable`` from where it is raised; ``is_retriable`` is the one place
that reads it (following ``raise ... from`` when a wrapper does not say), so the classification is made
once and kept when an error is wrapped.
"""

from __future__ import annotations

from typing import Final

#: Errors without a ``retriable`` flag that may still go away by themselves: the network, the disk,
#: a timeout. Anything else unflagged (``KeyError``, ``TypeError``, ...) is a bug: no retry fixes it.
_TRANSIENT_BUILTINS: Final = (OSError, TimeoutError)
#: SQLAlchemy's "the database went away" (checked by name: SQLAlchemy loads only with the store).
_TRANSIENT_DB: Final = frozenset({"OperationalError", "InterfaceError", "TimeoutError", "DisconnectionError"})


class SyncError(Exception):
    exit_code = 1
    retriable: bool = False

    def __init__(self, *args: object, retriable: bool | None = None) -> None:
        super().__init__(*args)
        if retriable is not None:
            self.retriable = retriable


class ConfigError(SyncError):
    exit_code = 2


class KafkaError(SyncError):
    exit_code = 5
    retriable = True


class PermanentEventError(SyncError):
    """This event can never be processed (invalid, unknown episode, refused by the EHR): dead-letter it.

    Raised by a consumer's handler; ``sync.kafka.EventConsumer`` sends the record to the dead-letter topic
    with ``str(error)`` as the reason and moves on. The message therefore becomes the dead-letter reason,
    read by operators and kept with the record: it must hold no PHI (ids, codes, statuses only).
    """

    retriable = False


def is_retriable(error: BaseException) -> bool:
    """Whether trying again later may succeed: the error's own ``retriable`` flag, else that of the error
    it wraps (``raise ... from``), else True only for transient I/O (network, disk, database)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        flag = getattr(current, "retriable", None)
        if isinstance(flag, bool):
            return flag
        if isinstance(current, _TRANSIENT_BUILTINS):
            return True
        kind = type(current)
        if kind.__module__.startswith("sqlalchemy") and kind.__name__ in _TRANSIENT_DB:
            return True
        current = current.__cause__
    return False


def has_flag(error: BaseException) -> bool:
    """Whether the error (or one it wraps) is one of ours or a library's that says if it is retriable,
    as opposed to an unflagged exception from a bug; its message is then ours and PHI-free."""
    current: BaseException | None = error
    for _ in range(10):
        if current is None:
            return False
        if isinstance(getattr(current, "retriable", None), bool):
            return True
        current = current.__cause__
    return False

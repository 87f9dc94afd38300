"""A bound on kafka-python 3.0's blocking calls, until the library ships its own.

kafka-python 3.0 runs its network on an I/O thread; a blocking call (``poll``, ``commit``, ``close``, ...)
schedules a coroutine there and waits on a ``threading.Event`` with no timeout. When that coroutine is
never run or never finishes, the caller waits forever (upstream issue #3121; seen here once in about ten
full test runs: ``KafkaConsumer.poll`` stuck in ``Fetcher.send_fetches`` with the I/O thread idle).
Upstream's fix (a ``default_api_timeout_ms`` setting, raising ``KafkaTimeoutError`` on the caller's
side) is merged but not released as of 3.0.12.

``install(limit_s)`` gives the event that ``kafka.net.selector`` waits on a limit: a wait with no timeout
gives up after ``limit_s`` seconds with ``KafkaTimeoutError``, which kafka-python marks retriable, so our
``with_retries`` tries the call again instead of the service hanging. Waits that pass their own timeout
are untouched. The patch applies only to a kafka-python whose consumer lacks ``default_api_timeout_ms``
(the releases that have the bug) and only to that module's name ``threading``.
"""

from __future__ import annotations

import threading
import types
from typing import Any

import structlog
from kafka import KafkaConsumer
from kafka import errors as kafka_errors
from kafka.net import selector

log = structlog.get_logger()

#: Java's ``default.api.timeout.ms``: what upstream's fix defaults to as well.
DEFAULT_LIMIT_S = 60.0


class BoundedEvent(threading.Event):
    """A ``threading.Event`` whose timeout-less ``wait`` gives up after ``limit_s`` seconds."""

    def __init__(self, limit_s: float) -> None:
        super().__init__()
        self.limit_s = limit_s

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            return super().wait(timeout)
        if super().wait(self.limit_s):
            return True
        log.warning("kafka_call_timed_out", limit_s=self.limit_s)
        raise kafka_errors.KafkaTimeoutError(
            f"kafka-python's network thread did not answer within {self.limit_s:g} s"
        )


class _Threading(types.ModuleType):
    """The ``threading`` module as ``kafka.net.selector`` sees it: the same, but its Events bounded."""

    def __init__(self, limit_s: float) -> None:
        super().__init__("threading")
        self.limit_s = limit_s

    def __getattr__(self, name: str) -> Any:
        return getattr(threading, name)

    def Event(self) -> BoundedEvent:  # the name threading.Event, which it stands in for
        return BoundedEvent(self.limit_s)


def needed() -> bool:
    """Whether this kafka-python waits without a bound (it has no ``default_api_timeout_ms``)."""
    return "default_api_timeout_ms" not in KafkaConsumer.DEFAULT_CONFIG


def install(limit_s: float = DEFAULT_LIMIT_S) -> bool:
    """Bound kafka-python's blocking waits at ``limit_s`` seconds; True when the patch is in place."""
    if limit_s <= 0:
        raise ValueError(f"limit_s must be positive, not {limit_s}")
    if not needed():
        return False
    selector.threading = _Threading(limit_s)
    return True

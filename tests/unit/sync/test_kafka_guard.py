"""The bound on kafka-python 3.0's blocking waits (sync.kafka_guard)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from kafka import errors as kafka_errors
from kafka.future import Future
from kafka.net.selector import NetworkSelector

import sync.kafka  # noqa: F401  (importing it installs the guard, as the service does)
from sync import kafka_guard


@pytest.fixture
def short_limit() -> Iterator[float]:
    kafka_guard.install(0.2)
    yield 0.2
    kafka_guard.install()


@pytest.fixture
def io_selector() -> Iterator[NetworkSelector]:
    net = NetworkSelector(client_id="guard-test")
    net.start()
    yield net
    net.close()


def test_importing_sync_kafka_bounds_the_selector_events() -> None:
    # When this fails, kafka-python bounds its own waits (default_api_timeout_ms): drop the guard.
    assert kafka_guard.needed()
    from kafka.net import selector

    event = selector.threading.Event()
    assert isinstance(event, kafka_guard.BoundedEvent)
    assert event.limit_s == kafka_guard.DEFAULT_LIMIT_S
    # Everything else is the real threading module.
    assert selector.threading.Lock is threading.Lock
    assert selector.threading.current_thread() is threading.current_thread()


def test_a_wait_without_timeout_gives_up_after_the_limit() -> None:
    event = kafka_guard.BoundedEvent(0.05)
    with pytest.raises(kafka_errors.KafkaTimeoutError, match=r"within 0\.05 s") as raised:
        event.wait()
    assert raised.value.retriable


def test_waits_that_finish_or_carry_their_own_timeout_are_untouched() -> None:
    event = kafka_guard.BoundedEvent(0.05)
    assert event.wait(timeout=0.01) is False  # its own timeout: no error
    event.set()
    assert event.wait() is True


def test_a_coroutine_that_never_finishes_no_longer_blocks_run_forever(
    short_limit: float, io_selector: NetworkSelector
) -> None:
    never = Future()

    async def stuck() -> None:
        await never

    with pytest.raises(kafka_errors.KafkaTimeoutError):
        io_selector.run(stuck)
    # The loop itself is fine: the next call completes.

    async def answer() -> int:
        return 42

    assert io_selector.run(answer) == 42


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        kafka_guard.install(0)

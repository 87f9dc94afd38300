"""sync.keyed_batch.run_keyed: one key's items in order, different keys at once, a failure stops its group."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.keyed_batch import run_keyed

#: How long a test waits for something another thread must do; a wait that runs out fails the test.
WAIT_S = 30.0


@dataclass(frozen=True)
class Item:
    key: str
    group: int
    n: int
    fails: bool = False


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def _run(
    pool: ThreadPoolExecutor, items: list[Item], work: Callable[[Item], str] | None = None
) -> list[str | None]:
    def default(item: Item) -> str:
        return "failed" if item.fails else "ok"

    return run_keyed(
        pool,
        items,
        key=lambda item: item.key,
        group=lambda item: item.group,
        work=work or default,
        stops=lambda outcome: outcome == "failed",
    )


def test_different_keys_run_at_the_same_time(pool: ThreadPoolExecutor) -> None:
    both_running = threading.Barrier(2, timeout=WAIT_S)  # broken (and the test failed) unless 2 meet

    def work(item: Item) -> str:
        if item.n == 0:
            both_running.wait()
        return "ok"

    items = [Item("a", 0, 0), Item("b", 0, 0), Item("a", 0, 1)]
    assert _run(pool, items, work) == ["ok", "ok", "ok"]


def test_a_slow_key_holds_up_only_its_own_items(pool: ThreadPoolExecutor) -> None:
    """One patient's EHR call hangs until every other patient's events are written."""
    others_done = threading.Event()
    order: list[tuple[str, int]] = []
    lock = threading.Lock()
    others = [Item(key, 0, n) for n in range(5) for key in ("b", "c", "d")]

    def work(item: Item) -> str:
        if item == Item("a", 0, 0):
            assert others_done.wait(WAIT_S), "the other keys waited for the slow one"
        with lock:
            order.append((item.key, item.n))
            if sum(1 for key, _ in order if key != "a") == len(others):
                others_done.set()
        return "ok"

    items = [Item("a", 0, 0), *others, Item("a", 0, 1)]
    assert _run(pool, items, work) == ["ok"] * len(items)
    assert [n for key, n in order if key == "a"] == [0, 1]
    assert order.index(("a", 0)) > order.index(("b", 4))


def test_a_failure_stops_its_group_but_not_the_others(pool: ThreadPoolExecutor) -> None:
    # one key, so strictly sequential: after the failure nothing more of group 0 starts
    items = [Item("a", 0, 0), Item("a", 0, 1, fails=True), Item("a", 0, 2), Item("a", 1, 3), Item("a", 0, 4)]
    assert _run(pool, items) == ["ok", "failed", None, "ok", None]


def test_items_that_are_no_longer_live_are_skipped(pool: ThreadPoolExecutor) -> None:
    revoked = {1}
    outcomes = run_keyed(
        pool,
        [Item("a", 0, 0), Item("a", 1, 1), Item("b", 1, 2), Item("b", 0, 3)],
        key=lambda item: item.key,
        group=lambda item: item.group,
        work=lambda item: "ok",
        stops=lambda outcome: False,
        live=lambda item: item.group not in revoked,
    )
    assert outcomes == ["ok", None, None, "ok"]


def test_an_exception_stops_its_group_and_is_raised_once_all_chains_ended(pool: ThreadPoolExecutor) -> None:
    finished: list[int] = []

    def work(item: Item) -> str:
        if item.n == 1:
            raise RuntimeError("bug")
        finished.append(item.n)
        return "ok"

    items = [Item("a", 0, 0), Item("a", 0, 1), Item("a", 0, 2), Item("b", 1, 3), Item("b", 1, 4)]
    with pytest.raises(RuntimeError, match="bug"):
        _run(pool, items, work)
    assert sorted(finished) == [0, 3, 4]  # group 1 went on; group 0 stopped after the error


def test_nothing_to_run() -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert _run(pool, []) == []


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abcde"), st.integers(0, 2)), max_size=40),
    st.sets(st.integers(0, 39), max_size=4),
    st.integers(1, 5),
)
def test_order_per_key_and_stopped_groups_hold_for_any_batch(
    shape: list[tuple[str, int]], failing: set[int], workers: int
) -> None:
    items = [Item(key, group, n, fails=n in failing) for n, (key, group) in enumerate(shape)]
    started: list[Item] = []
    lock = threading.Lock()

    def work(item: Item) -> str:
        with lock:
            started.append(item)
        return "failed" if item.fails else "ok"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = _run(pool, items, work)

    assert {item.n for item in started} == {item.n for item, o in zip(items, outcomes, strict=True) if o}
    for key in "abcde":
        ran = [item.n for item in started if item.key == key]
        assert ran == sorted(ran), "one key's items run in the order given"
    for item, outcome in zip(items, outcomes, strict=True):
        earlier_failure = any(
            other.fails and other.key == item.key and other.group == item.group and other.n < item.n
            for other in items
            if outcomes[other.n] == "failed"
        )
        if earlier_failure:
            assert outcome is None, "after a failure in its group, a later item of the same key never starts"
        if not any(o == "failed" for o in outcomes):
            assert outcome == "ok"
    failed_groups = {item.group for item, o in zip(items, outcomes, strict=True) if o == "failed"}
    for group in {item.group for item in items} - failed_groups:
        assert all(o == "ok" for item, o in zip(items, outcomes, strict=True) if item.group == group)

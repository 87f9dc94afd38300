"""One batch of work on a thread pool: items of one key in order, different keys at once.

``run_keyed`` is how the write-back consumer handles a poll's records concurrently without breaking the
order that matters: the records of one message key (one patient) are handled one after another in the
order given; records of different keys run on the pool's threads at the same time. Each key's next item
goes to the back of the pool's queue after its previous one finished, so long chains do not starve short
ones (the batch takes about ``max(total work / threads, longest chain)``).

An outcome for which ``stops(outcome)`` holds stops the item's *group* (a Kafka partition): items of that
group not yet started are skipped (their outcome stays ``None``), in every chain, so the caller can rewind
the group to its first unfinished item. Items for which ``live(item)`` is false when their turn comes are
skipped the same way (a partition that was revoked). Items already running always finish: nothing is
abandoned half-way. ``run_keyed`` returns when every chain has ended; an exception raised by ``work`` stops
the item's group like a stopping outcome and is re-raised then.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")


def run_keyed(
    executor: Executor,
    items: Sequence[T],
    *,
    key: Callable[[T], Hashable],
    group: Callable[[T], Hashable],
    work: Callable[[T], str],
    stops: Callable[[str], bool],
    live: Callable[[T], bool] = lambda _item: True,
) -> list[str | None]:
    """The outcome of each item, in the order of ``items`` (``None``: skipped, never started)."""
    outcomes: list[str | None] = [None] * len(items)
    chains: dict[Hashable, deque[int]] = {}
    for index, item in enumerate(items):
        chains.setdefault(key(item), deque()).append(index)
    if not chains:
        return outcomes
    lock = threading.Lock()
    stopped: set[Hashable] = set()
    errors: list[BaseException] = []
    open_chains = [len(chains)]
    finished = threading.Event()

    def next_index(chain: deque[int]) -> int | None:
        while chain:
            index = chain.popleft()
            with lock:
                skip = group(items[index]) in stopped
            if not skip and live(items[index]):
                return index
        return None

    def end_chain() -> None:
        with lock:
            open_chains[0] -= 1
            if open_chains[0] == 0:
                finished.set()

    def step(chain: deque[int]) -> None:
        try:
            index = next_index(chain)
            if index is not None:
                try:
                    outcome = work(items[index])
                except BaseException as exc:
                    with lock:
                        errors.append(exc)
                        stopped.add(group(items[index]))
                else:
                    with lock:
                        outcomes[index] = outcome
                        if stops(outcome):
                            stopped.add(group(items[index]))
            if chain:
                executor.submit(step, chain)  # to the back of the queue: the other keys' turn first
                return
        except BaseException as exc:  # the pool refused the next step (shut down): end this chain
            with lock:
                errors.append(exc)
        end_chain()

    for chain in chains.values():
        try:
            executor.submit(step, chain)
        except BaseException as exc:
            with lock:
                errors.append(exc)
            end_chain()
    finished.wait()
    if errors:
        raise errors[0]
    return outcomes

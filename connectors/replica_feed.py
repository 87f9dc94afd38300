"""A pull's resources into the state store's replica: upserted as they come, committed after the files.

``ReplicaFeed.add`` takes each validated chunk (NDJSON lines by resource type). A small pull's lines are
held until ``finish``, which writes them and the cursors in one transaction (a few thousand rows: a
short lock). Once a pull has brought more than ``stream_after`` resources, a thread opens that one
transaction and upserts the chunks while the download goes on; ``finish`` hands it the cursors and the
panel changes and lets it COMMIT. The caller calls ``finish`` only after its output files are durable,
and ``abort`` on any failure, which rolls the transaction back: the replica (which the pull's overlap
de-duplication reads) and the cursors never move ahead of the files.

A SQLite database in memory is private to its connection, so a second thread cannot write into it:
such a store never streams, and gets the resources read back from the published files at ``finish``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, cast

import orjson

from connectors.store import Deletion, Increment, StateStore

__all__ = ["ReplicaFeed"]

_DEPTH = 16  # chunks queued for the thread: bounds memory when the database lags the download
_PUT_WAIT = 0.2  # seconds between looks at whether the thread is still alive while the queue is full


class PublishedOutput(Protocol):
    """What ``finish`` reads back when it cannot stream: the run's published type files."""

    def read(self, resource_type: str) -> Iterator[dict[str, object]]: ...


class _Aborted(Exception):
    """Raised inside the thread's transaction so that it rolls back."""


_FINISH = object()
_ABORT = object()


class ReplicaFeed:
    """Feeds one pull's kept resources to ``store.commit_increments`` (see the module docstring)."""

    def __init__(self, store: StateStore, ehr: str, *, stream_after: int) -> None:
        self.store = store
        self.ehr = ehr
        self.stream_after = stream_after
        url = store.engine.url
        self.can_stream = not (url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"))
        self._held: list[tuple[str, list[bytes]]] = []
        self._held_count = 0
        self._queue: queue.Queue[object] = queue.Queue(maxsize=_DEPTH)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._cursors: list[Increment] = []
        self._panel_added: list[str] = []
        self._panel_removed: list[str] = []

    @property
    def streaming(self) -> bool:
        return self._thread is not None

    def add(self, resource_type: str, lines: list[bytes]) -> None:
        """Queue validated resources (JSON lines) of one type; raises if the thread has failed."""
        if not lines or not self.can_stream:
            return
        if self._thread is None:
            self._held.append((resource_type, lines))
            self._held_count += len(lines)
            if self._held_count > self.stream_after:
                self._start()
            return
        self._put((resource_type, lines))

    def finish(
        self,
        output: PublishedOutput,
        cursors: Mapping[str, str | None],
        *,
        panel_added: Sequence[str] = (),
        panel_removed: Sequence[str] = (),
        deletions: Mapping[str, Sequence[Deletion]] | None = None,
    ) -> None:
        """Write the cursors, the deletions (and whatever is still held) and COMMIT; the output must be
        durable by now."""
        gone = deletions or {}
        cursor_increments = [
            Increment(kind, (), cursors.get(kind), gone.get(kind, ()))
            for kind in dict.fromkeys([*cursors, *gone])
        ]
        if self._thread is None:
            if self.can_stream:
                increments = [Increment(kind, _parsed(lines), None) for kind, lines in self._held]
            else:
                increments = [Increment(kind, output.read(kind), None) for kind in cursors]
            self._held = []
            self.store.commit_increments(
                self.ehr,
                [*increments, *cursor_increments],
                panel_added=panel_added,
                panel_removed=panel_removed,
            )
            return
        self._cursors = cursor_increments
        self._panel_added.extend(panel_added)
        self._panel_removed.extend(panel_removed)
        self._put(_FINISH)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Roll the transaction back (when one is open) and wait for the thread to end."""
        self._held = []
        thread = self._thread
        if thread is None:
            return
        while thread.is_alive():
            try:
                self._queue.put(_ABORT, timeout=_PUT_WAIT)
            except queue.Full:
                continue
            break
        thread.join()

    # -- the thread ----------------------------------------------------------------------------

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="replica-feed", daemon=True)
        self._thread.start()
        held, self._held = self._held, []
        for item in held:
            self._put(item)

    def _put(self, item: object) -> None:
        thread = self._thread
        assert thread is not None
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(item, timeout=_PUT_WAIT)
            except queue.Full:
                if not thread.is_alive() and self._error is None:
                    raise RuntimeError("the replica thread stopped without an error") from None
                continue
            return

    def _run(self) -> None:
        try:
            # commit_increments only iterates its increments once, in order: a generator fits, and lets
            # the transaction stay open while the pull goes on.
            self.store.commit_increments(
                self.ehr,
                cast(Sequence[Increment], self._increments()),
                panel_added=self._panel_added,  # filled by finish() before the generator ends
                panel_removed=self._panel_removed,
            )
        except BaseException as exc:  # handed to the pull's thread, which re-raises it
            self._error = exc

    def _increments(self) -> Iterator[Increment]:
        while True:
            item = self._queue.get()
            if item is _ABORT:
                raise _Aborted
            if item is _FINISH:
                yield from self._cursors
                return
            kind, lines = cast(tuple[str, list[bytes]], item)
            yield Increment(kind, _parsed(lines), None)


def _parsed(lines: list[bytes]) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in lines]

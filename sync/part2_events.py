"""Which write-back events and dead letters are 42 CFR Part 2 records, so they stay on Part 2 topics.

An event (or the dead letter of one) is Part 2 when

- it came on a Part 2 topic (``iop.attendance.part2.v1``, ``iop.discharges.part2.v1``: ``Topics.is_part2``);
- or its episode, ``(ehr, episode_id)`` of its body, was published as Part 2 (the episode record's
  ``part2``, as the state store holds it now: an episode that turned Part 2 later counts too);
- or its own body carries SUD evidence (``mappers.part2``: a SUD service code in ``session.services``).

When the store cannot answer, the record is taken as Part 2: a restricted topic holding a general record
does no harm, the reverse is a disclosure. A record that names no episode we can read (not JSON, no
``episode_id``, an episode we never published) and came on a general topic stays general: nothing ties it
to Part 2 care.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson
import structlog

from mappers.part2 import is_part2
from schemas.topics import Topics
from sync.state import SyncState

log = structlog.get_logger()


class Origin(Protocol):
    """What the decision reads of a record (a consumed record, or a dead letter's original)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...


#: ``(ehr, episode_id) -> part2`` of the published episode; None when there is no such episode.
EpisodeLookup = Callable[[str, str], bool | None]


def published_episode_part2(state: SyncState) -> EpisodeLookup:
    """The lookup of the state store: the ``part2`` of the last published version of an episode."""

    def lookup(ehr: str, episode_id: str) -> bool | None:
        entry = state.published_entry(ehr, "episode", episode_id)
        return None if entry is None else bool(entry.record.get("part2"))

    return lookup


def _body(value: bytes | None) -> Mapping[str, Any] | None:
    if not value:
        return None
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def event_is_part2(topics: Topics, topic: str, body: Mapping[str, Any] | None, lookup: EpisodeLookup) -> bool:
    """Whether an event (its topic and decoded body, None when it has none) is a Part 2 record (see the
    module docstring). Raises what ``lookup`` raises."""
    if topics.is_part2(topic):
        return True
    if body is None:
        return False
    session = body.get("session")
    if isinstance(session, Mapping) and is_part2([session], {}):
        return True
    ehr, episode_id = body.get("ehr"), body.get("episode_id")
    if isinstance(ehr, str) and isinstance(episode_id, str) and ehr and episode_id:
        return bool(lookup(ehr, episode_id))
    return False


def record_is_part2(topics: Topics, record: Origin, lookup: EpisodeLookup) -> bool:
    """Whether a consumed record is a Part 2 record; True when ``lookup`` fails (kept restricted)."""
    try:
        return event_is_part2(topics, record.topic, _body(record.value), lookup)
    except Exception as exc:  # the store is down, or anything else: fail closed
        log.warning(
            "part2_lookup_failed",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error=type(exc).__name__,
        )
        return True

"""Dead letters: a record we cannot process, kept whole with where it came from and why.

The envelope (the value of a ``iop.deadletter.v1`` record) is the ``deadletter.v1`` contract: the
original key, value and headers byte for byte (base64), the original topic, partition, offset and
timestamp, the reason and the time we gave up. ``original(envelope)`` gives back what replay needs.

The envelope always fits a producer's request (``ENVELOPE_MAX``, well under kafka-python's 1 MiB
``max_request_size``): when the whole record would not, its value is left out, then its headers, then
its key (``omitted`` says which); the value's SHA-256 and size are always kept, and so is where it came
from (topic, partition, offset), so the original can still be found there and checked. ``stub`` is the
smallest envelope (nothing of the record but where and why), sent when the full one cannot be.
Pure functions: producing is ``sync.kafka.EventProducer.dead_letter``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

import orjson

from schemas import (
    HEADER_DLQ_OFFSET,
    HEADER_DLQ_PARTITION,
    HEADER_DLQ_REASON,
    HEADER_DLQ_TOPIC,
    HEADER_EVENT_ID,
    HEADER_SCHEMA,
    HEADER_SCHEMA_VERSION,
    HEADER_TRACEPARENT,
)

SCHEMA: Final = "deadletter"
VERSION: Final = 1
#: The envelope's limit for the reason (``deadletter.v1``); a header carries at most ``HEADER_REASON_MAX``.
REASON_MAX: Final = 4000
HEADER_REASON_MAX: Final = 1000
#: The largest envelope we produce, serialized (the reason, topic and offsets take a few KB at most).
ENVELOPE_MAX: Final = 512 * 1024
#: An original header (event_id, traceparent) copied to the dead letter's own headers only if this small.
HEADER_COPY_MAX: Final = 256

Header = tuple[str, bytes | None]


class SourceRecord(Protocol):
    """What a dead letter needs of a consumed record (``kafka.consumer.fetcher.ConsumerRecord``)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int | None: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[Header]: ...


@dataclass(frozen=True)
class OriginalRecord:
    """A dead-lettered record as it was: enough to re-publish it where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]
    reason: str
    timestamp: int | None = None


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text, validate=True)


def _text(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _header(headers: Sequence[Header], name: str) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def clip_reason(reason: str, limit: int = REASON_MAX) -> str:
    """The reason, one line, at most ``limit`` characters (never empty)."""
    one_line = " ".join(reason.split()) or "unspecified"
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"


def envelope(
    record: SourceRecord, reason: str, *, failed_at: datetime, contract: tuple[str, int] | None
) -> dict[str, Any]:
    """The ``deadletter.v1`` value for a record, at most ``ENVELOPE_MAX`` bytes serialized.
    ``failed_at`` must be timezone-aware."""
    if failed_at.tzinfo is None:
        raise ValueError("failed_at must be timezone-aware")
    headers = list(record.headers or ())
    event_id = _header(headers, HEADER_EVENT_ID)
    value: dict[str, Any] = {
        "reason": clip_reason(reason),
        "failed_at": failed_at.isoformat(),
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": _text(record.key),
        "key_base64": _b64(record.key),
        "value_base64": _b64(record.value),
        "value_sha256": None if record.value is None else hashlib.sha256(record.value).hexdigest(),
        "value_bytes": None if record.value is None else len(record.value),
        "headers": [{"key": key, "value_base64": _b64(data)} for key, data in headers],
        "event_id": _text(event_id) if event_id is not None and len(event_id) <= HEADER_COPY_MAX else None,
        "schema": contract[0] if contract else None,
        "schema_version": contract[1] if contract else None,
        "omitted": [],
    }
    return _fitted(value)


def _fitted(value: dict[str, Any]) -> dict[str, Any]:
    """Leave out the value, then the headers, then the key, until the envelope fits ``ENVELOPE_MAX``."""
    for part in ("value", "headers", "key"):
        if len(orjson.dumps(value)) <= ENVELOPE_MAX:
            break
        value["omitted"].append(part)
        if part == "value":
            value["value_base64"] = None
        elif part == "headers":
            value["headers"] = []
        else:
            value["key"] = value["key_base64"] = None
    return value


def stub(
    record: SourceRecord,
    reason: str,
    *,
    failed_at: datetime,
    cause: str,
    contract: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """The smallest envelope: where the record came from, its value's hash, and why (``cause``: why the
    full envelope could not be sent, a class name). Nothing of the record itself."""
    value = envelope(record, "", failed_at=failed_at, contract=contract)
    value.update(
        key=None, key_base64=None, value_base64=None, headers=[], omitted=["value", "headers", "key"]
    )
    suffix = f" (stub: the full dead letter could not be sent: {cause})"
    value["reason"] = clip_reason(reason, REASON_MAX - len(suffix)) + suffix
    return value


def headers(record: SourceRecord, reason: str) -> list[tuple[str, bytes]]:
    """The dead-letter record's own headers: what it is, and where from and why (no parsing needed)."""
    original = list(record.headers or ())
    result: list[tuple[str, bytes]] = [
        (HEADER_SCHEMA, SCHEMA.encode()),
        (HEADER_SCHEMA_VERSION, str(VERSION).encode()),
    ]
    for name in (HEADER_EVENT_ID, HEADER_TRACEPARENT):
        value = _header(original, name)
        if value is not None and len(value) <= HEADER_COPY_MAX:
            result.append((name, value))
    result += [
        (HEADER_DLQ_REASON, clip_reason(reason, HEADER_REASON_MAX).encode()),
        (HEADER_DLQ_TOPIC, record.topic.encode()),
        (HEADER_DLQ_PARTITION, str(record.partition).encode()),
        (HEADER_DLQ_OFFSET, str(record.offset).encode()),
    ]
    return result


def original(value: Mapping[str, Any]) -> OriginalRecord:
    """The original record inside a ``deadletter.v1`` envelope (validate the envelope first);
    ``ValueError`` when the envelope left part of it out (it cannot be replayed from here)."""
    omitted = list(value.get("omitted") or [])
    if omitted:
        raise ValueError(
            f"the dead letter's {' and '.join(omitted)} was not kept (too large): the original is at "
            f"{value['topic']} partition {value['partition']} offset {value['offset']}"
        )
    return OriginalRecord(
        topic=str(value["topic"]),
        partition=int(value["partition"]),
        offset=int(value["offset"]),
        key=_unb64(value["key_base64"]),
        value=_unb64(value["value_base64"]),
        headers=tuple((str(h["key"]), _unb64(h["value_base64"])) for h in value["headers"]),
        reason=str(value["reason"]),
        timestamp=value.get("timestamp"),
    )


def replay_topic(own_headers: Sequence[Header], value: Mapping[str, Any], allowed: Sequence[str]) -> str:
    """The topic a dead letter may be replayed to: the one its envelope names, only when the dead-letter
    record's own headers (``dlq_topic``, ``dlq_partition``, ``dlq_offset``, set when we dead-lettered it)
    say the same and it is one of ``allowed`` (our write-back topics). ``ValueError`` otherwise."""
    claimed = {
        HEADER_DLQ_TOPIC: str(value.get("topic")),
        HEADER_DLQ_PARTITION: str(value.get("partition")),
        HEADER_DLQ_OFFSET: str(value.get("offset")),
    }
    for name, expected in claimed.items():
        given = _header(own_headers, name)
        if given is None or given.decode("utf-8", "replace") != expected:
            raise ValueError(f"the dead letter's {name} header does not match its envelope: not replayed")
    if claimed[HEADER_DLQ_TOPIC] not in allowed:
        raise ValueError(f"{claimed[HEADER_DLQ_TOPIC]!r} is not one of our write-back topics: not replayed")
    return claimed[HEADER_DLQ_TOPIC]

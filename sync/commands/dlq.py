"""``iop-bridge dlq list|replay``: look at dead letters, and re-publish them once the cause is fixed.

Replay reads the whole dead-letter topic (it is small), skips what an earlier replay already sent (kept
in the state store, so a replay never sends the same dead letter twice), filters by ``--reason`` and
re-publishes each original record to its original topic with its original key, value and headers, but
only to our write-back topics (attendance, discharges) and only when the dead-letter record's own
headers (``dlq_topic``/``dlq_partition``/``dlq_offset``) name the same origin as its envelope. The
write-back consumers de-duplicate by event id, so a replayed event that had in fact been written is
harmless.

42 CFR Part 2 dead letters (those on ``iop.deadletter.part2.v1``, and any on the general dead-letter
topic whose original came on a Part 2 topic or belongs to an episode now published as Part 2,
``sync.part2_events``) are neither listed nor replayed unless ``--part2`` is given; the command says how
many it left out. Run ``--part2`` only as a principal allowed to read the Part 2 topics.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, String, Table, insert, select

from connectors.store import create_tables
from schemas import Topics
from schemas.contracts import ContractError
from schemas.contracts import errors as contract_errors
from sync import deadletter, part2_events
from sync.config import Settings, load_settings, open_store
from sync.kafka import EventProducer, client_kwargs, connect
from sync.state import SyncState, now_utc

log = structlog.get_logger()

_metadata = MetaData()
replayed = Table(
    "sync_dlq_replayed",
    _metadata,
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("offset", BigInteger, primary_key=True),  # Kafka offsets are 64-bit
    Column("replayed_at", DateTime(timezone=True), nullable=False),
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("dlq", help="list or replay dead-lettered events")
    actions = parser.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")
    for name, help_text in (("list", "show dead letters and their reasons"), ("replay", "re-publish them")):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--config", required=True, help="the service's config file (TOML)")
        action.add_argument("--reason", help="only dead letters whose reason contains this text")
        action.add_argument(
            "--part2",
            action="store_true",
            help="include the dead letters of 42 CFR Part 2 records (the Part 2 dead-letter topic too)",
        )
        action.set_defaults(handler=run)


def _dead_letters(settings: Settings, topic: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Every record of the dead-letter topic, from the beginning to the current end."""
    consumer = connect(
        lambda: KafkaConsumer(**client_kwargs(settings.kafka), enable_auto_commit=False, group_id=None),
        what="dead-letter reader",
        bootstrap=settings.kafka.bootstrap_servers,
    )
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            return
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if ends[tp] > consumer.position(tp)}
        while remaining:
            for tp, records in consumer.poll(timeout_ms=1000).items():
                for record in records:
                    yield record, dict(orjson.loads(record.value))
                if consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        consumer.close(autocommit=False)


def _count_records(settings: Settings, topic: str) -> int | None:
    """How many records a topic holds now (end minus beginning offsets), without reading them; None when
    this principal cannot see the topic."""
    consumer = connect(
        lambda: KafkaConsumer(**client_kwargs(settings.kafka), enable_auto_commit=False, group_id=None),
        what="dead-letter counter",
        bootstrap=settings.kafka.bootstrap_servers,
    )
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            return 0
        ends = consumer.end_offsets(partitions)
        starts = consumer.beginning_offsets(partitions)
        return int(sum(ends[tp] - starts[tp] for tp in partitions))
    except Exception as exc:  # not authorised to describe it, or gone: say so, list the rest
        log.warning("dlq_part2_not_counted", error=type(exc).__name__)
        return None
    finally:
        consumer.close(autocommit=False)


@dataclass(frozen=True)
class _Origin:
    """Where a dead letter came from, as ``part2_events`` reads a record."""

    topic: str
    partition: int
    offset: int
    value: bytes | None


def _envelope_is_part2(names: Topics, envelope: dict[str, Any], lookup: part2_events.EpisodeLookup) -> bool:
    """Whether a dead letter on the general topic is of a Part 2 record (by its origin and its body)."""
    try:
        body = deadletter.original(envelope).value
    except (ValueError, KeyError):
        body = None  # the value was not kept: its origin alone decides
    origin = _Origin(str(envelope["topic"]), int(envelope["partition"]), int(envelope["offset"]), body)
    return part2_events.record_is_part2(names, origin, lookup)


def _sources(settings: Settings, names: Topics, part2: bool) -> Iterator[tuple[bool, Any, dict[str, Any]]]:
    """``(from the Part 2 dead-letter topic, record, envelope)`` of the general dead-letter topic, then,
    with ``part2``, of the Part 2 one."""
    for record, envelope in _dead_letters(settings, names.deadletter):
        yield False, record, envelope
    if part2:
        for record, envelope in _dead_letters(settings, names.deadletter_part2):
            yield True, record, envelope


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    names = Topics(settings.kafka.topic_prefix)
    include_part2 = bool(getattr(args, "part2", False))
    with open_store(settings.store.url) as store:
        create_tables(store.engine, _metadata)
        with store.engine.connect() as conn:
            done = {(r.topic, r.partition, r.offset) for r in conn.execute(select(replayed)).all()}
        lookup = part2_events.published_episode_part2(SyncState(store.engine))
        producer = EventProducer(settings.kafka) if args.dlq_action == "replay" else None
        writeback_topics = names.writeback_topics()
        shown = sent = skipped = invalid = hidden = 0
        for on_part2_topic, record, envelope in _sources(settings, names, include_part2):
            if contract_errors(deadletter.SCHEMA, deadletter.VERSION, envelope):
                log.warning("dlq_envelope_invalid", partition=record.partition, offset=record.offset)
                continue
            part2 = on_part2_topic or _envelope_is_part2(names, envelope, lookup)
            if part2 and not include_part2:
                hidden += 1
                continue
            if args.reason and args.reason not in str(envelope["reason"]):
                continue
            key = (record.topic, record.partition, record.offset)
            if producer is None:
                status = "replayed" if key in done else "partial" if envelope.get("omitted") else "waiting"
                where = f"{record.partition}:{record.offset}"
                if include_part2:  # two dead-letter topics: say which one
                    where = f"{'part2' if on_part2_topic else 'general'}:{where}"
                    status += " part2" if part2 else ""
                print(f"{where}\t{envelope['topic']}\t{status}\t{envelope['reason']}")
                shown += 1
                continue
            try:
                # Only to our write-back topics, and only where the dead letter's own headers say it
                # came from: an envelope naming another topic is never followed.
                deadletter.replay_topic(record.headers or [], envelope, writeback_topics)
                original = deadletter.original(envelope)
            except ValueError as exc:
                # Misdirected, or too large to keep whole (replay that from its original offset).
                log.warning(
                    "dlq_not_replayable", partition=record.partition, offset=record.offset, why=str(exc)
                )
                invalid += 1
                continue
            if key in done:
                skipped += 1
                continue
            try:
                producer.republish(original)
            except ContractError as exc:
                # Still breaks its contract: replaying would only dead-letter it again. Fix the producer.
                log.warning(
                    "dlq_not_replayable",
                    partition=record.partition,
                    offset=record.offset,
                    contract=exc.contract,
                )
                invalid += 1
                continue
            with store.engine.begin() as conn:
                conn.execute(
                    insert(replayed).values(
                        topic=record.topic,
                        partition=record.partition,
                        offset=record.offset,
                        replayed_at=now_utc(),
                    )
                )
            sent += 1
            log.info("dlq_replayed", topic=original.topic, partition=record.partition, offset=record.offset)
        if producer is not None:
            producer.close()
            print(
                f"replayed {sent} dead letters ({skipped} already replayed before, "
                f"{invalid} not replayable: breaking their contract, not kept whole, "
                "or not for a write-back topic)"
            )
        elif shown == 0:
            print("no dead letters")
        if not include_part2:
            _say_hidden(settings, names, hidden)
    return 0


def _say_hidden(settings: Settings, names: Topics, hidden: int) -> None:
    """How many Part 2 dead letters were left out: those of the general topic, and the Part 2 topic's."""
    on_part2_topic = _count_records(settings, names.deadletter_part2)
    if on_part2_topic is None:
        print(
            f"{hidden} dead letters of 42 CFR Part 2 records not shown; {names.deadletter_part2} could "
            "not be counted (no access?): --part2, as a principal allowed Part 2 records, shows them"
        )
    elif hidden + on_part2_topic:
        print(
            f"{hidden + on_part2_topic} dead letters of 42 CFR Part 2 records not shown "
            f"({on_part2_topic} on {names.deadletter_part2}): --part2, as a principal allowed Part 2 "
            "records, shows them"
        )

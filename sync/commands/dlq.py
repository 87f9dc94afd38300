"""``iop-bridge dlq list|replay``: look at dead letters, and re-publish them once the cause is fixed.

Replay reads the whole dead-letter topic (it is small), skips what an earlier replay already sent (kept
in the state store, so a replay never sends the same dead letter twice), filters by ``--reason`` and
re-publishes each original record to its original topic with its original key, value and headers, but
only to our write-back topics (attendance, discharges) and only when the dead-letter record's own
headers (``dlq_topic``/``dlq_partition``/``dlq_offset``) name the same origin as its envelope. The
write-back consumers de-duplicate by event id, so a replayed event that had in fact been written is
harmless.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import orjson
import structlog
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, String, Table, insert, select

from connectors.store import create_tables
from schemas import Topics
from schemas.contracts import ContractError
from schemas.contracts import errors as contract_errors
from sync import deadletter
from sync.config import Settings, load_settings, open_store
from sync.kafka import EventProducer, client_kwargs, connect
from sync.state import now_utc

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


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    topic = settings.kafka.topic_prefix + "iop.deadletter.v1"
    with open_store(settings.store.url) as store:
        create_tables(store.engine, _metadata)
        with store.engine.connect() as conn:
            done = {(r.topic, r.partition, r.offset) for r in conn.execute(select(replayed)).all()}
        producer = EventProducer(settings.kafka) if args.dlq_action == "replay" else None
        names = Topics(settings.kafka.topic_prefix)
        writeback_topics = (names.attendance, names.discharges)
        shown = sent = skipped = invalid = 0
        for record, envelope in _dead_letters(settings, topic):
            if contract_errors(deadletter.SCHEMA, deadletter.VERSION, envelope):
                log.warning("dlq_envelope_invalid", partition=record.partition, offset=record.offset)
                continue
            if args.reason and args.reason not in str(envelope["reason"]):
                continue
            key = (record.topic, record.partition, record.offset)
            if producer is None:
                status = "replayed" if key in done else "partial" if envelope.get("omitted") else "waiting"
                print(
                    f"{record.partition}:{record.offset}\t{envelope['topic']}\t{status}\t{envelope['reason']}"
                )
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
    return 0

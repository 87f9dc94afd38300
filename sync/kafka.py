"""Kafka for the service: a validating idempotent producer and an at-least-once consumer.

- ``client_kwargs`` / ``producer_kwargs`` / ``consumer_kwargs``: kafka-python settings from
  ``[kafka]`` (security protocol, SASL and TLS passed through). They hold the SASL password in clear,
  as kafka-python needs it: never log them.
- ``EventProducer.publish`` validates a record against its contract *before* producing (a
  ``ContractError`` means nothing was produced), keys it ``{ehr}|Patient/{id}`` and sets the headers
  ``schema``, ``schema_version``, ``event_id`` and a W3C ``traceparent``. The producer is idempotent
  (``enable_idempotence``, ``acks=all``), so its own retries never duplicate a record.
- ``EventProducer.republish`` sends a dead letter's original record back to its topic (replay).
- ``EventProducer.dead_letter`` sends a record we cannot process to ``iop.deadletter.v1`` with its
  original key, value, headers, topic, partition, offset and the reason (``sync.deadletter``); a 42 CFR
  Part 2 record (``part2=True``) to ``iop.deadletter.part2.v1`` only. The consumer decides: a record of a
  Part 2 topic always, any other when its ``part2`` classifier says so (``sync.part2_events``).
- ``EventConsumer`` processes records at least once: auto-commit off; every record is decoded and
  validated against its topic's contract (an invalid one is dead-lettered and the partition moves on);
  the handler runs; only then is ``offset + 1`` committed for that partition. A handler failure is
  classified once (``sync.errors.is_retriable``: the error's own ``retriable`` flag): one that is not
  retriable (an EHR 403, a bug) is dead-lettered at once (``permanent:<class>`` or
  ``handler_error:<class>``); a retriable one leaves the offset uncommitted, rewinds the partition to
  that record and pauses it for ``retry_pause_s``: the record is retried later, by this consumer or,
  after a rebalance, by another, until its budget (``retry_max_attempts`` failures or
  ``retry_max_seconds`` since the first) is spent; then it is dead-lettered ``gave_up:<class>``.
  Offsets are committed before every poll, so when a rebalance revokes partitions there is no finished
  but uncommitted work to lose, and the rebalance listener only abandons what belonged to them.
  With ``concurrency`` > 1 a poll's records run on a pool of that many threads (``sync.keyed_batch``):
  records of one message key (one patient) one after another in offset order, different keys at once.
  Each partition then commits its contiguous done prefix: never past a record that is not finished. A
  temporary failure stops the partition's records not yet started, and once those running have
  finished the partition is rewound to its first unfinished record and paused, as above. Every record
  of a poll is finished or skipped before the next poll, so a rebalance (which only happens inside a
  poll) never meets work in flight, and only the poll thread ever touches the (not thread-safe)
  ``KafkaConsumer``; handlers and dead-lettering run on the pool's threads (the producer is
  thread-safe), so the handler must be too.

``ensure_topics`` creates our missing topics on a broker that does not auto-create them.

Errors from kafka-python are retried when the client marks them ``retriable`` (its own classification,
not a list kept here), a bounded number of times; then they become ``sync.errors.KafkaError``.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any, Final, TypeVar

import orjson
import structlog
from jsonschema import Draft202012Validator
from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    OffsetAndMetadata,
    TopicPartition,
)
from kafka import errors as kafka_errors
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from schemas import (
    HEADER_EVENT_ID,
    HEADER_SCHEMA,
    HEADER_SCHEMA_VERSION,
    HEADER_TRACEPARENT,
    ContractError,
    Topics,
    contract_name,
    load_schema,
    parse_message_key,
)
from sync import deadletter, kafka_guard
from sync import errors as sync_errors
from sync.config import KafkaConfig
from sync.errors import KafkaError, PermanentEventError
from sync.keyed_batch import run_keyed

log = structlog.get_logger()

# kafka-python 3.0.12 can wait forever on its network thread; bound those waits (see sync.kafka_guard).
kafka_guard.install()

T = TypeVar("T")

#: How often a retriable client error is tried before it becomes ``KafkaError``.
RETRY_ATTEMPTS: Final = 5
#: How long one produce waits for the broker's acknowledgement, in seconds.
SEND_TIMEOUT_S: Final = 60.0
_TRACEPARENT = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")


def client_kwargs(config: KafkaConfig) -> dict[str, Any]:
    """Connection and security settings shared by producers, consumers and admin clients."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in config.bootstrap_servers.split(",") if s.strip()],
        "client_id": config.client_id,
        "security_protocol": config.security_protocol,
    }
    optional: dict[str, Any] = {
        "sasl_mechanism": config.sasl_mechanism,
        "sasl_plain_username": config.sasl_plain_username,
        "sasl_plain_password": (
            config.sasl_plain_password.get_secret_value() if config.sasl_plain_password else None
        ),
        "ssl_cafile": config.ssl_cafile,
        "ssl_certfile": config.ssl_certfile,
        "ssl_keyfile": config.ssl_keyfile,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    return kwargs


def producer_kwargs(config: KafkaConfig) -> dict[str, Any]:
    """An idempotent producer: the broker de-duplicates the producer's own retries, acks from all ISRs.

    ``enable_idempotence=True`` is explicit so that a conflicting setting fails loudly instead of
    silently turning idempotence off.
    """
    return {**client_kwargs(config), "enable_idempotence": True, "acks": "all"}


def consumer_kwargs(config: KafkaConfig, group_id: str | None = None) -> dict[str, Any]:
    """A group consumer that never commits by itself and starts at the beginning of a new topic."""
    return {
        **client_kwargs(config),
        "group_id": group_id or config.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
    }


def new_traceparent() -> str:
    """A W3C Trace Context ``traceparent`` for a new trace (version 00, sampled)."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def is_retriable(error: BaseException) -> bool:
    """kafka-python's own verdict: its errors carry ``retriable``."""
    return isinstance(error, kafka_errors.KafkaError) and bool(error.retriable)


def with_retries(
    action: Callable[[], T], *, what: str, sleep: Callable[[float], None] = time.sleep, **context: Any
) -> T:
    """Run ``action``, retrying errors kafka-python marks retriable; any other failure, or running out
    of attempts, raises ``KafkaError`` naming ``what``."""
    retrying = Retrying(
        retry=retry_if_exception(is_retriable),
        stop=stop_after_attempt(RETRY_ATTEMPTS),
        wait=wait_exponential(multiplier=0.2, max=5),
        sleep=sleep,
        before_sleep=lambda state: log.warning(
            "kafka_retry",
            what=what,
            attempt=state.attempt_number,
            error=type(state.outcome.exception()).__name__ if state.outcome else None,
            **context,
        ),
        reraise=True,
    )
    try:
        return retrying(action)
    except kafka_errors.KafkaError as exc:
        raise KafkaError(f"Kafka: {what} failed: {exc}") from exc


def connect(factory: Callable[[], T], *, what: str, bootstrap: str) -> T:
    """Build a kafka-python client. Its constructor already retries the bootstrap until
    ``bootstrap_timeout_ms``, so a failure here is final: ``KafkaError`` naming the servers."""
    try:
        return factory()
    except kafka_errors.KafkaError as exc:
        raise KafkaError(f"Kafka: {what}: cannot reach {bootstrap} ({type(exc).__name__})") from exc


def ensure_topics(config: KafkaConfig, *, partitions: int = 6) -> list[str]:
    """Create those of our topics (with the configured prefix) that the cluster lacks; returns their
    names. For the local broker and the demo, which do not auto-create topics; in production the
    topics (and their ACLs, the Part 2 ones above all) are usually provisioned by the platform."""
    wanted = Topics(config.topic_prefix).all()
    admin = connect(
        lambda: KafkaAdminClient(**client_kwargs(config)),
        what="admin client",
        bootstrap=config.bootstrap_servers,
    )
    try:
        existing = set(with_retries(admin.list_topics, what="listing topics"))
        missing = [name for name in wanted if name not in existing]
        if missing:
            # replication_factor -1: the broker's default.replication.factor.
            spec = {name: {"num_partitions": partitions, "replication_factor": -1} for name in missing}
            with_retries(lambda: admin.create_topics(spec, wait_for_metadata=True), what="creating topics")
            log.info("topics_created", count=len(missing), partitions=partitions)
        return missing
    finally:
        admin.close()


@cache
def _validator(name: str, version: int) -> Draft202012Validator:
    return Draft202012Validator(
        load_schema(name, version), format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def contract_problems(name: str, version: int, record: Any) -> list[str]:
    """Where and how a record breaks its contract, without its values (they may be PHI): field paths,
    the JSON Schema keyword that failed, and the names of missing or unexpected fields."""
    problems: list[str] = []
    for error in _validator(name, version).iter_errors(record):
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        detail = str(error.validator)
        if error.validator == "required" and isinstance(error.instance, Mapping):
            missing = [p for p in error.validator_value if p not in error.instance]
            detail = "missing " + ", ".join(missing)
        elif error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
            allowed = set(error.schema.get("properties", {}))
            extra = sorted({_field_name(p) for p in error.instance if p not in allowed})
            detail = "unexpected " + ", ".join(extra)
        problems.append(f"{where}: {detail}")
    return sorted(problems)


_FIELD_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _field_name(key: object) -> str:
    """An unexpected key as a reason shows it: a contract-style name, else only that there was one
    (a key of any other shape may be a value: a name, a birth date)."""
    return key if isinstance(key, str) and _FIELD_NAME.fullmatch(key) else "(a field)"


def check_contract(name: str, version: int, record: Any) -> None:
    """Raise ``ContractError`` (naming fields, never values) unless the record satisfies its contract."""
    problems = contract_problems(name, version, record)
    if problems:
        raise ContractError(contract_name(name, version), problems)


class EventProducer:
    """Publishes contract-checked records with an idempotent producer. One per process; thread-safe."""

    def __init__(
        self,
        config: KafkaConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        **overrides: Any,
    ) -> None:
        self.topics = Topics(config.topic_prefix)
        self._sleep = sleep
        kwargs = {**producer_kwargs(config), **overrides}
        self._producer: KafkaProducer = connect(
            lambda: KafkaProducer(**kwargs), what="producer", bootstrap=config.bootstrap_servers
        )
        log.info("kafka_producer_ready", security_protocol=config.security_protocol)

    def publish(
        self,
        topic: str,
        key: str,
        value: Mapping[str, Any],
        *,
        schema: str,
        version: int,
        event_id: str,
        traceparent: str | None = None,
    ) -> Any:
        """Validate ``value`` against ``<schema>.v<version>``, then produce it to ``topic``.

        ``topic`` is a full name (``producer.topics.episodes``); ``key`` is ``{ehr}|Patient/{id}``.
        Returns kafka-python's future (``.get()`` waits for the acknowledgement; ``flush()`` waits for
        all). Raises ``ContractError`` (nothing produced), ``ValueError`` for a key, topic or
        traceparent that is not ours, or ``KafkaError``.
        """
        parse_message_key(key)
        if self.topics.contract(topic) != (schema, version):
            raise ValueError(
                f"{topic} carries {contract_name(*self.topics.contract(topic))} records, not {schema}"
            )
        if traceparent is not None and not _TRACEPARENT.match(traceparent):
            raise ValueError(
                f"traceparent {traceparent!r} is not W3C Trace Context (00-<trace>-<span>-<flags>)"
            )
        try:
            check_contract(schema, version, value)
        except ContractError as exc:
            log.warning(
                "publish_rejected",
                topic=topic,
                contract=exc.contract,
                event_id=event_id,
                problems=exc.problems,
            )
            raise
        body = orjson.dumps(value)
        headers = [
            (HEADER_SCHEMA, schema.encode()),
            (HEADER_SCHEMA_VERSION, str(version).encode()),
            (HEADER_EVENT_ID, event_id.encode()),
            (HEADER_TRACEPARENT, (traceparent or new_traceparent()).encode()),
        ]
        return with_retries(
            lambda: self._producer.send(topic, key=key.encode(), value=body, headers=headers),
            what=f"producing to {topic}",
            sleep=self._sleep,
            topic=topic,
        )

    def dead_letter(
        self,
        record: deadletter.SourceRecord,
        reason: str,
        *,
        contract: tuple[str, int] | None = None,
        part2: bool = False,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """Produce ``record`` to the dead-letter topic with ``reason`` and wait for the acknowledgement
        (the caller commits past the record only after this returns). ``reason`` must hold no PHI.
        A Part 2 record (``part2``) goes to the Part 2 dead-letter topic, never the general one."""
        failed_at = now()
        value = deadletter.envelope(record, reason, failed_at=failed_at, contract=contract)
        topic = self.topics.deadletter_part2 if part2 else self.topics.deadletter
        try:
            self._send_dead_letter(topic, record, value, reason)
        except KafkaError as exc:
            # The whole dead letter would not go (too large for the broker, a header it refuses...):
            # a stub with where it came from and why still does, so the partition moves on.
            cause = type(exc.__cause__ or exc).__name__
            log.warning("dead_letter_stubbed", topic=record.topic, offset=record.offset, error=cause)
            value = deadletter.stub(record, reason, failed_at=failed_at, cause=cause, contract=contract)
            self._send_dead_letter(topic, record, value, reason, whole=False)
        log.warning(
            "event_dead_lettered",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            event_id=value["event_id"],
            part2=part2,
        )

    def _send_dead_letter(
        self,
        topic: str,
        record: deadletter.SourceRecord,
        value: dict[str, Any],
        reason: str,
        *,
        whole: bool = True,
    ) -> None:
        check_contract(deadletter.SCHEMA, deadletter.VERSION, value)
        body = orjson.dumps(value)
        headers = deadletter.headers(record, reason)
        key = record.key if whole and "key" not in value["omitted"] else None

        def send() -> Any:
            future = self._producer.send(topic, key=key, value=body, headers=headers)
            return future.get(timeout=SEND_TIMEOUT_S)

        with_retries(send, what=f"dead-lettering to {topic}", sleep=self._sleep, topic=topic)

    def republish(self, original: deadletter.OriginalRecord) -> None:
        """Produce a dead-lettered record again to its original topic, key, value and headers byte for
        byte, and wait for the acknowledgement (``dlq replay``). It must still satisfy its topic's
        contract: ``ContractError`` otherwise (nothing produced)."""
        contract = self.topics.contract(original.topic)
        try:
            decode(original, contract)
        except _NotValid as invalid:
            raise ContractError(contract_name(*contract), [invalid.reason]) from None
        # kafka-python cannot send a header without a value (other clients can): it goes as empty.
        headers = [(key, b"" if value is None else value) for key, value in original.headers]

        def send() -> Any:
            future = self._producer.send(
                original.topic, key=original.key, value=original.value, headers=headers
            )
            return future.get(timeout=SEND_TIMEOUT_S)

        with_retries(send, what=f"re-publishing to {original.topic}", sleep=self._sleep, topic=original.topic)
        log.info("event_republished", topic=original.topic, offset=original.offset)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every produced record is acknowledged (or raise ``KafkaError``)."""
        try:
            self._producer.flush(timeout=timeout_s)
        except kafka_errors.KafkaError as exc:
            raise KafkaError(f"Kafka: flushing the producer failed: {exc}") from exc

    def close(self, timeout_s: float | None = None) -> None:
        self._producer.close(timeout=timeout_s)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass(frozen=True)
class Event:
    """A consumed record that satisfies its topic's contract."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: dict[str, Any]
    schema: str
    version: int
    event_id: str | None
    traceparent: str | None
    headers: tuple[tuple[str, bytes | None], ...]


Handler = Callable[[Event], None]


@dataclass
class PollStats:
    """What one poll (or a whole drain) did."""

    processed: int = 0
    dead_lettered: int = 0
    failed: int = 0
    abandoned: int = 0

    def add(self, other: PollStats) -> None:
        self.processed += other.processed
        self.dead_lettered += other.dead_lettered
        self.failed += other.failed
        self.abandoned += other.abandoned

    @property
    def records(self) -> int:
        return self.processed + self.dead_lettered + self.failed + self.abandoned


class _NotValid(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _header(headers: Sequence[tuple[str, bytes | None]], name: str) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def decode(record: deadletter.SourceRecord, contract: tuple[str, int]) -> Event:
    """The record as an ``Event``, or ``_NotValid`` with a PHI-free reason."""
    name, version = contract
    headers = tuple(record.headers or ())
    claimed = _header(headers, HEADER_SCHEMA)
    claimed_version = _header(headers, HEADER_SCHEMA_VERSION)
    if claimed is not None and claimed != name.encode():
        raise _NotValid(f"schema_mismatch: header schema is not {name!r}, the contract of {record.topic}")
    if claimed_version is not None and claimed_version != str(version).encode():
        raise _NotValid(f"schema_mismatch: header schema_version is not {version} on {record.topic}")
    try:
        key = None if record.key is None else record.key.decode("utf-8")
    except UnicodeDecodeError:
        raise _NotValid("undecodable: the key is not UTF-8") from None
    if record.value is None:
        raise _NotValid("undecodable: the value is empty (tombstone)")
    try:
        value = orjson.loads(record.value)
    except orjson.JSONDecodeError:
        raise _NotValid("undecodable: the value is not UTF-8 JSON") from None
    problems = contract_problems(name, version, value)
    if problems:
        raise _NotValid(f"schema_invalid: {contract_name(name, version)}: " + "; ".join(problems))
    event_id = value.get("event_id") if isinstance(value.get("event_id"), str) else None
    if event_id is None and (raw := _header(headers, HEADER_EVENT_ID)) is not None:
        event_id = raw.decode("utf-8", "replace")
    trace = _header(headers, HEADER_TRACEPARENT)
    traceparent = trace.decode("ascii", "replace") if trace is not None else None
    return Event(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=key,
        value=value,
        schema=name,
        version=version,
        event_id=event_id,
        traceparent=traceparent if traceparent and _TRACEPARENT.match(traceparent) else None,
        headers=headers,
    )


def _order_key(item: tuple[TopicPartition, Any]) -> Hashable:
    """Records that must be handled in order: those of one message key (a patient: across topics
    too); a record without a key is ordered with the other keyless records of its partition."""
    tp, record = item
    return ("key", record.key) if record.key is not None else ("partition", tp.topic, tp.partition)


@dataclass
class _PartitionState:
    """Per assigned partition: where a retry will start, and when."""

    resume_at: float | None = None
    failures: int = 0
    #: Per failed offset: how many times it failed and when it first did (the retry budget).
    attempts: dict[int, tuple[int, float]] = field(default_factory=dict)


@dataclass
class _Assignment:
    """The partitions this member owns, shared with the rebalance listener (which runs on
    kafka-python's I/O thread), hence the lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    owned: set[TopicPartition] = field(default_factory=set)
    states: dict[TopicPartition, _PartitionState] = field(default_factory=dict)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Finishes or abandons in-flight work when partitions move to another member.

    Offsets of finished records are committed before every poll, and rebalances run inside poll, so at
    revocation there is nothing finished left to commit; what is dropped is the partition's retry
    state. A record being handled when the member is evicted is abandoned: its offset stays
    uncommitted and the new owner processes it again (the handlers are idempotent).
    """

    def __init__(self, assignment: _Assignment) -> None:
        self._assignment = assignment

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = set(revoked)
        with self._assignment.lock:
            self._assignment.owned -= revoked
            for tp in revoked:
                self._assignment.states.pop(tp, None)
        if revoked:
            log.info("partitions_revoked", count=len(revoked))

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assigned = set(assigned)
        with self._assignment.lock:
            self._assignment.owned |= assigned
        log.info("partitions_assigned", count=len(assigned))


class EventConsumer:
    """At-least-once processing of our topics by a consumer group (see the module docstring)."""

    def __init__(
        self,
        config: KafkaConfig,
        topics: Sequence[str],
        producer: EventProducer,
        *,
        group_id: str | None = None,
        permanent: tuple[type[Exception], ...] = (PermanentEventError,),
        retry_pause_s: float = 30.0,
        retry_max_attempts: int = 10,
        retry_max_seconds: float = 3600.0,
        concurrency: int = 1,
        part2: Callable[[deadletter.SourceRecord], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        **overrides: Any,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        names = Topics(config.topic_prefix)
        self._names = names
        self._contracts = {topic: names.contract(topic) for topic in topics}
        self._part2 = part2  # is a record of a general topic Part 2? (a Part 2 topic's always is)
        self._producer = producer
        self._permanent = permanent
        self._retry_pause_s = retry_pause_s
        if retry_max_attempts < 1 or retry_max_seconds < 0:
            raise ValueError("retry_max_attempts must be at least 1 and retry_max_seconds not negative")
        self._retry_max_attempts = retry_max_attempts
        self._retry_max_seconds = retry_max_seconds
        self._clock = clock
        self._sleep = sleep
        self._assignment = _Assignment()
        # 1: every record on the poll thread, as it comes (no pool at all).
        self._pool = (
            ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="event-worker")
            if concurrency > 1
            else None
        )
        kwargs = {**consumer_kwargs(config, group_id), **overrides}
        self._consumer: KafkaConsumer = connect(
            lambda: KafkaConsumer(**kwargs), what="consumer", bootstrap=config.bootstrap_servers
        )
        self._consumer.subscribe(list(topics), listener=_Listener(self._assignment))
        self.group_id = kwargs["group_id"]
        log.info("kafka_consumer_ready", group=self.group_id, topics=list(topics))

    # -- one poll ---------------------------------------------------------------------------------
    def poll_once(self, handler: Handler, timeout_ms: int = 1000) -> PollStats:
        """Resume partitions whose retry pause is over, poll once, process what came, commit."""
        self._resume_due()
        batches = with_retries(
            lambda: self._consumer.poll(timeout_ms=timeout_ms), what="polling", sleep=self._sleep
        )
        if self._pool is not None and sum(len(records) for records in batches.values()) > 1:
            return self._process_concurrently(self._pool, batches, handler)
        stats = PollStats()
        for tp, records in batches.items():
            stats.add(self._process_partition(tp, records, handler))
        return stats

    def _process_concurrently(
        self, pool: ThreadPoolExecutor, batches: Mapping[TopicPartition, Sequence[Any]], handler: Handler
    ) -> PollStats:
        """The poll's records on the pool (see the module docstring), then each partition's commit, or
        its rewind and pause from its first unfinished record after a temporary failure."""
        items = [(tp, record) for tp, records in batches.items() for record in records]
        outcomes = run_keyed(
            pool,
            items,
            key=_order_key,
            group=lambda item: item[0],
            work=lambda item: self._process_record(item[1], handler),
            stops=lambda outcome: outcome == "failed",
            live=lambda item: self._owned(item[0]),
        )
        stats = PollStats()
        by_partition: dict[TopicPartition, list[tuple[Any, str | None]]] = {}
        for (tp, record), outcome in zip(items, outcomes, strict=True):
            by_partition.setdefault(tp, []).append((record, outcome))
        done_upto: dict[TopicPartition, Any] = {}
        open_from: dict[TopicPartition, Any] = {}
        for tp, results in by_partition.items():
            done: Any = None
            first_open: Any = None
            for record, outcome in results:  # in offset order
                if outcome == "processed":
                    stats.processed += 1
                elif outcome == "dead_lettered":
                    stats.dead_lettered += 1
                elif outcome == "failed":
                    stats.failed += 1
                else:
                    stats.abandoned += 1
                if first_open is None:
                    if outcome in ("processed", "dead_lettered"):
                        done = record
                    else:
                        first_open = record
            done_upto[tp] = done
            open_from[tp] = first_open
        self._commit_all(done_upto)  # every partition's done prefix in one request
        for tp, results in by_partition.items():
            first_open = open_from[tp]
            if first_open is None:
                with self._assignment.lock:
                    self._assignment.states.pop(tp, None)
            elif any(outcome == "failed" for _, outcome in results):
                self._retry_later(tp, first_open)
            else:
                skipped = sum(1 for _, outcome in results if outcome is None)
                log.info("partition_work_abandoned", topic=tp.topic, partition=tp.partition, count=skipped)
        return stats

    def _owned(self, tp: TopicPartition) -> bool:
        with self._assignment.lock:
            return tp in self._assignment.owned

    def _process_partition(self, tp: TopicPartition, records: Sequence[Any], handler: Handler) -> PollStats:
        stats = PollStats()
        done: Any = None
        for index, record in enumerate(records):
            if not self._owned(tp):
                stats.abandoned += len(records) - index
                log.info(
                    "partition_work_abandoned", topic=tp.topic, partition=tp.partition, count=stats.abandoned
                )
                return stats
            outcome = self._process_record(record, handler)
            if outcome == "failed":
                stats.failed += 1
                stats.abandoned += len(records) - index - 1
                self._commit(tp, done)
                self._retry_later(tp, record)
                return stats
            if outcome == "dead_lettered":
                stats.dead_lettered += 1
            else:
                stats.processed += 1
            done = record
        self._commit(tp, done)
        with self._assignment.lock:
            self._assignment.states.pop(tp, None)
        return stats

    def _process_record(self, record: Any, handler: Handler) -> str:
        contract = self._contracts[record.topic]
        context = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        try:
            event = decode(record, contract)
        except _NotValid as invalid:
            return self._dead_letter(record, invalid.reason, contract, context)
        try:
            handler(event)
        except self._permanent as exc:
            return self._dead_letter(record, str(exc) or type(exc).__name__, contract, context)
        except Exception as exc:
            error = type(exc).__name__
            # Our errors' messages are PHI-free by contract; an unflagged exception (a bug) may quote
            # data, so only its class is kept.
            detail = f": {exc}" if sync_errors.has_flag(exc) and str(exc) else ""
            if not sync_errors.is_retriable(exc):
                prefix = "permanent" if sync_errors.has_flag(exc) else "handler_error"
                return self._dead_letter(record, f"{prefix}:{error}{detail}", contract, context)
            attempts, age = self._count_failure(record)
            if attempts >= self._retry_max_attempts or age >= self._retry_max_seconds:
                reason = f"gave_up:{error} after {attempts} attempts in {age:.0f} s{detail}"
                return self._dead_letter(record, reason, contract, context)
            log.warning("event_failed", event_id=event.event_id, error=error, attempts=attempts, **context)
            return "failed"
        return "processed"

    def _count_failure(self, record: Any) -> tuple[int, float]:
        """Count one more retriable failure of ``record``: (failures so far, seconds since the first)."""
        now = self._clock()
        tp = TopicPartition(record.topic, record.partition)
        with self._assignment.lock:
            state = self._assignment.states.setdefault(tp, _PartitionState())
            count, first = state.attempts.get(record.offset, (0, now))
            state.attempts[record.offset] = (count + 1, first)
        return count + 1, now - first

    def _dead_letter(
        self, record: Any, reason: str, contract: tuple[str, int], context: dict[str, Any]
    ) -> str:
        part2 = self._names.is_part2(record.topic) or (self._part2 is not None and self._part2(record))
        try:
            self._producer.dead_letter(record, reason, contract=contract, part2=part2)
        except KafkaError:
            log.warning("dead_letter_failed", **context)
            return "failed"
        return "dead_lettered"

    def _commit(self, tp: TopicPartition, record: Any) -> None:
        """Commit ``record.offset + 1`` for its partition (nothing when ``record`` is None)."""
        self._commit_all({tp: record})

    def _commit_all(self, done: Mapping[TopicPartition, Any]) -> None:
        """Commit ``record.offset + 1`` for each partition's record, in one request (a partition whose
        record is None: nothing)."""
        offsets = {
            tp: OffsetAndMetadata(record.offset + 1, "", record.leader_epoch)
            for tp, record in done.items()
            if record is not None
        }
        if not offsets:
            return
        try:
            with_retries(lambda: self._consumer.commit(offsets), what="committing", sleep=self._sleep)
        except KafkaError as exc:
            # Typically CommitFailedError: the group rebalanced and the partition has a new owner,
            # which will process these records again. Nothing is lost; the handlers are idempotent.
            for tp, offset in offsets.items():
                log.warning(
                    "commit_failed",
                    topic=tp.topic,
                    partition=tp.partition,
                    offset=offset.offset,
                    error=type(exc.__cause__).__name__,
                )

    def _retry_later(self, tp: TopicPartition, record: Any) -> None:
        """Rewind the partition to the failed record and pause it for ``retry_pause_s``."""
        if not self._owned(tp):
            return
        self._consumer.seek(tp, record.offset)
        self._consumer.pause(tp)
        with self._assignment.lock:
            state = self._assignment.states.setdefault(tp, _PartitionState())
            state.failures += 1
            state.resume_at = self._clock() + self._retry_pause_s
        log.info(
            "partition_paused",
            topic=tp.topic,
            partition=tp.partition,
            offset=record.offset,
            failures=state.failures,
            pause_s=self._retry_pause_s,
        )

    def _resume_due(self) -> None:
        """Resume every paused partition whose retry time has come, and any whose retry state the
        rebalance listener dropped (kafka-python may keep a retained partition paused across a
        rebalance; it restarts from its committed offset)."""
        now = self._clock()
        paused = set(self._consumer.paused())
        if not paused:
            return
        with self._assignment.lock:
            waiting = {
                tp
                for tp, state in self._assignment.states.items()
                if state.resume_at is not None and state.resume_at > now
            }
        due = paused - waiting
        if due:
            self._consumer.resume(*due)

    def paused(self) -> set[TopicPartition]:
        """Partitions waiting to retry a failed record."""
        return set(self._consumer.paused())

    # -- loops ------------------------------------------------------------------------------------
    def run(self, handler: Handler, should_stop: Callable[[], bool], *, timeout_ms: int = 1000) -> PollStats:
        """Process until ``should_stop()`` (checked between polls; SIGTERM sets it): in-flight work
        finishes and is committed before returning."""
        total = PollStats()
        while not should_stop():
            total.add(self.poll_once(handler, timeout_ms))
        return total

    def drain(
        self,
        handler: Handler,
        *,
        idle_polls: int = 3,
        max_seconds: float = 300.0,
        timeout_ms: int = 1000,
    ) -> PollStats:
        """Process until ``idle_polls`` polls in a row, with partitions assigned, bring nothing and no
        partition waits to retry, or ``max_seconds`` have passed (``--once``)."""
        total = PollStats()
        idle = 0
        deadline = self._clock() + max_seconds
        while idle < idle_polls and self._clock() < deadline:
            stats = self.poll_once(handler, timeout_ms)
            total.add(stats)
            # Not idle while the group join is still under way (no assignment yet), nor while a
            # partition waits to retry a record.
            busy = stats.records or self.paused() or not self._consumer.assignment()
            idle = 0 if busy else idle + 1
        return total

    def close(self) -> None:
        """Leave the group. Finished records are already committed; nothing else is (no record is in
        flight between polls)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._consumer.close(autocommit=False)
        log.info("kafka_consumer_closed", group=self.group_id)

    def __enter__(self) -> EventConsumer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

"""The service's own tables in the state store: what was published, the outbox, the write-back ledger.

They live in the same database as the connectors' cursors and replica (one SQLAlchemy engine: SQLite by
default, PostgreSQL for several instances).

- ``sync_published``: the last published version of each episode and referral, by content hash, so a
  cycle publishes only what changed; it also answers "which episode is this event for?" during write-back
  and keeps the EpisodeOfCare's server id once we wrote it.
- ``sync_outbox``: messages staged in the SAME transaction that records them as published. A crash
  between mapping and producing loses nothing: the outbox is drained (in order) on the next start.
- ``sync_ledger_v2``: every consumed event by (ehr, topic, ``event_id``) with its content hash and outcome:
  redelivery is a no-op, an id reused for other content a conflict.
- ``sync_sessions_v2``: the resource written for each IOP session (by its session key: episode, program
  and the program's session id), so a later
  event for the same session updates it instead of creating another (servers' conditional create is
  racy: the ledger is the second lock).

Thread-safe: the write-back consumer's workers share one ``SyncState``. Reads take a pooled connection
each; on SQLite every write transaction starts with ``BEGIN IMMEDIATE`` (it takes the write lock before
reading, so a read-then-write never fails with "database is locked" when another writer committed in
between) and writers of this process queue on a lock instead of SQLite's sleeping busy handler (other
processes still wait through the store's busy timeout). PostgreSQL writes need neither.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from connectors.store import create_tables

metadata = MetaData()
# Values other systems choose (patient and server ids, event and session ids, timestamps as sent) have
# no length limit: PostgreSQL enforces VARCHAR(n) where SQLite does not.
_TEXT = String()

published = Table(
    "sync_published",
    metadata,
    Column("ehr", String(200), primary_key=True),
    Column("kind", String(20), primary_key=True),
    Column("record_id", String(64), primary_key=True),
    Column("patient_id", _TEXT, nullable=False, index=True),
    Column("content_hash", String(64), nullable=False),
    Column("record", Text, nullable=False),
    Column("fhir_id", _TEXT, nullable=True),
    # The day from which an active episode is finished by time alone: its patient is re-mapped then.
    Column("review_after", String(10), nullable=True, index=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

outbox = Table(
    "sync_outbox",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("topic", String(255), nullable=False),
    Column("message_key", _TEXT, nullable=False),
    Column("value", Text, nullable=False),
    Column("schema_name", String(50), nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("event_id", _TEXT, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# ``sync_ledger_v2``: by (ehr, topic, event_id), with the hash of the event's content so that an id reused
# for other content is told apart from a redelivery. The first table, ``sync_ledger``, was keyed by
# ``event_id`` alone (another program's event reusing an id was dropped); it is left in an existing store,
# unread: a redelivered event it knew is recognised by the session table and the server's conditional
# create instead (the other two locks of ``sync.writeback``).
ledger = Table(
    "sync_ledger_v2",
    metadata,
    Column("ehr", String(200), primary_key=True),
    Column("topic", String(255), primary_key=True),
    Column("event_id", _TEXT, primary_key=True),
    Column("content_hash", String(64), nullable=False),
    Column("outcome", String(50), nullable=False),
    Column("detail", Text, nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False),
)

# ``sync_sessions_v2``: by the session key (``schemas.identifiers.session_key``: episode, program and the
# program's session id). The first table, ``sync_sessions``, was keyed by the program's session id alone,
# which two programs share; it is left in an existing store, unread (its rows name sessions ambiguously).
sessions = Table(
    "sync_sessions_v2",
    metadata,
    Column("ehr", String(200), primary_key=True),
    Column("session_id", _TEXT, primary_key=True),
    Column("resource_type", String(50), nullable=False),
    Column("resource_id", _TEXT, nullable=False),
    Column("occurred_at", _TEXT, nullable=False),
    Column("status", String(20), nullable=False),
)

# ``sync_mapping_v1``: per EHR, the fingerprint of the rules and episode settings its published records
# were mapped with (``sync.episode_config.settings_fingerprint``); another one re-maps every patient.
mapping = Table(
    "sync_mapping_v1",
    metadata,
    Column("ehr", String(200), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


# The write-back's reads, once per event each: built once (bound parameters), not per call.
_EVENT_ENTRY = select(ledger.c.outcome, ledger.c.content_hash).where(
    ledger.c.ehr == bindparam("ehr"),
    ledger.c.topic == bindparam("topic"),
    ledger.c.event_id == bindparam("event_id"),
)
_SESSION = select(sessions).where(
    sessions.c.ehr == bindparam("ehr"), sessions.c.session_id == bindparam("session_id")
)
_PUBLISHED_ENTRY = select(published.c.record, published.c.fhir_id).where(
    published.c.ehr == bindparam("ehr"),
    published.c.kind == bindparam("kind"),
    published.c.record_id == bindparam("record_id"),
)


def content_hash(record: Mapping[str, Any]) -> str:
    """A stable hash of a record's content (key order does not matter)."""
    return hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True)
class Staged:
    """A record to publish if it changed since the last time."""

    kind: str  # "episode" | "referral"
    record_id: str
    patient_id: str
    record: Mapping[str, Any]
    topic: str
    message_key: str
    schema_name: str
    schema_version: int
    review_after: str | None = None


@dataclass(frozen=True)
class OutboxMessage:
    seq: int
    topic: str
    message_key: str
    value: dict[str, Any]
    schema_name: str
    schema_version: int
    event_id: str


@dataclass(frozen=True)
class SessionResource:
    resource_type: str
    resource_id: str
    occurred_at: str
    status: str


@dataclass(frozen=True)
class PublishedEntry:
    """A published record with the server id of its EHR copy (the EpisodeOfCare), when we know it."""

    record: dict[str, Any]
    fhir_id: str | None


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger holds of a processed event."""

    outcome: str
    content_hash: str


@dataclass(frozen=True)
class SessionWrite:
    """The session-table row an event leaves behind, written with the event's ledger entry."""

    ehr: str
    session_id: str
    resource: SessionResource


def now_utc() -> datetime:
    return datetime.now(UTC)


def _upsert(conn: Connection, table: Table, values: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Insert or update one row by its primary key, on SQLite and PostgreSQL alike."""
    conn.execute(_upsert_statement(conn.dialect.name, table, tuple(keys), tuple(values)), dict(values))


@cache
def _upsert_statement(dialect: str, table: Table, keys: tuple[str, ...], columns: tuple[str, ...]) -> Any:
    """``INSERT … ON CONFLICT (keys) DO UPDATE`` the other ``columns`` from the row offered, built once
    per shape (the write-back writes two rows per event: building and caching the statement each time
    was most of their cost)."""
    if dialect == "sqlite":
        sqlite_stmt = sqlite.insert(table)
        changes = {c: sqlite_stmt.excluded[c] for c in columns if c not in keys}
        return sqlite_stmt.on_conflict_do_update(index_elements=list(keys), set_=changes)
    if dialect == "postgresql":
        pg_stmt = postgresql.insert(table)
        changes = {c: pg_stmt.excluded[c] for c in columns if c not in keys}
        return pg_stmt.on_conflict_do_update(index_elements=list(keys), set_=changes)
    raise RuntimeError(f"unsupported database dialect {dialect!r}")  # pragma: no cover - only the two stores


class SyncState:
    """The service's tables on the shared state-store engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._write_lock = threading.Lock()
        create_tables(engine, metadata)

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """One write transaction (see the module docstring for SQLite)."""
        if not self._sqlite:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock, self.engine.begin() as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn

    # -- publishing -------------------------------------------------------------------------------

    def stage_changes(self, ehr: str, items: Iterable[Staged]) -> list[Staged]:
        """Record new versions and put the changed ones in the outbox, in one transaction.

        Returns the items that changed (unchanged records are skipped).
        """
        staged: list[Staged] = []
        now = now_utc()
        with self._writing() as conn:
            for item in items:
                digest = content_hash(item.record)
                row = conn.execute(
                    select(published.c.content_hash).where(
                        published.c.ehr == ehr,
                        published.c.kind == item.kind,
                        published.c.record_id == item.record_id,
                    )
                ).first()
                if row is not None and row.content_hash == digest:
                    continue
                value = orjson.dumps(item.record).decode()
                _upsert(
                    conn,
                    published,
                    {
                        "ehr": ehr,
                        "kind": item.kind,
                        "record_id": item.record_id,
                        "patient_id": item.patient_id,
                        "content_hash": digest,
                        "record": value,
                        "review_after": item.review_after,
                        "updated_at": now,
                    },
                    ["ehr", "kind", "record_id"],
                )
                conn.execute(
                    insert(outbox).values(
                        topic=item.topic,
                        message_key=item.message_key,
                        value=value,
                        schema_name=item.schema_name,
                        schema_version=item.schema_version,
                        # The event id of a publication: the record and the version of its content.
                        event_id=f"{item.kind}:{item.record_id}:{digest[:16]}",
                        created_at=now,
                    )
                )
                staged.append(item)
        return staged

    def outbox_batch(self, limit: int = 500) -> list[OutboxMessage]:
        """The oldest staged messages, in the order they were staged."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(outbox).order_by(outbox.c.seq).limit(limit)).all()
        return [
            OutboxMessage(
                seq=r.seq,
                topic=r.topic,
                message_key=r.message_key,
                value=orjson.loads(r.value),
                schema_name=r.schema_name,
                schema_version=r.schema_version,
                event_id=r.event_id,
            )
            for r in rows
        ]

    def outbox_done(self, seqs: Iterable[int]) -> None:
        """Forget messages the broker acknowledged."""
        done = list(seqs)
        if not done:
            return
        with self._writing() as conn:
            conn.execute(delete(outbox).where(outbox.c.seq.in_(done)))

    def outbox_size(self) -> int:
        with self.engine.connect() as conn:
            return len(conn.execute(select(outbox.c.seq)).all())

    def patients_due(self, ehr: str, today: str) -> list[str]:
        """Patients with an active episode whose gap deadline (``review_after``) is ``today`` or earlier."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(published.c.patient_id)
                .where(
                    published.c.ehr == ehr,
                    published.c.kind == "episode",
                    published.c.review_after.is_not(None),
                    published.c.review_after <= today,
                )
                .distinct()
            ).all()
        return sorted(str(r.patient_id) for r in rows)

    def published_record(self, ehr: str, kind: str, record_id: str) -> dict[str, Any] | None:
        """The last published record (an episode or referral), or None when we never published it."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(published.c.record).where(
                    published.c.ehr == ehr, published.c.kind == kind, published.c.record_id == record_id
                )
            ).first()
        return None if row is None else dict(orjson.loads(row.record))

    def published_ids(self, ehr: str, kind: str, patient_id: str) -> dict[str, dict[str, Any]]:
        """Every record of a kind published for a patient, by id (the previous state of that patient)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(published.c.record_id, published.c.record).where(
                    published.c.ehr == ehr, published.c.kind == kind, published.c.patient_id == patient_id
                )
            ).all()
        return {r.record_id: dict(orjson.loads(r.record)) for r in rows}

    def published_entry(self, ehr: str, kind: str, record_id: str) -> PublishedEntry | None:
        """``published_record`` and the record's EHR server id, in one read."""
        with self.engine.connect() as conn:
            row = conn.execute(_PUBLISHED_ENTRY, {"ehr": ehr, "kind": kind, "record_id": record_id}).first()
        return None if row is None else PublishedEntry(dict(orjson.loads(row.record)), row.fhir_id)

    def episode_fhir_id(self, ehr: str, episode_id: str) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(published.c.fhir_id).where(
                    published.c.ehr == ehr, published.c.kind == "episode", published.c.record_id == episode_id
                )
            ).first()
        return None if row is None else row.fhir_id

    def set_episode_fhir_id(self, ehr: str, episode_id: str, fhir_id: str) -> None:
        with self._writing() as conn:
            conn.execute(
                update(published)
                .where(
                    published.c.ehr == ehr, published.c.kind == "episode", published.c.record_id == episode_id
                )
                .values(fhir_id=fhir_id)
            )

    def mapping_fingerprint(self, ehr: str) -> str | None:
        """The fingerprint of the rules and settings ``ehr``'s records were last mapped with."""
        with self.engine.connect() as conn:
            row = conn.execute(select(mapping.c.fingerprint).where(mapping.c.ehr == ehr)).first()
        return None if row is None else str(row.fingerprint)

    def set_mapping_fingerprint(self, ehr: str, fingerprint: str) -> None:
        with self._writing() as conn:
            _upsert(conn, mapping, {"ehr": ehr, "fingerprint": fingerprint, "updated_at": now_utc()}, ["ehr"])

    # -- write-back -------------------------------------------------------------------------------

    def event_outcome(self, event_id: str, *, ehr: str = "", topic: str | None = None) -> str | None:
        """The outcome recorded for an event of ``ehr`` (on ``topic``, or on any), or None when never
        processed."""
        query = select(ledger.c.outcome).where(ledger.c.ehr == ehr, ledger.c.event_id == event_id)
        if topic is not None:
            query = query.where(ledger.c.topic == topic)
        with self.engine.connect() as conn:
            row = conn.execute(query.limit(1)).first()
        return None if row is None else str(row.outcome)

    def event_entry(self, ehr: str, topic: str, event_id: str) -> LedgerEntry | None:
        """The ledger's entry for one event of one EHR on one topic, or None when never processed."""
        with self.engine.connect() as conn:
            row = conn.execute(_EVENT_ENTRY, {"ehr": ehr, "topic": topic, "event_id": event_id}).first()
        return None if row is None else LedgerEntry(str(row.outcome), str(row.content_hash))

    def record_event(
        self,
        event_id: str,
        *,
        topic: str,
        outcome: str,
        detail: Mapping[str, Any],
        session: SessionWrite | None = None,
        ehr: str = "",
        content_hash: str = "",
    ) -> None:
        """The event's ledger entry and, when given, its session's row: one transaction, so a crash
        leaves both or neither."""
        with self._writing() as conn:
            if session is not None:
                _put_session(conn, session)
            _upsert(
                conn,
                ledger,
                {
                    "ehr": ehr,
                    "topic": topic,
                    "event_id": event_id,
                    "content_hash": content_hash,
                    "outcome": outcome,
                    "detail": orjson.dumps(detail).decode(),
                    "processed_at": now_utc(),
                },
                ["ehr", "topic", "event_id"],
            )

    def session_resource(self, ehr: str, session_id: str) -> SessionResource | None:
        with self.engine.connect() as conn:
            row = conn.execute(_SESSION, {"ehr": ehr, "session_id": session_id}).first()
        if row is None:
            return None
        return SessionResource(row.resource_type, row.resource_id, row.occurred_at, row.status)

    def put_session_resource(self, ehr: str, session_id: str, resource: SessionResource) -> None:
        with self._writing() as conn:
            _put_session(conn, SessionWrite(ehr, session_id, resource))


def _put_session(conn: Connection, write: SessionWrite) -> None:
    _upsert(
        conn,
        sessions,
        {
            "ehr": write.ehr,
            "session_id": write.session_id,
            "resource_type": write.resource.resource_type,
            "resource_id": write.resource.resource_id,
            "occurred_at": write.resource.occurred_at,
            "status": write.resource.status,
        },
        ["ehr", "session_id"],
    )

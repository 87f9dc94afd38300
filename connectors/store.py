"""The connectors' state store: pull cursors and the local replica of every pulled resource.

One SQLAlchemy 2 Core engine, SQLite by default (WAL, busy timeout) and PostgreSQL
(``postgresql+psycopg://``) with the same code: portable column types, upserts through each dialect's
``INSERT … ON CONFLICT``. The sync service adds its own tables to the same database through ``engine``.

- ``connector_cursors``: one ``_lastUpdated`` / ``_since`` cursor per (EHR, resource type).
- ``connector_panel``: the panel patients already pulled in full (a newcomer's history is fetched whole).
- ``connector_replica``: the LATEST version of each (EHR, type, id), indexed by patient, so the mappers
  can read a patient's whole history while an incremental pull brings only what changed. Resources
  marked ``entered-in-error`` and deletions stay as rows (``status`` / ``deleted``), never dropped.

"Latest" is decided in the database, inside the upsert (``ON CONFLICT … DO UPDATE … WHERE``), so two
pulls racing cannot put an older version back: each row keeps a ``rank`` string that sorts like
(``meta.lastUpdated`` as a UTC instant, numeric ``meta.versionId``). An incoming row replaces the stored
one when its rank is at least as high; a row without ``meta.lastUpdated`` has no rank and always
replaces (the newest pull is the best guess we have).

Cursors and replica rows change only together, in ONE transaction (``commit_increments``): this is what
makes a killed pull safe to re-run (see ``connectors.pull``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import structlog
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    Index,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import ColumnElement

from connectors.private import make_private_dir, private_file

__all__ = [
    "DEFAULT_STORE_URL",
    "Deletion",
    "Increment",
    "ReplicaRow",
    "StateStore",
    "create_tables",
    "cursor_upsert",
    "parse_instant",
    "patient_of",
    "rank_of",
    "replica_upsert",
    "version_token",
]

log = structlog.get_logger()

DEFAULT_STORE_URL = "sqlite:///.run/iop-bridge.db"
_BATCH = 400  # rows per statement: well under SQLite's bound-parameter limit
_BUSY_TIMEOUT_MS = 30_000  # a second writer (the service, a manual pull) waits instead of failing

metadata = MetaData()
# Values that come from the EHR (ids, versionIds, statuses, cursors) have no length limit here:
# PostgreSQL enforces VARCHAR(n) where SQLite does not, and real servers exceed FHIR's limits (Epic ids
# are longer than 64 characters, some versionIds are long opaque strings).
_TEXT = String()

cursor_table = Table(
    "connector_cursors",
    metadata,
    Column("ehr", String(200), primary_key=True),
    Column("resource_type", String(64), primary_key=True),
    Column("value", _TEXT, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

replica_table = Table(
    "connector_replica",
    metadata,
    Column("ehr", String(200), primary_key=True),
    Column("resource_type", String(64), primary_key=True),
    Column("id", _TEXT, primary_key=True),
    Column("version_id", _TEXT, nullable=True),
    Column("last_updated", _TEXT, nullable=True),
    Column("rank", String(64), nullable=False),
    Column("token", _TEXT, nullable=False),  # version_token(): what overlap de-duplication compares
    Column("patient_id", _TEXT, nullable=True),
    Column("status", _TEXT, nullable=True),
    Column("deleted", Boolean, nullable=False),
    Column("resource", Text, nullable=True),
    Column("pulled_at", DateTime(timezone=True), nullable=False),
    Index("ix_connector_replica_patient", "ehr", "patient_id"),
)

panel_table = Table(
    "connector_panel",
    metadata,
    Column("ehr", String(200), primary_key=True),
    Column("patient_id", _TEXT, primary_key=True),
    Column("added_at", DateTime(timezone=True), nullable=False),
)

# Where a resource names its patient, in the order we look (Coverage.beneficiary, Task.for, ...).
_PATIENT_FIELDS = ("subject", "patient", "beneficiary", "for")
_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-._]+)(?:/_history/[^/]*)?$")
_RANK_WIDTH = 20
_CONTENT_COLUMNS = (
    "version_id",
    "token",
    "last_updated",
    "rank",
    "patient_id",
    "status",
    "deleted",
    "resource",
    "pulled_at",
)
# A deletion keeps the last content and patient link (the mappers still see what was deleted).
_DELETION_COLUMNS = ("last_updated", "rank", "token", "deleted", "pulled_at")


@dataclass(frozen=True)
class Deletion:
    """A resource the server reports as deleted (e.g. a Bulk Data ``deleted`` entry)."""

    resource_type: str
    id: str
    when: str | None = None


@dataclass(frozen=True)
class Increment:
    """What one pull brought for one resource type, and the cursor to store with it."""

    resource_type: str
    resources: Iterable[Mapping[str, Any]]
    new_cursor: str | None
    deletions: Sequence[Deletion] = ()


@dataclass(frozen=True)
class ReplicaRow:
    resource_type: str
    id: str
    version_id: str | None
    last_updated: str | None
    patient_id: str | None
    status: str | None
    deleted: bool
    resource: dict[str, Any] | None


def parse_instant(value: object) -> datetime | None:
    """An aware FHIR instant as UTC, or None for anything else (a date, a naive time, garbage)."""
    if not isinstance(value, str) or "T" not in value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.astimezone(UTC)


def rank_of(version_id: object, last_updated: object) -> str:
    """A string that sorts like (lastUpdated instant, numeric versionId); "" when lastUpdated is unknown."""
    instant = parse_instant(last_updated)
    if instant is None:
        return ""
    version = str(version_id).strip() if version_id is not None else ""
    tail = version.zfill(_RANK_WIDTH) if version.isdigit() and len(version) <= _RANK_WIDTH else ""
    return instant.strftime("%Y-%m-%dT%H:%M:%S.%fZ") + "|" + tail


def patient_of(resource: Mapping[str, Any]) -> str | None:
    """The id of the patient a resource belongs to: Patient.id, else its subject/patient/beneficiary/for
    reference, else an Appointment participant that is a Patient."""
    if resource.get("resourceType") == "Patient":
        value = resource.get("id")
        return value if isinstance(value, str) and value else None
    for name in _PATIENT_FIELDS:
        found = _patient_ref(resource.get(name))
        if found:
            return found
    for participant in resource.get("participant") or []:
        if isinstance(participant, dict):
            found = _patient_ref(participant.get("actor"))
            if found:
                return found
    return None


def _patient_ref(value: object) -> str | None:
    if not isinstance(value, dict):
        return None
    reference = value.get("reference")
    if isinstance(reference, str):
        match = _PATIENT_REF.search(reference.strip())
        if match:
            return match.group(1)
    return None


def _meta(resource: Mapping[str, Any]) -> tuple[str | None, str | None]:
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        return None, None
    version = meta.get("versionId")
    updated = meta.get("lastUpdated")
    return (
        str(version) if version is not None else None,
        updated if isinstance(updated, str) else None,
    )


def version_token(resource: Mapping[str, Any]) -> str:
    """What identifies this version of a resource: ``meta.versionId``, else ``meta.lastUpdated``, else
    a hash of its content (Epic often sends neither, and a changed resource must not look already seen).
    """
    version, updated = _meta(resource)
    if version is not None:
        return "v:" + version
    if updated is not None:
        return "t:" + updated
    return "h:" + hashlib.sha256(orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)).hexdigest()


class StateStore:
    """Cursors and the replica on one engine (a context manager)."""

    def __init__(self, url: str = DEFAULT_STORE_URL) -> None:
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(
                f"unsupported state store {self.dialect!r}: use sqlite:/// or postgresql+psycopg://"
            )
        if self.dialect == "sqlite" and parsed.database and parsed.database != ":memory:":
            database = Path(parsed.database).expanduser()
            make_private_dir(database.parent)  # the replica holds PHI: folder 0700, file 0600
            private_file(database)  # SQLite gives its -wal, -shm and journal files the same mode
        # hide_parameters: a failing statement's message would otherwise carry the resource (PHI) into
        # the CLI's error line and the logs. pre_ping: a PostgreSQL restart costs one reconnect, not a
        # failed cycle.
        try:
            self.engine: Engine = create_engine(
                url, hide_parameters=True, pool_pre_ping=self.dialect == "postgresql"
            )
        except ModuleNotFoundError as exc:
            raise ValueError(
                f"the {self.dialect} state store needs its driver ({exc.name}): "
                "pip install 'iop-bridge[postgres]'"
            ) from exc
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        create_tables(self.engine, metadata)

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateStore(dialect={self.dialect!r})"

    def close(self) -> None:
        self.engine.dispose()

    # -- cursors ---------------------------------------------------------------------------------

    def get_cursor(self, ehr: str, resource_type: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(cursor_table.c.value).where(
                    cursor_table.c.ehr == ehr, cursor_table.c.resource_type == resource_type
                )
            ).scalar_one_or_none()

    def cursors(self, ehr: str) -> dict[str, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(cursor_table.c.resource_type, cursor_table.c.value).where(cursor_table.c.ehr == ehr)
            ).all()
        return {row.resource_type: row.value for row in rows}

    # -- writing ---------------------------------------------------------------------------------

    def commit_increment(
        self,
        ehr: str,
        resource_type: str,
        resources: Iterable[Mapping[str, Any]],
        new_cursor: str | None,
        deletions: Sequence[Deletion] = (),
    ) -> int:
        """Upsert one type's resources into the replica and advance its cursor, in ONE transaction."""
        return self.commit_increments(ehr, [Increment(resource_type, resources, new_cursor, deletions)])

    def commit_increments(
        self,
        ehr: str,
        increments: Sequence[Increment],
        *,
        panel_added: Sequence[str] = (),
        panel_removed: Sequence[str] = (),
    ) -> int:
        """Upsert every increment's resources and advance every cursor, all in ONE transaction.

        ``resources`` may be a lazy iterable (e.g. read back from the output file): rows are written in
        batches, so memory stays bounded. ``panel_added`` records panel patients whose whole history this
        pull fetched (see ``panel_known``); ``panel_removed`` ones must be fetched whole again.
        Returns how many resource rows were offered.
        """
        now = datetime.now(UTC)
        offered = 0
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                # Two instances committing the same EHR's rows in different orders would deadlock
                # (PostgreSQL then aborts one pull); one writer per EHR at a time, released at commit.
                # SQLite needs nothing: it has one writer anyway.
                _advisory_lock(conn, "replica:" + ehr)
            for increment in increments:
                for batch in _batches(increment.resources, _BATCH):
                    rows = [_row(ehr, increment.resource_type, r, now) for r in batch]
                    self._upsert_replica(conn, rows, _CONTENT_COLUMNS)
                    offered += len(rows)
                if increment.deletions:
                    rows = [_deleted_row(ehr, d, now) for d in increment.deletions]
                    for batch_rows in _batches(rows, _BATCH):
                        self._upsert_replica(conn, batch_rows, _DELETION_COLUMNS)
                if increment.new_cursor is not None:
                    self._set_cursor(conn, ehr, increment.resource_type, increment.new_cursor, now)
            for batch in _batches(dict.fromkeys(panel_added), _BATCH):
                stmt = _insert(self.dialect, panel_table).on_conflict_do_nothing()
                conn.execute(stmt, [{"ehr": ehr, "patient_id": p, "added_at": now} for p in batch])
            for batch in _batches(dict.fromkeys(panel_removed), _BATCH):
                conn.execute(
                    delete(panel_table).where(panel_table.c.ehr == ehr, panel_table.c.patient_id.in_(batch))
                )
        return offered

    def _upsert_replica(self, conn: Connection, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
        if not rows:
            return
        # One row per key per statement: PostgreSQL refuses to touch the same row twice in one INSERT.
        unique: dict[tuple[str, str, str], dict[str, Any]] = {}
        for row in rows:
            key = (row["ehr"], row["resource_type"], row["id"])
            held = unique.get(key)
            if held is None or _wins(row["rank"], held["rank"]):
                unique[key] = row
        conn.execute(replica_upsert(self.dialect, columns), list(unique.values()))

    def _set_cursor(self, conn: Connection, ehr: str, resource_type: str, value: str, now: datetime) -> None:
        row = {"ehr": ehr, "resource_type": resource_type, "value": value, "updated_at": now}
        conn.execute(cursor_upsert(self.dialect), row)

    # -- reading ---------------------------------------------------------------------------------

    def seen_versions(self, ehr: str, resource_type: str, ids: Iterable[str]) -> dict[str, str]:
        """For each id already in the replica: the ``version_token`` of the version it holds."""
        found: dict[str, str] = {}
        with self.engine.connect() as conn:
            for batch in _batches(dict.fromkeys(ids), _BATCH):
                rows = conn.execute(
                    select(replica_table.c.id, replica_table.c.token).where(
                        replica_table.c.ehr == ehr,
                        replica_table.c.resource_type == resource_type,
                        replica_table.c.id.in_(batch),
                    )
                ).all()
                for row in rows:
                    found[row.id] = row.token
        return found

    def panel_known(self, ehr: str, patient_ids: Iterable[str]) -> set[str]:
        """The panel patients an earlier pull already fetched in full (a cursor applies to them only:
        a patient who joins the panel later needs their history from the start)."""
        found: set[str] = set()
        with self.engine.connect() as conn:
            for batch in _batches(dict.fromkeys(patient_ids), _BATCH):
                found.update(
                    conn.execute(
                        select(panel_table.c.patient_id).where(
                            panel_table.c.ehr == ehr, panel_table.c.patient_id.in_(batch)
                        )
                    ).scalars()
                )
        return found

    def patient_resources(
        self, ehr: str, patient_id: str, *, include_deleted: bool = False
    ) -> list[dict[str, Any]]:
        """Every stored resource of one patient (entered-in-error included: the status says so)."""
        query = select(replica_table.c.resource).where(
            replica_table.c.ehr == ehr,
            replica_table.c.patient_id == patient_id,
            replica_table.c.resource.is_not(None),
        )
        if not include_deleted:
            query = query.where(replica_table.c.deleted.is_(False))
        with self.engine.connect() as conn:
            rows = (
                conn.execute(query.order_by(replica_table.c.resource_type, replica_table.c.id))
                .scalars()
                .all()
            )
        return [orjson.loads(text) for text in rows]

    def resources_of_type(self, ehr: str, resource_types: Iterable[str]) -> list[dict[str, Any]]:
        """Every live stored resource of these types (Locations, Organizations: context of no patient)."""
        query = select(replica_table.c.resource).where(
            replica_table.c.ehr == ehr,
            replica_table.c.resource_type.in_(list(resource_types)),
            replica_table.c.deleted.is_(False),
            replica_table.c.resource.is_not(None),
        )
        with self.engine.connect() as conn:
            rows = (
                conn.execute(query.order_by(replica_table.c.resource_type, replica_table.c.id))
                .scalars()
                .all()
            )
        return [orjson.loads(text) for text in rows]

    def patients_touched(self, ehr: str, since: datetime) -> list[str]:
        """Patients with a replica row written (pulled) at or after ``since`` (aware datetime)."""
        if since.tzinfo is None:
            raise ValueError("patients_touched() needs a timezone-aware datetime")
        query = (
            select(replica_table.c.patient_id)
            .where(
                replica_table.c.ehr == ehr,
                replica_table.c.pulled_at >= since,
                replica_table.c.patient_id.is_not(None),
            )
            .distinct()
        )
        with self.engine.connect() as conn:
            return sorted(str(p) for p in conn.execute(query).scalars().all())

    def replica_row(self, ehr: str, resource_type: str, resource_id: str) -> ReplicaRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(replica_table).where(
                    replica_table.c.ehr == ehr,
                    replica_table.c.resource_type == resource_type,
                    replica_table.c.id == resource_id,
                )
            ).one_or_none()
        if row is None:
            return None
        return ReplicaRow(
            resource_type=row.resource_type,
            id=row.id,
            version_id=row.version_id,
            last_updated=row.last_updated,
            patient_id=row.patient_id,
            status=row.status,
            deleted=bool(row.deleted),
            resource=orjson.loads(row.resource) if row.resource is not None else None,
        )

    def replica_count(self, ehr: str, resource_type: str | None = None) -> int:
        query = select(replica_table.c.id).where(replica_table.c.ehr == ehr)
        if resource_type is not None:
            query = query.where(replica_table.c.resource_type == resource_type)
        with self.engine.connect() as conn:
            return len(conn.execute(query).all())


def create_tables(engine: Engine, tables: MetaData) -> None:
    """Create whichever of ``tables`` are missing. On PostgreSQL this holds an advisory lock for the
    transaction: instances starting together would otherwise both see a table missing and the second
    CREATE would fail (DDL is transactional there, so the second waits and then finds the tables)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            _advisory_lock(conn, "schema")
        tables.create_all(conn)


def _advisory_lock(conn: Connection, name: str) -> None:
    """A PostgreSQL transaction-level advisory lock named ``name`` (a 64-bit key from its hash)."""
    key = int.from_bytes(hashlib.sha256(("iop-bridge:" + name).encode()).digest()[:8], "big", signed=True)
    conn.execute(select(func.pg_advisory_xact_lock(literal(key, BigInteger))))


def replica_upsert(dialect: str, columns: Sequence[str] = _CONTENT_COLUMNS) -> Insert:
    """``INSERT … ON CONFLICT (ehr, resource_type, id) DO UPDATE SET columns … WHERE newer`` for
    ``dialect`` ("sqlite" or "postgresql"): the same statement shape on both."""
    stmt = _insert(dialect, replica_table)
    return stmt.on_conflict_do_update(
        index_elements=["ehr", "resource_type", "id"],
        set_={c: stmt.excluded[c] for c in columns},
        where=_newer(stmt.excluded.rank),
    )


def cursor_upsert(dialect: str) -> Insert:
    """Insert or replace one cursor."""
    stmt = _insert(dialect, cursor_table)
    return stmt.on_conflict_do_update(
        index_elements=["ehr", "resource_type"],
        set_={"value": stmt.excluded.value, "updated_at": stmt.excluded.updated_at},
    )


def _insert(dialect: str, table: Table) -> sqlite.Insert | postgresql.Insert:
    if dialect == "sqlite":
        return sqlite.insert(table)
    if dialect == "postgresql":
        return postgresql.insert(table)
    raise ValueError(f"unsupported state store {dialect!r}")


def _newer(incoming: ColumnElement[Any]) -> ColumnElement[bool]:
    """The upsert's guard: replace only with a version at least as new (unknown order replaces)."""
    return or_(incoming == "", replica_table.c.rank == "", and_(incoming >= replica_table.c.rank))


def _wins(incoming: str, held: str) -> bool:
    return incoming == "" or held == "" or incoming >= held


def _row(ehr: str, resource_type: str, resource: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    resource_id = resource.get("id")
    if not isinstance(resource_id, str) or not resource_id:
        raise ValueError(f"a {resource_type} without an id cannot be kept in the replica")
    version, updated = _meta(resource)
    status = resource.get("status")
    return {
        "ehr": ehr,
        "resource_type": resource_type,
        "id": resource_id,
        "version_id": version,
        "last_updated": updated,
        "rank": rank_of(version, updated),
        "token": version_token(resource),
        "patient_id": patient_of(resource),
        "status": status.strip() if isinstance(status, str) else None,
        "deleted": False,
        "resource": orjson.dumps(resource).decode(),
        "pulled_at": now,
    }


def _deleted_row(ehr: str, deletion: Deletion, now: datetime) -> dict[str, Any]:
    # The patient link and the last content are not known from a deletion notice: the row keeps the
    # deletion itself (id, when) so the mappers learn the resource is gone.
    return {
        "ehr": ehr,
        "resource_type": deletion.resource_type,
        "id": deletion.id,
        "version_id": None,
        "last_updated": deletion.when,
        "rank": rank_of(None, deletion.when),
        "token": "deleted:" + (deletion.when or ""),
        "patient_id": None,
        "status": "deleted",
        "deleted": True,
        "resource": None,
        "pulled_at": now,
    }


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()

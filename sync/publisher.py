"""From mapped records to Kafka: choose the topic, stage changes in the outbox, drain it in order.

A record flagged ``part2`` (42 CFR Part 2: substance use treatment) goes only to the Part 2 topic of its
kind, never to the plain one. Messages are keyed ``{ehr}|Patient/{id}`` so each patient's records are
consumed in the order they were produced.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import structlog

from schemas.topics import Topics, message_key
from sync.metrics import Metrics
from sync.state import Staged, SyncState

log = structlog.get_logger()


class EventProducer(Protocol):
    """What the outbox needs of the Kafka producer (``sync.kafka``)."""

    def publish(
        self,
        topic: str,
        key: str,
        value: Mapping[str, Any],
        *,
        schema: str,
        version: int,
        event_id: str,
    ) -> None: ...

    def flush(self) -> None: ...


def patient_id_of(record: Mapping[str, Any]) -> str:
    """The FHIR id of a record's patient (``patient.reference`` is ``Patient/<id>``)."""
    reference = str((record.get("patient") or {}).get("reference") or "")
    if not reference.startswith("Patient/"):
        raise ValueError(
            f"record {record.get('episode_id') or record.get('referral_id')} has no Patient reference"
        )
    return reference[len("Patient/") :]


def stage_records(
    ehr: str,
    topics: Topics,
    *,
    episodes: Iterable[Mapping[str, Any]] = (),
    referrals: Iterable[Mapping[str, Any]] = (),
) -> list[Staged]:
    """The outbox entries for a patient's mapped episodes and referrals (unchanged ones are dropped later)."""
    staged: list[Staged] = []
    for kind, records, id_field, plain, part2, schema in (
        ("episode", episodes, "episode_id", topics.episodes, topics.episodes_part2, "episode"),
        ("referral", referrals, "referral_id", topics.referrals, topics.referrals_part2, "referral"),
    ):
        for record in records:
            patient_id = patient_id_of(record)
            staged.append(
                Staged(
                    kind=kind,
                    record_id=str(record[id_field]),
                    patient_id=patient_id,
                    record=record,
                    topic=part2 if record.get("part2") else plain,
                    message_key=message_key(ehr, patient_id),
                    schema_name=schema,
                    schema_version=1,
                )
            )
    return staged


def drain_outbox(state: SyncState, producer: EventProducer, *, metrics: Metrics | None = None) -> int:
    """Produce every staged message, oldest first, and forget each batch once the broker acknowledged it.

    A crash in the middle re-sends the unacknowledged batch on the next drain: consumers de-duplicate by
    the ``event_id`` header (at-least-once, never at-most-once).
    """
    sent = 0
    while True:
        batch = state.outbox_batch()
        if not batch:
            break
        for message in batch:
            producer.publish(
                message.topic,
                message.message_key,
                message.value,
                schema=message.schema_name,
                version=message.schema_version,
                event_id=message.event_id,
            )
            if metrics is not None:
                metrics.published.labels(topic=message.topic).inc()
        producer.flush()
        state.outbox_done(m.seq for m in batch)
        sent += len(batch)
    if metrics is not None:
        metrics.outbox.set(state.outbox_size())
    if sent:
        log.info("outbox_drained", messages=sent)
    return sent

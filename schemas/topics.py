"""The Kafka side of the contracts: topic names, the message key, the header names.

Programs and billing systems consume and produce these, so they change only with a new version suffix
(``.v2`` topics, ``*.v2.json`` schemas), never in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

#: Episode records (``episode.v1``) we publish; billing and IOP programs consume them.
EPISODES: Final = "iop.episodes.v1"
#: Referral records (``referral.v1``) we publish.
REFERRALS: Final = "iop.referrals.v1"
#: The same for 42 CFR Part 2 episodes: separate topics so that only consumers allowed to read SUD
#: treatment records can (broker ACLs in production); a Part 2 record never goes to the plain ones.
EPISODES_PART2: Final = "iop.episodes.part2.v1"
REFERRALS_PART2: Final = "iop.referrals.part2.v1"
#: Attendance events (``attendance.v1``) that IOP programs produce and we write back to the EHR.
ATTENDANCE: Final = "iop.attendance.v1"
#: Discharge events (``discharge.v1``) that IOP programs produce and we write back to the EHR.
DISCHARGES: Final = "iop.discharges.v1"
#: Records we could not process for a reason no retry will fix, with that reason (``deadletter.v1``),
#: so nothing is lost and ``iop-bridge dlq replay`` can re-publish them once the cause is fixed.
DEADLETTER: Final = "iop.deadletter.v1"
#: Attendance, discharges and dead letters of 42 CFR Part 2 episodes, apart from the general ones for the
#: same reason as the episodes: a program sends an episode's events to the Part 2 topics when the episode
#: record it received says ``part2: true`` (it came on ``iop.episodes.part2.v1``); we dead-letter an event
#: to ``iop.deadletter.part2.v1`` when it came on a Part 2 topic or belongs to a Part 2 episode
#: (``sync.part2_events``). A Part 2 episode's event on a general topic is still written (nothing is lost)
#: and counted as misrouted; a general episode's event on a Part 2 topic is written like any other.
ATTENDANCE_PART2: Final = "iop.attendance.part2.v1"
DISCHARGES_PART2: Final = "iop.discharges.part2.v1"
DEADLETTER_PART2: Final = "iop.deadletter.part2.v1"

#: Every topic name and the contract (schema name, version) of its values. Consumers validate each
#: record against its topic's contract, not against what the record's headers claim.
CONTRACT_OF_TOPIC: Final[dict[str, tuple[str, int]]] = {
    EPISODES: ("episode", 1),
    REFERRALS: ("referral", 1),
    EPISODES_PART2: ("episode", 1),
    REFERRALS_PART2: ("referral", 1),
    ATTENDANCE: ("attendance", 1),
    DISCHARGES: ("discharge", 1),
    DEADLETTER: ("deadletter", 1),
    ATTENDANCE_PART2: ("attendance", 1),
    DISCHARGES_PART2: ("discharge", 1),
    DEADLETTER_PART2: ("deadletter", 1),
}
TOPICS: Final = tuple(CONTRACT_OF_TOPIC)
#: The topics that carry only 42 CFR Part 2 records (guard them with broker ACLs).
PART2_TOPICS: Final = frozenset(
    {EPISODES_PART2, REFERRALS_PART2, ATTENDANCE_PART2, DISCHARGES_PART2, DEADLETTER_PART2}
)

#: Header names. The value is the JSON contract itself; headers let a consumer route, de-duplicate and
#: trace a record without parsing it.
#: ``schema``: the contract name (``attendance``), so a record is self-describing wherever it ends up
#: (the dead-letter topic holds records of every topic).
HEADER_SCHEMA: Final = "schema"
#: ``schema_version``: the contract version as decimal text (``1``).
HEADER_SCHEMA_VERSION: Final = "schema_version"
#: ``event_id``: the record's idempotency key (as in its value), for de-duplication without parsing.
HEADER_EVENT_ID: Final = "event_id"
#: ``traceparent``: W3C Trace Context, so a write-back can be traced to the pull that caused it.
HEADER_TRACEPARENT: Final = "traceparent"
#: Dead-letter records also carry where the original came from and why it failed, so the dead-letter
#: topic can be filtered and replayed without parsing each value (the ``deadletter.v1`` envelope holds
#: the same, plus the original key, value and headers byte for byte).
HEADER_DLQ_REASON: Final = "dlq_reason"
HEADER_DLQ_TOPIC: Final = "dlq_topic"
HEADER_DLQ_PARTITION: Final = "dlq_partition"
HEADER_DLQ_OFFSET: Final = "dlq_offset"

# Kafka's own rule for topic names: these characters, at most 249 of them.
_TOPIC_CHARS = re.compile(r"^[A-Za-z0-9._-]*$")
_MAX_TOPIC_LENGTH = 249
# The parts of the key: an EHR connection name (no '|') and a FHIR resource id.
_EHR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Wider than FHIR's id rule ([A-Za-z0-9.-]{1,64}) on purpose, like the contracts' reference patterns: the
# vendor profiles keep resources whose ids break it (Oracle's underscores, Epic's ids over 64 characters),
# and their patients must still be keyed and published. Never '|' or '/': the key stays unambiguous.
_FHIR_ID = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
_KEY = re.compile(r"^(?P<ehr>[A-Za-z0-9][A-Za-z0-9_.-]*)\|Patient/(?P<id>[A-Za-z0-9._-]{1,255})$")


@dataclass(frozen=True)
class Topics:
    """The topic names in use, with the configured prefix (``[kafka] topic_prefix``).

    A prefix lets several environments or tenants share one cluster (``staging.iop.episodes.v1``) and
    lets tests use the real names without meeting each other.
    """

    prefix: str = ""

    def __post_init__(self) -> None:
        longest = max(len(name) for name in TOPICS)
        if not _TOPIC_CHARS.match(self.prefix) or len(self.prefix) + longest > _MAX_TOPIC_LENGTH:
            raise ValueError(
                f"topic prefix {self.prefix!r}: only letters, digits, '.', '_' and '-' are allowed, "
                f"and at most {_MAX_TOPIC_LENGTH - longest} characters"
            )

    def name(self, topic: str) -> str:
        """The full name of one of the ``TOPICS``."""
        if topic not in CONTRACT_OF_TOPIC:
            raise ValueError(f"unknown topic {topic!r}; known: {', '.join(TOPICS)}")
        return self.prefix + topic

    def unprefixed(self, full_name: str) -> str:
        """The topic (one of ``TOPICS``) a full name stands for; ``ValueError`` if it is none of ours."""
        if full_name.startswith(self.prefix) and full_name[len(self.prefix) :] in CONTRACT_OF_TOPIC:
            return full_name[len(self.prefix) :]
        raise ValueError(f"topic {full_name!r} is not one of ours (prefix {self.prefix!r})")

    def contract(self, full_name: str) -> tuple[str, int]:
        """The contract (schema name, version) of the values on a topic, by its full name."""
        return CONTRACT_OF_TOPIC[self.unprefixed(full_name)]

    @property
    def episodes(self) -> str:
        return self.name(EPISODES)

    @property
    def referrals(self) -> str:
        return self.name(REFERRALS)

    @property
    def episodes_part2(self) -> str:
        return self.name(EPISODES_PART2)

    @property
    def referrals_part2(self) -> str:
        return self.name(REFERRALS_PART2)

    @property
    def attendance(self) -> str:
        return self.name(ATTENDANCE)

    @property
    def discharges(self) -> str:
        return self.name(DISCHARGES)

    @property
    def deadletter(self) -> str:
        return self.name(DEADLETTER)

    @property
    def attendance_part2(self) -> str:
        return self.name(ATTENDANCE_PART2)

    @property
    def discharges_part2(self) -> str:
        return self.name(DISCHARGES_PART2)

    @property
    def deadletter_part2(self) -> str:
        return self.name(DEADLETTER_PART2)

    def writeback_topics(self) -> tuple[str, ...]:
        """The topics we consume and write back from (general, then Part 2): also the only topics
        ``dlq replay`` re-publishes to."""
        return (self.attendance, self.discharges, self.attendance_part2, self.discharges_part2)

    def is_part2(self, full_name: str) -> bool:
        """Whether a topic (full name) carries only 42 CFR Part 2 records; False for names not ours."""
        try:
            return self.unprefixed(full_name) in PART2_TOPICS
        except ValueError:
            return False

    def all(self) -> tuple[str, ...]:
        return tuple(self.prefix + topic for topic in TOPICS)


def message_key(ehr: str, patient_id: str) -> str:
    """The message key ``{ehr}|Patient/{id}``.

    Kafka orders records per key, so every record about one patient is consumed in the order it was
    produced; the EHR name keeps the same patient id at two hospitals apart. ``patient_id`` is the
    FHIR id (``123``) or a reference (``Patient/123``).
    """
    if patient_id.startswith("Patient/"):
        patient_id = patient_id[len("Patient/") :]
    if not _EHR_NAME.match(ehr):
        raise ValueError(f"message key: EHR name {ehr!r} is not a connection name")
    if not _FHIR_ID.match(patient_id):
        raise ValueError(f"message key: {patient_id!r} is not a FHIR Patient id")
    return f"{ehr}|Patient/{patient_id}"


def parse_message_key(key: str) -> tuple[str, str]:
    """``(ehr, patient_id)`` of a message key; ``ValueError`` naming the key if it is malformed."""
    match = _KEY.match(key)
    if match is None:
        raise ValueError(f"message key {key!r} is not '{{ehr}}|Patient/{{id}}'")
    return match["ehr"], match["id"]

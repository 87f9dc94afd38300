"""The pure parts of sync.kafka: client settings, traceparent, retry policy, contract checks on the
Kafka path (no broker needed; the broker tests are in tests/integration/test_kafka_events.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import structlog
from kafka import errors as kafka_errors

from schemas import ContractError
from sync.config import KafkaConfig, load_settings
from sync.errors import KafkaError
from sync.kafka import (
    RETRY_ATTEMPTS,
    _NotValid,
    check_contract,
    client_kwargs,
    connect,
    consumer_kwargs,
    contract_problems,
    decode,
    new_traceparent,
    producer_kwargs,
    with_retries,
)

PLANTED_NAME = "Jane Q Planted"


def test_plaintext_settings_carry_no_security_extras() -> None:
    kwargs = client_kwargs(KafkaConfig(bootstrap_servers="a:9092, b:9092"))
    assert kwargs == {
        "bootstrap_servers": ["a:9092", "b:9092"],
        "client_id": "iop-bridge",
        "security_protocol": "PLAINTEXT",
    }


def test_sasl_and_tls_pass_through_from_the_config(tmp_path: Any) -> None:
    config_file = tmp_path / "c.toml"
    config_file.write_text(
        '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "SCRAM-SHA-512"\n'
        'sasl_plain_username = "bridge"\nssl_cafile = "/etc/ca.pem"\n',
        encoding="utf-8",
    )
    settings = load_settings(config_file, environ={"IOP_BRIDGE_KAFKA__SASL_PLAIN_PASSWORD": "s3cret-pw"})

    kwargs = client_kwargs(settings.kafka)

    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "bridge"
    assert kwargs["sasl_plain_password"] == "s3cret-pw"
    assert kwargs["ssl_cafile"] == "/etc/ca.pem"
    assert "s3cret-pw" not in repr(settings.kafka)


def test_producer_is_idempotent_and_waits_for_all_replicas() -> None:
    kwargs = producer_kwargs(KafkaConfig())
    assert (kwargs["enable_idempotence"], kwargs["acks"]) == (True, "all")


def test_consumer_never_commits_by_itself() -> None:
    kwargs = consumer_kwargs(KafkaConfig(group_id="wb"))
    assert (kwargs["group_id"], kwargs["enable_auto_commit"], kwargs["auto_offset_reset"]) == (
        "wb",
        False,
        "earliest",
    )
    assert consumer_kwargs(KafkaConfig(), group_id="other")["group_id"] == "other"


def test_traceparent_is_w3c_and_fresh() -> None:
    first, second = new_traceparent(), new_traceparent()
    version, trace_id, span_id, flags = first.split("-")
    assert (version, len(trace_id), len(span_id), flags) == ("00", 32, 16, "01")
    int(trace_id, 16), int(span_id, 16)
    assert first != second


def test_retriable_errors_are_retried_then_become_kafka_error() -> None:
    sleeps: list[float] = []
    calls: list[int] = []

    def always_timing_out() -> None:
        calls.append(1)
        raise kafka_errors.KafkaTimeoutError("no metadata")

    with pytest.raises(KafkaError, match="producing to t failed"):
        with_retries(always_timing_out, what="producing to t", sleep=sleeps.append)
    assert len(calls) == RETRY_ATTEMPTS
    assert len(sleeps) == RETRY_ATTEMPTS - 1


def test_a_retriable_error_that_clears_is_not_an_error() -> None:
    outcomes: list[Exception | str] = [kafka_errors.NotLeaderForPartitionError(), "ok"]

    def flaky() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert with_retries(flaky, what="x", sleep=lambda _: None) == "ok"


def test_errors_kafka_python_does_not_mark_retriable_fail_at_once() -> None:
    calls: list[int] = []

    def refused() -> None:
        calls.append(1)
        raise kafka_errors.TopicAuthorizationFailedError()

    with pytest.raises(KafkaError):
        with_retries(refused, what="x", sleep=lambda _: pytest.fail("must not sleep"))
    assert calls == [1]


def test_contract_problems_name_fields_never_values() -> None:
    event = {
        "event_id": "evt 1",
        "occurred_at": PLANTED_NAME,
        "ehr": "h",
        "episode_id": "6f1c8f4e-2b1d-5c3a-9e7f-0a1b2c3d4e5f",
        "patient": {"reference": f"Patient/{PLANTED_NAME}"},
        "session": {"status": PLANTED_NAME, "nickname": PLANTED_NAME},
    }
    problems = contract_problems("attendance", 1, event)
    assert problems == [
        "event_id: pattern",
        "occurred_at: pattern",
        "patient/reference: pattern",
        "session/status: enum",
        "session: missing id",
        "session: unexpected nickname",
    ]
    with pytest.raises(ContractError) as caught:
        check_contract("attendance", 1, event)
    assert PLANTED_NAME not in str(caught.value)


@dataclass(frozen=True)
class Record:
    value: bytes | None
    key: bytes | None = b"h|Patient/1"
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    topic: str = "iop.discharges.v1"
    partition: int = 0
    offset: int = 7
    timestamp: int | None = None


DISCHARGE = {
    "event_id": "evt-9",
    "occurred_at": "2026-04-10T16:30:00Z",
    "ehr": "h",
    "episode_id": "6f1c8f4e-2b1d-5c3a-9e7f-0a1b2c3d4e5f",
    "patient": {"reference": "Patient/1"},
    "discharge": {"date": "2026-04-10", "reason": "completed", "summary": PLANTED_NAME},
}


def test_decode_gives_the_event_with_its_trace() -> None:
    trace = new_traceparent()
    event = decode(
        Record(orjson.dumps(DISCHARGE), headers=[("traceparent", trace.encode())]), ("discharge", 1)
    )
    assert (event.value, event.event_id, event.key, event.traceparent) == (
        DISCHARGE,
        "evt-9",
        "h|Patient/1",
        trace,
    )


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (
            Record(orjson.dumps(DISCHARGE), headers=[("schema", b"attendance")]),
            "schema_mismatch: header schema",
        ),
        (
            Record(orjson.dumps(DISCHARGE), headers=[("schema_version", b"2")]),
            "schema_mismatch: header schema_v",
        ),
        (Record(orjson.dumps(DISCHARGE), key=b"\xff"), "undecodable: the key is not UTF-8"),
        (Record(None), "undecodable: the value is empty (tombstone)"),
        (Record(b"[1, 2"), "undecodable: the value is not UTF-8 JSON"),
        (Record(b"[]"), "schema_invalid: discharge.v1: (root): type"),
        (
            Record(orjson.dumps({**DISCHARGE, "discharge": {"date": "2026-04-10"}})),
            "schema_invalid: discharge.v1",
        ),
    ],
)
def test_decode_refuses_with_a_reason_free_of_phi(record: Record, reason: str) -> None:
    with pytest.raises(_NotValid) as caught:
        decode(record, ("discharge", 1))
    assert caught.value.reason.startswith(reason)
    assert PLANTED_NAME not in caught.value.reason


def test_retry_warnings_name_the_error_class_only() -> None:
    def failing() -> None:
        raise kafka_errors.KafkaTimeoutError(PLANTED_NAME)

    with structlog.testing.capture_logs() as logs, pytest.raises(KafkaError):
        with_retries(failing, what="x", sleep=lambda _: None)
    assert [entry["error"] for entry in logs] == ["KafkaTimeoutError"] * (RETRY_ATTEMPTS - 1)
    assert PLANTED_NAME not in repr(logs)


def test_a_client_that_cannot_bootstrap_is_a_kafka_error_naming_the_servers() -> None:
    def no_bootstrap() -> None:
        raise kafka_errors.KafkaTimeoutError("Unable to bootstrap from 127.0.0.1:1")

    with pytest.raises(
        KafkaError, match=r"^Kafka: producer: cannot reach 127\.0\.0\.1:1 \(KafkaTimeoutError\)$"
    ) as caught:
        connect(no_bootstrap, what="producer", bootstrap="127.0.0.1:1")
    assert caught.value.exit_code == 5


def test_an_oversized_event_is_refused_for_the_dead_letter_topic_naming_field_and_cap() -> None:
    summary = PLANTED_NAME + " " + "x" * 200_000
    oversized = {**DISCHARGE, "discharge": {**DISCHARGE["discharge"], "summary": summary}}
    with pytest.raises(_NotValid) as caught:
        decode(Record(orjson.dumps(oversized)), ("discharge", 1))
    assert caught.value.reason == "schema_invalid: discharge.v1: discharge/summary: maxLength"
    many = {**DISCHARGE, "patient": {"identifier": [{"system": "urn:mrn", "value": "1"}] * 1000}}
    with pytest.raises(_NotValid) as caught:
        decode(Record(orjson.dumps(many)), ("discharge", 1))
    assert caught.value.reason == "schema_invalid: discharge.v1: patient/identifier: maxItems"

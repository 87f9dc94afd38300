"""``iop-bridge demo`` end to end, twice, against the session's real Kafka broker and HAPI sandbox.

The first run writes the simulated program's events back; the second re-sends the same events, which
write-back's ledger reports as duplicates: no new resource appears in the EHR.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from kafka import KafkaAdminClient

from schemas.identifiers import EVENT_ID_SYSTEM, SESSION_ID_SYSTEM
from sync.cli import main
from sync.commands.demo import dead_letter_reasons
from sync.config import KafkaConfig
from tests.integration.kafka_fixtures import TopicFactory, unique_name

pytestmark = pytest.mark.integration

_WRITEBACKS = re.compile(r"^write-backs: (\d+) written, (\d+) duplicates", re.MULTILINE)
_HIDDEN_PART2 = re.compile(
    r"42 CFR Part 2 records not shown: (\d+) episodes, \d+ referrals, (\d+) write-backs"
)
_EVENTS = re.compile(
    r"^program simulator: (\d+) events sent \((\d+) attendance, (\d+) discharge\)", re.MULTILINE
)
_EPISODE_LINE = re.compile(r"  episode ([0-9a-f-]{36})$", re.MULTILINE)


@pytest.fixture
def demo_topics(monkeypatch: pytest.MonkeyPatch, kafka_admin: KafkaAdminClient) -> Iterator[str]:
    """The demo's topics and consumer group under a prefix of this test (the demo creates them)."""
    prefix = unique_name("demo") + "."
    monkeypatch.setenv("IOP_BRIDGE_KAFKA__TOPIC_PREFIX", prefix)
    monkeypatch.setenv("IOP_BRIDGE_KAFKA__GROUP_ID", prefix + "writeback")
    yield prefix
    ours = [name for name in kafka_admin.list_topics() if name.startswith(prefix)]
    if ours:
        kafka_admin.delete_topics(ours)


def _ours(fhir: httpx.Client) -> dict[str, int]:
    """How many resources our write-back made, by type and identifier system."""
    counts = {}
    for resource_type, system in (
        ("Encounter", SESSION_ID_SYSTEM),
        ("Appointment", SESSION_ID_SYSTEM),
        ("DocumentReference", EVENT_ID_SYSTEM),
    ):
        response = fhir.get(resource_type, params={"identifier": f"{system}|", "_summary": "count"})
        response.raise_for_status()
        counts[resource_type] = int(response.json()["total"])
    return counts


def _run(
    capsys: pytest.CaptureFixture[str], kafka: str, fhir_url: str, state: Path, report: Path
) -> tuple[int, str]:
    code = main(
        [
            "--log-level",
            "WARNING",
            "demo",
            "--kafka",
            kafka,
            "--fhir-url",
            fhir_url,
            "--state-dir",
            str(state),
            "--report",
            str(report),
        ]
    )
    return code, capsys.readouterr().out


def test_demo_twice_second_run_writes_nothing_new(
    capsys: pytest.CaptureFixture[str],
    kafka_bootstrap: str,
    fhir_base_url: str,
    fhir: httpx.Client,
    demo_topics: str,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    report = tmp_path / "out" / "report.html"

    code, first = _run(capsys, kafka_bootstrap, fhir_base_url, state, report)
    assert code == 0, first
    events = _EVENTS.search(first)
    assert events, first
    sent, attendance, discharges = (int(n) for n in events.groups())
    assert attendance > 0
    assert discharges > 0
    written = _WRITEBACKS.search(first)
    assert written, first
    # The report leaves 42 CFR Part 2 records out unless --part2 and says how many (issue 10 item 9): the
    # journeys' SUD patient's write-backs are among those left out, not among those shown.
    hidden = _HIDDEN_PART2.search(first)
    assert hidden, first
    part2_writebacks = int(hidden.group(2))
    assert int(hidden.group(1)) > 0
    assert part2_writebacks > 0
    assert (int(written.group(1)) + part2_writebacks, int(written.group(2))) == (sent, 0)
    assert "dead letters: 0" in first
    assert f"HTML report: {report.resolve()}" in first
    assert (state / "iop-bridge.db").is_file()
    html = report.read_text(encoding="utf-8")
    shown = set(re.findall(r'data-episode-id="([^"]+)"', html))
    assert shown
    assert shown == set(_EPISODE_LINE.findall(first))
    resources_after_first = _ours(fhir)

    code, second = _run(capsys, kafka_bootstrap, fhir_base_url, state, report)
    assert code == 0, second
    again = _EVENTS.search(second)
    assert again, second
    assert int(again.group(1)) == sent, "the same events are sent again"
    duplicates = _WRITEBACKS.search(second)
    assert duplicates, second
    assert (int(duplicates.group(1)), int(duplicates.group(2)) + part2_writebacks) == (0, sent)
    assert "dead letters: 0" in second
    assert _ours(fhir) == resources_after_first
    assert report.read_text(encoding="utf-8").count("data-episode-id=") >= len(shown)


def test_dead_letter_reasons_are_read_back_for_the_events_asked(
    kafka_bootstrap: str,
    make_topic: TopicFactory,
    topic_prefix: str,
    produce: Callable[..., list[tuple[int, int]]],
) -> None:
    topic = make_topic(f"{topic_prefix}iop.deadletter.v1", partitions=2)
    envelope = {"event_id": "sim-att-1", "topic": "iop.attendance.v1", "reason": "unknown episode e1"}
    produce(
        topic,
        [
            (b"k", b"not json", []),
            (b"k", orjson.dumps({**envelope, "event_id": "other", "reason": "not asked for"}), []),
            (b"k", orjson.dumps(envelope), []),
        ],
    )
    config = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix)
    found = dead_letter_reasons(config, ["sim-att-1", "sim-dis-2"])
    assert found == {"sim-att-1": ("iop.attendance.v1", "unknown episode e1")}
    assert (
        dead_letter_reasons(KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix="none."), ["x"]) == {}
    )

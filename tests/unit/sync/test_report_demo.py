"""The demo's own pieces that need no services: its config file, the anchor, and the report rows it
makes from the ledger (written, duplicate, dead-lettered)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from schemas.topics import Topics
from sync.cli import build_parser
from sync.commands.demo import EHR_NAME, journeys_anchor, write_config, writeback_rows
from sync.config import load_settings
from sync.errors import ConfigError
from sync.simulator import simulate
from tests.unit.sync.demo_records import AS_OF, SINCE, episodes


def test_config_is_the_local_stack_with_a_sqlite_store_and_the_demo_patients(tmp_path: Path) -> None:
    state = tmp_path / "demo state"  # a space: paths are quoted TOML strings
    path = write_config(
        state, kafka="127.0.0.1:9092", fhir_url="http://127.0.0.1:8080/fhir", patient_ids=["b", "a"]
    )
    settings = load_settings(path, environ={})
    assert settings.store.url == f"sqlite:///{state.resolve() / 'iop-bridge.db'}"
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    (ehr,) = settings.ehr
    assert (ehr.name, ehr.vendor, ehr.base_url, ehr.bulk_poll_max_seconds) == (
        EHR_NAME,
        "hapi",
        "http://127.0.0.1:8080/fhir",
        1,
    )
    assert ehr.panel is not None
    assert ehr.panel.patients_file is not None
    assert Path(ehr.panel.patients_file).read_text(encoding="utf-8") == "a\nb\n"


def test_the_environment_still_overrides_the_demo_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, kafka="127.0.0.1:9092", fhir_url="http://h/fhir", patient_ids=[])
    settings = load_settings(path, environ={"IOP_BRIDGE_KAFKA__TOPIC_PREFIX": "mine."})
    assert settings.kafka.topic_prefix == "mine."


def test_anchor_defaults_to_a_week_ago_and_must_be_a_date() -> None:
    assert journeys_anchor(None, date(2026, 11, 29)) == date(2026, 11, 22)
    assert journeys_anchor("2026-01-02", date(2026, 11, 29)) == date(2026, 1, 2)
    with pytest.raises(ConfigError, match="--anchor"):
        journeys_anchor("yesterday", date(2026, 11, 29))


def test_demo_command_and_its_options_are_registered() -> None:
    args = build_parser().parse_args(
        ["demo", "--report", "r.html", "--anchor", "2026-01-02", "--stop-services"]
    )
    assert (args.report, args.anchor, args.stop_services, args.verbose) == (
        Path("r.html"),
        "2026-01-02",
        True,
        False,
    )
    assert args.state_dir == Path(".run/demo")
    assert build_parser().parse_args(["demo"]).report == Path("iop-bridge-report.html")


def test_rows_say_written_duplicate_or_dead_lettered_with_the_reason() -> None:
    events = simulate(episodes(), since=SINCE, as_of=AS_OF)
    first, second, third, fourth = events[:4]
    before = {first.event_id: ("created", ["Encounter/1"])}
    after = {**before, second.event_id: ("discharged", ["EpisodeOfCare/2", "DocumentReference/3"])}
    topics = Topics("p.")
    dead = {third.event_id: ("p.iop.discharges.v1", "unknown episode")}
    rows, dead_rows = writeback_rows(events[:4], before, after, dead, topics)
    assert [(r.event_id, r.outcome, r.references) for r in rows] == [
        (first.event_id, "duplicate", ("Encounter/1",)),
        (second.event_id, "discharged", ("EpisodeOfCare/2", "DocumentReference/3")),
    ]
    assert [(d.event_id, d.topic, d.reason) for d in dead_rows] == [
        (third.event_id, "p.iop.discharges.v1", "unknown episode"),
        (
            fourth.event_id,
            topics.attendance if fourth.kind == "attendance" else topics.discharges,
            "not written (nothing on p.iop.deadletter.v1 yet)",
        ),
    ]
    assert rows[1].episode_id == second.episode_id
    assert rows[1].detail.startswith(second.value["discharge"]["date"])


def test_a_part2_episodes_dead_letters_are_marked_part2() -> None:
    events = simulate(episodes(), since=SINCE, as_of=AS_OF)
    part2 = next(e for e in events if e.part2)
    general = next(e for e in events if not e.part2)
    topics = Topics("p.")
    _, dead_rows = writeback_rows([part2, general], {}, {}, {}, topics)
    assert [(d.event_id, d.part2) for d in dead_rows] == [(part2.event_id, True), (general.event_id, False)]
    assert topics.is_part2(dead_rows[0].topic)
    assert dead_rows[0].reason == "not written (nothing on p.iop.deadletter.part2.v1 yet)"

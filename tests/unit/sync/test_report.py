"""The demo report: every episode shown, transitions and minimums drawn, self-contained, deterministic."""

from __future__ import annotations

import random
import re
from collections import Counter
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any

from sync.report import DeadLetterRow, WriteBackRow, render_report, render_text
from tests.unit.sync.demo_records import AS_OF, episodes, referrals

NOW = datetime(2026, 6, 8, 9, 30, tzinfo=UTC)


class _Elements(HTMLParser):
    """Start tags with their attributes, and the text, of a document."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(document: str) -> _Elements:
    parser = _Elements()
    parser.feed(document)
    parser.close()
    return parser


def _writebacks(records: list[dict[str, Any]]) -> list[WriteBackRow]:
    ordered = sorted(records, key=lambda e: str(e["episode_id"]))
    active = next(e for e in ordered if e["status"] == "active")
    finished = next(e for e in ordered if e["status"] == "finished")
    return [
        WriteBackRow(
            "sim-att-1",
            "attendance",
            active["episode_id"],
            "2026-06-02 attended, telehealth",
            "created",
            ("Encounter/e1",),
        ),
        WriteBackRow("sim-dis-1", "discharge", finished["episode_id"], "2026-03-28 other", "duplicate"),
    ]


def _report(records: list[dict[str, Any]] | None = None) -> str:
    records = episodes() if records is None else records
    dead = [DeadLetterRow("sim-att-9", "iop.attendance.v1", "unknown episode x at EHR 'harbor-general'")]
    return render_report(records, referrals(), _writebacks(records), dead, as_of=NOW, include_part2=True)


def test_every_episode_has_its_own_element() -> None:
    records = episodes()
    ids = [
        attrs.get("data-episode-id")
        for _, attrs in _parse(_report(records)).tags
        if "data-episode-id" in attrs
    ]
    assert Counter(ids) == Counter(e["episode_id"] for e in records)


def test_cancelled_episodes_are_shown_too() -> None:
    records = episodes()
    records[-1] = {**records[-1], "status": "cancelled", "end": None, "exit": None, "superseded_by": None}
    document = _report(records)
    ids = {attrs.get("data-episode-id") for _, attrs in _parse(document).tags}
    assert records[-1]["episode_id"] in ids
    assert "no longer an episode" in document


def test_each_patient_gets_a_timeline_with_a_bar_per_episode() -> None:
    records = episodes()
    tags = _parse(_report(records)).tags
    patients = {e["patient"]["reference"] for e in records}
    assert {a.get("data-patient") for t, a in tags if t == "section" and a.get("data-patient")} == patients
    assert sum(1 for t, a in tags if t == "svg" and a.get("class") == "timeline") == len(patients)
    bars = [a.get("data-episode-bar") for t, a in tags if t == "rect" and a.get("class") == "episode-bar"]
    assert Counter(bars) == Counter(e["episode_id"] for e in records)


def _section(document: str, patient: str) -> str:
    start = document.index(f'data-patient="{patient}"')
    end = document.find("<section", start)
    return document[start:end]


def test_step_ups_and_step_downs_are_drawn_as_labelled_arrows_once() -> None:
    document = _report()
    stepup = _section(document, "Patient/pt-stepup-php")
    # outpatient -> IOP (entry), IOP -> PHP (exit = the PHP entry, drawn once), PHP -> IOP (ditto).
    assert stepup.count('class="transition step-up"') == 2
    assert stepup.count('class="transition step-down"') == 1
    legend = re.findall(r'<li class="(step-up|step-down)">([^<]+)</li>', stepup)
    assert [(kind, text.split(":")[0]) for kind, text in legend] == [
        ("step-up", "step up from Outpatient"),
        ("step-up", "step up to PHP"),  # not again as "step up from IOP": the same transition
        ("step-down", "step down to IOP"),
    ]
    php = next(
        e for e in episodes() if e["patient"]["reference"] == "Patient/pt-stepup-php" and e["level"] == "php"
    )
    assert f"step up to PHP: IOP {php['entry']['at']} → PHP {php['start']}" in stepup
    assert 'marker-end="url(#arrow-' in stepup
    direct = _section(document, "Patient/pt-two-stints")
    assert "transition" not in direct


def test_weekly_hours_have_the_level_minimum_line() -> None:
    records = episodes()
    tags = _parse(_report(records)).tags
    minimums = Counter(a.get("data-minimum") for t, a in tags if t == "line" and a.get("class") == "minimum")
    with_weeks = [e for e in records if e["attendance"]["weeks"]]
    assert minimums == Counter(
        {
            "9": sum(1 for e in with_weeks if e["level"] == "iop"),
            "20": sum(1 for e in with_weeks if e["level"] == "php"),
        }
    )
    weeks = sum(len(e["attendance"]["weeks"]) for e in records)
    assert sum(1 for t, a in tags if t == "rect" and a.get("class") == "week") == weeks


def test_billing_table_per_episode_with_its_codes() -> None:
    records = episodes()
    document = _report(records)
    assert document.count('<table class="billing">') == len(records)
    for record in records:
        billing = record["billing"]
        article = document[document.index(f'data-episode-id="{record["episode_id"]}"') :]
        article = article[: article.index("</article>")]
        for value in (billing["condition_code"], billing["revenue_code"], billing["hcpcs"]):
            if value:
                assert f"<td>{value}</td>" in article
        assert f"<td>{billing['units']}</td>" in article
        for diagnosis in billing["diagnoses"]:
            assert diagnosis["code"] in article


def test_part2_episodes_carry_a_badge() -> None:
    records = episodes()
    document = _report(records)
    for record in records:
        article = document[document.index(f'data-episode-id="{record["episode_id"]}"') :]
        article = article[: article.index("</article>")]
        assert ("42 CFR Part 2" in article) == record["part2"]
    assert any(r["part2"] for r in records)


def test_self_contained_no_urls_no_scripts() -> None:
    document = _report()
    assert not re.search(r"https?://|//[a-z0-9]", document, re.IGNORECASE)
    tags = _parse(document).tags
    assert not [t for t, _ in tags if t in ("script", "link", "img", "iframe", "object", "embed")]
    assert not [a for _, a in tags if "src" in a or "href" in a]
    assert document.startswith("<!DOCTYPE html>")


def test_shows_patient_references_never_identifiers() -> None:
    records = episodes()
    document = _report(records)
    text = render_text(records, referrals(), [], [], as_of=NOW)
    for record in records:
        assert record["patient"]["reference"] in document
        for identifier in record["patient"]["identifier"]:
            assert identifier["value"] not in document
            assert identifier["value"] not in text


def test_text_is_escaped() -> None:
    records = episodes()
    records[0]["billing"]["diagnoses"] = [
        {"system": "x", "code": "<b>F1</b>", "principal": True, "condition": None}
    ]
    document = _report(records)
    assert "<b>F1</b>" not in document
    assert "&lt;b&gt;F1&lt;/b&gt;" in document


def test_same_bytes_whatever_the_order() -> None:
    records = episodes()
    expected = _report(records)
    shuffled = list(records)
    random.Random(3).shuffle(shuffled)
    assert _report(shuffled) == expected
    assert render_text(shuffled, referrals(), [], [], as_of=NOW) == render_text(
        records, referrals(), [], [], as_of=NOW
    )


def test_write_backs_and_dead_letters_are_listed() -> None:
    records = episodes()
    document = _report(records)
    assert "Encounter/e1" in document
    assert "1 write-backs · 1 duplicates · 1 dead letters" in document
    assert "unknown episode x" in document


def test_text_report_has_entry_exit_sessions_hours_billing_referrals_and_write_backs() -> None:
    records = episodes()
    text = render_text(records, referrals(), _writebacks(records), [], as_of=NOW, include_part2=True)
    stepdown = text[text.index("Patient/pt-stepdown-inpatient") :]
    stepdown = stepdown[: stepdown.index("\n\n")]
    record = next(e for e in records if e["patient"]["reference"] == "Patient/pt-stepdown-inpatient")
    assert "entry: step down from Inpatient" in stepdown
    assert "exit: stepped down to Outpatient" in stepdown
    assert f"sessions: {record['attendance']['sessions_attended']} attended" in stepdown
    assert (
        "weekly hours (minimum 9 h): " + " ".join(f"{w['hours']:g}" for w in record["attendance"]["weeks"])
        in stepdown
    )
    assert f"HCPCS {record['billing']['hcpcs']}" in stepdown
    assert f"referrals: {len(referrals())}" in text
    assert "write-back: attendance 2026-06-02 attended, telehealth: created" in text
    assert "write-backs: 1 written, 1 duplicates" in text
    assert "dead letters: 0" in text
    assert "[42 CFR Part 2]" in text
    assert text.startswith(f"iop-bridge report as of {NOW.isoformat(timespec='seconds')}")
    assert AS_OF.date().isoformat() in render_report(records, [], [], [], as_of=AS_OF)


def test_part2_records_stay_out_of_the_report_unless_asked() -> None:
    """42 CFR Part 2 episodes, referrals, their write-backs and dead letters (issue 10 item 9)."""
    records = episodes()
    part2 = [r for r in records if r["part2"]]
    assert part2
    part2_ids = {str(r["episode_id"]) for r in part2}
    rows = [
        *_writebacks(records),
        WriteBackRow("sim-att-p2", "attendance", part2[0]["episode_id"], "2026-06-02 attended", "created"),
    ]
    dead = [
        DeadLetterRow("sim-att-9", "iop.attendance.v1", "unknown episode"),
        DeadLetterRow("sim-att-p2x", "iop.attendance.part2.v1", "sud-reason", part2=True),
    ]
    refs = referrals()
    part2_refs = [r for r in refs if r.get("part2")]
    text = render_text(records, refs, rows, dead, as_of=NOW)
    document = render_report(records, refs, rows, dead, as_of=NOW)
    for shown in (text, document):
        assert not any(episode_id in shown for episode_id in part2_ids)
        assert "sim-att-p2" not in shown
        assert "sud-reason" not in shown
        assert "42 CFR Part 2 records not shown" in shown
    assert f"{len(part2)} episodes, {len(part2_refs)} referrals, 1 write-backs, 1 dead letters" in text
    with_part2 = render_text(records, refs, rows, dead, as_of=NOW, include_part2=True)
    assert all(episode_id in with_part2 for episode_id in part2_ids)
    assert "sud-reason" in with_part2
    assert "not shown" not in with_part2

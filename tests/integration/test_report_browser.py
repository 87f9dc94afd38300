"""The HTML report in a real headless browser (Debian's chromium): it loads without a console message and
shows every episode.

``chromium --dump-dom`` prints the DOM after the page loaded (scripts run); ``--enable-logging=stderr``
writes every console message and uncaught exception as an ``INFO:CONSOLE`` line on stderr. The report
has no script, so any console line is a failure. The control page proves the check sees them.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sync.report import DeadLetterRow, WriteBackRow, render_report
from tests.unit.sync.demo_records import episodes, referrals

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
#: A cold start of chromium on a busy 2-core machine takes seconds; this is only a guard against a hang.
BROWSER_TIMEOUT_S = 120
_CONSOLE = re.compile(r":CONSOLE[:(]")
_EPISODE = re.compile(r'data-episode-id="([^"]+)"')


@dataclass(frozen=True)
class Loaded:
    dom: str
    console: list[str]


def load_in_chromium(page: Path, profile: Path) -> Loaded:
    """Open a local page in headless chromium: its DOM after load and its console messages."""
    assert CHROMIUM.exists(), "Debian's chromium is needed: apt-get install -y chromium (scripts/test does)"
    done = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if _CONSOLE.search(line)]
    return Loaded(done.stdout, console)


def test_the_check_sees_console_errors_and_exceptions(tmp_path: Path) -> None:
    page = tmp_path / "control.html"
    page.write_text(
        '<!DOCTYPE html><html><body><div data-episode-id="x"></div>'
        '<script>console.error("control-error"); notAFunction();</script></body></html>',
        encoding="utf-8",
    )
    loaded = load_in_chromium(page, tmp_path / "profile")
    assert any("control-error" in line for line in loaded.console)
    assert any("notAFunction" in line for line in loaded.console)
    assert _EPISODE.findall(loaded.dom) == ["x"]


def test_report_loads_without_console_messages_and_shows_every_episode(tmp_path: Path) -> None:
    records = episodes()
    active = next(e for e in records if e["status"] == "active")
    writebacks = [
        WriteBackRow(
            "sim-att-1",
            "attendance",
            active["episode_id"],
            "attended, telehealth",
            "created",
            ("Encounter/1",),
        )
    ]
    dead = [DeadLetterRow("sim-att-2", "iop.attendance.v1", "unknown episode")]
    page = tmp_path / "report.html"
    page.write_text(
        render_report(
            records, referrals(), writebacks, dead, as_of=datetime(2026, 6, 8, tzinfo=UTC), include_part2=True
        ),
        encoding="utf-8",
    )
    loaded = load_in_chromium(page, tmp_path / "profile")
    assert loaded.console == []
    shown = _EPISODE.findall(loaded.dom)
    assert sorted(shown) == sorted(e["episode_id"] for e in records)
    assert loaded.dom.count('class="timeline"') == len({e["patient"]["reference"] for e in records})

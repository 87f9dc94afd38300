"""Episode settings from the config file and the environment, per EHR (issue 13, "Settings per EHR")."""

from __future__ import annotations

from pathlib import Path

import pytest

from mappers.settings import EpisodeSettings
from sync.config import Settings, load_settings
from sync.episode_config import settings_fingerprint
from sync.errors import ConfigError

CONFIG = """
rules = "shared-rules.toml"

[episode]
max_gap_days = 21
week = "sunday"
referral_local_codes = ["urn:oid:1.2.840.114350.1.13.1|IOP-REF"]

[[episode.payer]]
name = "state-medicaid"
iop_hcpcs = "H0015"
payor_ids = ["org-medicaid"]

[episode.default_payer]
name = "commercial"
per_diem = true

[[ehr]]
name = "north"
base_url = "https://north.example.org/fhir"

[[ehr]]
name = "south"
base_url = "https://south.example.org/fhir"

[ehr.episode]
max_gap_days = 10
part2_program = true
rules = "south-rules.toml"
"""


def _settings(tmp_path: Path, text: str = CONFIG, environ: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path, environ={} if environ is None else environ)


def test_every_episode_setting_reaches_the_mappers_and_an_ehr_table_overrides_key_by_key(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    north, south = settings.ehr
    n = settings.episode_settings(north)
    s = settings.episode_settings(south)
    assert (n.max_gap_days, n.week, n.part2_program) == (21, "sunday", False)
    assert (s.max_gap_days, s.week, s.part2_program) == (10, "sunday", True)
    assert n.referral_local_codes == (("urn:oid:1.2.840.114350.1.13.1", "IOP-REF"),)
    assert [p.name for p in n.payer_profiles] == ["state-medicaid"]
    assert n.payer_profiles[0].hcpcs("iop", substance_use=False) == "H0015"
    assert n.payer_profiles[0].payor_ids == ("org-medicaid",)
    assert n.default_payer.name == "commercial"
    assert settings.rules_file("north") == "shared-rules.toml"
    assert settings.rules_file("south") == "south-rules.toml"


def test_without_an_episode_table_the_model_defaults_hold(tmp_path: Path) -> None:
    settings = load_settings(None, {"IOP_BRIDGE_EHR__H__BASE_URL": "https://h.example.org/fhir"})
    chosen = settings.episode_settings(settings.ehr[0])
    assert chosen == EpisodeSettings()


def test_environment_overrides_the_shared_and_one_ehr_s_settings(tmp_path: Path) -> None:
    environ = {
        "IOP_BRIDGE_EPISODE__IOP_MIN_WEEKLY_HOURS": "12",
        "IOP_BRIDGE_EHR__SOUTH__EPISODE__PROGRAM_LEVELS": "iop,php,residential",
        "IOP_BRIDGE_EHR__SOUTH__EPISODE__DEFAULT_PAYER__PER_DIEM": "false",
    }
    settings = _settings(tmp_path, environ=environ)
    north, south = settings.ehr
    assert settings.episode_settings(north).iop_min_weekly_hours == 12
    s = settings.episode_settings(south)
    assert s.iop_min_weekly_hours == 12  # the shared key still reaches an EHR that overrides others
    assert s.program_levels == ("iop", "php", "residential")
    assert s.default_payer.hcpcs("iop", substance_use=False) is None  # line items


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("[episode]\nmax_gap_days = -1\n", r"episode\.max_gap_days"),
        ('[episode]\nweek = "monday"\n', r"episode\.week"),
        ('[episode]\nprogram_levels = ["iop", "detox"]\n', r"episode\.program_levels\.1"),
        ('[episode]\niop_revenue_code = "905"\n', r"episode\.iop_revenue_code"),
        ('[episode]\nreferral_local_codes = ["IOP-REF"]\n', r"episode\.referral_local_codes"),
        ("[episode]\ngap_days = 3\n", r"episode\.gap_days"),
        ("[[episode.payer]]\nper_diem = false\n", r"episode\.payer\.0\.name"),
    ],
)
def test_an_invalid_episode_setting_is_a_configuration_error_naming_the_key(
    tmp_path: Path, extra: str, key: str
) -> None:
    text = extra + '[[ehr]]\nname = "h"\nbase_url = "https://h.example.org/fhir"\n'
    with pytest.raises(ConfigError, match=key) as caught:
        _settings(tmp_path, text)
    assert caught.value.exit_code == 2


def test_an_invalid_setting_in_one_ehr_s_table_names_that_ehr(tmp_path: Path) -> None:
    text = (
        '[[ehr]]\nname = "h"\nbase_url = "https://h.example.org/fhir"\n[ehr.episode]\nlookback_days = "x"\n'
    )
    with pytest.raises(ConfigError, match=r"ehr\.0\.episode\.lookback_days"):
        _settings(tmp_path, text)


def test_the_fingerprint_changes_with_any_setting_or_the_rules_and_only_then() -> None:
    base = settings_fingerprint(EpisodeSettings(), "2026.12.1", None)
    assert settings_fingerprint(EpisodeSettings(), "2026.12.1", None) == base
    assert settings_fingerprint(EpisodeSettings(max_gap_days=21), "2026.12.1", None) != base
    assert settings_fingerprint(EpisodeSettings(), "2026.12.2", None) != base
    assert settings_fingerprint(EpisodeSettings(), "2026.12.1", "[[rule]]\n") != base

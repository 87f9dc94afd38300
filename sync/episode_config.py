"""The episode settings of the config file: ``[episode]`` for every EHR, ``[ehr.episode]`` for one.

Every number and code of ``mappers.settings.EpisodeSettings`` has a key here; an ``[ehr.episode]`` table
overrides the shared ``[episode]`` key by key (a ``payer`` list replaces the shared list whole). The
mappers never see this module: ``EpisodeConfig.settings()`` builds the frozen ``EpisodeSettings`` they
receive, and a value the mappers would refuse is a configuration error naming the key.

Environment overrides follow ``sync.config``: ``IOP_BRIDGE_EPISODE__MAX_GAP_DAYS=21`` for every EHR,
``IOP_BRIDGE_EHR__<NAME>__EPISODE__MAX_GAP_DAYS=21`` for one; lists are comma-separated there.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, fields, replace
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mappers.settings import MEDICARE, PER_DIEM, EpisodeSettings, PayerProfile

_DEFAULTS = EpisodeSettings()


def _split(value: object) -> object:
    """A comma-separated string (from the environment) as a list; anything else unchanged."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PayerConfig(_Strict):
    """One payer profile (``mappers.settings.PayerProfile``): how the payer is billed and how its
    Coverage is recognised."""

    name: str = Field(min_length=1)
    #: per-diem HCPCS per level; false: line-item billing (the per-diem codes are then not used)
    per_diem: bool = True
    iop_hcpcs: str | None = PER_DIEM.iop_hcpcs
    iop_substance_use_hcpcs: str | None = PER_DIEM.iop_substance_use_hcpcs
    php_hcpcs: str | None = PER_DIEM.php_hcpcs
    residential_hcpcs: str | None = PER_DIEM.residential_hcpcs
    payor_ids: tuple[str, ...] = ()
    coverage_types: tuple[str, ...] = ()
    name_contains: tuple[str, ...] = ()

    @field_validator("payor_ids", "coverage_types", "name_contains", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split(value)

    def profile(self) -> PayerProfile:
        return PayerProfile(**self.model_dump())

    @classmethod
    def of(cls, profile: PayerProfile) -> PayerConfig:
        return cls(**asdict(profile))


class EpisodeConfig(_Strict):
    """The episode model's thresholds, codes and payers for one EHR (defaults: ``episode-model.md``)."""

    max_gap_days: int = Field(default=_DEFAULTS.max_gap_days, ge=0, le=365)
    lookback_days: int = Field(default=_DEFAULTS.lookback_days, ge=0, le=3650)
    lookahead_days: int = Field(default=_DEFAULTS.lookahead_days, ge=0, le=3650)
    default_session_hours: float = Field(default=_DEFAULTS.default_session_hours, gt=0, le=24)
    max_session_hours: float = Field(default=_DEFAULTS.max_session_hours, gt=0, le=24)
    iop_min_weekly_hours: float = Field(default=_DEFAULTS.iop_min_weekly_hours, ge=0, le=168)
    php_min_weekly_hours: float = Field(default=_DEFAULTS.php_min_weekly_hours, ge=0, le=168)
    iop_flag_weekly_hours: float = Field(default=_DEFAULTS.iop_flag_weekly_hours, ge=0, le=168)
    program_levels: tuple[Literal["iop", "php", "residential"], ...] = ("iop", "php")
    week: Literal["iso", "sunday"] = "iso"
    part2_program: bool = _DEFAULTS.part2_program
    iop_revenue_code: str = Field(default=_DEFAULTS.iop_revenue_code, pattern=r"^\d{4}$")
    iop_substance_use_revenue_code: str = Field(
        default=_DEFAULTS.iop_substance_use_revenue_code, pattern=r"^\d{4}$"
    )
    php_revenue_code: str = Field(default=_DEFAULTS.php_revenue_code, pattern=r"^\d{4}$")
    residential_revenue_code: str = Field(default=_DEFAULTS.residential_revenue_code, pattern=r"^\d{4}$")
    payer: tuple[PayerConfig, ...] = Field(
        default=(PayerConfig.of(MEDICARE),),
        description="payer profiles, tried in order (the shipped list holds Medicare)",
    )
    default_payer: PayerConfig = Field(
        default=PayerConfig.of(PER_DIEM), description="the profile of a Coverage no payer entry matches"
    )
    referral_local_codes: tuple[str, ...] = Field(
        default=(), description="'system|code' ServiceRequest codes that mark a referral to the IOP"
    )
    rules: str | None = Field(default=None, description="this EHR's own rule file (else the top-level one)")

    @field_validator("default_payer", mode="before")
    @classmethod
    def _default_payer_named(cls, value: object) -> object:
        if isinstance(value, dict) and "name" not in value:  # a table giving only some keys
            return {"name": PER_DIEM.name, **value}
        return value

    @field_validator("program_levels", "referral_local_codes", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split(value)

    @field_validator("referral_local_codes")
    @classmethod
    def _system_bar_code(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            system, bar, code = entry.rpartition("|")
            if not bar or not system or not code:
                raise ValueError(f"{entry!r} is not 'system|code'")
        return value

    @model_validator(mode="after")
    def _settings_accept_it(self) -> EpisodeConfig:
        self.settings()  # EpisodeSettings' own checks (levels, week): their message names the field
        return self

    def settings(self, patient_identifier_systems: tuple[str, ...] | None = None) -> EpisodeSettings:
        """The ``EpisodeSettings`` the mappers receive."""
        values: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in fields(EpisodeSettings) if hasattr(self, f.name)
        }
        values["payer_profiles"] = tuple(p.profile() for p in self.payer)
        values["default_payer"] = self.default_payer.profile()
        values["referral_local_codes"] = tuple(
            (entry.rpartition("|")[0], entry.rpartition("|")[2]) for entry in self.referral_local_codes
        )
        settings = EpisodeSettings(**values)
        if patient_identifier_systems is not None:
            settings = replace(settings, patient_identifier_systems=patient_identifier_systems)
        return settings


def merged_episode_table(shared: object, own: object) -> dict[str, Any]:
    """``[episode]`` with ``[ehr.episode]`` laid over it: tables key by key (at any depth), any other value
    (a list included) whole. Both are raw TOML tables; neither is changed."""
    base: dict[str, Any] = copy.deepcopy(shared) if isinstance(shared, dict) else {}
    if isinstance(own, dict):
        for key, value in own.items():
            held = base.get(key)
            base[key] = (
                merged_episode_table(held, value)
                if isinstance(held, dict) and isinstance(value, dict)
                else copy.deepcopy(value)
            )
    return base


def settings_fingerprint(settings: EpisodeSettings, rules_version: str, rules_text: str | None) -> str:
    """A hash of everything a mapping depends on besides the data: the settings and the rules.

    A different fingerprint than the one the store holds for an EHR means every patient is re-mapped
    once (``sync.service``)."""
    material = {
        "settings": asdict(settings),
        "rules_version": rules_version,
        "rules_sha256": hashlib.sha256(rules_text.encode("utf-8")).hexdigest() if rules_text else None,
    }
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()

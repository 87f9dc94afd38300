"""Episode thresholds and billing profiles: every number and code the episode model calls configuration.

The defaults are those of ``episode-model.md``. The service reads its config once at the edge and builds
one ``EpisodeSettings``; the mappers only receive it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from schemas.patient_identifiers import DEFAULT_PATIENT_IDENTIFIER_SYSTEMS, check_entries

#: Program levels an episode can be built for.
PROGRAM_LEVELS: Final = ("iop", "php", "residential")
WEEK_STARTS: Final = ("iso", "sunday")


@dataclass(frozen=True)
class PayerProfile:
    """How a payer is billed: per-diem HCPCS per level, or line items (Medicare: no per-diem code).

    A Coverage matches the profile when its payor reference id or identifier value is in ``payor_ids``,
    a ``Coverage.type`` code is in ``coverage_types``, or the payor's display contains one of
    ``name_contains`` (case-insensitive). Profiles are tried in order; ``default_payer`` applies otherwise.
    """

    name: str
    per_diem: bool = True
    iop_hcpcs: str | None = "S9480"
    iop_substance_use_hcpcs: str | None = "H0015"
    php_hcpcs: str | None = "H0035"
    residential_hcpcs: str | None = "H0019"
    payor_ids: tuple[str, ...] = ()
    coverage_types: tuple[str, ...] = ()
    name_contains: tuple[str, ...] = ()

    def hcpcs(self, level: str, *, substance_use: bool) -> str | None:
        if not self.per_diem:
            return None
        if level == "iop":
            return self.iop_substance_use_hcpcs if substance_use else self.iop_hcpcs
        if level == "php":
            return self.php_hcpcs
        if level == "residential":
            return self.residential_hcpcs
        return None


#: Medicare bills IOP/PHP as line items under condition code 92/41, not with an S- or H- per diem
#: (domain.md 2.1, 2.2: S9480 is not payable by Medicare). SOPT "1" = Medicare (PHDSC source of payment).
MEDICARE: Final = PayerProfile(
    name="medicare",
    per_diem=False,
    iop_hcpcs=None,
    iop_substance_use_hcpcs=None,
    php_hcpcs=None,
    residential_hcpcs=None,
    coverage_types=("1", "11", "111", "112", "113", "119", "MEDICARE"),
    name_contains=("medicare",),
)
#: Commercial / Medicaid per-diem billing (domain.md 2.2, 2.3).
PER_DIEM: Final = PayerProfile(name="per-diem")


@dataclass(frozen=True)
class EpisodeSettings:
    """Thresholds of the episode model (defaults from ``episode-model.md``)."""

    max_gap_days: int = 14
    lookback_days: int = 30
    lookahead_days: int = 30
    default_session_hours: float = 3.0
    iop_min_weekly_hours: float = 9
    php_min_weekly_hours: float = 20
    #: IOP weeks at or above this many hours are flagged (they look like PHP).
    iop_flag_weekly_hours: float = 20
    #: Levels that form episodes; add "residential" where a hospital runs it as a program.
    program_levels: tuple[str, ...] = ("iop", "php")
    #: "iso" (weeks start Monday) or "sunday".
    week: str = "iso"
    #: The program is a 42 CFR Part 2 program: every episode is Part 2.
    part2_program: bool = False
    iop_revenue_code: str = "0905"
    iop_substance_use_revenue_code: str = "0906"
    php_revenue_code: str = "0913"
    residential_revenue_code: str = "1001"
    payer_profiles: tuple[PayerProfile, ...] = (MEDICARE,)
    default_payer: PayerProfile = PER_DIEM
    #: ServiceRequest codes (system URI, code) a hospital uses for referrals besides SNOMED 3457005.
    referral_local_codes: tuple[tuple[str, str], ...] = ()
    #: Hours a session may last at most; a longer or inverted period counts the default session length.
    max_session_hours: float = 12.0
    #: Patient identifiers records carry: system URIs or ``type system|code`` tokens (default: MR type);
    #: SSN, driver's licence and passport are refused (``schemas.patient_identifiers``).
    patient_identifier_systems: tuple[str, ...] = DEFAULT_PATIENT_IDENTIFIER_SYSTEMS

    def __post_init__(self) -> None:
        for level in self.program_levels:
            if level not in PROGRAM_LEVELS:
                raise ValueError(f"program_levels: {level!r} is not one of {', '.join(PROGRAM_LEVELS)}")
        if self.week not in WEEK_STARTS:
            raise ValueError(f"week: {self.week!r} is not one of {', '.join(WEEK_STARTS)}")
        for name in ("max_gap_days", "lookback_days", "lookahead_days"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        try:
            check_entries(self.patient_identifier_systems)
        except ValueError as exc:
            raise ValueError(f"patient_identifier_systems: {exc}") from exc
        if self.default_session_hours <= 0:
            raise ValueError("default_session_hours must be positive")

    def min_weekly_hours(self, level: str) -> float | None:
        return {"iop": self.iop_min_weekly_hours, "php": self.php_min_weekly_hours}.get(level)

"""Typed configuration of one EHR connection (the ``[[ehr]]`` tables of the config file).

Secrets (private keys, bearer tokens, client secrets) are ``SecretStr``: they never show in ``repr``
or in logs. A private key is either a path to a PEM file or the PEM text itself.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from schemas.identifiers import checked_id
from schemas.patient_identifiers import DEFAULT_PATIENT_IDENTIFIER_SYSTEMS, check_entries

DEFAULT_RESOURCE_TYPES: tuple[str, ...] = (
    "Patient",
    "Encounter",
    "CarePlan",
    "ServiceRequest",
    "EpisodeOfCare",
    "Condition",
    "Procedure",
    "Coverage",
    "Location",
    "Organization",
    "Task",
    "Appointment",
)


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Vendor = Literal["generic", "epic", "oracle", "hapi"]
AuthKind = Literal["none", "bearer", "smart"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuthConfig(_Strict):
    """``[ehr.auth]``: how we authenticate to the EHR."""

    kind: AuthKind = "none"
    client_id: str | None = None
    private_key: SecretStr | None = Field(
        default=None, description="PEM file path, or the PEM text itself (RS384/ES384 key)"
    )
    token_url: str | None = Field(
        default=None, description="OAuth token endpoint; discovered from .well-known/smart-configuration"
    )
    scopes: str = "system/*.read"
    kid: str | None = None
    alg: Literal["RS384", "ES384"] | None = Field(
        default=None, description="JWT signing algorithm; taken from the key type when unset"
    )
    token: SecretStr | None = Field(default=None, description="static bearer token (kind = bearer)")

    @model_validator(mode="after")
    def _complete(self) -> AuthConfig:
        if self.kind == "smart" and (self.client_id is None or self.private_key is None):
            raise ValueError("auth kind 'smart' needs client_id and private_key")
        if self.kind == "bearer" and self.token is None:
            raise ValueError("auth kind 'bearer' needs token")
        return self

    def private_key_pem(self) -> bytes:
        """The PEM bytes of the private key, read from the file when ``private_key`` is a path."""
        if self.private_key is None:
            raise ValueError("no private_key configured")
        value = self.private_key.get_secret_value()
        if "-----BEGIN" in value:
            return value.encode()
        return Path(value).expanduser().read_bytes()


class PanelConfig(_Strict):
    """Patient panel for servers that refuse searches without a patient (Epic, Oracle)."""

    group_id: str | None = None
    patients_file: str | None = Field(default=None, description="text file, one patient id per line")
    concurrency: int = Field(default=4, ge=1, le=64)

    @field_validator("group_id")
    @classmethod
    def _group_id(cls, value: str | None) -> str | None:
        return None if value is None else checked_id("Group", value)


class EhrConfig(_Strict):
    """One ``[[ehr]]`` table: an EHR connection."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base_url: str
    vendor: Vendor = "generic"
    timezone: str = "UTC"
    auth: AuthConfig = AuthConfig()
    resource_types: tuple[str, ...] = DEFAULT_RESOURCE_TYPES
    page_size: int = Field(default=200, ge=1, le=5000, description="the _count of each search page")
    overlap_seconds: int = Field(
        default=300, ge=0, description="how far before the cursor each incremental pull starts (clock skew)"
    )
    mode: Literal["search", "bulk"] = "search"
    bulk_group_id: str | None = Field(default=None, description="Group-level $export instead of system level")
    bulk_poll_max_seconds: float = Field(
        default=60.0,
        gt=0,
        description="longest wait between $export status polls, whatever Retry-After asks (HAPI asks 120 s)",
    )
    panel: PanelConfig | None = None
    epic_client_id: str | None = Field(default=None, description="sent as the Epic-Client-ID header")
    concurrency: int = Field(default=4, ge=1, le=64, description="parallel requests to this EHR")
    timeout_seconds: float = Field(default=60.0, gt=0)
    write_back: bool = Field(default=True, description="allow writes to this EHR (where the vendor can)")
    allow_insecure_http: bool = Field(
        default=False,
        description="accept an http:// base_url on a host other than loopback (cleartext PHI and tokens)",
    )
    bulk_file_hosts: tuple[str, ...] = Field(
        default=(),
        description="hosts (host or host:port) besides the EHR's own that may receive the access token "
        "for $export files; always over https",
    )
    max_line_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="longest NDJSON line (one resource) accepted from a $export file",
    )
    max_page_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description="largest response body (a search page, a manifest, decompressed) read from the EHR; "
        "a larger one is refused, never buffered",
    )
    log_server_text: bool = Field(
        default=False,
        description="put the server's free text (OperationOutcome diagnostics, error bodies) into logs "
        "and error messages; off by default because servers echo patient data in it",
    )
    patient_identifier_systems: tuple[str, ...] = Field(
        default=DEFAULT_PATIENT_IDENTIFIER_SYSTEMS,
        description="Patient identifiers records carry: system URIs or 'type-system|code' (default MR type)",
    )

    @field_validator("bulk_group_id")
    @classmethod
    def _bulk_group_id(cls, value: str | None) -> str | None:
        return None if value is None else checked_id("Group", value)

    @field_validator("patient_identifier_systems", mode="before")
    @classmethod
    def _split_identifier_systems(cls, value: object) -> object:
        if isinstance(value, str):  # from the environment: comma-separated
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("patient_identifier_systems")
    @classmethod
    def _no_ssn_dl_passport(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        check_entries(value)
        return value

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("bulk_file_hosts")
    @classmethod
    def _plain_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        hosts = tuple(host.strip().lower() for host in value)
        for host in hosts:
            if not host or not re.fullmatch(r"[a-z0-9.\-\[\]:]+", host):
                raise ValueError(f"bulk_file_hosts: {host!r} is not a host name (host or host:port)")
        return hosts

    @model_validator(mode="after")
    def _no_cleartext(self) -> EhrConfig:
        if self.base_url.startswith("http://") and not (
            self.allow_insecure_http or is_loopback_url(self.base_url)
        ):
            raise ValueError(
                f"base_url {self.base_url!r} is plain http:// on a non-loopback host: use https, "
                "or set allow_insecure_http = true for a test server"
            )
        token_url = self.auth.token_url
        if token_url is not None and not token_url.startswith("https://"):
            cleartext_allowed = self.allow_insecure_http or is_loopback_url(token_url)
            if not (token_url.startswith("http://") and cleartext_allowed):
                raise ValueError(
                    f"auth.token_url {token_url!r} must be https (plain http:// only on loopback or "
                    "with allow_insecure_http = true)"
                )
        return self

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {value!r}") from exc
        return value

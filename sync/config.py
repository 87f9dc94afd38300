"""The service configuration: one TOML file plus environment overrides, read once at the edge.

Environment overrides (documented in README.md):

- ``IOP_BRIDGE_<SECTION>__<KEY>`` sets a key of a section, e.g. ``IOP_BRIDGE_STORE__URL``,
  ``IOP_BRIDGE_KAFKA__BOOTSTRAP_SERVERS``.
- ``IOP_BRIDGE_EHR__<NAME>__<KEY>`` (and ``…__AUTH__<KEY>``, ``…__PANEL__<KEY>``) sets a key of the
  ``[[ehr]]`` table whose ``name`` is NAME (compared case-insensitively, ``-`` and ``.`` written as ``_``),
  e.g. ``IOP_BRIDGE_EHR__GENERAL_HOSPITAL__AUTH__PRIVATE_KEY=/run/secrets/key.pem``. An EHR that the file
  does not name is added when the environment gives at least its ``BASE_URL``.

Values from the environment are strings; pydantic converts them to the declared types. Variables under
``IOP_BRIDGE_TEST_`` belong to the test harness (service addresses) and are not configuration.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from connectors.config import EhrConfig, is_loopback_url
from sync.episode_config import EpisodeConfig, merged_episode_table
from sync.errors import ConfigError

if TYPE_CHECKING:  # the store (SQLAlchemy) loads only when a command opens it
    from connectors.store import StateStore
    from mappers.settings import EpisodeSettings

_log = structlog.get_logger()

ENV_PREFIX = "IOP_BRIDGE_"
_HARNESS_PREFIX = "IOP_BRIDGE_TEST_"  # scripts/test exports IOP_BRIDGE_TEST_KAFKA / _FHIR to the tests


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(_Section):
    url: str = Field(
        default="sqlite:///.run/iop-bridge.db",
        description="SQLAlchemy URL: sqlite:///path (default) or postgresql+psycopg://…",
    )

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """The URL with its password masked (``repr``, ``str``, error messages)."""
        yield "url", masked_url(self.url)


def masked_url(url: str) -> str:
    """``url`` with the password of its authority replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class KafkaConfig(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = ""
    client_id: str = "iop-bridge"
    group_id: str = "iop-bridge-writeback"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None


class ServiceConfig(_Section):
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    metrics_host: str = Field(default="127.0.0.1", description="0.0.0.0 in a container")
    pull_interval_seconds: int = Field(default=300, ge=1)
    out_dir: str = ".run/out"
    writeback_concurrency: int = Field(default=8, ge=1, le=64, description="write-back events at once")
    retry_pause_seconds: float = Field(
        default=30.0, ge=0, description="how long a partition waits after a retriable write-back failure"
    )
    retry_max_attempts: int = Field(
        default=10, ge=1, description="retriable failures of one event before it is dead-lettered"
    )
    retry_max_seconds: float = Field(
        default=3600.0, ge=0, description="seconds since an event first failed before it is dead-lettered"
    )
    provenance_agent: str = Field(
        default="iop-bridge",
        min_length=1,
        max_length=200,
        description="Provenance.agent.who.display (a Device) on every resource written to an EHR",
    )


class StoreURLError(ConfigError):
    """The ``[store] url`` names a database we cannot use."""


class Settings(_Section):
    store: StoreConfig = StoreConfig()
    kafka: KafkaConfig = KafkaConfig()
    service: ServiceConfig = ServiceConfig()
    rules: str | None = Field(default=None, description="a hospital's own level-of-care rule file (TOML)")
    episode: EpisodeConfig = Field(default=EpisodeConfig(), description="episode settings of every EHR")
    ehr: tuple[EhrConfig, ...] = ()
    #: ``[ehr.episode]`` tables laid over ``[episode]``, by EHR name (built by ``load_settings``).
    ehr_episode: dict[str, EpisodeConfig] = Field(default_factory=dict)

    def episode_config(self, ehr_name: str) -> EpisodeConfig:
        return self.ehr_episode.get(ehr_name, self.episode)

    def episode_settings(self, ehr: EhrConfig) -> EpisodeSettings:
        """What the mappers receive for ``ehr``: its episode settings and its patient identifiers."""
        return self.episode_config(ehr.name).settings(ehr.patient_identifier_systems)

    def rules_file(self, ehr_name: str) -> str | None:
        """The EHR's own rule file, else the top-level one, else none (the shipped rules)."""
        return self.episode_config(ehr_name).rules or self.rules

    def ehr_named(self, name: str) -> EhrConfig:
        for ehr in self.ehr:
            if ehr.name == name:
                return ehr
        known = ", ".join(e.name for e in self.ehr) or "none"
        raise ConfigError(f"no [[ehr]] named {name!r} in the configuration (configured: {known})")


def _env_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _set_path(target: dict[str, Any], path: list[str], value: str) -> None:
    for part in path[:-1]:
        child = target.get(part)
        if not isinstance(child, dict):
            child = {}
            target[part] = child
        target = child
    target[path[-1]] = value


def apply_env_overrides(raw: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return a copy of the raw config dict with ``IOP_BRIDGE_*`` overrides applied."""
    merged: dict[str, Any] = copy.deepcopy(dict(raw))  # nested tables too: the caller's dict stays as it was
    tables = merged.get("ehr", [])
    ehrs: list[Any] = list(tables) if isinstance(tables, list) else []
    by_key = {_env_key(str(e.get("name", ""))): e for e in ehrs if isinstance(e, dict)}
    added = False
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX) or key.startswith(_HARNESS_PREFIX):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        value = environ[key]
        if parts[0] == "ehr":
            if len(parts) < 3:
                raise ConfigError(f"{key}: expected IOP_BRIDGE_EHR__<NAME>__<KEY>")
            name_key = parts[1].upper()
            ehr = by_key.get(name_key)
            if ehr is None:
                ehr = {"name": parts[1].replace("_", "-")}
                by_key[name_key] = ehr
                ehrs.append(ehr)
                added = True
            _set_path(ehr, parts[2:], value)
        elif len(parts) == 1:
            # Only top-level keys are configuration; other single-word variables (the launchers'
            # IOP_BRIDGE_KAFKA_PORT, IOP_BRIDGE_FHIR_PORT, …) belong to the scripts, not to us.
            if parts[0] in _TOP_LEVEL_KEYS:
                merged[parts[0]] = value
        else:
            section = merged.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"{key}: {parts[0]!r} is not a section")
            _set_path(section, parts[1:], value)
    if added:
        merged["ehr"] = ehrs
    return merged


_TOP_LEVEL_KEYS = frozenset({"rules"})


def load_settings(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the config file (if any), apply the environment, validate. Errors name the key at fault."""
    raw: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {file}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from exc
    merged = apply_env_overrides(raw, os.environ if environ is None else environ)
    own_episode = _pop_ehr_episode_tables(merged)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_problems(exc)}") from exc
    per_ehr: dict[str, EpisodeConfig] = {}
    for index, own in own_episode.items():
        try:
            per_ehr[settings.ehr[index].name] = EpisodeConfig.model_validate(
                merged_episode_table(merged.get("episode"), own)
            )
        except ValidationError as exc:
            raise ConfigError(f"invalid configuration: {_problems(exc, f'ehr.{index}.episode')}") from exc
    if per_ehr:
        settings = settings.model_copy(update={"ehr_episode": per_ehr})
    warn_cleartext(settings)
    return settings


def _pop_ehr_episode_tables(merged: dict[str, Any]) -> dict[int, object]:
    """Take each ``[ehr.episode]`` table out of its ``[[ehr]]`` (the connector's config does not know
    episodes), by the EHR's position."""
    tables = merged.get("ehr")
    if not isinstance(tables, list):
        return {}
    return {
        i: ehr.pop("episode") for i, ehr in enumerate(tables) if isinstance(ehr, dict) and "episode" in ehr
    }


def _problems(exc: ValidationError, prefix: str = "") -> str:
    """Each error as ``key.path: message`` (the key a person would fix)."""
    return "; ".join(
        ".".join([prefix, *(str(p) for p in err["loc"])] if prefix else [str(p) for p in err["loc"]])
        + f": {err['msg']}"
        for err in exc.errors(include_url=False)
    )


_VERIFIED_SSLMODES = frozenset({"verify-ca", "verify-full"})


def warn_cleartext(settings: Settings) -> None:
    """Log a warning for each connection that crosses a network without verified TLS."""
    kafka = settings.kafka
    brokers = [b.strip() for b in kafka.bootstrap_servers.split(",") if b.strip()]
    if kafka.security_protocol.upper() in {"PLAINTEXT", "SASL_PLAINTEXT"} and not all(
        is_loopback_url(f"//{broker}") for broker in brokers
    ):
        _log.warning(
            "kafka_plaintext",
            security_protocol=kafka.security_protocol,
            hint="events carry PHI: set [kafka] security_protocol = SSL or SASL_SSL",
        )
    store = urlsplit(settings.store.url)
    if store.scheme.startswith("postgres") and not is_loopback_url(f"//{store.hostname or 'localhost'}"):
        sslmode = (parse_qs(store.query).get("sslmode") or ["(unset)"])[-1]
        if sslmode not in _VERIFIED_SSLMODES:
            _log.warning(
                "store_without_tls",
                sslmode=sslmode,
                hint="the store holds PHI: add ?sslmode=verify-full to [store] url",
            )


def open_store(url: str) -> StateStore:
    """The state store at ``url``; an unusable URL (unsupported database, missing driver) is a
    configuration error (exit 2), not a crash."""
    from connectors.store import StateStore  # here: SQLAlchemy loads only for commands that open a store

    try:
        return StateStore(url)
    except ValueError as exc:
        raise StoreURLError(f"[store] url: {exc}") from exc

"""The service configuration: TOML file, IOP_BRIDGE_* environment overrides, clear errors, secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sync.config import apply_env_overrides, load_settings
from sync.errors import ConfigError

CONFIG = """
[store]
url = "sqlite:///state/bridge.db"

[kafka]
bootstrap_servers = "broker-1:9092"

[[ehr]]
name = "general-hospital"
base_url = "https://ehr.example.org/r4/"
vendor = "epic"
timezone = "America/Chicago"

[ehr.auth]
kind = "smart"
client_id = "iop-bridge"
private_key = "/etc/keys/old.pem"

[[ehr]]
name = "clinic"
base_url = "https://clinic.example.org/fhir"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "iop-bridge.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def test_file_is_read_into_typed_settings(config_file: Path) -> None:
    settings = load_settings(config_file, environ={})
    assert settings.store.url == "sqlite:///state/bridge.db"
    assert settings.kafka.bootstrap_servers == "broker-1:9092"
    ehr = settings.ehr_named("general-hospital")
    assert ehr.base_url == "https://ehr.example.org/r4"  # trailing slash stripped
    assert (ehr.vendor, ehr.timezone, ehr.auth.kind) == ("epic", "America/Chicago", "smart")
    assert settings.ehr_named("clinic").auth.kind == "none"


def test_environment_overrides_sections_and_ehr_keys(config_file: Path) -> None:
    environ = {
        "IOP_BRIDGE_STORE__URL": "postgresql+psycopg://db/bridge",
        "IOP_BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "broker-2:9093",
        "IOP_BRIDGE_EHR__GENERAL_HOSPITAL__AUTH__PRIVATE_KEY": "/run/secrets/key.pem",
        "IOP_BRIDGE_EHR__general_hospital__PAGE_SIZE": "50",
        "IOP_BRIDGE_EHR__CLINIC__PANEL__GROUP_ID": "iop-panel",
        "IOP_BRIDGE_RULES": "/etc/iop/rules.toml",
        "IOP_BRIDGE_TEST_KAFKA": "127.0.0.1:39092",  # the test harness's, not configuration
        "OTHER_TOOL__STORE__URL": "ignored",
    }
    settings = load_settings(config_file, environ=environ)
    assert settings.store.url == "postgresql+psycopg://db/bridge"
    assert settings.kafka.bootstrap_servers == "broker-2:9093"
    hospital = settings.ehr_named("general-hospital")
    assert hospital.auth.private_key is not None
    assert hospital.auth.private_key.get_secret_value() == "/run/secrets/key.pem"
    assert hospital.auth.client_id == "iop-bridge"  # the rest of the table is kept
    assert hospital.page_size == 50
    clinic = settings.ehr_named("clinic")
    assert clinic.panel is not None
    assert clinic.panel.group_id == "iop-panel"
    assert settings.rules == "/etc/iop/rules.toml"


def test_an_ehr_only_the_environment_names_is_added() -> None:
    settings = load_settings(
        None,
        environ={
            "IOP_BRIDGE_EHR__SANDBOX__BASE_URL": "http://127.0.0.1:8080/fhir",
            "IOP_BRIDGE_EHR__SANDBOX__AUTH__KIND": "bearer",
            "IOP_BRIDGE_EHR__SANDBOX__AUTH__TOKEN": "s3cret-token",
        },
    )
    ehr = settings.ehr_named("sandbox")
    assert ehr.auth.kind == "bearer"
    assert "s3cret-token" not in repr(settings)
    assert "s3cret-token" not in str(ehr.auth)


def test_overrides_do_not_change_the_callers_dict() -> None:
    raw: dict[str, Any] = {"ehr": [{"name": "a", "base_url": "https://a", "auth": {"kind": "none"}}]}
    merged = apply_env_overrides(raw, {"IOP_BRIDGE_EHR__A__AUTH__KIND": "bearer"})
    assert merged["ehr"][0]["auth"]["kind"] == "bearer"
    assert raw["ehr"][0]["auth"]["kind"] == "none"


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        (CONFIG, {"IOP_BRIDGE_EHR__CLINIC__PAGE_SIZE": "many"}, r"ehr\.1\.page_size"),
        (CONFIG, {"IOP_BRIDGE_EHR__CLINIC__TIMEZONE": "Mars/Olympus"}, "unknown IANA time zone"),
        (CONFIG, {"IOP_BRIDGE_STORE__URLL": "x"}, r"store\.urll"),
        (CONFIG, {"IOP_BRIDGE_EHR__CLINIC": "x"}, "expected IOP_BRIDGE_EHR__<NAME>__<KEY>"),
        (CONFIG, {"IOP_BRIDGE_RULES__X": "y"}, "rules: Input should be a valid string"),
        ("[store\nurl=1", {}, "not valid TOML"),
        ('[[ehr]]\nname = "x"\nbase_url = "ftp://x"\n', {}, "must be an http"),
        ('[[ehr]]\nname = "x"\nbase_url = "https://x"\n[ehr.auth]\nkind = "smart"\n', {}, "needs client_id"),
    ],
)
def test_errors_name_the_key_at_fault(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(path, environ=environ)
    assert caught.value.exit_code == 2


def test_missing_file_and_unknown_ehr_are_config_errors(config_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match=r"no \[\[ehr\]\] named 'elsewhere'.*general-hospital, clinic"):
        load_settings(config_file, environ={}).ehr_named("elsewhere")


def test_launcher_variables_are_not_configuration() -> None:
    settings = load_settings(
        None,
        environ={
            "IOP_BRIDGE_KAFKA_PORT": "19092",
            "IOP_BRIDGE_FHIR_PORT": "18080",
            "IOP_BRIDGE_RULES": "x.toml",
        },
    )
    assert settings.rules == "x.toml"
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"


def test_an_unusable_store_url_is_a_configuration_error() -> None:
    from sync.config import StoreURLError, open_store

    with pytest.raises(StoreURLError, match=r"\[store\] url: unsupported state store 'mysql'") as caught:
        open_store("mysql://localhost/iop")
    assert caught.value.exit_code == 2


def test_store_url_password_is_masked_in_repr() -> None:
    from sync.config import Settings, StoreConfig

    url = "postgresql+psycopg://bridge:s3cr%40t-pw@db.example.org:5432/iop"
    settings = Settings(store=StoreConfig(url=url))
    for text in (repr(settings), str(settings), repr(settings.store)):
        assert "s3cr" not in text
        assert "bridge:***@db.example.org:5432" in text
    assert settings.store.url == url  # the store itself still gets the password
    assert "sqlite:///.run/iop-bridge.db" in repr(StoreConfig())


# -- cleartext (issue 10, item 12) -------------------------------------------------------------------


def _one_ehr(tmp_path: Path, base_url: str, extra: str = "") -> Path:
    path = tmp_path / "ehr.toml"
    path.write_text(f'[[ehr]]\nname = "x"\nbase_url = "{base_url}"\n{extra}', encoding="utf-8")
    return path


def test_a_plain_http_ehr_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ehr\.0.*http://.*allow_insecure_http"):
        load_settings(_one_ehr(tmp_path, "http://ehr.example.org/r4"), environ={})


@pytest.mark.parametrize(
    "base_url", ["http://127.0.0.1:8080/fhir", "http://localhost/fhir", "http://[::1]:8080/fhir"]
)
def test_plain_http_on_loopback_is_allowed(tmp_path: Path, base_url: str) -> None:
    assert load_settings(_one_ehr(tmp_path, base_url), environ={}).ehr[0].base_url == base_url


def test_plain_http_elsewhere_needs_the_explicit_opt_in(tmp_path: Path) -> None:
    path = _one_ehr(tmp_path, "http://hapi:8080/fhir", "allow_insecure_http = true\n")
    assert load_settings(path, environ={}).ehr[0].allow_insecure_http is True


@pytest.mark.parametrize(
    ("environ", "event"),
    [
        ({"IOP_BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9092,broker-1:9092"}, "kafka_plaintext"),
        (
            {
                "IOP_BRIDGE_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "IOP_BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "b:9092",
            },
            "kafka_plaintext",
        ),
        ({"IOP_BRIDGE_STORE__URL": "postgresql+psycopg://u@db/bridge"}, "store_without_tls"),
        ({"IOP_BRIDGE_STORE__URL": "postgresql+psycopg://u@db/bridge?sslmode=prefer"}, "store_without_tls"),
    ],
)
def test_cleartext_kafka_and_postgres_are_warned_about(environ: dict[str, str], event: str) -> None:
    with capture_logs() as logs:
        load_settings(None, environ=environ)
    assert event in [e["event"] for e in logs if e["log_level"] == "warning"]


@pytest.mark.parametrize(
    "environ",
    [
        {
            "IOP_BRIDGE_STORE__URL": "postgresql+psycopg://u@db/bridge?sslmode=verify-full",
            "IOP_BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "broker-1:9093",
            "IOP_BRIDGE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        },
        {  # loopback: nothing crosses a network
            "IOP_BRIDGE_STORE__URL": "postgresql+psycopg://u@127.0.0.1:5432/bridge",
            "IOP_BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "localhost:9092",
        },
    ],
)
def test_tls_or_loopback_kafka_and_postgres_are_not_warned_about(environ: dict[str, str]) -> None:
    with capture_logs() as logs:
        load_settings(None, environ=environ)
    assert [e for e in logs if e["log_level"] == "warning"] == []


def test_patient_identifier_systems_default_to_mr_and_refuse_ssn_naming_the_key() -> None:
    settings = load_settings(None, {"IOP_BRIDGE_EHR__H__BASE_URL": "https://ehr.example/fhir"})
    assert settings.ehr[0].patient_identifier_systems == ("http://terminology.hl7.org/CodeSystem/v2-0203|MR",)
    environ = {
        "IOP_BRIDGE_EHR__H__BASE_URL": "https://ehr.example/fhir",
        "IOP_BRIDGE_EHR__H__PATIENT_IDENTIFIER_SYSTEMS": "urn:oid:1.2.3,http://hl7.org/fhir/sid/us-ssn",
    }
    with pytest.raises(ConfigError, match=r"ehr\.0\.patient_identifier_systems.*us-ssn"):
        load_settings(None, environ)

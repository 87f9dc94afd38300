"""deploy/compose.yaml (not run here) names the same ports and settings as the local scripts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from sync.config import KafkaConfig, ServiceConfig, Settings, apply_env_overrides, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _launcher_default(script: str, variable: str) -> int:
    text = (ROOT / "deploy" / script / "run").read_text(encoding="utf-8")
    match = re.search(r"\$\{" + variable + r":-(\d+)\}", text)
    assert match, f"deploy/{script}/run has no default for {variable}"
    return int(match.group(1))


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port of a service's ``ports`` (short syntax ``[ip:]host:container``)."""
    ports = {}
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        ports[int(parts[-1])] = int(parts[-2])
    return ports


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping"
    return {str(k): str(v) for k, v in env.items()}


def _settings(compose: dict[str, Any]) -> Settings:
    env = _environment(compose["services"]["iop-bridge"])
    return Settings.model_validate(apply_env_overrides({}, env))


def test_the_stack_is_kafka_hapi_and_iop_bridge(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"kafka", "hapi", "iop-bridge"}
    depends = compose["services"]["iop-bridge"]["depends_on"]
    assert set(depends) == {"kafka", "hapi"}


def test_published_ports_are_the_launchers_and_the_configs_defaults(compose: dict[str, Any]) -> None:
    services = compose["services"]
    kafka_port = _launcher_default("kafka", "IOP_BRIDGE_KAFKA_PORT")
    fhir_port = _launcher_default("fhir-sandbox", "IOP_BRIDGE_FHIR_PORT")
    assert (kafka_port, fhir_port, ServiceConfig().metrics_port) == (9092, 8080, 9464)
    assert _published(services["kafka"]) == {kafka_port: kafka_port}
    assert _published(services["hapi"]) == {fhir_port: fhir_port}
    assert _published(services["iop-bridge"]) == {9464: ServiceConfig().metrics_port}
    assert KafkaConfig().bootstrap_servers.endswith(f":{kafka_port}")


def test_kafka_runs_in_kraft_mode_and_advertises_both_listeners(compose: dict[str, Any]) -> None:
    env = _environment(compose["services"]["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "ZOOKEEPER" not in " ".join(env).upper()
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    bootstrap = _settings(compose).kafka.bootstrap_servers
    assert bootstrap in advertised.values(), "iop-bridge connects to an advertised listener"
    assert f"127.0.0.1:{_launcher_default('kafka', 'IOP_BRIDGE_KAFKA_PORT')}" in advertised.values()
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    assert set(listeners) == set(advertised) | {"CONTROLLER"}


def test_kafka_image_is_the_release_the_launcher_resolves(compose: dict[str, Any]) -> None:
    pom = (ROOT / "deploy" / "kafka" / "pom.xml").read_text(encoding="utf-8")
    version = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    assert version
    assert compose["services"]["kafka"]["image"].endswith(f"apache/kafka:{version.group(1)}}}")


def test_iop_bridge_environment_is_settings_that_sync_config_reads(compose: dict[str, Any]) -> None:
    env = _environment(compose["services"]["iop-bridge"])
    assert all(name.startswith("IOP_BRIDGE_") for name in env)
    for name in (
        "IOP_BRIDGE_KAFKA__BOOTSTRAP_SERVERS",
        "IOP_BRIDGE_STORE__URL",
        "IOP_BRIDGE_SERVICE__METRICS_PORT",
        "IOP_BRIDGE_EHR__HARBOR_GENERAL__BASE_URL",
    ):
        assert name in env
    settings = _settings(compose)
    assert settings.kafka.bootstrap_servers == "kafka:29092"
    assert settings.store.url.startswith("sqlite:////")
    assert settings.service.metrics_port == 9464
    (ehr,) = settings.ehr
    assert (ehr.name, ehr.vendor) == ("harbor-general", "hapi")
    url = urlsplit(ehr.base_url)
    assert (url.hostname, url.port, url.path) == (
        "hapi",
        _launcher_default("fhir-sandbox", "IOP_BRIDGE_FHIR_PORT"),
        "/fhir",
    )


def test_the_image_has_the_config_file_the_command_names(compose: dict[str, Any], tmp_path: Path) -> None:
    command = compose["services"]["iop-bridge"]["command"]
    assert command[0] == "run"
    config = command[command.index("--config") + 1]
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert f"> {config}" in dockerfile
    # That file holds only a comment: the environment alone makes a valid configuration.
    written = re.search(r"printf '([^']*)'", dockerfile)
    assert written
    empty = tmp_path / "iop-bridge.toml"
    empty.write_text(written.group(1).replace("\\n", "\n"), encoding="utf-8")
    settings = load_settings(empty, environ=_environment(compose["services"]["iop-bridge"]))
    assert settings.ehr[0].name == "harbor-general"


def test_dockerfile_copies_only_what_exists() -> None:
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source

"""Shared fixtures of the connector unit tests: EHR configs, a fake clock, a recording sleep, keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from connectors.config import EhrConfig

BASE = "https://ehr.example.org/r4/tenant-1"


@dataclass
class FakeClock:
    """A wall clock the test moves by hand (seconds since the epoch)."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Sleeps:
    """A ``sleep`` that records what it was asked and moves the fake clock instead of waiting."""

    clock: FakeClock
    slept: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleeps(clock: FakeClock) -> Sleeps:
    return Sleeps(clock)


@pytest.fixture
def make_ehr() -> Callable[..., EhrConfig]:
    """An ``EhrConfig`` at ``BASE`` (open, generic vendor) with any field overridden."""

    def make(**overrides: Any) -> EhrConfig:
        values: dict[str, Any] = {"name": "test-ehr", "base_url": BASE, **overrides}
        return EhrConfig.model_validate(values)

    return make


def pem_of(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())

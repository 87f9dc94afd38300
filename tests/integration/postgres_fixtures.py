"""pytest plugin: a real PostgreSQL server for the state store's integration tests.

- ``postgres_url`` (session): the SQLAlchemy URL of the server's ``iop_bridge`` database. Uses
  ``IOP_BRIDGE_TEST_POSTGRES`` when ``scripts/test`` started the server; otherwise runs
  ``deploy/postgres/run start`` itself and, at the end of the session, ``stop`` — but only if the server
  was not already running before.
- ``postgres_database`` (per test): the URL of a database of its own, created for the test and dropped
  after it, so tests never see each other's rows. It is created with ICU's ``en-US`` collation when the
  server has ICU (the usual collation of production servers, where text does not sort byte-wise), else
  with the server's default.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "deploy" / "postgres" / "run"
ENV_URL = "IOP_BRIDGE_TEST_POSTGRES"
#: Long enough for a cold first start (apt-get install of the server package, initdb).
LAUNCHER_TIMEOUT_S = 900


def _launcher(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LAUNCHER), command],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        timeout=LAUNCHER_TIMEOUT_S,
    )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """``postgresql+psycopg://postgres@127.0.0.1:55432/iop_bridge`` by default."""
    given = os.environ.get(ENV_URL, "").strip()
    if given:
        yield given
        return
    was_running = _launcher("status").returncode == 0
    started = _launcher("start")
    if started.returncode != 0 or not started.stdout.strip():
        pytest.fail(f"deploy/postgres/run start failed (exit {started.returncode}); see its output above")
    url = started.stdout.strip().splitlines()[-1]
    try:
        yield url
    finally:
        if not was_running:
            _launcher("stop")


@pytest.fixture(scope="session")
def postgres_admin(postgres_url: str) -> Iterator[Engine]:
    """An autocommit engine on the server's maintenance database (CREATE / DROP DATABASE)."""
    engine = create_engine(make_url(postgres_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def _icu_available(postgres_admin: Engine) -> bool:
    with postgres_admin.connect() as conn:
        return bool(conn.execute(text("SELECT count(*) FROM pg_collation WHERE collprovider = 'i'")).scalar())


@pytest.fixture
def postgres_database(postgres_url: str, postgres_admin: Engine, _icu_available: bool) -> Iterator[str]:
    """The URL of a fresh, empty database for this test only (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex}"
    locale = " LOCALE_PROVIDER icu ICU_LOCALE 'en-US'" if _icu_available else ""
    with postgres_admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'{locale}"))
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with postgres_admin.connect() as conn:
            # FORCE: a connection the test left open (a pool not disposed) must not keep it alive.
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))

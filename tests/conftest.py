"""Shared fixtures: a real Gleap sandbox, real SQLite files and (when set) real PostgreSQL.

Fixtures only; what tests import lives in ``tests/helpers.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from audsync.config import Config, load_config
from audsync.sandbox import Sandbox
from tests.helpers import (
    PG_URL,
    TOKEN,
    MakeConfig,
    Process,
    Receiver,
    Warehouse,
    fresh_pg_database,
    write_config,
)


@pytest.fixture
def gleap() -> Iterator[Sandbox]:
    """A Gleap sandbox with no rate limit (tests that need one build their own)."""
    with Sandbox(TOKEN, seed=1) as server:
        yield server


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database (skipped without AUDSYNC_TEST_POSTGRES_URL)."""
    if not PG_URL:
        pytest.skip("AUDSYNC_TEST_POSTGRES_URL is not set")
    yield from fresh_pg_database()


@pytest.fixture(params=["sqlite", "postgres"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The state DB URL: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    if not PG_URL:
        pytest.skip("AUDSYNC_TEST_POSTGRES_URL is not set")
    yield from fresh_pg_database()


@pytest.fixture
def warehouse(tmp_path: Path) -> Warehouse:
    return Warehouse(tmp_path / "warehouse.db")


@pytest.fixture
def make_config(
    tmp_path: Path,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> MakeConfig:
    """Write a config for the sandbox + warehouse + state DB; returns (path, Config)."""
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    for name in (
        "AUDSYNC_CONFIG",
        "AUDSYNC_STATE_URL",
        "AUDSYNC_SOURCE_URL",
        "AUDSYNC_GLEAP_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)

    def make(**kwargs: Any) -> tuple[Path, Config]:
        path = write_config(
            tmp_path, base_url=gleap.url, source_url=warehouse.url, state_url=state_url, **kwargs
        )
        return path, load_config(str(path))

    return make


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Processes a test starts; killed at its end whatever happened."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A local webhook receiver for alerts, closed at the end of the test."""
    hook = Receiver()
    yield hook
    hook.close()

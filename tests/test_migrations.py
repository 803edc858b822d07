from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from audsync import migrate, models
from audsync.state import open_state


def test_migrations_build_exactly_the_models(state_url: str) -> None:
    engine = open_state(state_url)
    assert migrate.current_revision(engine) == migrate.head_revision()
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), models.metadata)
    assert diff == []


def test_upgrade_is_idempotent(state_url: str) -> None:
    engine = open_state(state_url)
    migrate.upgrade(engine)
    open_state(state_url)
    assert migrate.current_revision(engine) == migrate.head_revision()

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


def test_a_failed_upgrade_leaves_the_schema_as_it_was(state_url: str) -> None:
    """All revisions run in one transaction: a migration that dies halfway (here a
    table in the way of revision 0002) leaves no half schema behind."""
    import pytest
    from sqlalchemy import create_engine, inspect, text

    from audsync.errors import StateError

    raw = create_engine(state_url)
    with raw.begin() as conn:
        conn.execute(text("CREATE TABLE daemons (squatter INTEGER)"))
    with pytest.raises(StateError, match="unusable"):
        open_state(state_url)
    assert set(inspect(raw).get_table_names()) == {"daemons"}  # 0001's tables rolled back
    with raw.begin() as conn:
        conn.execute(text("DROP TABLE daemons"))
    raw.dispose()
    engine = open_state(state_url)
    assert migrate.current_revision(engine) == migrate.head_revision()

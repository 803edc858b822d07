"""Alembic revisions of the state database (shipped as ``audsync.migrations``)."""

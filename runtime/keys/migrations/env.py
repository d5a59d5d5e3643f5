"""Alembic's environment for the key store: run from `runtime.keys.migrate` on its connection."""

from __future__ import annotations

from alembic import context

from runtime.keys.schema import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=context.config.attributes["version_table"],
    render_as_batch=True,  # SQLite alters a table by copying it
)
with context.begin_transaction():
    context.run_migrations()

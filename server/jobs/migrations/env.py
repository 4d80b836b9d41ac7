"""Alembic environment: runs on the connection the store hands it (see store.migrate)."""

from __future__ import annotations

from alembic import context

from server.jobs.models import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # `alembic` run by hand: take the URL from alembic.ini or -x url=...
    from sqlalchemy import create_engine

    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    with create_engine(url).connect() as conn:  # type: ignore[arg-type]
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()

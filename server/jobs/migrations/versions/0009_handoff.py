"""A job handed to the idle worker a submit picks (PostgreSQL): the waiter's worker id, and the
queue-wait histogram observed for a job that is inserted already started.

A worker waiting for jobs names itself in its ``idle_waiters`` row (``owner``). A submit that picks
such a row inserts the job leased to that worker and sends it the job itself, so that the worker
starts it without a claim (server/jobs/statements.py, ``SUBMIT``). Such a job starts with its
insert: the queue-wait trigger of 0007 observes a start when the attempts grow, which an insert is
not, so an insert with an attempt spent observes it too (a wait of zero).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from server.jobs.stats import sqlite_histogram_trigger

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_STARTED = "NEW.attempts > 0"  # and started_at set: both triggers add that


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.add_column("idle_waiters", sa.Column("owner", sa.String(128), nullable=True))
    if postgres:  # 0007's function observes the row it is given
        op.execute(
            "CREATE TRIGGER jobs_stats_queue_wait_insert AFTER INSERT ON jobs FOR EACH ROW "
            f"WHEN ({_STARTED} AND NEW.started_at IS NOT NULL) EXECUTE FUNCTION qwen_edit_queue_wait()"
        )
    else:
        wait = "NEW.started_at - NEW.created_at"
        op.execute(sqlite_histogram_trigger("jobs_stats_queue_wait_insert", "queue_wait", wait, "INSERT", _STARTED))


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.execute("DROP TRIGGER jobs_stats_queue_wait_insert" + (" ON jobs" if postgres else ""))
    with op.batch_alter_table("idle_waiters") as batch:
        batch.drop_column("owner")

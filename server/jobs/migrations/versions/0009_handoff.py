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

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_STARTED = "NEW.attempts > 0 AND NEW.started_at IS NOT NULL"


def _sqlite_trigger() -> str:
    from server.jobs.stats import bucket_case

    def add(name: str, delta: str) -> str:
        return (
            f"INSERT INTO job_stats (name, value) VALUES ({name}, {delta}) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value;"
        )

    wait = "NEW.started_at - NEW.created_at"
    return (
        f"CREATE TRIGGER jobs_stats_queue_wait_insert AFTER INSERT ON jobs WHEN {_STARTED} BEGIN "
        f"{add(repr('queue_wait.count'), '1')} {add(repr('queue_wait.sum_ms'), wait)} "
        f"{add(bucket_case(wait, 'queue_wait'), '1')} END"
    )


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.add_column("idle_waiters", sa.Column("owner", sa.String(128), nullable=True))
    if postgres:  # 0007's function observes the row it is given
        op.execute(
            "CREATE TRIGGER jobs_stats_queue_wait_insert AFTER INSERT ON jobs FOR EACH ROW "
            f"WHEN ({_STARTED}) EXECUTE FUNCTION qwen_edit_queue_wait()"
        )
    else:
        op.execute(_sqlite_trigger())


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.execute("DROP TRIGGER jobs_stats_queue_wait_insert" + (" ON jobs" if postgres else ""))
    with op.batch_alter_table("idle_waiters") as batch:
        batch.drop_column("owner")

"""Flat costs at a million jobs: job counters kept by triggers (no scan at a scrape), and partial
indexes in the claim's order over the queued jobs only.

The upgrade backfills the counters from the rows already stored (one pass over them, once).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_QUEUED = sa.text("status = 'created'")
_IN_FLIGHT = sa.text("status IN ('created', 'processing')")

# One counter per status: every insert, status change and delete of a job moves them in the same
# statement, whichever code path makes it. SQLite's writers are serialised, so it updates the
# totals in place; PostgreSQL appends deltas instead (no hot row for concurrent writers).
_SQLITE_TRIGGERS = [
    "CREATE TRIGGER jobs_stats_insert AFTER INSERT ON jobs BEGIN "
    "UPDATE job_stats SET value = value + 1 WHERE name = 'jobs.' || NEW.status; END",
    "CREATE TRIGGER jobs_stats_delete AFTER DELETE ON jobs BEGIN "
    "UPDATE job_stats SET value = value - 1 WHERE name = 'jobs.' || OLD.status; END",
    "CREATE TRIGGER jobs_stats_status AFTER UPDATE OF status ON jobs WHEN OLD.status <> NEW.status BEGIN "
    "UPDATE job_stats SET value = value - 1 WHERE name = 'jobs.' || OLD.status; "
    "UPDATE job_stats SET value = value + 1 WHERE name = 'jobs.' || NEW.status; END",
]
_PG_TRIGGERS = [
    """CREATE FUNCTION qwen_edit_job_stats() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            INSERT INTO job_stat_deltas (name, delta) VALUES ('jobs.' || OLD.status, -1);
        END IF;
        IF TG_OP <> 'DELETE' THEN
            INSERT INTO job_stat_deltas (name, delta) VALUES ('jobs.' || NEW.status, 1);
        END IF;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER jobs_stats_insert_delete AFTER INSERT OR DELETE ON jobs "
    "FOR EACH ROW EXECUTE FUNCTION qwen_edit_job_stats()",
    "CREATE TRIGGER jobs_stats_status AFTER UPDATE OF status ON jobs "
    "FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION qwen_edit_job_stats()",
]


def upgrade() -> None:
    from server.jobs import stats

    op.create_table(
        "job_stats",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "job_stat_deltas",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("delta", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_job_stat_deltas_name", "job_stat_deltas", ["name"])
    # The claim walks queued jobs in its own order and stops at the first it may take.
    order: list[str | sa.TextClause] = [sa.text("priority DESC"), "created_at", "id"]
    op.create_index("ix_jobs_claim", "jobs", order, sqlite_where=_QUEUED, postgresql_where=_QUEUED)
    op.create_index(
        "ix_jobs_claim_batch", "jobs", ["batch_key", *order], sqlite_where=_QUEUED, postgresql_where=_QUEUED
    )
    op.create_index("ix_jobs_in_flight", "jobs", ["api_key_id"], sqlite_where=_IN_FLIGHT, postgresql_where=_IN_FLIGHT)
    # Superseded by the partial indexes above (they covered every finished job too).
    op.drop_index("ix_jobs_queue", table_name="jobs")
    op.drop_index("ix_jobs_batch", table_name="jobs")
    conn = op.get_bind()
    for stmt in _PG_TRIGGERS if conn.dialect.name == "postgresql" else _SQLITE_TRIGGERS:
        op.execute(stmt)
    stats.rebuild(conn)  # the counters of the jobs already stored


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        op.execute("DROP TRIGGER jobs_stats_status ON jobs")
        op.execute("DROP TRIGGER jobs_stats_insert_delete ON jobs")
        op.execute("DROP FUNCTION qwen_edit_job_stats()")
    else:
        for name in ("jobs_stats_insert", "jobs_stats_delete", "jobs_stats_status"):
            op.execute(f"DROP TRIGGER {name}")
    op.create_index("ix_jobs_batch", "jobs", ["status", "batch_key", "priority", "created_at"])
    op.create_index("ix_jobs_queue", "jobs", ["status", "variant", "priority", "created_at"])
    op.drop_index("ix_jobs_in_flight", table_name="jobs")
    op.drop_index("ix_jobs_claim_batch", table_name="jobs")
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.drop_table("job_stat_deltas")
    op.drop_table("job_stats")

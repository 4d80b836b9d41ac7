"""PostgreSQL: the queue cap checked inside the submit's one statement (``qwen_edit_admit``).

A submit against the queue cap took four round trips: BEGIN, the statement that inserts the job,
wakes a worker and takes the admission lock, the count of the queue, COMMIT. The count could not
join the statement: a statement reads one snapshot, taken when it starts, so a count in it would
miss the jobs admitted by whoever held the lock just before. A function does not have that limit: in
READ COMMITTED each statement of a VOLATILE function reads a fresh snapshot. ``qwen_edit_admit``
takes the lock, then counts the queue (the job counters of 0005: every job admitted before this one
committed before releasing the lock), and raises ``QEQ01`` when the queue is full, which rolls the
whole statement back, its job and its wake-up with it. Run in autocommit, the submit is then one
round trip. The count leaves out the job being submitted (its counter delta is written by an AFTER
trigger, at the end of the statement), so a full queue is ``queued >= cap``.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

from server.jobs.statements import ADMISSION_LOCK_ID, QUEUE_FULL_SQLSTATE

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite's BEGIN IMMEDIATE serialises the submits; the count is a statement of its own
    op.execute(
        f"""
        CREATE FUNCTION qwen_edit_admit(queue_cap bigint) RETURNS integer
        LANGUAGE plpgsql VOLATILE AS $$
        DECLARE
            queued bigint;
        BEGIN
            PERFORM pg_advisory_xact_lock({ADMISSION_LOCK_ID});
            SELECT coalesce(sum(v), 0) INTO queued FROM (
                SELECT value AS v FROM job_stats WHERE name = 'jobs.created'
                UNION ALL
                SELECT delta AS v FROM job_stat_deltas WHERE name = 'jobs.created'
            ) AS parts;
            IF queued >= queue_cap THEN
                RAISE EXCEPTION 'the queue holds % jobs', queue_cap USING ERRCODE = '{QUEUE_FULL_SQLSTATE}';
            END IF;
            RETURN 1;
        END
        $$
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION qwen_edit_admit(bigint)")

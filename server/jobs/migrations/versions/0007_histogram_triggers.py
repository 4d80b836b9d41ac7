"""The queue-wait and inference histograms kept by triggers, as the status counters are (0005): a
job's start and its completion observe them in the statement that starts or completes it, instead
of one more statement from the store in the same transaction (on the path of every job).

A job starts when its attempts grow (a claim that spends one, or the begin of a job claimed ahead):
its queue wait is ``started_at - created_at``. It completes when its status becomes completed: its
inference time is ``inference_ms``. The counters are the ones the store added before, named as
before (server/jobs/stats.py), so nothing is backfilled.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# (histogram, the value observed, the trigger's event, when it observes)
_HISTOGRAMS = [
    ("queue_wait", "NEW.started_at - NEW.created_at", "UPDATE OF attempts", "NEW.attempts > OLD.attempts"),
    (
        "inference",
        "NEW.inference_ms",
        "UPDATE OF status",
        "NEW.status = 'completed' AND OLD.status <> 'completed'",
    ),
]


def _sqlite(histogram: str, value: str, event: str, when: str) -> str:
    from server.jobs.stats import sqlite_histogram_trigger

    return sqlite_histogram_trigger(f"jobs_stats_{histogram}", histogram, value, event, when)


def _postgres(histogram: str, value: str, event: str, when: str) -> list[str]:
    from server.jobs.stats import bucket_case

    function = f"qwen_edit_{histogram}()"
    return [
        f"""CREATE FUNCTION {function} RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO job_stat_deltas (name, delta) VALUES
                ('{histogram}.count', 1), ('{histogram}.sum_ms', {value}), ({bucket_case(value, histogram)}, 1);
            RETURN NULL;
        END $$""",
        f"CREATE TRIGGER jobs_stats_{histogram} AFTER {event} ON jobs FOR EACH ROW "
        f"WHEN ({when} AND NEW.started_at IS NOT NULL) EXECUTE FUNCTION {function}",
    ]


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for histogram in _HISTOGRAMS:
        for stmt in _postgres(*histogram) if postgres else [_sqlite(*histogram)]:
            op.execute(stmt)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for histogram, *_ in _HISTOGRAMS:
        op.execute(f"DROP TRIGGER jobs_stats_{histogram}" + (" ON jobs" if postgres else ""))
        if postgres:
            op.execute(f"DROP FUNCTION qwen_edit_{histogram}()")

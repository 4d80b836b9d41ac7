"""Retention's queries: old finished jobs and old uploads, found by index in bounded batches, so
that a pass costs what it deletes (one index probe when nothing is due), never a walk of the
table or of the storage tree. Their files go by the keys these return.
"""

from __future__ import annotations

from sqlalchemy import delete, select, tuple_

from server.jobs.contract import TERMINAL, Job
from server.jobs.db import Database
from server.jobs.models import IN_FLIGHT_ROWS, jobs, uploads, webhook_deliveries


class Retention:
    def __init__(self, db: Database) -> None:
        self.db = db

    def purge_finished(self, older_than_ms: int, limit: int) -> list[Job]:
        """Delete up to ``limit`` finished jobs that ended before ``older_than_ms`` (and their
        outbox rows); return them, so that their files can be removed by key."""
        # By ix_jobs_finished, oldest first (only finished jobs have a finished_at).
        due = select(jobs).where(jobs.c.finished_at < older_than_ms, jobs.c.status.in_(list(TERMINAL)))
        with self.db.write() as conn:
            rows = conn.execute(due.order_by(jobs.c.finished_at).limit(limit)).all()
            gone = [Job.from_row(row) for row in rows]
            ids = [job.id for job in gone]
            if ids:
                conn.execute(delete(webhook_deliveries).where(webhook_deliveries.c.job_id.in_(ids)))
                conn.execute(delete(jobs).where(jobs.c.id.in_(ids), jobs.c.status.in_(list(TERMINAL))))
        return gone

    def uploads_before(
        self, older_than_ms: int, limit: int, after: tuple[int, str] | None = None
    ) -> list[tuple[int, str]]:
        """Up to ``limit`` uploads (created_at, key) stored before ``older_than_ms``, oldest first,
        after the ``after`` one (a page's last): ix_uploads_created."""
        where = [uploads.c.created_at < older_than_ms]
        if after is not None:
            where.append(tuple_(uploads.c.created_at, uploads.c.key) > tuple_(*after))
        stmt = select(uploads.c.created_at, uploads.c.key).where(*where)
        with self.db.read() as conn:
            rows = conn.execute(stmt.order_by(uploads.c.created_at, uploads.c.key).limit(limit)).all()
        return [(int(at), str(key)) for at, key in rows]

    def forget_uploads(self, keys: list[str]) -> None:
        if keys:
            with self.db.write() as conn:
                conn.execute(delete(uploads).where(uploads.c.key.in_(keys)))

    def unfinished_input_keys(self) -> set[str]:
        """Storage keys that queued and running jobs still need (ix_jobs_in_flight's rows only)."""
        with self.db.read() as conn:
            rows = conn.execute(select(jobs).where(IN_FLIGHT_ROWS)).all()
        keys: set[str] = set()
        for row in rows:
            keys |= Job.from_row(row).params.stored_keys()
        return keys

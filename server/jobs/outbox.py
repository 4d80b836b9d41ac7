"""The webhook outbox: one delivery row per job that ended with a webhook URL.

The row is written by the store in the transaction that ends the job, so a finished job's webhook
is never lost; the API's dispatcher leases due rows, delivers them and records each attempt here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update

from server.jobs.db import Database
from server.jobs.models import webhook_deliveries as outbox
from server.jobs.statements import new_delivery


@dataclass(frozen=True)
class Delivery:
    job_id: str
    url: str
    attempts: int


class WebhookOutbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def enqueue(conn: Connection, job_id: str, url: str, now: int) -> None:
        """Inside the store's transaction that ends the job."""
        conn.execute(insert(outbox).values(job_id=job_id, url=url, **new_delivery(now)))

    def claim(self, limit: int, lease_s: float, now: int) -> list[Delivery]:
        """Lease up to ``limit`` due deliveries (nobody else takes them until the lease ends)."""
        due = (
            select(outbox.c.job_id)
            .where(
                outbox.c.delivered_at.is_(None),
                outbox.c.gave_up.is_(False),
                outbox.c.next_attempt_at <= now,
                (outbox.c.lease_expires_at.is_(None)) | (outbox.c.lease_expires_at < now),
            )
            .order_by(outbox.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self.db.write() as conn:
            rows = conn.execute(
                update(outbox)
                .where(outbox.c.job_id.in_(due))
                .values(lease_expires_at=now + int(lease_s * 1000))
                .returning(outbox.c.job_id, outbox.c.url, outbox.c.attempts)
            ).all()
        return [Delivery(job_id=r[0], url=r[1], attempts=r[2]) for r in rows]

    def record(self, job_id: str, *, error: str | None, retry_at: int | None, now: int) -> None:
        """One attempt's outcome: delivered (no error), retry at ``retry_at``, or given up (no retry)."""
        values: dict[str, Any] = {"attempts": outbox.c.attempts + 1, "lease_expires_at": None}
        if error is None:
            values.update(delivered_at=now, last_error="")
        elif retry_at is None:
            values.update(gave_up=True, last_error=error[:2000])
        else:
            values.update(next_attempt_at=retry_at, last_error=error[:2000])
        with self.db.write() as conn:
            conn.execute(update(outbox).where(outbox.c.job_id == job_id).values(**values))

    def state(self, job_id: str) -> dict[str, Any] | None:
        with self.db.read() as conn:
            row = conn.execute(select(outbox).where(outbox.c.job_id == job_id)).first()
        return dict(row._mapping) if row else None

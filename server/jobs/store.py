"""The job store: the one place that decides a job's fate.

Every state change is a single guarded statement, so that the same code is correct on SQLite
(writers serialised by the database) and PostgreSQL (claims with ``FOR UPDATE SKIP LOCKED``):

    created --claim--> processing --complete--> completed
       ^                   |  \\---fail------> failed
       +----reap/release---+   (a late or duplicate worker's writes match no row: its lease is gone)

``JobStore.open(settings)`` is the one way in for every process; the webhook outbox
(``store.outbox``), the worker registry (``store.workers``) and the uploads (``store.uploads``)
share its database.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import Connection, case, delete, func, insert, select, text, update

from server.errors import INTERNAL_ERROR, TASK_FAILED
from server.jobs.contract import IN_FLIGHT, TERMINAL, Job, Status
from server.jobs.db import Database
from server.jobs.models import jobs, webhook_deliveries
from server.jobs.notify import Notifier
from server.jobs.outbox import WebhookOutbox
from server.jobs.registry import WorkerRegistry
from server.jobs.uploads import Uploads

if TYPE_CHECKING:
    from server.settings import Settings

log = structlog.get_logger(__name__)

_ADMISSION_LOCK = 727002  # PostgreSQL advisory lock id: count-then-insert admissions, one at a time


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    return secrets.token_hex(16)


class AdmissionRefused(Exception):
    """A submit the store turned away (the queue or the key's allowance is full)."""


class QueueFull(AdmissionRefused):
    pass


class KeyAtLimit(AdmissionRefused):
    pass


@dataclass(frozen=True)
class Admission:
    """Caps checked atomically with the insert (0: no cap)."""

    queue_cap: int = 0
    per_key: int = 0


@dataclass(frozen=True)
class Heartbeat:
    alive: bool  # False: the lease is gone (reaped, or the job finished elsewhere): stop working on it
    cancel_requested: bool


@dataclass(frozen=True)
class Histogram:
    count: int
    sum_ms: int
    cumulative: tuple[int, ...]  # one count per bucket bound, in order


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.outbox = WebhookOutbox(db)
        self.workers = WorkerRegistry(db)
        self.uploads = Uploads(db)

    @classmethod
    def open(cls, settings: Settings, *, pool_size: int = 10) -> JobStore:
        return cls(Database.open(settings, pool_size=pool_size))

    @classmethod
    def at(cls, url: str, **kwargs: Any) -> JobStore:
        """A store on a database URL (tools and tests that have no Settings)."""
        return cls(Database(url, **kwargs))

    @property
    def notifier(self) -> Notifier:
        return self.db.notifier

    def migrate(self) -> None:
        self.db.migrate()

    def ping(self) -> None:
        self.db.ping()

    def close(self) -> None:
        self.db.close()

    # --- jobs: the API's side ------------------------------------------------------------

    def create(self, job: Job, admission: Admission | None = None) -> None:
        """Store a new job; with ``admission``, only if the caps still hold (checked and inserted
        in one transaction, so that concurrent submits can never overshoot them)."""
        with self.db.write() as conn:
            if admission and (admission.queue_cap or admission.per_key):
                self._admit(conn, job, admission)
            conn.execute(insert(jobs).values(**job.to_row()))
        self.db.publish("jobs")

    def _admit(self, conn: Connection, job: Job, admission: Admission) -> None:
        if self.db.is_postgres:  # SQLite's BEGIN IMMEDIATE already serialises writers
            conn.execute(text(f"SELECT pg_advisory_xact_lock({_ADMISSION_LOCK})"))
        if admission.queue_cap:
            queued = conn.execute(select(func.count()).select_from(jobs).where(jobs.c.status == Status.CREATED))
            if int(queued.scalar_one()) >= admission.queue_cap:
                raise QueueFull(f"the queue holds {admission.queue_cap} jobs")
        if admission.per_key and self._in_flight(conn, job.api_key_id) >= admission.per_key:
            raise KeyAtLimit(f"{admission.per_key} jobs in flight")

    @staticmethod
    def _in_flight(conn: Connection, key_id: str | None) -> int:
        who = jobs.c.api_key_id.is_(None) if key_id is None else jobs.c.api_key_id == key_id
        stmt = select(func.count()).select_from(jobs).where(who, jobs.c.status.in_(list(IN_FLIGHT)))
        return int(conn.execute(stmt).scalar_one())

    def in_flight(self, key_id: str | None) -> int:
        """Jobs of this API key that are queued or running."""
        with self.db.read() as conn:
            return self._in_flight(conn, key_id)

    def get(self, job_id: str) -> Job | None:
        with self.db.read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return Job.from_row(row) if row else None

    def terminal_among(self, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        with self.db.read() as conn:
            rows = conn.execute(select(jobs.c.id).where(jobs.c.id.in_(list(ids)), jobs.c.status.in_(list(TERMINAL))))
            return [r[0] for r in rows]

    def count_by_status(self) -> dict[str, int]:
        with self.db.read() as conn:
            rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all()
        counts = {s.value: 0 for s in Status}
        counts.update({status: n for status, n in rows})
        return counts

    def queued_count(self) -> int:
        with self.db.read() as conn:
            stmt = select(func.count()).select_from(jobs).where(jobs.c.status == Status.CREATED)
            return int(conn.execute(stmt).scalar_one())

    def cancel(self, job_id: str) -> Job | None:
        """Fail a queued job at once; ask a running one to stop at its next step."""
        now = now_ms()
        with self.db.write() as conn:
            ended = self._finish(
                conn,
                (jobs.c.id == job_id) & (jobs.c.status == Status.CREATED),
                job_id,
                Status.FAILED,
                error="Cancelled by the client before it started.",
                error_code=TASK_FAILED,
                now=now,
            )
            if not ended:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.status == Status.PROCESSING)
                    .values(cancel_requested=True, updated_at=now)
                )
        if ended:
            self.db.publish("done", job_id)
        return self.get(job_id)

    # --- jobs: the worker's side ---------------------------------------------------------

    def claim(self, worker_id: str, variants: Sequence[str], lease_s: float) -> Job | None:
        """Lease the next queued job of ``variants`` (priority, then age)."""
        queued = jobs.c.status == Status.CREATED, jobs.c.variant.in_(list(variants))
        claimed = self._claim(worker_id, lease_s, 1, *queued)
        return claimed[0] if claimed else None

    def claim_compatible(self, worker_id: str, batch_key: str, limit: int, lease_s: float) -> list[Job]:
        """Lease up to ``limit`` more queued jobs that may share a pipeline call (same batch key)."""
        if limit < 1:
            return []
        return self._claim(worker_id, lease_s, limit, jobs.c.status == Status.CREATED, jobs.c.batch_key == batch_key)

    def _claim(self, worker_id: str, lease_s: float, limit: int, *where: Any) -> list[Job]:
        now = now_ms()
        # A CTE, not "id IN (subquery)": PostgreSQL may evaluate a LIMITed sub-select with
        # SKIP LOCKED more than once inside the UPDATE, and then claims fewer rows than it may.
        picked = (
            select(jobs.c.id)
            .where(*where)
            .order_by(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("picked")
        )
        stmt = (
            update(jobs)
            .where(jobs.c.id == picked.c.id, jobs.c.status == Status.CREATED)
            .values(
                status=Status.PROCESSING,
                attempts=jobs.c.attempts + 1,
                lease_token=secrets.token_hex(16),
                lease_owner=worker_id,
                lease_expires_at=now + int(lease_s * 1000),
                started_at=now,
                progress_step=0,
                updated_at=now,
            )
            .returning(*jobs.c)
        )
        with self.db.write() as conn:
            claimed = [Job.from_row(row) for row in conn.execute(stmt).all()]
        claimed.sort(key=lambda job: (-job.priority, job.created_at, job.id))
        return claimed

    def heartbeat(
        self, job_id: str, token: str, lease_s: float, step: int | None = None, total: int | None = None
    ) -> Heartbeat:
        now = now_ms()
        values: dict[str, Any] = {"lease_expires_at": now + int(lease_s * 1000), "updated_at": now}
        if step is not None:
            values["progress_step"] = step
        if total is not None:
            values["progress_total"] = total
        with self.db.write() as conn:
            row = conn.execute(
                update(jobs).where(self._leased(job_id, token)).values(**values).returning(jobs.c.cancel_requested)
            ).first()
        return Heartbeat(alive=row is not None, cancel_requested=bool(row and row[0]))

    def complete(
        self, job_id: str, token: str, outputs: list[str], inference_ms: int, steps: int | None = None
    ) -> bool:
        """End a leased job as completed (all ``steps`` done); False when the lease is gone (the
        result is not taken)."""
        progress: dict[str, Any] = {"progress_step": jobs.c.progress_total}
        if steps is not None:
            progress = {"progress_step": steps, "progress_total": steps}
        with self.db.write() as conn:
            done = self._finish(
                conn,
                self._leased(job_id, token),
                job_id,
                Status.COMPLETED,
                outputs=outputs,
                inference_ms=inference_ms,
                now=now_ms(),
                **progress,
            )
        if done:
            self.db.publish("done", job_id)
        return done

    def fail(self, job_id: str, token: str, error: str, code: int, inference_ms: int = 0) -> bool:
        with self.db.write() as conn:
            done = self._finish(
                conn,
                self._leased(job_id, token),
                job_id,
                Status.FAILED,
                error=error,
                error_code=code,
                inference_ms=inference_ms,
                now=now_ms(),
            )
        if done:
            self.db.publish("done", job_id)
        return done

    def release(self, job_id: str, token: str) -> bool:
        """Hand a job back to the queue (a worker told to stop), without spending an attempt."""
        with self.db.write() as conn:
            n = conn.execute(
                update(jobs)
                .where(self._leased(job_id, token))
                .values(attempts=jobs.c.attempts - 1, **self._requeued(now_ms()))
            ).rowcount
        if n:
            self.db.publish("jobs")
        return bool(n)

    def release_owned_by(self, worker_id: str) -> int:
        """At a worker's start-up: whatever its previous life held is not being worked on."""
        return self._reap((jobs.c.status == Status.PROCESSING) & (jobs.c.lease_owner == worker_id))

    def reap(self) -> int:
        """Return jobs whose lease expired (their worker died) to the queue, or fail them at the cap."""
        return self._reap((jobs.c.status == Status.PROCESSING) & (jobs.c.lease_expires_at < now_ms()))

    def _reap(self, where: Any) -> int:
        now = now_ms()
        with self.db.write() as conn:
            expired = conn.execute(select(jobs.c.id, jobs.c.attempts, jobs.c.max_attempts).where(where)).all()
            requeued = 0
            for job_id, attempts, cap in expired:
                again = (jobs.c.id == job_id) & where & (jobs.c.attempts == attempts)
                if attempts >= cap:
                    self._finish(
                        conn,
                        again,
                        job_id,
                        Status.FAILED,
                        error=f"The worker running this prediction stopped {attempts} times; giving up.",
                        error_code=INTERNAL_ERROR,
                        now=now,
                    )
                else:
                    requeued += conn.execute(update(jobs).where(again).values(**self._requeued(now))).rowcount
        if expired:
            log.warning("reaped jobs with expired leases", count=len(expired), requeued=requeued)
            self.db.publish("jobs")
            for job_id, *_ in expired:
                self.db.publish("done", job_id)
        return len(expired)

    @staticmethod
    def _requeued(now: int) -> dict[str, Any]:
        return {
            "status": Status.CREATED,
            "lease_token": None,
            "lease_owner": None,
            "lease_expires_at": None,
            "progress_step": 0,
            "updated_at": now,
        }

    @staticmethod
    def _leased(job_id: str, token: str) -> Any:
        return (jobs.c.id == job_id) & (jobs.c.lease_token == token) & (jobs.c.status == Status.PROCESSING)

    def _finish(self, conn: Connection, where: Any, job_id: str, status: Status, *, now: int, **values: Any) -> bool:
        """End a job (guarded by ``where``) and queue its webhook in the same transaction."""
        row = conn.execute(
            update(jobs)
            .where(where)
            .values(
                status=status,
                finished_at=now,
                updated_at=now,
                lease_token=None,
                lease_expires_at=None,
                cancel_requested=False,
                **values,
            )
            .returning(jobs.c.webhook_url)
        ).first()
        if row is None:
            return False
        if row[0]:
            self.outbox.enqueue(conn, job_id, row[0], now)
        return True

    # --- retention -----------------------------------------------------------------------

    def purge_finished(self, older_than_ms: int, limit: int) -> list[Job]:
        """Delete up to ``limit`` finished jobs that ended before ``older_than_ms`` (and their
        outbox rows); return them, so that their files can be removed by key."""
        with self.db.write() as conn:
            rows = conn.execute(
                select(jobs).where(jobs.c.status.in_(list(TERMINAL)), jobs.c.finished_at < older_than_ms).limit(limit)
            ).all()
            gone = [Job.from_row(row) for row in rows]
            ids = [job.id for job in gone]
            if ids:
                conn.execute(delete(webhook_deliveries).where(webhook_deliveries.c.job_id.in_(ids)))
                conn.execute(delete(jobs).where(jobs.c.id.in_(ids), jobs.c.status.in_(list(TERMINAL))))
        return gone

    def unfinished_input_keys(self) -> set[str]:
        """Storage keys that queued and running jobs still need."""
        with self.db.read() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.status.in_(list(IN_FLIGHT)))).all()
        keys: set[str] = set()
        for row in rows:
            keys |= Job.from_row(row).params.stored_keys()
        return keys

    # --- aggregates (metrics) ------------------------------------------------------------

    def queue_wait_histogram(self, bounds_ms: Sequence[int]) -> Histogram:
        """Submission to start, over the jobs a worker started."""
        return self._histogram(jobs.c.started_at - jobs.c.created_at, jobs.c.started_at.is_not(None), bounds_ms)

    def inference_histogram(self, bounds_ms: Sequence[int]) -> Histogram:
        """Pipeline time of completed jobs."""
        return self._histogram(jobs.c.inference_ms, jobs.c.status == Status.COMPLETED, bounds_ms)

    def _histogram(self, expr: Any, where: Any, bounds_ms: Sequence[int]) -> Histogram:
        # One row: count, sum, then one cumulative count per bucket, aggregated by the database.
        cols: list[Any] = [func.count(), func.coalesce(func.sum(expr), 0)]
        cols += [func.coalesce(func.sum(case((expr <= bound, 1), else_=0)), 0) for bound in bounds_ms]
        with self.db.read() as conn:
            count, total, *cumulative = (
                int(v or 0) for v in conn.execute(select(*cols).select_from(jobs).where(where)).one()
            )
        return Histogram(count, total, tuple(cumulative))

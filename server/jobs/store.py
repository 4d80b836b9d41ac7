"""The job store: the one place that decides a job's fate.

Every state change is a single guarded statement, so that the same code is correct on SQLite
(writers serialised by the database) and PostgreSQL (claims with ``FOR UPDATE SKIP LOCKED``):

    created --claim--> processing --complete--> completed
       ^                   |  \\---fail------> failed
       +----reap/release---+   (a late or duplicate worker's writes match no row: its lease is gone)
"""

from __future__ import annotations

import contextlib
import fcntl
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, create_engine, event, func, insert, select, text, update
from sqlalchemy.engine import make_url

from server.errors import INTERNAL_ERROR
from server.jobs.models import Job, Status, WorkerInfo, jobs, meta, webhook_deliveries, workers
from server.jobs.notify import LocalNotifier, Notifier, NullNotifier, PostgresNotifier

log = structlog.get_logger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    return secrets.token_hex(16)


@dataclass
class Heartbeat:
    alive: bool  # False: the lease is gone (reaped, or the job finished elsewhere): stop working on it
    cancel_requested: bool


@dataclass
class WebhookTask:
    job_id: str
    url: str
    attempts: int


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    # Switching a new database to WAL takes an exclusive lock, and SQLite answers a second process
    # racing to switch it (an API and its worker starting together) with "database is locked" at
    # once, without its busy wait. The switch is persistent and quick: retry until it is done.
    deadline = time.monotonic() + 30
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class JobStore:
    def __init__(self, url: str, *, run_dir: Path | None = None, pool_size: int = 10) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.is_postgres = self.url.get_backend_name() == "postgresql"
        if self.is_sqlite:
            if self.url.database and self.url.database != ":memory:":
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(
                url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size, pool_timeout=10
            )
        self.notifier: Notifier
        if self.is_postgres:
            dsn = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
            self.notifier = PostgresNotifier(dsn, self._pg_notify)
        elif run_dir is not None:
            self.notifier = LocalNotifier(run_dir)
        else:
            self.notifier = NullNotifier()

    def _pg_notify(self, channel: str, payload: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(select(func.pg_notify(channel, payload)))

    def _notify(self, channel: str, payload: str = "") -> None:
        try:
            self.notifier.publish(channel, payload)
        except Exception as exc:  # a hint only: waiters poll anyway
            log.warning("notify failed", channel=channel, error=str(exc))

    def close(self) -> None:
        self.engine.dispose()

    # --- schema --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _migration_lock(self, conn: Connection) -> Iterator[None]:
        """One migrator at a time, held until its migration is committed: the next one then reads
        the new schema version instead of racing to create the same tables."""
        if self.is_postgres:
            # A transaction-level lock: released by the commit (or the rollback), never before.
            conn.execute(text("SELECT pg_advisory_xact_lock(727001)"))
            yield
        elif self.is_sqlite and self.url.database and self.url.database != ":memory:":
            with open(Path(self.url.database).with_suffix(".migrate.lock"), "w") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                yield
        else:
            yield

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe from many processes at once)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.connect() as conn, self._migration_lock(conn):
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # --- jobs: the API's side ------------------------------------------------------------

    def create(self, job: Job) -> None:
        values = {k: v for k, v in job.__dict__.items()}
        values["status"] = job.status.value
        with self.engine.begin() as conn:
            conn.execute(insert(jobs).values(**values))
        self._notify("jobs")

    def get(self, job_id: str) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return Job.from_row(row) if row else None

    def terminal_among(self, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(jobs.c.id).where(jobs.c.id.in_(list(ids)), jobs.c.status.in_([Status.COMPLETED, Status.FAILED]))
            ).all()
        return [r[0] for r in rows]

    def count_by_status(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all()
        counts = {s.value: 0 for s in Status}
        counts.update({status: n for status, n in rows})
        return counts

    def queued_count(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(select(func.count()).select_from(jobs).where(jobs.c.status == Status.CREATED)).scalar_one()
            )

    def cancel(self, job_id: str) -> Job | None:
        """Fail a queued job at once; ask a running one to stop at its next step."""
        now = now_ms()
        with self.engine.begin() as conn:
            ended = self._finish(
                conn,
                (jobs.c.id == job_id) & (jobs.c.status == Status.CREATED),
                job_id,
                Status.FAILED,
                error="Cancelled by the client before it started.",
                error_code=1403,
                now=now,
            )
            if not ended:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.status == Status.PROCESSING)
                    .values(cancel_requested=True, updated_at=now)
                )
        if ended:
            self._notify("done", job_id)
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
        with self.engine.begin() as conn:
            rows = conn.execute(stmt).all()
        claimed = [Job.from_row(row) for row in rows]
        claimed.sort(key=lambda job: (-job.priority, job.created_at, job.id))
        return claimed

    def has_queued(self, variants: Sequence[str]) -> bool:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(jobs.c.id).where(jobs.c.status == Status.CREATED, jobs.c.variant.in_(list(variants))).limit(1)
            ).first()
        return row is not None

    def heartbeat(
        self, job_id: str, token: str, lease_s: float, step: int | None = None, total: int | None = None
    ) -> Heartbeat:
        now = now_ms()
        values: dict[str, Any] = {"lease_expires_at": now + int(lease_s * 1000), "updated_at": now}
        if step is not None:
            values["progress_step"] = step
        if total is not None:
            values["progress_total"] = total
        with self.engine.begin() as conn:
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.lease_token == token, jobs.c.status == Status.PROCESSING)
                .values(**values)
                .returning(jobs.c.cancel_requested)
            ).first()
        return Heartbeat(alive=row is not None, cancel_requested=bool(row and row[0]))

    def complete(self, job_id: str, token: str, outputs: list[str], inference_ms: int) -> bool:
        now = now_ms()
        with self.engine.begin() as conn:
            done = self._finish(
                conn,
                self._leased(job_id, token),
                job_id,
                Status.COMPLETED,
                outputs=outputs,
                inference_ms=inference_ms,
                progress_step=jobs.c.progress_total,
                now=now,
            )
        if done:
            self._notify("done", job_id)
        return done

    def fail(self, job_id: str, token: str, error: str, code: int, inference_ms: int = 0) -> bool:
        now = now_ms()
        with self.engine.begin() as conn:
            done = self._finish(
                conn,
                self._leased(job_id, token),
                job_id,
                Status.FAILED,
                error=error,
                error_code=code,
                inference_ms=inference_ms,
                now=now,
            )
        if done:
            self._notify("done", job_id)
        return done

    def release(self, job_id: str, token: str) -> bool:
        """Hand a job back to the queue (a worker told to stop), without spending an attempt."""
        now = now_ms()
        with self.engine.begin() as conn:
            n = conn.execute(
                update(jobs)
                .where(self._leased(job_id, token))
                .values(
                    status=Status.CREATED,
                    attempts=jobs.c.attempts - 1,
                    lease_token=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    progress_step=0,
                    updated_at=now,
                )
            ).rowcount
        if n:
            self._notify("jobs")
        return bool(n)

    def release_owned_by(self, worker_id: str) -> int:
        """At a worker's start-up: whatever its previous life held is not being worked on."""
        return self._reap((jobs.c.status == Status.PROCESSING) & (jobs.c.lease_owner == worker_id))

    def reap(self) -> int:
        """Return jobs whose lease expired (their worker died) to the queue, or fail them at the cap."""
        return self._reap((jobs.c.status == Status.PROCESSING) & (jobs.c.lease_expires_at < now_ms()))

    def _reap(self, where: Any) -> int:
        now = now_ms()
        with self.engine.begin() as conn:
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
                    requeued += conn.execute(
                        update(jobs)
                        .where(again)
                        .values(
                            status=Status.CREATED,
                            lease_token=None,
                            lease_owner=None,
                            lease_expires_at=None,
                            progress_step=0,
                            updated_at=now,
                        )
                    ).rowcount
        if expired:
            log.warning("reaped jobs with expired leases", count=len(expired), requeued=requeued)
            self._notify("jobs")
            for job_id, *_ in expired:
                self._notify("done", job_id)
        return len(expired)

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
            conn.execute(
                insert(webhook_deliveries).values(
                    job_id=job_id,
                    url=row[0],
                    attempts=0,
                    next_attempt_at=now,
                    gave_up=False,
                    last_error="",
                    created_at=now,
                )
            )
        return True

    # --- webhook outbox ------------------------------------------------------------------

    def claim_webhooks(self, limit: int, lease_s: float) -> list[WebhookTask]:
        now = now_ms()
        due = (
            select(webhook_deliveries.c.job_id)
            .where(
                webhook_deliveries.c.delivered_at.is_(None),
                webhook_deliveries.c.gave_up.is_(False),
                webhook_deliveries.c.next_attempt_at <= now,
                (webhook_deliveries.c.lease_expires_at.is_(None)) | (webhook_deliveries.c.lease_expires_at < now),
            )
            .order_by(webhook_deliveries.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self.engine.begin() as conn:
            rows = conn.execute(
                update(webhook_deliveries)
                .where(webhook_deliveries.c.job_id.in_(due))
                .values(lease_expires_at=now + int(lease_s * 1000))
                .returning(webhook_deliveries.c.job_id, webhook_deliveries.c.url, webhook_deliveries.c.attempts)
            ).all()
        return [WebhookTask(job_id=r[0], url=r[1], attempts=r[2]) for r in rows]

    def webhook_result(self, job_id: str, *, error: str | None, retry_at: int | None) -> None:
        now = now_ms()
        values: dict[str, Any] = {"attempts": webhook_deliveries.c.attempts + 1, "lease_expires_at": None}
        if error is None:
            values.update(delivered_at=now, last_error="")
        elif retry_at is None:
            values.update(gave_up=True, last_error=error)
        else:
            values.update(next_attempt_at=retry_at, last_error=error)
        with self.engine.begin() as conn:
            conn.execute(update(webhook_deliveries).where(webhook_deliveries.c.job_id == job_id).values(**values))

    def webhook_state(self, job_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(webhook_deliveries).where(webhook_deliveries.c.job_id == job_id)).first()
        return dict(row._mapping) if row else None

    # --- workers -------------------------------------------------------------------------

    def worker_state(self, info: WorkerInfo) -> None:
        values = dict(info.__dict__)
        with self.engine.begin() as conn:
            n = conn.execute(update(workers).where(workers.c.id == info.id).values(**values)).rowcount
            if not n:
                conn.execute(insert(workers).values(**values))

    def list_workers(self) -> list[WorkerInfo]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(workers).order_by(workers.c.id)).all()
        return [WorkerInfo(**dict(r._mapping)) for r in rows]

    # --- meta ----------------------------------------------------------------------------

    def meta_value(self, key: str, factory: Callable[[], str]) -> str:
        """The stored value of ``key``, created once with ``factory()`` (the first writer wins)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(meta.c.value).where(meta.c.key == key)).first()
        if row:
            return str(row[0])
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(meta).values(key=key, value=factory()))
        except Exception:  # another process won the race: read theirs
            pass
        with self.engine.connect() as conn:
            return str(conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar_one())

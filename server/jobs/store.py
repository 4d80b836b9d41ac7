"""The job store: the one place that decides a job's fate.

Every state change is a single guarded statement, so that the same code is correct on SQLite
(writers serialised by the database) and PostgreSQL (claims with ``FOR UPDATE SKIP LOCKED``):

    created --claim--> processing --complete--> completed
       ^                   |  \\---fail------> failed
       +----reap/release---+   (a late or duplicate worker's writes match no row: its lease is gone)

``JobStore.open(settings)`` is the one way in for every process; the webhook outbox
(``store.outbox``), the worker registry (``store.workers``), the uploads (``store.uploads``), the
history and usage reads (``store.history``) and retention (``store.retention``) share its database;
the job counters are in ``stats.py``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import Connection, func, select, update
from sqlalchemy.exc import DBAPIError

from server.errors import INTERNAL_ERROR, TASK_FAILED
from server.jobs import statements as sql
from server.jobs import stats
from server.jobs.contract import HANDOFF_LEASE_S, IN_FLIGHT, TERMINAL, Done, Ending, Handoff, Job, Status
from server.jobs.db import Database
from server.jobs.history import History, Scope
from server.jobs.models import IN_FLIGHT_ROWS, RUNNING, jobs
from server.jobs.notify import Notifier, PostgresNotifier
from server.jobs.outbox import WebhookOutbox
from server.jobs.registry import WorkerRegistry
from server.jobs.retention import Retention
from server.jobs.uploads import Uploads

if TYPE_CHECKING:
    from server.settings import Settings

log = structlog.get_logger(__name__)


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


class OverBudget(AdmissionRefused):
    pass


@dataclass(frozen=True)
class Prices:
    """What one prediction of each model costs (``"*"``: any model not named; default 0)."""

    by_model: Mapping[str, float]

    def price(self, model: str) -> float:
        return float(self.by_model.get(model, self.by_model.get("*", 0.0)))


@dataclass(frozen=True)
class Budget:
    """What a key may spend, at these prices."""

    cap: float
    prices: Prices


@dataclass(frozen=True)
class Admission:
    """Caps checked atomically with the insert (0 or None: no cap). A budget counts the key's
    completed predictions and those still queued or running (they hold their price)."""

    queue_cap: int = 0
    per_key: int = 0
    budget: Budget | None = None


@dataclass(frozen=True)
class Heartbeat:
    alive: bool  # False: the lease is gone (reaped, or the job finished elsewhere): stop working on it
    cancel_requested: bool


@dataclass(frozen=True)
class Begun:
    attempts: int
    started_at: int
    cancel_requested: bool  # cancelled while it waited, claimed ahead: fail it, do not run it


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.outbox = WebhookOutbox(db)
        self.workers = WorkerRegistry(db)
        self.uploads = Uploads(db)
        self.history = History(db)
        self.retention = Retention(db)
        self._done_channel = PostgresNotifier.channel("done")  # where a job's end is told (PostgreSQL)

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
        caps = admission if admission and (admission.queue_cap or admission.per_key or admission.budget) else None
        wake = self.db.wake_params("jobs", job.variant)
        if wake is not None:
            self._submit(job, wake, caps)
            return
        with self.db.write() as conn:
            self.db.run(conn, sql.INSERT_JOB, job.to_row())
            # The local notifier wakes one idle worker that runs it, after the commit.
            notified = self.db.publish_on_commit(conn, "jobs", job.variant)
            if caps is not None:
                self._admit(conn, job, caps, locked=False)  # last: refused, all is rolled back
        if not notified:
            self.db.publish("jobs", job.variant)

    def _submit(self, job: Job, wake: dict[str, Any], caps: Admission | None) -> None:
        """PostgreSQL: the job, the wake-up of one idle worker that runs its variant (the job handed
        to that worker where it is one, so that it starts without a claim) and the admission lock in
        one statement. Against no cap or the queue cap alone (the default), the queue cap is checked
        in that statement too (statements.QUEUE_CHECK: the lock, then the count in a snapshot taken
        after it), run in autocommit: the whole submit is one round trip where a transaction took
        four, all of it rolled back when the queue is full. Against a per-key cap or a budget, their
        counts follow the statement in its transaction."""
        params = {**sql.job_values(job.to_row()), **wake, **self._handoff(job)}
        handoff = "handoff" in params
        if caps is not None and (caps.per_key or caps.budget is not None):
            with self.db.write() as conn:
                self.db.run(conn, sql.SUBMIT["locked", handoff], params)
                self._admit(conn, job, caps, locked=True)  # last: refused, all is rolled back
            return
        if caps is not None:
            params["a_queue_cap"] = caps.queue_cap
        with self.db.write_one() as conn:
            try:
                self.db.run(conn, sql.SUBMIT["checked" if caps else "", handoff], params)
            except DBAPIError as exc:
                if caps is not None and getattr(exc.orig, "sqlstate", None) == sql.QUEUE_FULL_SQLSTATE:
                    raise QueueFull(f"the queue holds {caps.queue_cap} jobs") from None
                raise

    @staticmethod
    def _handoff(job: Job) -> dict[str, Any]:
        """SUBMIT's parameters for handing ``job`` to the idle worker it picks (PostgreSQL): the job
        as leased to that worker, and the message that tells it so. None of them where the message
        would not fit a NOTIFY (a prompt of kilobytes): then the job is queued, and claimed."""
        now = now_ms()
        leased = replace(
            job,
            status=Status.PROCESSING,
            attempts=job.attempts + 1,
            lease_token=secrets.token_hex(16),
            lease_expires_at=now + int(HANDOFF_LEASE_S * 1000),
            started_at=now,
        )
        message = Handoff(leased).message()
        if message is None:
            return {}
        return {**sql.handoff_values(leased.to_row()), "handoff": message}

    def _admit(self, conn: Connection, job: Job, admission: Admission, *, locked: bool) -> None:
        """The caps, checked after the job's own insert (the counts include it). On PostgreSQL the
        admissions are serialised by a lock, taken with the insert and the wake-up (``locked``: in
        the same statement, statements.SUBMIT) or else here, so that it is held for the counts and
        the commit, not for a round trip of its own: each admitted job was counted with every job
        admitted before it, which committed before releasing the lock. SQLite's BEGIN IMMEDIATE
        already serialises writers."""
        if self.db.is_postgres and not locked:
            conn.execute(sql.ADMISSION_LOCK)
        if admission.queue_cap and self._queued(conn) > admission.queue_cap:
            raise QueueFull(f"the queue holds {admission.queue_cap} jobs")
        if admission.per_key and self._in_flight(conn, job.api_key_id) > admission.per_key:
            raise KeyAtLimit(f"{admission.per_key} jobs in flight")
        if admission.budget is not None:
            budget = admission.budget
            held = History.counts_in(conn, Scope(job.api_key_id), (Status.COMPLETED, *IN_FLIGHT))
            held[job.model] = held.get(job.model, 1) - 1  # what was spent or held before this job
            spent = sum(budget.prices.price(model) * n for model, n in held.items())
            cost = budget.prices.price(job.model)
            if spent + cost > budget.cap + 1e-9:
                raise OverBudget(f"{spent:g} of {budget.cap:g} spent or held; {job.model} costs {cost:g}")

    @staticmethod
    def _in_flight(conn: Connection, key_id: str | None) -> int:
        # ix_jobs_in_flight: counts this key's queued and running jobs, never its finished ones.
        who = jobs.c.api_key_id.is_(None) if key_id is None else jobs.c.api_key_id == key_id
        stmt = select(func.count()).select_from(jobs).where(who, IN_FLIGHT_ROWS)
        return int(conn.execute(stmt).scalar_one())

    def in_flight(self, key_id: str | None) -> int:
        """Jobs of this API key that are queued or running."""
        with self.db.read() as conn:
            return self._in_flight(conn, key_id)

    def get(self, job_id: str) -> Job | None:
        with self.db.read() as conn:
            row = self.db.run(conn, sql.GET_JOB, {"job_id": job_id}).first()
        return Job.from_row(row) if row else None

    def terminal_among(self, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        with self.db.read() as conn:
            rows = conn.execute(select(jobs.c.id).where(jobs.c.id.in_(list(ids)), jobs.c.status.in_(list(TERMINAL))))
            return [r[0] for r in rows]

    def count_by_status(self) -> dict[str, int]:
        """Jobs per status, from the counters (stats.py): a few rows read, however many jobs."""
        with self.db.read() as conn:
            counters = stats.read(conn, "jobs.")
        return {s.value: counters.get(f"jobs.{s.value}", 0) for s in Status}

    def counters(self) -> dict[str, int]:
        """Every job counter (statuses and histograms; stats.py)."""
        with self.db.read() as conn:
            return stats.read(conn)

    def fold_counters(self) -> int:
        """Compact the counters' pending deltas (PostgreSQL; run by the API's reaper)."""
        with self.db.write() as conn:
            return stats.fold(conn)

    def queued_count(self) -> int:
        with self.db.read() as conn:
            return self._queued(conn)

    def _queued(self, conn: Connection) -> int:
        """The queue's length (its counter, stats.ONE): on the driver, as it is on every submit's path."""
        return int(self.db.run(conn, stats.ONE[conn.dialect.name], {"name": "jobs.created"}).scalar_one())

    def cancel(self, job_id: str) -> Job | None:
        """Fail a queued job at once; ask a running one to stop at its next step."""
        if not self.cancel_queued(job_id, "Cancelled by the client before it started."):
            with self.db.write_one() as conn:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.status == Status.PROCESSING)
                    .values(cancel_requested=True, updated_at=now_ms())
                )
        return self.get(job_id)

    def cancel_queued(self, job_id: str, reason: str) -> bool:
        """Fail the job if it is still queued (no worker has it); True when it did."""
        where = (jobs.c.id == job_id) & (jobs.c.status == Status.CREATED)
        with self.db.write() as conn:
            ended = self._finish(conn, where, job_id, Status.FAILED, error=reason, error_code=TASK_FAILED, now=now_ms())
        if ended:
            self.db.publish("done", ended)
        return ended is not None

    # --- jobs: the worker's side ---------------------------------------------------------

    def claim(
        self,
        worker_id: str,
        variants: Sequence[str],
        lease_s: float,
        *,
        spend_attempt: bool = True,
        woken: bool = False,
    ) -> Job | None:
        """Lease the next queued job of ``variants`` (priority, then age). ``spend_attempt=False``:
        a job claimed ahead (prefetched) that spends its attempt only at ``begin``, so that one
        returned unstarted, or left behind by a crash, was never charged a try. ``woken``: the
        caller was woken for a job just queued (it was picked to take it): a job is very likely
        there, so SQLite's look before the write is skipped."""
        by = {"variant": variants[0]} if len(variants) == 1 else {"variants": list(variants)}
        claimed = self._claim(worker_id, lease_s, 1, by, spend_attempt=spend_attempt, look=not woken)
        return claimed[0] if claimed else None

    def begin(self, job_id: str, token: str) -> Begun | None:
        """A job claimed ahead really starts now: spend its attempt, start its clock; None when the
        lease is gone."""
        now = now_ms()
        with self.db.write_one() as conn:
            row = conn.execute(sql.BEGIN, {"job_id": job_id, "token": token, "now": now}).first()
        return Begun(int(row[0]), int(row[1]), bool(row[2])) if row else None

    def claim_compatible(
        self, worker_id: str, batch_key: str, limit: int, lease_s: float, *, spend_attempt: bool = True
    ) -> list[Job]:
        """Lease up to ``limit`` more queued jobs that may share a pipeline call (same batch key)."""
        if limit < 1:
            return []
        return self._claim(worker_id, lease_s, limit, {"b_batch_key": batch_key}, spend_attempt=spend_attempt)

    def _claim(
        self,
        worker_id: str,
        lease_s: float,
        limit: int,
        by: dict[str, Any],
        *,
        spend_attempt: bool = True,
        look: bool = True,
    ) -> list[Job]:
        """``by``: ``{"variant": ...}``, ``{"variants": [...]}`` or ``{"b_batch_key": ...}``
        (server/jobs/statements.py)."""
        kind = "batch" if "b_batch_key" in by else next(iter(by))
        if look and self.db.is_sqlite and not self._queued_any(kind, by):
            # SQLite has one writer at a time: a claim that finds nothing (a woken worker another
            # took the job from, a poll of an empty queue) must not queue for the write lock the
            # submits need. A WAL read takes no lock. A job queued just after this look is not
            # missed: its commit wakes a waiting worker, and workers poll anyway.
            return []
        now = now_ms()
        params = {
            **by,
            "limit": limit,
            "token": secrets.token_hex(16),
            "owner": worker_id,
            "expires_at": now + int(lease_s * 1000),
            "now": now,
        }
        with self.db.write_one() as conn:
            claimed = [Job.from_row(row) for row in self.db.run(conn, sql.CLAIM[kind, spend_attempt], params).all()]
        claimed.sort(key=lambda job: (-job.priority, job.created_at, job.id))
        return claimed

    def _queued_any(self, kind: str, by: dict[str, Any]) -> bool:
        """Whether a claim would find a job: a read, taking no lock."""
        with self.db.read() as conn:
            return self.db.run(conn, sql.QUEUED_ANY[kind], by).first() is not None

    def heartbeat(
        self, job_id: str, token: str, lease_s: float, step: int | None = None, total: int | None = None
    ) -> Heartbeat:
        now = now_ms()
        params = {"job_id": job_id, "token": token, "now": now, "b_step": step, "b_total": total}
        with self.db.write_one() as conn:
            row = conn.execute(sql.HEARTBEAT, {**params, "b_expires": now + int(lease_s * 1000)}).first()
        return Heartbeat(alive=row is not None, cancel_requested=bool(row and row[0]))

    def complete(
        self,
        job_id: str,
        token: str,
        outputs: list[str],
        inference_ms: int,
        steps: int | None = None,
        nsfw: list[bool] | None = None,
    ) -> bool:
        """End a leased job as completed (all ``steps`` done; ``nsfw``: the safety verdict per
        output); False when the lease is gone (the result is not taken)."""
        params = {"b_outputs": outputs, "b_inference_ms": inference_ms, "steps": steps, "b_nsfw": nsfw}
        return self._end_leased("complete", job_id, token, params)

    def fail(self, job_id: str, token: str, error: str, code: int, inference_ms: int = 0) -> bool:
        params = {"b_error": error, "b_error_code": code, "b_inference_ms": inference_ms}
        return self._end_leased("fail", job_id, token, params)

    def _end_leased(self, kind: str, job_id: str, token: str, params: dict[str, Any]) -> bool:
        """End a leased job (``kind``: complete, fail) and tell of it (``done``). False when the
        lease is gone (nothing was written, nothing told). PostgreSQL writes the end, its webhook
        delivery and its ``done`` NOTIFY in one statement (statements._delivering); SQLite the end
        and the delivery in one transaction of two, then publishes the message."""
        if self.db.is_postgres:
            params = {**params, "job_id": job_id, "token": token, "now": now_ms(), "done_channel": self._done_channel}
            with self.db.write_one() as conn:
                return self.db.run(conn, sql.END_LEASED[kind, True], params).first() is not None
        with self.db.write() as conn:
            now = now_ms()
            params = {**params, "job_id": job_id, "token": token, "now": now}
            row = self.db.run(conn, sql.END_LEASED[kind, False], params).first()
            done = None if row is None else self._ended(conn, job_id, row, now)
        if done:
            self.db.publish("done", done)
        return done is not None

    def release(self, job_id: str, token: str, *, refund: bool = True) -> bool:
        """Hand a job back to the queue (a worker told to stop), without spending an attempt
        (``refund=False``: a job claimed ahead that never began had spent none)."""
        with self.db.write_one() as conn:
            n = conn.execute(sql.RELEASE[refund], {"job_id": job_id, "token": token, "now": now_ms()}).rowcount
        if n:
            self.db.publish("jobs")
        return bool(n)

    def release_owned_by(self, worker_id: str) -> int:
        """At a worker's start-up: whatever its previous life held is not being worked on."""
        return self._reap(RUNNING & (jobs.c.lease_owner == worker_id))

    def reap(self) -> int:
        """Return jobs whose lease expired (their worker died) to the queue, or fail them at the cap."""
        return self._reap(RUNNING & (jobs.c.lease_expires_at < now_ms()))  # ix_jobs_lease

    def _reap(self, where: Any) -> int:
        now = now_ms()
        with self.db.write() as conn:
            expired = conn.execute(select(jobs.c.id, jobs.c.attempts, jobs.c.max_attempts).where(where)).all()
            requeued = 0
            ended: list[str] = []
            for job_id, attempts, cap in expired:
                again = (jobs.c.id == job_id) & where & (jobs.c.attempts == attempts)
                if attempts >= cap:
                    message = self._finish(
                        conn,
                        again,
                        job_id,
                        Status.FAILED,
                        error=f"The worker running this prediction stopped {attempts} times; giving up.",
                        error_code=INTERNAL_ERROR,
                        now=now,
                    )
                    if message:
                        ended.append(message)
                else:
                    requeued += conn.execute(update(jobs).where(again).values(**sql.requeued(now))).rowcount
        if expired:
            log.warning("reaped jobs with expired leases", count=len(expired), requeued=requeued)
            self.db.publish("jobs")
            for message in ended:
                self.db.publish("done", message)
        return len(expired)

    def _finish(
        self, conn: Connection, where: Any, job_id: str, status: Status, *, now: int, **values: Any
    ) -> str | None:
        """End a job (guarded by ``where``) and queue its webhook in the same transaction; the
        ``done`` message to publish once committed, None when ``where`` no longer held."""
        row = conn.execute(
            update(jobs).where(where).values(**sql.ended(status, now), **values).returning(*sql.ENDED_RETURNING)
        ).first()
        if row is None:
            return None
        return self._ended(conn, job_id, row, now)

    def _ended(self, conn: Connection, job_id: str, row: Any, now: int) -> str:
        """What ends a job besides its row (``row``: what the ending statement returned), in the
        same transaction: its webhook delivery (its counters: the triggers of migrations 0005 and
        0007); the ``done`` message to publish once committed, with what the end wrote."""
        ending = Ending.from_row(row)
        if row.webhook_url:
            self.outbox.enqueue(conn, job_id, row.webhook_url, now)
        return Done(job_id, webhook=bool(row.webhook_url), ending=ending).message()

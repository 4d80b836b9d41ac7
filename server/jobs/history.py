"""A caller's past predictions and what they used, read from the job rows: the history list
(newest first, by page), deletion, and per-day usage (count, GPU seconds) per model.

Every query is bounded by the API key (``ix_jobs_key_created``) or, for callers that see every
key, by time alone (``ix_jobs_created``): a page is an index range scan, however many jobs are stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, case, delete, func, select

from server.jobs.contract import TERMINAL, Job, Status
from server.jobs.db import Database
from server.jobs.models import jobs, webhook_deliveries

DAY_MS = 86_400_000


@dataclass(frozen=True)
class Scope:
    """Whose jobs a query sees: one key's (``key_id``), or every key's (``all_keys``: admins, auth off)."""

    key_id: str | None
    all_keys: bool = False

    def where(self) -> list[Any]:
        if self.all_keys:
            return []
        return [jobs.c.api_key_id.is_(None) if self.key_id is None else jobs.c.api_key_id == self.key_id]


@dataclass(frozen=True)
class HistoryQuery:
    page: int = 1  # from 1
    page_size: int = 20
    created_after: int | None = None  # epoch ms, inclusive
    created_before: int | None = None  # epoch ms, exclusive
    model: str | None = None
    statuses: tuple[Status, ...] = ()  # empty: any


@dataclass(frozen=True)
class HistoryPage:
    jobs: list[Job]
    has_more: bool


@dataclass
class UsageRow:
    """One (day, model) of a scope's jobs."""

    day: int  # days since the epoch (UTC)
    key_id: str | None  # the API key's id (None: auth off)
    model: str
    requests: int
    completed: int
    gpu_ms: int  # pipeline time of the jobs that ran


@dataclass
class DeleteOutcome:
    deleted: list[Job] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)  # queued or running: kept (cancel them first)


class History:
    def __init__(self, db: Database) -> None:
        self.db = db

    def page(self, scope: Scope, query: HistoryQuery) -> HistoryPage:
        where = [*scope.where(), *self._range(query.created_after, query.created_before)]
        if query.model:
            where.append(jobs.c.model == query.model)
        if query.statuses:
            where.append(jobs.c.status.in_([s.value for s in query.statuses]))
        stmt = (
            select(jobs)
            .where(*where)
            .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
            .offset((query.page - 1) * query.page_size)
            .limit(query.page_size + 1)  # one more: whether another page follows
        )
        with self.db.read() as conn:
            rows = conn.execute(stmt).all()
        found = [Job.from_row(row) for row in rows[: query.page_size]]
        return HistoryPage(jobs=found, has_more=len(rows) > query.page_size)

    def delete(self, scope: Scope, ids: Sequence[str]) -> DeleteOutcome:
        """Delete the scope's finished jobs among ``ids`` (and their webhook rows); return them so
        that their files can go too. Ids of other keys' jobs, or of no job, are ignored."""
        outcome = DeleteOutcome()
        if not ids:
            return outcome
        with self.db.write() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.id.in_(list(ids)), *scope.where())).all()
            found = [Job.from_row(row) for row in rows]
            done = [job for job in found if job.status in TERMINAL]
            outcome.in_flight = [job.id for job in found if job.status not in TERMINAL]
            gone = [job.id for job in done]
            if gone:
                conn.execute(delete(webhook_deliveries).where(webhook_deliveries.c.job_id.in_(gone)))
                conn.execute(delete(jobs).where(jobs.c.id.in_(gone), jobs.c.status.in_(list(TERMINAL))))
            outcome.deleted = done
        return outcome

    def usage(self, scope: Scope, since: int | None, until: int | None, model: str | None = None) -> list[UsageRow]:
        """Per UTC day, API key and model: requests, completed ones, GPU milliseconds; oldest day first."""
        day = jobs.c.created_at // DAY_MS  # integer division on both databases
        where = [*scope.where(), *self._range(since, until)]
        if model:
            where.append(jobs.c.model == model)
        completed = func.sum(case((jobs.c.status == Status.COMPLETED.value, 1), else_=0))
        stmt = (
            select(
                day.label("day"),
                jobs.c.api_key_id,
                jobs.c.model,
                func.count(),
                completed,
                func.coalesce(func.sum(jobs.c.inference_ms), 0),
            )
            .where(*where)
            .group_by(day, jobs.c.api_key_id, jobs.c.model)
            .order_by(day, jobs.c.api_key_id, jobs.c.model)
        )
        with self.db.read() as conn:
            rows = conn.execute(stmt).all()
        return [UsageRow(int(d), k, str(m), int(n), int(c or 0), int(ms or 0)) for d, k, m, n, c, ms in rows]

    def count_by_model(self, scope: Scope, statuses: Sequence[Status]) -> dict[str, int]:
        """The scope's jobs in ``statuses`` per model, all time (what a key has spent, or holds)."""
        with self.db.read() as conn:
            return self.counts_in(conn, scope, statuses)

    @staticmethod
    def counts_in(conn: Connection, scope: Scope, statuses: Sequence[Status]) -> dict[str, int]:
        """``count_by_model`` inside a transaction already open (the store's admission)."""
        stmt = (
            select(jobs.c.model, func.count())
            .where(*scope.where(), jobs.c.status.in_([s.value for s in statuses]))
            .group_by(jobs.c.model)
        )
        return {str(m): int(n) for m, n in conn.execute(stmt).all()}

    @staticmethod
    def _range(after: int | None, before: int | None) -> list[Any]:
        where = []
        if after is not None:
            where.append(jobs.c.created_at >= after)
        if before is not None:
            where.append(jobs.c.created_at < before)
        return where

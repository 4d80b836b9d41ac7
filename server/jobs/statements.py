"""The job store's hot statements, built once with bound parameters.

A statement built per call costs its construction and its cache key on every request or job (on
a 2-core machine about half of a claim's and a completion's time went there, not to the database).
A statement built once keeps its cache key, and its compiled form stays in the engine's cache; only
the parameters change. Each is used by ``JobStore`` (server/jobs/store.py) as documented there.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BindParameter, Select, Update, bindparam, func, insert, literal, select, update

from server.jobs.contract import Ending, Status
from server.jobs.models import QUEUED, jobs
from server.jobs.models import webhook_deliveries as outbox

# Parameter names are never column names: SQLAlchemy keeps those for an UPDATE's own SET values.

GET_JOB = select(jobs).where(jobs.c.id == bindparam("job_id"))
INSERT_JOB = insert(jobs)

# What a claim looks for: queued jobs of some variants (a worker's next job), or of one batch key
# (more jobs for the pipeline call it is about to make).
_BY = {
    "variants": jobs.c.variant.in_(bindparam("variants", expanding=True)),
    "batch": jobs.c.batch_key == bindparam("b_batch_key"),
}


def _claim(by: str, spend_attempt: bool):  # type: ignore[no-untyped-def]
    # A CTE, not "id IN (subquery)": PostgreSQL may evaluate a LIMITed sub-select with SKIP LOCKED
    # more than once inside the UPDATE, and then claims fewer rows than it may.
    picked = (
        select(jobs.c.id)
        .where(QUEUED, _BY[by])
        .order_by(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True)
        .cte("picked")
    )
    # The status as a literal here too (QUEUED): with a bound value SQLite ran the same plan about
    # six times slower (170 us against 30 per claim, measured on the statement alone).
    return (
        update(jobs)
        .where(jobs.c.id == picked.c.id, QUEUED)
        .values(
            status=Status.PROCESSING,
            attempts=jobs.c.attempts + 1 if spend_attempt else jobs.c.attempts,
            lease_token=bindparam("token"),
            lease_owner=bindparam("owner"),
            lease_expires_at=bindparam("expires_at"),
            started_at=bindparam("now"),
            progress_step=0,
            updated_at=bindparam("now"),
        )
        .returning(*jobs.c)
    )


# CLAIM[by, spend_attempt]; QUEUED_ANY[by]: whether such a claim would find a job (a read).
CLAIM = {(by, spend): _claim(by, spend) for by in _BY for spend in (True, False)}
QUEUED_ANY = {by: select(jobs.c.id).where(QUEUED, where).limit(1) for by, where in _BY.items()}

_LEASED = (
    jobs.c.id == bindparam("job_id"),
    jobs.c.lease_token == bindparam("token"),
    jobs.c.status == Status.PROCESSING,
)

# A job claimed ahead starts: its attempt is spent and its clock starts now.
BEGIN = (
    update(jobs)
    .where(*_LEASED)
    .values(attempts=jobs.c.attempts + 1, started_at=bindparam("now"), updated_at=bindparam("now"))
    .returning(jobs.c.attempts, jobs.c.started_at, jobs.c.cancel_requested)
)


def _given_or_kept(param: str, column: Any) -> Any:
    """``param`` where it is given, else the column's value unchanged (NULL: no change)."""
    return func.coalesce(bindparam(param, type_=column.type), column)


def ended(status: Status, now: Any) -> dict[str, Any]:
    """A job's values once it ended (``now``: a value or a parameter): no lease, no cancel pending."""
    return {
        "status": status,
        "finished_at": now,
        "updated_at": now,
        "lease_token": None,
        "lease_expires_at": None,
        "cancel_requested": False,
    }


# What a statement that ends a job returns: its webhook URL (a delivery is due if it has one) and
# what the end wrote (``Ending``: the ``done`` message carries it to whoever waits for the job).
ENDED_RETURNING = (jobs.c.webhook_url, *(jobs.c[name] for name in Ending.columns()))


# A leased job's completion. ``steps`` NULL: every step of the run was done (progress_total).
COMPLETE = (
    update(jobs)
    .where(*_LEASED)
    .values(
        **ended(Status.COMPLETED, bindparam("now")),
        outputs=bindparam("b_outputs", type_=jobs.c.outputs.type),
        inference_ms=bindparam("b_inference_ms"),
        progress_step=_given_or_kept("steps", jobs.c.progress_total),
        progress_total=_given_or_kept("steps", jobs.c.progress_total),
        nsfw=bindparam("b_nsfw", type_=jobs.c.nsfw.type),
    )
    .returning(*ENDED_RETURNING)
)

# The lease's renewal, with the progress where the run reports one (NULL: unchanged); it answers
# whether a cancel was asked for.
HEARTBEAT = (
    update(jobs)
    .where(*_LEASED)
    .values(
        lease_expires_at=bindparam("b_expires"),
        updated_at=bindparam("now"),
        progress_step=_given_or_kept("b_step", jobs.c.progress_step),
        progress_total=_given_or_kept("b_total", jobs.c.progress_total),
    )
    .returning(jobs.c.cancel_requested)
)

# A leased job's failure.
FAIL = (
    update(jobs)
    .where(*_LEASED)
    .values(
        **ended(Status.FAILED, bindparam("now")),
        error=bindparam("b_error"),
        error_code=bindparam("b_error_code"),
        inference_ms=bindparam("b_inference_ms"),
    )
    .returning(*ENDED_RETURNING)
)


def requeued(now: Any) -> dict[str, Any]:
    """A job's values back in the queue: no lease, no progress (``now``: a value or a parameter)."""
    return {
        "status": Status.CREATED,
        "lease_token": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "progress_step": 0,
        "updated_at": now,
    }


def _release(refund: bool) -> Any:
    values = requeued(bindparam("now"))
    if refund:
        values["attempts"] = jobs.c.attempts - 1
    return update(jobs).where(*_LEASED).values(**values)


# RELEASE[refund]: a leased job back to the queue (refund: the attempt it spent is given back).
RELEASE = {refund: _release(refund) for refund in (True, False)}


def new_delivery(now: Any) -> dict[str, Any]:
    """A webhook delivery's first values, besides its job and URL (``now``: a value or a parameter):
    due at once, never tried."""
    return {"attempts": 0, "next_attempt_at": now, "gave_up": False, "last_error": "", "created_at": now}


def _delivering(ending: Update) -> Select:  # type: ignore[type-arg]
    """PostgreSQL: ``ending`` (COMPLETE, FAIL) and, for a job with a webhook, its delivery in the
    outbox, as ONE statement (a data-modifying CTE), atomic by itself: run alone in autocommit it is
    one round trip where a transaction of the two took four. It returns what ``ending`` returns.
    SQLite has no data-modifying CTEs: there the delivery is a second statement in the same
    transaction (WebhookOutbox.enqueue)."""
    ended = ending.returning(jobs.c.id).cte("ended")  # returning() adds to what it returns
    first = {
        name: value if isinstance(value, BindParameter) else literal(value, outbox.c[name].type)
        for name, value in new_delivery(bindparam("now")).items()
    }
    delivery = insert(outbox).from_select(
        ["job_id", "url", *first],
        select(ended.c.id, ended.c.webhook_url, *first.values()).where(ended.c.webhook_url.is_not(None)),
    )
    return select(*(ended.c[column.name] for column in ENDED_RETURNING)).add_cte(delivery.cte("delivery"))


# END_LEASED[kind, delivering]: COMPLETE or FAIL, alone or with the webhook delivery (PostgreSQL).
END_LEASED = {
    (kind, delivering): _delivering(statement) if delivering else statement
    for kind, statement in (("complete", COMPLETE), ("fail", FAIL))
    for delivering in (False, True)
}

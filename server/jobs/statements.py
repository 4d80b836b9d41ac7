"""The job store's hot statements, built once with bound parameters.

A statement built per call costs its construction and its cache key on every request or job (on
a 2-core machine about half of a claim's and a completion's time went there, not to the database).
A statement built once keeps its cache key, and its compiled form stays in the engine's cache; only
the parameters change. Each is used by ``JobStore`` (server/jobs/store.py) as documented there.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    BindParameter,
    ColumnElement,
    Select,
    Text,
    Update,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.sql.selectable import CTE

from server.jobs.contract import MAX_MESSAGE_BYTES, Ending, Status
from server.jobs.models import QUEUED, idle_waiters, jobs
from server.jobs.models import webhook_deliveries as outbox

# Parameter names are never column names: SQLAlchemy keeps those for an UPDATE's own SET values.

GET_JOB = select(jobs).where(jobs.c.id == bindparam("job_id"))
INSERT_JOB = insert(jobs)

# What a claim looks for: queued jobs of some variants (a worker's next job), or of one batch key
# (more jobs for the pipeline call it is about to make).
_BY = {
    # One variant (every worker's claim): no IN list, so the claim can run on the driver (db.run).
    "variant": jobs.c.variant == bindparam("variant"),
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


def _done_message(ended: CTE) -> ColumnElement[Any]:
    """PostgreSQL: the ``done`` message of the job ``ended`` (contract.Done's, built from the row the
    ending wrote, so that it can be sent by the ending's own statement): its ending where the
    message has room for it, else the id and the webhook flag alone (the listener reads the row)."""

    def obj(*pairs: tuple[str, Any]) -> ColumnElement[Any]:
        items: list[Any] = []
        for name, value in pairs:
            items += [literal_column(f"'{name}'"), value]  # names: Done's and Ending's own fields
        return func.json_build_object(*items)

    head = (("id", ended.c.id), ("webhook", ended.c.webhook_url.is_not(None)))
    full = cast(obj(*head, ("ending", obj(*((name, ended.c[name]) for name in Ending.columns())))), Text)
    return case((func.octet_length(full) <= MAX_MESSAGE_BYTES, full), else_=cast(obj(*head), Text))


def _delivering(ending: Update) -> Select:  # type: ignore[type-arg]
    """PostgreSQL: ``ending`` (COMPLETE, FAIL), for a job with a webhook its delivery in the outbox,
    and its ``done`` NOTIFY (channel: the ``done_channel`` parameter), as ONE statement (a
    data-modifying CTE), atomic by itself: run alone in autocommit it is one round trip and one
    commit where a transaction of the first two and the NOTIFY's own took five and two. The NOTIFY
    goes out only when the ending matched (a lost lease writes and tells nothing), and with the
    ending's commit. It returns what ``ending`` returns. SQLite has no data-modifying CTEs: there
    the delivery is a second statement in the same transaction (WebhookOutbox.enqueue), and the
    ``done`` message is published after the commit."""
    ended = ending.returning(jobs.c.id).cte("ended")  # returning() adds to what it returns
    first = {
        name: value if isinstance(value, BindParameter) else literal(value, outbox.c[name].type)
        for name, value in new_delivery(bindparam("now")).items()
    }
    delivery = insert(outbox).from_select(
        ["job_id", "url", *first],
        select(ended.c.id, ended.c.webhook_url, *first.values()).where(ended.c.webhook_url.is_not(None)),
    )
    told = func.pg_notify(bindparam("done_channel"), _done_message(ended)).label("told")
    return select(*(ended.c[column.name] for column in ENDED_RETURNING), told).add_cte(delivery.cte("delivery"))


# END_LEASED[kind, delivering]: COMPLETE or FAIL, alone or with the webhook delivery (PostgreSQL).
END_LEASED = {
    (kind, delivering): _delivering(statement) if delivering else statement
    for kind, statement in (("complete", COMPLETE), ("fail", FAIL))
    for delivering in (False, True)
}


# --- PostgreSQL: a job's wake-up, and a submit in one statement ------------------------------------

# The advisory lock that serialises admissions (JobStore._admit), alone or inside SUBMIT, or taken
# by the admission function of migration 0010 (``qwen_edit_admit``).
ADMISSION_LOCK_ID = 727002
ADMISSION_LOCK = select(func.pg_advisory_xact_lock(ADMISSION_LOCK_ID))
# The SQLSTATE ``qwen_edit_admit`` raises when the queue is full (class QE: none of PostgreSQL's).
QUEUE_FULL_SQLSTATE = "QEQ01"
# The queue cap checked in SUBMIT itself: the lock, then the count, in a snapshot of their own.
QUEUE_CHECK = select(func.qwen_edit_admit(bindparam("a_queue_cap", type_=BigInteger)))

# A job's INSERT with parameters that are not column names (see the top): job_values(job.to_row()).
_JOB_PARAMS = {column.name: bindparam(f"j_{column.name}", type_=column.type) for column in jobs.c}


def job_values(row: dict[str, Any]) -> dict[str, Any]:
    """``Job.to_row()`` as the parameters of SUBMIT."""
    return {f"j_{name}": value for name, value in row.items()}


# A job's columns that a handoff sets otherwise than a queued job's (the ``h_<column>`` parameters
# of SUBMIT[..., True]: statements.handoff_values), besides ``lease_owner`` (the picked worker's).
HANDED_COLUMNS = ("status", "attempts", "lease_token", "lease_expires_at", "started_at")


def handoff_values(row: dict[str, Any]) -> dict[str, Any]:
    """The handed job's ``to_row()`` as the ``h_<column>`` parameters of SUBMIT[..., True]."""
    return {f"h_{name}": row[name] for name in HANDED_COLUMNS}


def _alive(pid: Any) -> ColumnElement[bool]:
    """Whether the backend ``pid`` is still connected: a worker that died left its row behind."""
    return exists(select(literal_column("1")).select_from(func.pg_stat_get_activity(pid).alias("backend")))


def _wake_one(*, job: bool = False, admission: str = "", handoff: bool = False) -> Select:  # type: ignore[type-arg]
    """The submitter's side of wake-one: take the longest-idle waiter of the topic (or of any, '*')
    whose connection is alive and notify its channel, else the shared one (binds ``topic``,
    ``shared``, ``payload``). Run inside the submit's transaction, the NOTIFY goes out with its
    commit.

    ``job``: with the job's INSERT (binds ``j_<column>``) in the same statement. ``admission``:
    "locked", with the admission lock taken too, so that the caps' counts, the next statement, read
    every job admitted before this one (each committed before its lock was released; where the lock
    is taken inside this statement does not matter: the counts read after it, in a snapshot of their
    own); "checked", with the queue cap checked too (binds ``a_queue_cap``: QUEUE_CHECK, the lock and
    the count in a function, migration 0010), so that the whole submit is this one statement; "": no
    caps.
    ``handoff`` (with ``job``): where the waiter picked is a worker of the job's variant (its row has
    an ``owner``, and the topic itself, not '*'), the job is inserted leased to it (binds
    ``h_<column>``: HANDED_COLUMNS) and its channel gets the ``handoff`` parameter
    (contract.Handoff) instead of ``payload``: it starts without a claim."""
    waiter = (
        select(idle_waiters.c.channel)
        .where(
            or_(idle_waiters.c.topic == bindparam("topic"), idle_waiters.c.topic == literal_column("'*'")),
            _alive(idle_waiters.c.pid),
        )
        .order_by(idle_waiters.c.since)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    picked = (
        delete(idle_waiters)
        .where(idle_waiters.c.channel == waiter)
        .returning(idle_waiters.c.channel, idle_waiters.c.owner, idle_waiters.c.topic)
        .cte("picked")
    )
    channel = func.coalesce(select(picked.c.channel).scalar_subquery(), bindparam("shared"))
    payload: Any = bindparam("payload")
    values: dict[str, Any] = dict(_JOB_PARAMS)
    if handoff:
        # A worker of this very variant: one that waits for any ('*') runs another model.
        owner = select(picked.c.owner).where(picked.c.topic == bindparam("topic")).scalar_subquery()
        handed = owner.is_not(None)
        for name in HANDED_COLUMNS:
            given = bindparam(f"h_{name}", type_=jobs.c[name].type)
            values[name] = case((handed, given), else_=_JOB_PARAMS[name])
        values["lease_owner"] = owner
        payload = case((handed, bindparam("handoff")), else_=payload)
    stmt = select(func.pg_notify(channel, payload))
    if job:
        stmt = stmt.add_cte(insert(jobs).values(values).cte("job"))  # a data-modifying CTE always runs
    if admission:
        stmt = stmt.select_from({"locked": ADMISSION_LOCK, "checked": QUEUE_CHECK}[admission].subquery("admission"))
    return stmt


WAKE_ONE = _wake_one()
# SUBMIT[admission, handoff]: a job, its wake-up and, where the submit is admitted against caps, the
# admission lock ("locked") or the queue cap's whole check ("checked"); ``handoff``: the job handed to
# the waiter picked, where that is a worker.
SUBMIT = {
    (admission, handoff): _wake_one(job=True, admission=admission, handoff=handoff)
    for admission in ("", "locked", "checked")
    for handoff in (False, True)
}

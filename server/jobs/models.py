"""The job store's tables (SQLAlchemy Core), shared by SQLite and PostgreSQL.

Times are integer epoch milliseconds: portable across both databases and cheap to compare.
The schema itself is created and changed only by the Alembic migrations beside this file; the
typed rows that the processes exchange are in contract.py.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    literal_column,
    text,
)

metadata = MetaData()


jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("model", String(128), nullable=False),
    Column("variant", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("input", JSON, nullable=False),  # what the client sent (inline images replaced by links)
    Column("params", JSON, nullable=False),  # what the worker runs: resolved seed, sizes, image refs
    Column("base_url", Text, nullable=False),  # for absolute links in results and webhooks
    Column("outputs", JSON, nullable=False, default=list),  # storage keys
    Column("output_format", String(8), nullable=False),
    Column("base64_output", Boolean, nullable=False, default=False),
    Column("seed", BigInteger, nullable=False),
    Column("error", Text, nullable=False, default=""),
    Column("error_code", Integer, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("lease_token", String(32), nullable=True),
    Column("lease_owner", String(128), nullable=True),
    Column("lease_expires_at", BigInteger, nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("progress_step", Integer, nullable=False, default=0),
    Column("progress_total", Integer, nullable=False, default=0),
    Column("inference_ms", Integer, nullable=False, default=0),
    Column("webhook_url", Text, nullable=True),
    Column("api_key_id", String(16), nullable=True),
    # Jobs with equal keys may share one pipeline call (JobParams.batch_key); NULL: never batched.
    Column("batch_key", String(64), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("started_at", BigInteger, nullable=True),
    Column("finished_at", BigInteger, nullable=True),
    Column("updated_at", BigInteger, nullable=False),
    # The safety checker's verdict per output (has_nsfw_contents); NULL: not checked.
    Column("nsfw", JSON, nullable=True),
    # The running jobs' leases, for the reaper (migration 0008: partial). Over every status it
    # also served "status = 'created'", and SQLite, which has no statistics until someone runs
    # ANALYZE, then planned the claim on it: every queued job read and sorted, at each claim.
    Index(
        "ix_jobs_lease",
        "lease_expires_at",
        sqlite_where=text("status = 'processing'"),
        postgresql_where=text("status = 'processing'"),
    ),
    Index("ix_jobs_finished", "finished_at"),
    # Partial indexes over the queued (or in-flight) jobs only, in the claim's order: a claim, a
    # per-key count and the queue walk cost what they touch, not the table (migration 0005). The
    # queries spell the status as a literal: a partial index is only usable when the database can
    # see that the query's condition implies the index's.
    Index(
        "ix_jobs_claim",
        text("priority DESC"),
        "created_at",
        "id",
        sqlite_where=text("status = 'created'"),
        postgresql_where=text("status = 'created'"),
    ),
    Index(
        "ix_jobs_claim_batch",
        "batch_key",
        text("priority DESC"),
        "created_at",
        "id",
        sqlite_where=text("status = 'created'"),
        postgresql_where=text("status = 'created'"),
    ),
    Index(
        "ix_jobs_in_flight",
        "api_key_id",
        sqlite_where=text("status IN ('created', 'processing')"),
        postgresql_where=text("status IN ('created', 'processing')"),
    ),
    Index("ix_jobs_key_created", "api_key_id", "created_at", "id"),  # history and usage per key
    Index("ix_jobs_created", "created_at", "id"),  # history of every key (admins, auth off)
)

# Job counters (stats.py): totals, and on PostgreSQL the deltas not yet folded into them.
job_stats = Table(
    "job_stats",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

job_stat_deltas = Table(
    "job_stat_deltas",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),
    Column("delta", BigInteger, nullable=False),
    Index("ix_job_stat_deltas_name", "name"),
)

# The partial indexes' conditions, as literals: a bound parameter would hide from the planner that
# the query's condition implies the index's, and it would scan the table instead.
QUEUED = jobs.c.status == literal_column("'created'")
RUNNING = jobs.c.status == literal_column("'processing'")
IN_FLIGHT_ROWS = jobs.c.status.in_([literal_column("'created'"), literal_column("'processing'")])

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("job_id", String(32), primary_key=True),
    Column("url", Text, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("lease_expires_at", BigInteger, nullable=True),
    Column("delivered_at", BigInteger, nullable=True),
    Column("gave_up", Boolean, nullable=False, default=False),
    Column("last_error", Text, nullable=False, default=""),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_webhooks_due", "delivered_at", "gave_up", "next_attempt_at"),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("variant", String(32), nullable=False),
    Column("state", String(16), nullable=False),  # loading, ready, stopped, failed
    Column("detail", Text, nullable=False, default=""),
    Column("started_at", BigInteger, nullable=False),
    Column("heartbeat_at", BigInteger, nullable=False),
)

# One row per stored upload (the signed PUT's one-time claim, and retention by key).
uploads = Table(
    "uploads",
    metadata,
    Column("key", String(512), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("api_key_id", String(16), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_uploads_created", "created_at"),
)

# PostgreSQL wake-one: one row per worker waiting for jobs right now, keyed by its own LISTEN channel
# (server/jobs/notify.py). Unlogged there (migration 0006); unused on SQLite. ``owner``: the waiting
# worker's id, to which a submit may hand its job (migration 0009; NULL: a waiter that only wakes).
idle_waiters = Table(
    "idle_waiters",
    metadata,
    Column("channel", String(63), primary_key=True),
    Column("topic", String(64), nullable=False),
    Column("pid", Integer, nullable=False),  # the listening backend's, to forget dead ones
    Column("since", BigInteger, nullable=False),
    Column("owner", String(128), nullable=True),
)

# Small server-wide values every replica must agree on (webhook secret, upload signing key).
meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

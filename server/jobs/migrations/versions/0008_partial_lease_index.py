"""The lease index over the running jobs only.

``ix_jobs_lease`` was ``(status, lease_expires_at)`` over every job. SQLite keeps no statistics
until ANALYZE runs (nothing runs it on an embedded store), and without them it took that index for
the claim's ``status = 'created'``: it read every queued job and sorted them at each claim (7 ms
at 20,000 queued, growing with the queue) instead of walking ``ix_jobs_claim`` to the first. As a
partial index on the running jobs it serves the reaper alone (``status = 'processing' AND
lease_expires_at < now``), and the claim's plan no longer depends on statistics.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_RUNNING = sa.text("status = 'processing'")


def upgrade() -> None:
    op.drop_index("ix_jobs_lease", table_name="jobs")
    op.create_index("ix_jobs_lease", "jobs", ["lease_expires_at"], sqlite_where=_RUNNING, postgresql_where=_RUNNING)


def downgrade() -> None:
    op.drop_index("ix_jobs_lease", table_name="jobs")
    op.create_index("ix_jobs_lease", "jobs", ["status", "lease_expires_at"])

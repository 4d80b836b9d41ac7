"""Dynamic batching: a batch key per job, indexed for claiming compatible queued jobs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column: a plain ADD COLUMN on both databases, no table rebuild on SQLite.
    op.add_column("jobs", sa.Column("batch_key", sa.String(64), nullable=True))
    op.create_index("ix_jobs_batch", "jobs", ["status", "batch_key", "priority", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_batch", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("batch_key")

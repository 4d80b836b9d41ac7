"""History and safety: a prediction list per API key, newest first, stays an index range scan at
millions of rows; one safety verdict per output.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The caller's predictions (history, usage) by time; every key's (admins, auth off) by time.
    op.create_index("ix_jobs_key_created", "jobs", ["api_key_id", "created_at", "id"])
    op.create_index("ix_jobs_created", "jobs", ["created_at", "id"])
    # has_nsfw_contents, one boolean per output; NULL: not checked (no safety checker).
    op.add_column("jobs", sa.Column("nsfw", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("nsfw")
    op.drop_index("ix_jobs_created", table_name="jobs")
    op.drop_index("ix_jobs_key_created", table_name="jobs")

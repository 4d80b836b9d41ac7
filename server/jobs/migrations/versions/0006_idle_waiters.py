"""Wake one worker on PostgreSQL: the waiters idle right now, one row each, so that a submit can
pick one and notify its own channel (server/jobs/notify.py). Unlogged on PostgreSQL: the rows live
as long as the waits, so a crash that empties the table loses nothing.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "idle_waiters",
        sa.Column("channel", sa.String(63), primary_key=True),
        sa.Column("topic", sa.String(64), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("since", sa.BigInteger, nullable=False),
        prefixes=["UNLOGGED"] if postgres else [],
    )


def downgrade() -> None:
    op.drop_table("idle_waiters")

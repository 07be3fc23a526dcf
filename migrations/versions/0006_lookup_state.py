"""Lookup state (sa_shardkit.lookups): whether each lookup is built, and its build progress.

Revision ID: 0006_lookup_state
Revises: 0005_saga_digest
Create Date: 2026-12-01 22:15:00

Reads trust a lookup only once ``shardkit lookups build`` marked it ready here (on the first ring
shard; the final state is copied to every shard). The lookup tables themselves belong to the models'
metadata (``shardkit_lookup_<table>_<column>``) and come with the application's own revisions.
Additive and idempotent (IF NOT EXISTS).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006_lookup_state"
down_revision: str | Sequence[str] | None = "0005_saga_digest"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shardkit_lookup_state",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_shardkit_lookup_state"),
        comment="sa_shardkit lookups: whether each lookup is built (reads use it only then), build progress",
        if_not_exists=True,
    )


def downgrade() -> None:
    # Forgets which lookups are built: reads scatter until `shardkit lookups build` runs again.
    op.drop_table("shardkit_lookup_state", if_exists=True)

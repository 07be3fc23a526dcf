"""Saga tables: the saga log and the step receipts (sa_shardkit.saga), on every shard.

Revision ID: 0002_sagas
Revises: 0001
Create Date: 2026-11-27 09:30:00

Every shard can be a saga's home (its log row lives on the initiating customer's shard) and a step's
shard (its receipt is written with the step's effect), so both tables exist on every shard. They are
sa_shardkit infrastructure, keyed by saga id rather than by a customer key, and are mapped by no model.
Additive and idempotent (IF NOT EXISTS), so shards that already ran ``create_saga_tables()`` are fine.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_sagas"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shardkit_sagas",
        sa.Column("saga_id", sa.String(length=100), nullable=False),
        sa.Column("saga_type", sa.String(length=100), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column("status", sa.String(length=100), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("compensating", sa.Boolean(), nullable=False),
        sa.Column("failure", sa.String(length=100), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(length=200), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("saga_id"),
        comment="sa_shardkit saga log: one row per saga on its home shard",
        if_not_exists=True,
    )
    op.create_index(
        "ix_shardkit_sagas_open_lease",
        "shardkit_sagas",
        ["lease_until"],
        unique=False,
        postgresql_where=sa.text("finished_at IS NULL"),
        if_not_exists=True,
    )
    op.create_table(
        "shardkit_saga_receipts",
        sa.Column("saga_id", sa.String(length=100), nullable=False),
        sa.Column("step", sa.String(length=100), nullable=False),
        sa.Column("phase", sa.String(length=4), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=100), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("saga_id", "step", "phase", name="pk_shardkit_saga_receipts"),
        comment="sa_shardkit saga step receipts: idempotency records written with each step's effect",
        if_not_exists=True,
    )


def downgrade() -> None:
    # Drops the saga history: unfinished sagas can no longer be recovered, receipts no longer dedupe.
    op.drop_table("shardkit_saga_receipts", if_exists=True)
    op.drop_index("ix_shardkit_sagas_open_lease", table_name="shardkit_sagas", if_exists=True)
    op.drop_table("shardkit_sagas", if_exists=True)

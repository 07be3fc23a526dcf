"""Fleet-wide sequences (sa_shardkit.sequences), on every shard.

Revision ID: 0004_sequences
Revises: 0003_2pc
Create Date: 2026-12-01 21:15:00

One row per sequence, on the sequence shard only (the first configured shard unless configured
otherwise); the table exists on every shard so any shard can be designated. Additive and idempotent
(IF NOT EXISTS), so shards that already ran ``create_sequence_tables()`` are fine.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_sequences"
down_revision: str | Sequence[str] | None = "0003_2pc"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shardkit_sequences",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("next_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
        comment="sa_shardkit fleet-wide sequences: the next unreserved id of each (used on one shard)",
        if_not_exists=True,
    )


def downgrade() -> None:
    # Forgets every sequence's position: ids handed out again from the start would collide.
    op.drop_table("shardkit_sequences", if_exists=True)

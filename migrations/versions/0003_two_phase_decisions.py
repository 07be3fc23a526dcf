"""Two-phase commit decisions (sa_shardkit.saga.twophase), on every shard.

Revision ID: 0003_2pc
Revises: 0002_sagas
Create Date: 2026-11-27 09:45:00

Any shard can coordinate a two-phase transaction (the first participant), so every shard has the
table. Additive and idempotent (IF NOT EXISTS).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_2pc"
down_revision: str | Sequence[str] | None = "0002_sagas"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shardkit_2pc_decisions",
        sa.Column("txid", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=8), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("txid"),
        comment="sa_shardkit two-phase commit decisions, on the coordinator shard",
        if_not_exists=True,
    )


def downgrade() -> None:
    # Only safe with no prepared sa_shardkit transactions left (run resolve_in_doubt first).
    op.drop_table("shardkit_2pc_decisions", if_exists=True)

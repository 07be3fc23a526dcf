"""unsafe: CREATE INDEX without CONCURRENTLY (blocks writes to orders on each shard)

Revision ID: u0000000005
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "u0000000005"
down_revision = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("SET LOCAL statement_timeout = '1min'")
    op.create_index("ix_orders_created_at", "orders", ["created_at"])


def downgrade() -> None:
    pass

"""unsafe: a unique index on orders.order_id alone (unique per shard only)

Revision ID: u0000000007
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "u0000000007"
down_revision = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("SET LOCAL statement_timeout = '1min'")
    with op.get_context().autocommit_block():
        op.create_index(
            "uq_orders_order_id",
            "orders",
            ["order_id"],
            unique=True,
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    pass

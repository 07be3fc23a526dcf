"""unsafe: order_items with a primary key that leaves out the shard key customer_id

Revision ID: u0000000003
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "u0000000003"
down_revision = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("SET LOCAL statement_timeout = '1min'")
    op.create_table(
        "order_items",
        sa.Column("customer_id", sa.BigInteger(), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("item_no", sa.BigInteger(), nullable=False),
        sa.Column("sku", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("order_id", "item_no"),
    )


def downgrade() -> None:
    pass

"""unsafe: a foreign key order_items -> orders on order_id alone (the parent may be on another shard)

Revision ID: u0000000004
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "u0000000004"
down_revision = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("SET LOCAL statement_timeout = '1min'")
    op.create_foreign_key(
        "fk_order_items_order", "order_items", "orders", ["order_id"], ["order_id"], postgresql_not_valid=True
    )


def downgrade() -> None:
    pass

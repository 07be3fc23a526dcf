"""Demo schema: customers, orders, order_items (sharded by customer_id) and products (reference).

Revision ID: 0001
Revises: (base)
Create Date: 2026-11-27 09:00:35

Runs on every shard, one shard at a time, each in its own transaction. Every sharded table has the
shard key (customer_id) in its primary key, so a customer's rows and their foreign keys stay on one
shard. Idempotent: IF NOT EXISTS on every table and index, so a shard that already has the schema
(created by hand or by metadata.create_all) is brought under Alembic without errors.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "customers",
        sa.Column("customer_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("balance", sa.Numeric(precision=14, scale=2), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("customer_id"),
        if_not_exists=True,
    )
    op.create_table(
        "products",
        sa.Column("sku", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("price", sa.Numeric(precision=14, scale=2), nullable=False),
        sa.PrimaryKeyConstraint("sku"),
        if_not_exists=True,
    )
    op.create_table(
        "orders",
        sa.Column("customer_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("total", sa.Numeric(precision=14, scale=2), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.customer_id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("customer_id", "order_id"),
        if_not_exists=True,
    )
    op.create_index(op.f("ix_orders_status"), "orders", ["status"], unique=False, if_not_exists=True)
    op.create_table(
        "order_items",
        sa.Column("customer_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("item_no", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("sku", sa.String(length=64), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("unit_price", sa.Numeric(precision=14, scale=2), nullable=False),
        sa.ForeignKeyConstraint(
            ["customer_id", "order_id"], ["orders.customer_id", "orders.order_id"], ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("customer_id", "order_id", "item_no"),
        if_not_exists=True,
    )


def downgrade() -> None:
    # Destructive by nature: downgrading past 0001 drops the demo data on the shard.
    op.drop_table("order_items", if_exists=True)
    op.drop_index(op.f("ix_orders_status"), table_name="orders", if_exists=True)
    op.drop_table("orders", if_exists=True)
    op.drop_table("products", if_exists=True)
    op.drop_table("customers", if_exists=True)

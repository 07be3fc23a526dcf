"""expand: add customers.full_name (nullable) and backfill it from customers.name on every shard

Step 1 of renaming ``customers.name`` to ``customers.full_name`` without a rename: the new column is
added nullable (no table rewrite, no long lock) and filled from the old one. The backfill runs on each
shard, for that shard's rows only, because the sharded env runs every revision once per shard. It is
idempotent (``WHERE full_name IS NULL``), so re-running it after a half-finished rollout is safe, and
it copies again any row the old code wrote in between.

Revision ID: a1e5c0de0001
Revises:
Create Date: 2026-11-27 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "a1e5c0de0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("SET LOCAL statement_timeout = '5min'")
    op.add_column("customers", sa.Column("full_name", sa.Text(), nullable=True), if_not_exists=True)
    op.execute("UPDATE customers SET full_name = name WHERE full_name IS NULL")


def downgrade() -> None:
    op.drop_column("customers", "full_name", if_exists=True)

"""unsafe: make the shard key customers.customer_id nullable

Revision ID: u0000000008
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "u0000000008"
down_revision = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("SET LOCAL statement_timeout = '1min'")
    op.alter_column("customers", "customer_id", existing_type=sa.BigInteger(), nullable=True)


def downgrade() -> None:
    pass

"""unsafe: add customers.email NOT NULL with no default (fails on every shard with rows)

Revision ID: u0000000006
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "u0000000006"
down_revision = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("SET LOCAL statement_timeout = '1min'")
    op.add_column("customers", sa.Column("email", sa.Text(), nullable=False))


def downgrade() -> None:
    pass

"""unsafe: drop orders.status in a revision not marked as a contract step

Revision ID: u0000000002
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "u0000000002"
down_revision = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("SET LOCAL statement_timeout = '1min'")
    op.drop_column("orders", "status")


def downgrade() -> None:
    pass

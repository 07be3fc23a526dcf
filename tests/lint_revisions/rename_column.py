"""unsafe: rename customers.name to full_name (running code still reads name)

Revision ID: u0000000001
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "u0000000001"
down_revision = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("SET LOCAL statement_timeout = '1min'")
    op.alter_column("customers", "name", new_column_name="full_name")


def downgrade() -> None:
    pass

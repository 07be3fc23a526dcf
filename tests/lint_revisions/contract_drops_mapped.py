"""unsafe: a contract step dropping customers.name while the models still map it

Revision ID: u0000000009
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "u0000000009"
down_revision = None
shardkit_contract = True


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("SET LOCAL statement_timeout = '1min'")
    op.drop_column("customers", "name")


def downgrade() -> None:
    pass

"""contract: drop customers.name, which no deployed code reads or writes any more

Step 3 of the rename, applied only after every application server runs code that maps
``full_name`` and no longer maps ``name`` (step 2 is a deploy, not a migration). The module-level
``shardkit_contract = True`` tells ``shardkit migrations lint`` that dropping is intended here; the
lint still refuses it while the current models map ``customers.name``.

Revision ID: a1e5c0de0002
Revises: a1e5c0de0001
Create Date: 2026-11-27 09:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "a1e5c0de0002"
down_revision = "a1e5c0de0001"
branch_labels = None
depends_on = None

shardkit_contract = True


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("SET LOCAL statement_timeout = '1min'")
    # Catch up rows that old code wrote (name only) while step 2 was rolling out, then drop.
    op.execute("UPDATE customers SET full_name = name WHERE full_name IS NULL")
    op.drop_column("customers", "name", if_exists=True)


def downgrade() -> None:
    # Back to the expand state: the old column again, nullable, filled from the new one.
    op.add_column("customers", sa.Column("name", sa.String(200), nullable=True), if_not_exists=True)
    op.execute("UPDATE customers SET name = full_name WHERE name IS NULL")

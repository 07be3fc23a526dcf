"""Sagas across a rebalance: receipts know their step's shard key; the log is walked in id order.

Revision ID: 0007_saga_rebalance
Revises: 0006_lookup_state
Create Date: 2026-12-02 01:00:00

``shardkit_saga_receipts.shard_key`` holds the step's shard key as text, so a rebalance moves each
receipt in the same cut-over as its key's rows (a step's effect and its receipt never end up on
different shards). The mover walks the saga log in ``saga_id`` order ("C" collation) when it
carries log rows to an id's new shard. Both indexes are built ``CONCURRENTLY`` (no write lock on a
live table), outside the revision's transaction. Additive and idempotent; old receipts keep NULL
(recorded before this revision) and stay where they are.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007_saga_rebalance"
down_revision: str | Sequence[str] | None = "0006_lookup_state"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _postgresql() -> bool:
    """Sagas run on PostgreSQL only; on the embedded demo's SQLite files this revision has nothing to do."""
    return bool(op.get_context().dialect.name == "postgresql")


def upgrade() -> None:
    if not _postgresql():
        return
    op.execute("ALTER TABLE shardkit_saga_receipts ADD COLUMN IF NOT EXISTS shard_key text")
    with op.get_context().autocommit_block():
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_shardkit_saga_receipts_shard_key"
            " ON shardkit_saga_receipts (shard_key)"
        )
        op.execute(
            'CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_shardkit_sagas_id_c ON shardkit_sagas ((saga_id COLLATE "C"))'
        )


def downgrade() -> None:
    if not _postgresql():
        return
    op.execute("DROP INDEX IF EXISTS ix_shardkit_sagas_id_c")
    op.execute("DROP INDEX IF EXISTS ix_shardkit_saga_receipts_shard_key")
    op.execute("ALTER TABLE shardkit_saga_receipts DROP COLUMN IF EXISTS shard_key")

"""Saga ids fleet-wide: receipt digests and the steps' shards in the log.

Revision ID: 0005_saga_digest
Revises: 0004_sequences
Create Date: 2026-12-01 21:40:00

``shardkit_saga_receipts.digest`` holds a hash of (saga type, step, payload): a step retried under
the same saga id with other input is refused (``SagaConflictError``) instead of trusted.
``shardkit_sagas.shards`` lists the shards a saga's steps run on (``shardkit sagas`` shows it).
No index is added (purging scans; an index build on a live table would need CONCURRENTLY, which
cannot run in the revision's one transaction). Additive and idempotent (IF NOT EXISTS); old rows
keep NULLs, which mean "recorded before digests" and are trusted as before.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005_saga_digest"
down_revision: str | Sequence[str] | None = "0004_sequences"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _postgresql() -> bool:
    """Sagas run on PostgreSQL only; on the embedded demo's SQLite files this revision has nothing to do."""
    return bool(op.get_context().dialect.name == "postgresql")


def upgrade() -> None:
    if not _postgresql():
        return
    op.execute("ALTER TABLE shardkit_saga_receipts ADD COLUMN IF NOT EXISTS digest varchar(32)")
    op.execute("ALTER TABLE shardkit_sagas ADD COLUMN IF NOT EXISTS shards jsonb")


def downgrade() -> None:
    if not _postgresql():
        return
    op.execute("ALTER TABLE shardkit_sagas DROP COLUMN IF EXISTS shards")
    op.execute("ALTER TABLE shardkit_saga_receipts DROP COLUMN IF EXISTS digest")

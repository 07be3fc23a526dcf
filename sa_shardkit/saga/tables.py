"""The saga's durable tables: the log (one row per saga, on its home shard) and the step receipts.

A saga's home shard is the one its *id* hashes to on the ring (:func:`sa_shardkit.saga.runner.home_of`),
so one id has one log row fleet-wide, whatever payload it is submitted with.

A receipt is written in the same transaction as the step's effect, on the step's own shard; it is what
makes a retried step a no-op and lets a compensation know whether the forward step really happened.
Create them with :func:`create_saga_tables` (or the Alembic revision in ``migrations/versions``).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from ..manager import ShardManager

saga_metadata = MetaData()

sagas_table = Table(
    "shardkit_sagas",
    saga_metadata,
    Column("saga_id", String(100), primary_key=True),
    Column("saga_type", String(100), nullable=False),
    Column("payload", JSON().with_variant(JSONB(), "postgresql"), nullable=False),
    Column("status", String(100), nullable=False),
    Column("step", Integer, nullable=False),
    Column("compensating", Boolean, nullable=False, default=False),
    Column("failure", String(100)),
    Column("error", Text),
    Column("owner", String(200)),
    Column("lease_until", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finished_at", DateTime(timezone=True)),
    Column("shards", JSON().with_variant(JSONB(), "postgresql")),  # the steps' shards, for operators
    comment="sa_shardkit saga log: one row per saga on its home shard",
)
# Recovery's scan: open sagas whose lease ran out.
Index(
    "ix_shardkit_sagas_open_lease",
    sagas_table.c.lease_until,
    postgresql_where=text("finished_at IS NULL"),
)

receipts_table = Table(
    "shardkit_saga_receipts",
    saga_metadata,
    Column("saga_id", String(100), nullable=False),
    Column("step", String(100), nullable=False),
    Column("phase", String(4), nullable=False),  # 'do' | 'undo'
    Column("outcome", String(16), nullable=False),  # 'applied' | 'failed' | 'fenced' | 'skipped'
    Column("reason", String(100)),
    Column("digest", String(32)),  # of (saga type, step, payload): the same id with other input conflicts
    Column("shard_key", Text),  # the step's shard key as text: a rebalance moves the receipt with it
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("saga_id", "step", "phase", name="pk_shardkit_saga_receipts"),
    comment="sa_shardkit saga step receipts: idempotency records written with each step's effect",
)


# A rebalance moves receipts with their step's key (sa_shardkit.rebalance.positioned).
Index("ix_shardkit_saga_receipts_shard_key", receipts_table.c.shard_key)
# ... and log rows in their id's text order ("C" collation), one batch after another.
Index("ix_shardkit_sagas_id_c", sagas_table.c.saga_id.collate("C"))


def create_saga_tables(manager: ShardManager) -> None:
    """Create the saga log and receipt tables on every shard (existing tables are left alone)."""
    for shard_id in manager.shard_ids:
        saga_metadata.create_all(manager.engine(shard_id), checkfirst=True)

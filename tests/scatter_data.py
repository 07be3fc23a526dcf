"""A random order data set (NULLs, ties, many customers) loaded into the shards and an oracle DB."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, Numeric, String, Table
from sqlalchemy.engine import Engine

from sa_shardkit import ShardManager

metadata = MetaData()
orders = Table(
    "orders",
    metadata,
    Column("customer_id", BigInteger, primary_key=True, autoincrement=False),
    Column("order_id", Integer, primary_key=True, autoincrement=False),
    Column("status", String(20), nullable=False),
    Column("total", Numeric(10, 2)),
    Column("qty", Integer),
    Column("note", String(40)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    info={"shard_key": "customer_id"},
)

STATUSES = ["pending", "paid", "shipped", "cancelled", "Returned", "élan"]


def random_orders(count: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = []
    for order_id in range(1, count + 1):
        rows.append(
            {
                "customer_id": rng.randint(1, 400),
                "order_id": order_id,
                "status": rng.choice(STATUSES),
                "total": None if rng.random() < 0.1 else Decimal(rng.randint(0, 50_000)) / 100,
                "qty": None if rng.random() < 0.15 else rng.randint(1, 9),
                "note": None if rng.random() < 0.5 else rng.choice(["a", "b", "gift", "Gift", "rush"]),
                "created_at": start + dt.timedelta(minutes=rng.randint(0, 2_000)),  # many ties
            }
        )
    return rows


def load(manager: ShardManager, oracle: Engine, rows: list[dict[str, Any]]) -> None:
    """Every row to the shard that owns its customer, and every row to the oracle."""
    by_shard: dict[str, list[dict[str, Any]]] = {s: [] for s in manager.shard_ids}
    for row in rows:
        by_shard[manager.shard_for(row["customer_id"])].append(row)
    for shard_id, shard_rows in by_shard.items():
        with manager.engine(shard_id).begin() as conn:
            metadata.drop_all(conn)
            metadata.create_all(conn)
            if shard_rows:
                conn.execute(orders.insert(), shard_rows)
    with oracle.begin() as conn:
        metadata.drop_all(conn)
        metadata.create_all(conn)
        conn.execute(orders.insert(), rows)

"""asyncio with sa_shardkit: concurrent per-customer transactions and an every-shard report.

Each customer's work is one ``AsyncSession`` transaction on that customer's shard; the report is a
cross-shard SELECT whose shards are queried at once on the event loop and merged globally.

    SHARD_1_URL=postgresql+psycopg://app@db1/app SHARD_2_URL=... python examples/async_orders.py
    python examples/async_orders.py      # no SHARD_<N>_URL: starts 4 local PostgreSQL servers
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

from sqlalchemy import func, select

from sa_shardkit import ShardManager
from sa_shardkit.aio import AsyncShardManager
from sa_shardkit.demo.models import Base, Customer, Order
from sa_shardkit.testing import manager_from_env_or_local_fleet


async def place_orders(shards: AsyncShardManager, customers: int) -> None:
    """One transaction per customer, all customers concurrently (each on its own shard)."""
    Session = shards.sessionmaker()

    async def one(customer_id: int) -> None:
        async with Session() as session, session.begin():
            session.add(Customer(customer_id=customer_id, name=f"Customer {customer_id}"))
            session.add_all(Order(customer_id=customer_id, total=Decimal(10 * n)) for n in range(1, 4))

    await asyncio.gather(*(one(i) for i in range(1, customers + 1)))


async def report(shards: AsyncShardManager) -> list[tuple[int, Decimal]]:
    """The biggest spenders across every shard: one query, fanned out and merged."""
    async with shards.sessionmaker()() as session:
        rows = await session.execute(
            select(Order.customer_id, func.sum(Order.total).label("spent"))
            .group_by(Order.customer_id)
            .order_by(func.sum(Order.total).desc(), Order.customer_id)
            .limit(3)
        )
        return [(row.customer_id, row.spent) for row in rows]


async def run(manager: ShardManager, customers: int = 20) -> list[tuple[int, Decimal]]:
    for shard_id in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard_id))
    async with AsyncShardManager(manager) as shards:
        await place_orders(shards, customers)
        top = await report(shards)
        counts = await shards.query_all_shards("SELECT count(*) FROM customers", with_shard_id=True)
        for count, shard_id in counts:
            print(f"{shard_id}: {count} customers")
    for customer_id, spent in top:
        print(f"customer {customer_id} ({manager.shard_for(customer_id)}): spent {spent}")
    return top


def main() -> None:
    with manager_from_env_or_local_fleet() as manager:
        asyncio.run(run(manager))


if __name__ == "__main__":
    main()

"""AsyncSession over the sharded session, and asyncio fan-out, on the real 4-shard fleet."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from sa_shardkit import ShardManager, ShardUnavailableError
from sa_shardkit.aio import AsyncShardManager
from sa_shardkit.demo.models import Base, Customer, Order
from tests.fleet import TestFleet

CUSTOMERS = range(1, 21)


@pytest.fixture
def schema(manager: ShardManager) -> Iterator[ShardManager]:
    for shard_id in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard_id))
    yield manager


def customers_on(manager: ShardManager) -> dict[str, set[int]]:
    """Where each customer row physically is, read from every shard directly."""
    rows = manager.run_on_all("SELECT customer_id FROM customers")
    return {shard_id: {r[0] for r in found} for shard_id, found in rows.items()}


async def add_customers(shards: AsyncShardManager, ids: range) -> None:
    """One session transaction per customer (one shard each), all at once."""
    Session = shards.sessionmaker()

    async def one(customer_id: int) -> None:
        async with Session() as session, session.begin():
            session.add(
                Customer(customer_id=customer_id, name=f"c{customer_id}", balance=Decimal(customer_id))
            )
            session.add(Order(customer_id=customer_id, total=Decimal(1)))

    await asyncio.gather(*(one(i) for i in ids))


def test_async_session_writes_each_customer_to_its_ring_shard(schema: ShardManager) -> None:
    async def main() -> None:
        async with AsyncShardManager(schema) as shards:
            await add_customers(shards, CUSTOMERS)

    asyncio.run(main())
    expected: dict[str, set[int]] = {s: set() for s in schema.shard_ids}
    for customer_id in CUSTOMERS:
        expected[schema.shard_for(customer_id)].add(customer_id)
    assert customers_on(schema) == expected


def test_async_get_reads_the_owning_shard(schema: ShardManager) -> None:
    async def main() -> tuple[str | None, str | None]:
        async with AsyncShardManager(schema) as shards:
            await add_customers(shards, CUSTOMERS)
            async with shards.sessionmaker()() as session:
                customer = await session.get(Customer, 17)
                assert customer is not None
                token = session.sync_session.identity_key(instance=customer)[2]
                return customer.name, token

    assert asyncio.run(main()) == ("c17", schema.shard_for(17))


def test_async_scatter_select_is_merged_globally(schema: ShardManager) -> None:
    async def main() -> tuple[list[int], int | None, Decimal | None]:
        async with AsyncShardManager(schema) as shards:
            await add_customers(shards, CUSTOMERS)
            async with shards.sessionmaker()() as session:
                top = await session.scalars(
                    select(Customer.customer_id).order_by(Customer.balance.desc()).limit(5)
                )
                count = await session.scalar(select(func.count()).select_from(Customer))
                total = await session.scalar(select(func.sum(Order.total)))
                return list(top), count, total

    assert asyncio.run(main()) == ([20, 19, 18, 17, 16], 20, Decimal(20))


def test_async_scatter_runs_the_shards_concurrently(schema: ShardManager) -> None:
    async def main() -> float:
        async with AsyncShardManager(schema) as shards:
            await add_customers(shards, CUSTOMERS)
            async with shards.sessionmaker()() as session:
                await session.scalar(select(func.count()).select_from(Customer))  # connect to all
                started = time.perf_counter()
                rows = await session.execute(
                    select(Customer.customer_id, func.pg_sleep(0.5)).where(
                        Customer.customer_id.in_([shard_first(schema, s) for s in schema.shard_ids])
                    )
                )
                assert len(rows.all()) == 4
                return time.perf_counter() - started

    assert asyncio.run(main()) < 1.5  # one after another would take 2 s


def shard_first(manager: ShardManager, shard_id: str) -> int:
    return next(k for k in CUSTOMERS if manager.shard_for(k) == shard_id)


def test_async_query_all_shards_merges_in_order(schema: ShardManager) -> None:
    async def main() -> list[int]:
        async with AsyncShardManager(schema) as shards:
            await add_customers(shards, CUSTOMERS)
            result = await shards.query_all_shards(
                select(Customer.customer_id).order_by(Customer.customer_id).limit(3)
            )
            return [row[0] for row in result]

    assert asyncio.run(main()) == [1, 2, 3]


def test_async_query_all_shards_runs_in_parallel(schema: ShardManager) -> None:
    async def main() -> float:
        async with AsyncShardManager(schema) as shards:
            await shards.query_all_shards("SELECT 1")
            started = time.perf_counter()
            await shards.query_all_shards(text("SELECT pg_sleep(0.5)"))
            return time.perf_counter() - started

    assert asyncio.run(main()) < 1.5


def test_async_example_runs_against_shard_url_env_vars(shard_urls: list[str]) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "async_orders.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARD_")}
    env.update({f"SHARD_{i}_URL": url for i, url in enumerate(shard_urls, 1)})
    result = subprocess.run(
        [sys.executable, str(example)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=example.parent,
    )
    assert result.returncode == 0, result.stderr
    assert "customer 1 (" in result.stdout and "spent 60" in result.stdout
    assert sum(int(line.split()[1]) for line in result.stdout.splitlines() if "customers" in line) == 20


def test_async_scatter_with_a_stopped_shard_raises_shard_unavailable(
    schema: ShardManager, pg_fleet: TestFleet
) -> None:
    async def main() -> None:
        async with AsyncShardManager(schema) as shards:
            await add_customers(shards, CUSTOMERS)
            pg_fleet.server(2).stop()
            async with shards.sessionmaker()() as session:
                await session.scalar(select(func.count()).select_from(Customer))

    with pytest.raises(ShardUnavailableError, match="shard-3"):
        asyncio.run(main())

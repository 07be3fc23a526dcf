"""Async sessions read from shard-1's real streaming replica by the sync session's rules.

Each read selects ``pg_is_in_recovery()`` next to the row, so the answer says which server ran it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from sa_shardkit import QueryEvent, ShardManager
from sa_shardkit.aio import AsyncShardManager
from sa_shardkit.demo.models import Customer
from sa_shardkit.testing import LocalPostgres
from tests.fleet import TestFleet
from tests.replica_support import (
    manager_with_replica,
    pause_replay,
    seed_replicated,
    shard1_key,
)

Check = Callable[[AsyncSession], Awaitable[bool]]


@pytest.fixture
def fleet(
    replicated_manager: ShardManager, pg_fleet: TestFleet, pg_replica: LocalPostgres
) -> Iterator[ShardManager]:
    """The demo schema on every shard (and so on the replica), one customer on shard-1."""
    yield seed_replicated(replicated_manager, pg_fleet.server(0), pg_replica)


def in_recovery_of(manager: ShardManager, **execution_options: bool) -> Check:
    """Read the shard-1 customer and whether the server that answered is a replica."""
    statement = select(Customer.name, func.pg_is_in_recovery()).where(
        Customer.customer_id == shard1_key(manager, 0)
    )

    async def check(session: AsyncSession) -> bool:
        name, in_recovery = (await session.execute(statement, execution_options=execution_options)).one()
        assert name == "replicated"
        return bool(in_recovery)

    return check


def run_in_session(manager: ShardManager, body: Callable[[AsyncSession], Awaitable[bool]]) -> bool:
    async def main() -> bool:
        async with AsyncShardManager(manager) as shards, shards.sessionmaker()() as session:
            return await body(session)

    return asyncio.run(main())


def test_async_read_outside_a_write_transaction_goes_to_the_replica(fleet: ShardManager) -> None:
    assert run_in_session(fleet, in_recovery_of(fleet)) is True


def test_async_read_with_use_primary_goes_to_the_primary(fleet: ShardManager) -> None:
    assert run_in_session(fleet, in_recovery_of(fleet, use_primary=True)) is False


def test_async_read_inside_primary_reads_goes_to_the_primary(fleet: ShardManager) -> None:
    read = in_recovery_of(fleet)

    async def body(session: AsyncSession) -> bool:
        with session.sync_session.primary_reads():  # type: ignore[attr-defined]
            return await read(session)

    assert run_in_session(fleet, body) is False


def test_async_read_after_a_flush_in_the_transaction_goes_to_the_primary(fleet: ShardManager) -> None:
    read = in_recovery_of(fleet)

    async def body(session: AsyncSession) -> bool:
        async with session.begin():
            before = await read(session)
            session.add(Customer(customer_id=shard1_key(fleet, 1), name="new", balance=Decimal(0)))
            await session.flush()
            after = await read(session)
        assert before is True
        return after

    assert run_in_session(fleet, body) is False


def test_async_read_falls_back_to_the_primary_when_the_replica_is_stopped(
    fleet: ShardManager, pg_replica: LocalPostgres
) -> None:
    pg_replica.stop()
    assert run_in_session(fleet, in_recovery_of(fleet)) is False
    assert not fleet.replicas.status("shard-1").usable


def test_async_read_falls_back_when_the_replica_stopped_after_its_last_check(
    fleet: ShardManager, pg_replica: LocalPostgres
) -> None:
    fleet.replicas.check_interval = 3600
    assert fleet.replicas.status("shard-1", refresh=True).usable
    pg_replica.stop()
    assert run_in_session(fleet, in_recovery_of(fleet)) is False
    assert not fleet.replicas.status("shard-1").usable


def test_async_read_falls_back_to_the_primary_when_the_replica_lags(
    fleet: ShardManager, shard_map: dict[str, str], pg_replica: LocalPostgres
) -> None:
    pause_replay(pg_replica)
    with fleet.connect("shard-1") as conn, conn.begin():
        conn.execute(Customer.__table__.insert().values(customer_id=shard1_key(fleet, 1), name="fresh"))
    time.sleep(0.6)  # the replica received the insert but has not applied it for > 0.3 s
    with manager_with_replica(shard_map, pg_replica, max_replica_lag=0.3) as strict:
        assert run_in_session(strict, in_recovery_of(strict)) is False
        status = strict.replicas.status("shard-1")
    assert not status.usable and status.reason is not None and "lagging" in status.reason


def test_query_listeners_see_async_statements_with_their_role(fleet: ShardManager) -> None:
    seen: list[tuple[str, str]] = []

    def record(event: QueryEvent) -> None:
        seen.append((event.shard_id, event.role))

    fleet.events.add(record)
    try:

        async def count(session: AsyncSession) -> bool:
            return await session.scalar(select(func.count()).select_from(Customer)) == 1

        assert run_in_session(fleet, count)
    finally:
        fleet.events.remove(record)
    assert ("shard-1", "replica") in seen and ("shard-1", "primary") not in seen
    assert {("shard-2", "primary"), ("shard-3", "primary"), ("shard-4", "primary")} <= set(seen)

"""Core writes take the rebalance fence like a session flush: Core DML sent through the session
(``session.execute(insert/update/delete)``, bulk inserts), two-phase commit by key, and the async
manager's ``transaction(key)``.

On real PostgreSQL servers, with a move from 4 shards to 5 in flight:

* a write in the fenced window: the Core write runs in a transaction that is still open when the
  mover cuts its key's batch over; the cut-over must wait for it, so the write moves with the batch;
* a stale process (it loaded ring version 1 and never refreshes) writes a key that was cut over
  meanwhile: the write must land on the key's new shard.

Where the rows are is checked by querying each server directly.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import delete, insert, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.aio import AsyncShardManager
from sa_shardkit.demo.models import Base, Customer, Order, OrderItem
from sa_shardkit.errors import StaleRingError
from sa_shardkit.rebalance import MoveOptions, RingState, install_ring, table_set
from sa_shardkit.rebalance.catalog import write_state
from sa_shardkit.rebalance.mover import SourceMover
from sa_shardkit.rebalance.progress import ProgressTracker
from sa_shardkit.rebalance.rebalancer import _prepare
from sa_shardkit.saga import commit_across_keys, commit_across_shards, create_saga_tables
from tests.rebalance_data import never_refresh_by_itself, seed, start_move

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
CUSTOMERS = 100
MOVING = next(
    k for k in range(1, CUSTOMERS) if FOUR.get_shard(k) == "shard-1" and FIVE.get_shard(k) == "shard-5"
)
STAYING = next(
    k for k in range(1, CUSTOMERS) if FOUR.get_shard(k) == "shard-2" and FIVE.get_shard(k) == "shard-2"
)


def rows_of(manager: ShardManager, key: int) -> dict[str, tuple[int, int, int, Any]]:
    """Per server: (customers, orders, items, balance) of customer ``key``, asked directly."""
    found = {}
    for shard_id in manager.shard_ids:
        with manager.connect(shard_id) as conn:
            row = conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM customers WHERE customer_id = :k),"
                    " (SELECT count(*) FROM orders WHERE customer_id = :k),"
                    " (SELECT count(*) FROM order_items WHERE customer_id = :k),"
                    " (SELECT balance FROM customers WHERE customer_id = :k)"
                ),
                {"k": key},
            ).one()
        if any(row[:3]):
            found[shard_id] = tuple(row)
    return found


def order_row(n: int = 7) -> dict[str, Any]:
    return {"customer_id": MOVING, "order_id": uuid.UUID(int=n), "status": "new", "total": Decimal(1)}


WRITES: dict[str, tuple[Callable[[Session], Any], tuple[int, int, int, Any]]] = {
    # write through the session -> (customers, orders, items, balance) of MOVING afterwards
    "insert": (lambda s: s.execute(insert(Order).values(**order_row())), (1, 3, 2, Decimal(100))),
    "bulk insert": (
        lambda s: s.execute(insert(Order), [order_row(7), order_row(8)]),
        (1, 4, 2, Decimal(100)),
    ),
    "update": (
        lambda s: s.execute(update(Customer).where(Customer.customer_id == MOVING).values(balance=7)),
        (1, 2, 2, Decimal(7)),
    ),
    "delete": (
        lambda s: s.execute(delete(OrderItem).where(OrderItem.customer_id.in_([MOVING]))),
        (1, 2, 0, Decimal(100)),
    ),
}


def cut_over_in_thread(manager: ShardManager, state: RingState) -> threading.Thread:
    """Drain shard-1 (every moving key cut over) in a thread; returns once the mover waits for a
    lock on shard-1 (or finished, which a fenced writer must not let it)."""
    mover = SourceMover(
        manager, state, table_set(Base), "shard-1", MoveOptions(batch_size=10_000), ProgressTracker()
    )
    thread = threading.Thread(target=mover.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60  # a hang guard, not a speed bound
    with manager.connect("shard-1") as conn:
        while thread.is_alive() and time.monotonic() < deadline:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query ILIKE '%shardkit_ring_state%'"
                )
            ).scalar_one()
            conn.rollback()
            if waiting:
                break
            time.sleep(0.05)
    return thread


@pytest.fixture
def moving(manager: ShardManager, shard5_url: str) -> RingState:
    state = start_move(manager, shard5_url, CUSTOMERS)
    create_saga_tables(manager)
    return state


@pytest.mark.parametrize("write", list(WRITES))
def test_core_dml_through_the_session_holds_the_fence_until_commit(
    manager: ShardManager, moving: RingState, write: str
) -> None:
    run, expected = WRITES[write]
    with manager.sessionmaker()() as session, session.begin():
        run(session)
        mover = cut_over_in_thread(manager, moving)
        assert mover.is_alive(), "the cut-over of the written key did not wait for the open write"
    mover.join(60)
    assert not mover.is_alive()
    assert rows_of(manager, MOVING) == {"shard-5": expected}  # moved with its batch, none left behind


def test_a_two_phase_participant_holds_the_fence_until_it_commits(
    manager: ShardManager, moving: RingState
) -> None:
    movers: list[threading.Thread] = []

    def at(txid: str, step: str) -> None:
        if step == "prepared":  # both participants prepared, their fences held
            movers.append(cut_over_in_thread(manager, moving))
            assert movers[0].is_alive(), "the cut-over did not wait for the prepared participant"

    commit_across_keys(
        manager,
        {
            MOVING: lambda conn: conn.execute(insert(Order).values(**order_row())),
            STAYING: lambda conn: conn.execute(
                update(Customer).where(Customer.customer_id == STAYING).values(balance=1)
            ),
        },
        on_checkpoint=at,
    )
    movers[0].join(60)
    assert not movers[0].is_alive()
    assert rows_of(manager, MOVING) == {"shard-5": (1, 3, 2, Decimal(100))}
    assert rows_of(manager, STAYING) == {"shard-2": (1, 2, 2, Decimal(1))}


@pytest.fixture
def stale(manager: ShardManager, shard_map: dict[str, str], shard5_url: str) -> Iterator[ShardManager]:
    """A process that loaded ring version 1 and never refreshes by itself; meanwhile a move to
    five shards started and drained shard-1 (every moving key of shard-1 is on shard-5 now)."""
    seed(manager, FOUR, CUSTOMERS, 2, 1)
    install_ring(manager, FOUR)
    with ShardManager.from_urls({**shard_map, "shard-5": shard5_url}, refresh_seconds=3600) as process:
        never_refresh_by_itself(process)
        assert process.placement.refresh().version == 1
        manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
        tables = table_set(Base)
        _prepare(manager, tables, FOUR, ["shard-5"])
        create_saga_tables(manager)
        state = RingState(2, FOUR, FIVE, tables.key_sql_type)
        write_state(manager, state, state.shard_ids)
        SourceMover(
            manager, state, tables, "shard-1", MoveOptions(batch_size=10_000), ProgressTracker()
        ).run()
        assert rows_of(manager, MOVING) == {"shard-5": (1, 2, 2, Decimal(100))}
        assert process.placement.state.version == 1
        yield process


@pytest.mark.parametrize("write", list(WRITES))
def test_a_stale_process_core_dml_lands_on_the_keys_new_shard(
    manager: ShardManager, stale: ShardManager, write: str
) -> None:
    run, expected = WRITES[write]
    with stale.sessionmaker()() as session, session.begin():
        run(session)
    assert rows_of(manager, MOVING) == {"shard-5": expected}


def test_a_stale_process_two_phase_commit_by_key_lands_on_the_keys_new_shard(
    manager: ShardManager, stale: ShardManager
) -> None:
    def credit(key: int) -> Callable[[Connection], object]:
        return lambda conn: conn.execute(
            update(Customer).where(Customer.customer_id == key).values(balance=Customer.balance + 5)
        )

    commit_across_keys(stale, {MOVING: credit(MOVING), STAYING: credit(STAYING)})
    assert rows_of(manager, MOVING) == {"shard-5": (1, 2, 2, Decimal(105))}
    assert rows_of(manager, STAYING) == {"shard-2": (1, 2, 2, Decimal(105))}


def test_commit_across_shards_with_keys_refuses_a_key_on_its_old_shard(
    manager: ShardManager, stale: ShardManager
) -> None:
    ran = []
    with pytest.raises(StaleRingError, match="shard-5") as info:
        commit_across_shards(stale, {"shard-1": lambda conn: ran.append(conn)}, keys={"shard-1": [MOVING]})
    assert info.value.shard_id == "shard-5" and not ran  # refused before any work ran
    with manager.connect("shard-1") as conn:
        assert not conn.execute(text("SELECT gid FROM pg_prepared_xacts")).all()
    assert rows_of(manager, MOVING) == {"shard-5": (1, 2, 2, Decimal(100))}


def test_an_async_transaction_by_key_holds_the_fence_until_commit(
    manager: ShardManager, moving: RingState
) -> None:
    async def main() -> threading.Thread:
        async with AsyncShardManager(manager) as shards:
            async with shards.transaction(MOVING) as conn:
                await conn.execute(insert(Order).values(**order_row()))
                mover = cut_over_in_thread(manager, moving)
                assert mover.is_alive(), "the cut-over did not wait for the open async transaction"
            return mover

    mover = asyncio.run(main())
    mover.join(60)
    assert not mover.is_alive()
    assert rows_of(manager, MOVING) == {"shard-5": (1, 3, 2, Decimal(100))}


def test_a_stale_process_async_transaction_by_key_lands_on_the_keys_new_shard(
    manager: ShardManager, stale: ShardManager
) -> None:
    async def main() -> None:
        async with AsyncShardManager(stale) as shards:
            async with shards.transaction(MOVING) as conn:
                await conn.execute(update(Customer).where(Customer.customer_id == MOVING).values(balance=9))
            with pytest.raises(RuntimeError, match="rolled back"):
                async with shards.transaction(MOVING) as conn:
                    await conn.execute(
                        update(Customer).where(Customer.customer_id == MOVING).values(balance=0)
                    )
                    raise RuntimeError("rolled back")

    asyncio.run(main())
    assert rows_of(manager, MOVING) == {"shard-5": (1, 2, 2, Decimal(9))}

"""A process that only reads follows a move it never took part in: no keyed read misses a moved row.

The reader's ShardManager, RingRouter and session exist before the move; the move runs to
completion in another manager (as another process would); the reader never writes, so no write
fence tells it about the new ring. Its keyed reads must still find every row, on the new shard.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base, Customer, Order
from sa_shardkit.rebalance import MoveOptions, RingRouter, add_shard, install_ring
from tests.rebalance_data import never_refresh_by_itself, seed

CUSTOMERS, ORDERS_EACH = 100, 2
FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
MOVED = [k for k in range(1, CUSTOMERS + 1) if FIVE.get_shard(k) == "shard-5"]


@pytest.fixture
def reader(shard_map: dict[str, str], shard5_url: str, manager: ShardManager) -> Iterator[ShardManager]:
    """A second process's manager, configured with shard-5 (not on its ring) and following the
    stored 4-shard ring; created after seeding, before the move."""
    seed(manager, FOUR, CUSTOMERS, ORDERS_EACH, 1)
    install_ring(manager, FOUR)
    with ShardManager.from_urls(shard_map, connect_timeout=3) as mgr:
        mgr.add_shard(ShardConfig(id="shard-5", url=shard5_url))
        yield mgr


def _move_to_shard5(manager: ShardManager, shard5_url: str) -> None:
    add_shard(manager, ShardConfig(id="shard-5", url=shard5_url), Base, options=MoveOptions(batch_size=40))
    with manager.connect("shard-5") as conn:  # the rows really moved: the reader must look there
        assert conn.execute(select(func.count()).select_from(Customer)).scalar_one() == len(MOVED)


def test_a_read_only_session_get_finds_rows_moved_by_another_process(
    reader: ShardManager, manager: ShardManager, shard5_url: str
) -> None:
    router = RingRouter(reader, refresh_seconds=3600)
    never_refresh_by_itself(reader, read_now=True)  # no periodic refresh: only the empty-read check
    with reader.sessionmaker()() as session:
        assert session.get(Customer, MOVED[0]) is not None  # routed by the old ring, still there
        session.rollback()
        _move_to_shard5(manager, shard5_url)
        session.expunge_all()
        missing = [k for k in MOVED if session.get(Customer, k) is None]
    assert missing == []
    assert router.state.ring == FIVE and not router.state.in_flight


def test_a_read_only_keyed_select_finds_rows_moved_by_another_process(
    reader: ShardManager, manager: ShardManager, shard5_url: str
) -> None:
    RingRouter(reader, refresh_seconds=3600)
    never_refresh_by_itself(reader, read_now=True)
    with reader.sessionmaker()() as session:
        _move_to_shard5(manager, shard5_url)
        counts = {k: len(session.scalars(select(Order).where(Order.customer_id == k)).all()) for k in MOVED}
    assert counts == dict.fromkeys(MOVED, ORDERS_EACH)


def test_a_read_only_router_read_finds_rows_moved_by_another_process(
    reader: ShardManager, manager: ShardManager, shard5_url: str
) -> None:
    router = RingRouter(reader, refresh_seconds=3600)  # guards RingRouter.read's own re-check
    never_refresh_by_itself(reader, read_now=True)
    _move_to_shard5(manager, shard5_url)
    query = select(func.count()).select_from(Order).where(Order.customer_id == MOVED[0])
    assert router.read(MOVED[0], lambda conn: conn.execute(query).scalar_one()) == ORDERS_EACH


def test_a_read_only_scatter_follows_the_moved_ring_after_the_refresh_interval(
    reader: ShardManager, manager: ShardManager, shard5_url: str
) -> None:
    RingRouter(reader, refresh_seconds=0)  # every session read re-reads the stored ring first
    _move_to_shard5(manager, shard5_url)
    with reader.sessionmaker()() as session:
        total = session.scalar(select(func.count()).select_from(Order))
    assert total == CUSTOMERS * ORDERS_EACH

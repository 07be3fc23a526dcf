"""The shared ring state and its fence, on real PostgreSQL: who waits for whom, and stale sessions."""

from __future__ import annotations

import threading
import time
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import insert, select, text

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base, Order
from sa_shardkit.errors import FenceTimeoutError, RebalanceError, StaleRingError
from sa_shardkit.rebalance import (
    MoveOptions,
    RingRouter,
    add_shard,
    install_ring,
    load_ring_state,
    resume,
    table_set,
)
from sa_shardkit.rebalance.catalog import STATE_TABLE
from sa_shardkit.rebalance.mover import SourceMover
from sa_shardkit.rebalance.progress import ProgressTracker
from tests.rebalance_data import check_fleet, seed, start_move

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
ORDERS = Order.__table__


def _moving_key(source: str) -> int:
    return next(k for k in range(1, 10_000) if FOUR.get_shard(k) == source and FIVE.get_shard(k) == "shard-5")


def _staying_key(source: str) -> int:
    return next(k for k in range(1, 10_000) if FOUR.get_shard(k) == source and FIVE.get_shard(k) == source)


def test_install_stores_version_one_on_every_shard(manager: ShardManager) -> None:
    install_ring(manager, FOUR)
    install_ring(manager, FOUR)  # idempotent
    for shard_id in FOUR.shard_ids:
        with manager.connect(shard_id) as conn:
            rows = conn.execute(text(f"SELECT version, ring FROM {STATE_TABLE}")).all()
        assert [(r.version, HashRing.from_json(r.ring)) for r in rows] == [(1, FOUR)]


def test_a_cut_over_waits_for_an_in_flight_writer_of_a_moving_key(
    manager: ShardManager, shard5_url: str
) -> None:
    state = start_move(manager, shard5_url)
    key = _moving_key("shard-1")
    router = RingRouter(manager)
    new_order = uuid.uuid4()
    mover = SourceMover(
        manager, state, table_set(Base), "shard-1", MoveOptions(batch_size=10_000), ProgressTracker()
    )
    with router.begin_write(key) as conn:  # holds the fence on shard-1
        conn.execute(insert(ORDERS), {"customer_id": key, "order_id": new_order, "total": Decimal(1)})
        batch = threading.Thread(target=mover.batch)
        batch.start()
        batch.join(timeout=1.0)
        assert batch.is_alive()  # the cut-over is waiting for this writer
    batch.join(timeout=30)
    assert not batch.is_alive()
    with manager.connect("shard-5") as conn:  # the writer's row moved with the batch
        assert conn.execute(select(ORDERS.c.order_id).where(ORDERS.c.order_id == new_order)).all()
    with manager.connect("shard-1") as conn:
        assert not conn.execute(select(ORDERS.c.customer_id).where(ORDERS.c.customer_id == key)).all()


def test_writers_of_keys_that_stay_are_not_blocked_by_a_cut_over(
    manager: ShardManager, shard5_url: str
) -> None:
    start_move(manager, shard5_url)
    router = RingRouter(manager)
    with manager.connect("shard-1") as mover_conn:  # what a batch holds while it cuts over
        mover_conn.execute(text(f"SELECT 1 FROM {STATE_TABLE} FOR NO KEY UPDATE"))
        with manager.connect("shard-1") as conn:
            conn.execute(text("SET lock_timeout = '2s'"))
            started = time.perf_counter()
            router.fence_write(conn, "shard-1", _staying_key("shard-1"))
            assert time.perf_counter() - started < 1.5
            conn.rollback()
            conn.execute(text("SET lock_timeout = '300ms'"))
            with pytest.raises(FenceTimeoutError, match="'shard-1'.*0.3 s"):  # a moving key's writer waits
                router.fence_write(conn, "shard-1", _moving_key("shard-1"))
        mover_conn.rollback()


def test_a_session_on_an_old_version_is_fenced_off_a_moved_range(
    manager: ShardManager, shard_map: dict[str, str], shard5_url: str
) -> None:
    seed(manager, FOUR, 100, 2, 1)
    install_ring(manager, FOUR)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    stale = RingRouter(manager)  # this "process" routes by version 1 and is never told about the move
    key = _moving_key("shard-2")
    with ShardManager.from_urls({**shard_map, "shard-5": shard5_url}) as operator:
        add_shard(operator, "shard-5", Base)
    assert stale.state.version == 1
    with manager.connect("shard-2") as conn:  # the old owner refuses the key, naming its new shard
        with pytest.raises(StaleRingError, match="shard-5") as info:
            stale.fence_write(conn, "shard-2", key)
        assert info.value.shard_id == "shard-5"
    with stale.begin_write(key) as conn:  # routing follows the stored version without a restart
        conn.execute(insert(ORDERS), {"customer_id": key, "order_id": uuid.uuid4(), "total": Decimal(1)})
    assert stale.state.version == 3 and stale.state.ring == FIVE
    check_fleet(manager, FIVE, None, 100 * 2 + 1)


def test_failed_verification_deletes_nothing_and_a_rerun_converges(
    manager: ShardManager, shard5_url: str
) -> None:
    seed(manager, FOUR, 100, 2, 1)
    install_ring(manager, FOUR)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    Base.metadata.create_all(manager.engine("shard-5"))
    with manager.connect("shard-5") as conn:  # a target that silently alters what it stores
        conn.execute(
            text(
                "CREATE FUNCTION bump() RETURNS trigger AS $$ BEGIN NEW.total := NEW.total + 1; "
                "RETURN NEW; END $$ LANGUAGE plpgsql;"
                "CREATE TRIGGER bump BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION bump()"
            )
        )
        conn.commit()
    with pytest.raises(RebalanceError, match="verification failed copying from"):
        add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=1000))
    check_fleet(manager, FOUR, None, 200)  # every row still where it was
    state = load_ring_state(manager)
    assert state is not None and state.target == FIVE
    with manager.connect("shard-5") as conn:
        conn.execute(text("DROP TRIGGER bump ON orders"))
        conn.commit()
    result = resume(manager, Base)
    assert result is not None and result.new == FIVE
    check_fleet(manager, FIVE, None, 200)


def test_a_target_whose_column_type_differs_is_read_back_and_fails_verification(
    manager: ShardManager, shard5_url: str
) -> None:
    """Without triggers the read-back is skipped only when the target's column types equal the
    source's: here the target rounds ``total`` to one decimal, silently, and the move must refuse."""
    seed(manager, FOUR, 100, 2, 1)
    for shard_id in FOUR.shard_ids:
        with manager.connect(shard_id) as conn:
            conn.execute(text("UPDATE orders SET total = 10.25"))
            conn.commit()
    install_ring(manager, FOUR)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    Base.metadata.create_all(manager.engine("shard-5"))
    with manager.connect("shard-5") as conn:  # schema drift: a narrower numeric
        conn.execute(text("ALTER TABLE orders ALTER COLUMN total TYPE numeric(14, 1)"))
        conn.commit()
    with pytest.raises(RebalanceError, match="verification failed copying from"):
        add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=1000))
    check_fleet(manager, FOUR, None, 200)  # every row still where it was

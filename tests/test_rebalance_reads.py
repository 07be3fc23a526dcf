"""Keyed reads through ShardedSession while their range moves: never a missed committed row.

A read routed to a moving key's old shard can be overtaken by the batch's cut-over (which deletes
the rows there) between the routing decision and the query. These tests land a real cut-over in
exactly that gap (from a hook on the old shard's engine, just before the reader's SELECT reaches
the server) and check that the session re-checks and reads the new shard.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, func, select, text

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.demo.models import Base, Customer, Order
from sa_shardkit.rebalance import MoveOptions, RingRouter, RingState, table_set
from sa_shardkit.rebalance.catalog import STATE_TABLE
from sa_shardkit.rebalance.mover import SourceMover
from sa_shardkit.rebalance.progress import ProgressTracker
from tests.rebalance_data import start_move

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
ORDERS_EACH = 2


def _moving_keys(source: str, customers: int = 100) -> list[int]:
    return [
        k for k in range(1, customers + 1) if FOUR.get_shard(k) == source and FIVE.get_shard(k) == "shard-5"
    ]


def _mover(manager: ShardManager, state: RingState, source: str, batch_size: int) -> SourceMover:
    options = MoveOptions(batch_size=batch_size)
    return SourceMover(manager, state, table_set(Base), source, options, ProgressTracker())


@contextmanager
def _cut_over_before_read_of(manager: ShardManager, mover: SourceMover, table: str) -> Iterator[list[int]]:
    """Run one mover batch (copy + cut-over, committed) just before the first SELECT from
    ``table`` reaches the mover's source shard; yields a list that gets one entry once it did."""
    engine = manager.engine(mover.source)
    done: list[int] = []

    def cut_over(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if done or not statement.lstrip().upper().startswith("SELECT") or f"FROM {table}" not in statement:
            return
        done.append(1)  # first: the mover's own SELECTs must not re-enter
        assert mover.batch()

    event.listen(engine, "before_cursor_execute", cut_over)
    try:
        yield done
    finally:
        event.remove(engine, "before_cursor_execute", cut_over)


def _rows_of(manager: ShardManager, shard_id: str, key: int) -> int:
    with manager.connect(shard_id) as conn:
        return int(conn.execute(select(func.count()).where(Order.customer_id == key)).scalar_one())


def test_get_finds_a_row_cut_over_between_routing_and_the_read(
    manager: ShardManager, shard5_url: str
) -> None:
    state = start_move(manager, shard5_url)
    key = _moving_keys("shard-1")[0]
    RingRouter(manager)
    with _cut_over_before_read_of(manager, _mover(manager, state, "shard-1", 10_000), "customers") as cut:
        with manager.sessionmaker()() as session:
            customer = session.get(Customer, key)
    assert cut  # the cut-over really landed between the routing decision and the read
    assert customer is not None and customer.customer_id == key
    assert (_rows_of(manager, "shard-1", key), _rows_of(manager, "shard-5", key)) == (0, ORDERS_EACH)


def test_a_keyed_select_finds_rows_cut_over_between_routing_and_the_read(
    manager: ShardManager, shard5_url: str
) -> None:
    state = start_move(manager, shard5_url)
    key = _moving_keys("shard-2")[0]
    RingRouter(manager)
    with _cut_over_before_read_of(manager, _mover(manager, state, "shard-2", 10_000), "orders") as cut:
        with manager.sessionmaker()() as session:
            orders = session.scalars(select(Order).where(Order.customer_id == key)).all()
    assert cut
    assert sorted(o.customer_id for o in orders) == [key] * ORDERS_EACH  # each row once
    assert (_rows_of(manager, "shard-2", key), _rows_of(manager, "shard-5", key)) == (0, ORDERS_EACH)


def test_readers_hammering_moving_keys_never_miss_a_row_during_a_move(
    manager: ShardManager, shard5_url: str
) -> None:
    customers = 2000
    state = start_move(manager, shard5_url, customers)
    keys = _moving_keys("shard-3", customers)
    RingRouter(manager)
    mover = _mover(manager, state, "shard-3", 1)  # one moving key per cut-over: many chances to race
    misses: list[str] = []
    reads = [0]
    stop = threading.Event()

    def next_to_move() -> int:
        """A moving key the batch now in flight is about to cut over: the race is most likely there."""
        with manager.connect("shard-3") as conn:
            mark = conn.execute(text(f"SELECT watermark FROM {STATE_TABLE}")).scalar_one()
        ahead = [k for k in keys if mark is None or k > int(mark)]
        return rnd.choice(ahead[:2]) if ahead else rnd.choice(keys)

    rnd = random.Random(7)

    def read() -> None:
        factory = manager.sessionmaker()
        while not stop.is_set():
            key = next_to_move()
            with factory() as session:
                if session.get(Customer, key) is None:
                    misses.append(f"get(Customer, {key})")
                found = len(session.scalars(select(Order).where(Order.customer_id == key)).all())
                if found != ORDERS_EACH:
                    misses.append(f"{found} orders of customer {key}")
            reads[0] += 1

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while mover.batch() and time.monotonic() < deadline:
            time.sleep(0.05)  # let the reader race the next cut-over too
    finally:
        stop.set()
        reader.join(timeout=30)
    assert reads[0] > 50
    assert misses == []
    assert sum(_rows_of(manager, "shard-3", k) for k in keys) == 0


def test_a_scatter_overtaken_by_a_cut_over_sees_each_row_once(manager: ShardManager, shard5_url: str) -> None:
    """A batch is cut over (targets, then source, committed) just before the scatter's query reaches
    the source: the source no longer has the rows, and the target was maybe read before they got
    there. The session sees the source's marks changed, runs the scatter again, and counts each
    row once (without the re-check it misses them; without the filter it could count them twice)."""
    customers = 100
    state = start_move(manager, shard5_url, customers)
    RingRouter(manager)
    mover = _mover(manager, state, "shard-1", 10_000)
    with _cut_over_before_read_of(manager, mover, "customers") as cut:
        with manager.sessionmaker()() as session:
            count = session.scalar(select(func.count()).select_from(Customer))
            ids = session.scalars(select(Customer.customer_id).order_by(Customer.customer_id)).all()
    assert cut
    assert _moving_keys("shard-1") and all(
        _rows_of(manager, "shard-1", k) == 0 for k in _moving_keys("shard-1")
    )
    assert count == customers
    assert ids == list(range(1, customers + 1))


def test_a_scatter_that_keeps_being_overtaken_holds_the_sources_fences(
    manager: ShardManager, shard5_url: str, monkeypatch: Any
) -> None:
    """After its unfenced tries, a scatter holds each source's fence (``FOR SHARE``) while its
    shards run: a cut-over (``FOR NO KEY UPDATE``) cannot commit in the middle of it."""
    from sqlalchemy.exc import OperationalError

    import sa_shardkit.session as session_module

    monkeypatch.setattr(session_module, "OPTIMISTIC_SCATTERS", 0)
    state = start_move(manager, shard5_url, 100)
    RingRouter(manager)
    blocked: list[bool] = []

    def try_cut_over(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if blocked or "FROM customers" not in statement:
            return
        with manager.connect("shard-1") as other:
            try:
                other.execute(text(f"SELECT 1 FROM {STATE_TABLE} FOR NO KEY UPDATE NOWAIT"))
                blocked.append(False)
            except OperationalError:
                blocked.append(True)
            other.rollback()

    engine = manager.engine("shard-5")
    event.listen(engine, "before_cursor_execute", try_cut_over)
    try:
        with manager.sessionmaker()() as session:
            assert session.scalar(select(func.count()).select_from(Customer)) == 100
    finally:
        event.remove(engine, "before_cursor_execute", try_cut_over)
    assert blocked == [True]
    assert state.sources == ("shard-1", "shard-2", "shard-3", "shard-4")
    with manager.connect("shard-1") as conn:  # released afterwards
        conn.execute(text(f"SELECT 1 FROM {STATE_TABLE} FOR NO KEY UPDATE NOWAIT"))
        conn.rollback()

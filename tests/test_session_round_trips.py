"""A routed ShardedSession talks to its shard less often than a plain Session does (issue 13).

Round trips are counted from libpq's own protocol trace of every connection the shard's engine
hands out (each ``ReadyForQuery`` the server sends ends one), so the count is exact and no timing
is involved. The fleet stores no ring: every write transaction checks that none is stored
(:mod:`sa_shardkit.placement`). A session flush's check rides with the BEGIN on its first
statement, in one pipeline (:mod:`sa_shardkit.fused_write`): one round trip fewer than a plain
Session's write transaction (BEGIN, INSERT, COMMIT). A read transaction's BEGIN rides on its first
SELECT the same way: one round trip fewer than a plain Session's (BEGIN, SELECT, ROLLBACK). Other
checks ride on the transaction's BEGIN (:mod:`sa_shardkit.fused_begin`).
"""

from __future__ import annotations

import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest
from psycopg import pq
from sqlalchemy import event, insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from sa_shardkit import ShardManager
from sa_shardkit.demo.models import Base, Customer, Order
from sa_shardkit.placement import RECHECK_ENV
from sa_shardkit.rebalance import install_ring
from sa_shardkit.ring_state import STATE_TABLE

WARM = 7
"""Runs before counting: psycopg prepares a statement on its 5th execution (one more round trip)."""


@contextmanager
def traced(engine: Engine) -> Iterator[Callable[[], int]]:
    """Round trips of every connection ``engine`` hands out in the block (``count()``)."""
    out = tempfile.TemporaryFile("w+")

    here = threading.get_ident()  # not the routing's own ring checks, made in worker threads

    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if threading.get_ident() != here:
            return
        dbapi_connection.pgconn.trace(out.fileno())
        dbapi_connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)

    def checkin(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            dbapi_connection.pgconn.untrace()

    def count() -> int:
        out.seek(0)
        return sum(1 for line in out if line.startswith("B") and "\tReadyForQuery" in line)

    event.listen(engine, "checkout", checkout)
    event.listen(engine, "checkin", checkin)
    try:
        yield count
    finally:
        event.remove(engine, "checkout", checkout)
        event.remove(engine, "checkin", checkin)
        out.close()


def insert_order(factory: Callable[[], Session], key: int) -> None:
    with factory() as session, session.begin():
        session.add(Order(customer_id=key, order_id=uuid.uuid4(), status="new", total=Decimal(1)))


def get_orders(factory: Callable[[], Session], key: int) -> None:
    with factory() as session:
        assert session.scalars(select(Order).where(Order.customer_id == key)).all()


def round_trips(engine: Engine, work: Callable[[], None]) -> int:
    with traced(engine) as count:
        work()
        return count()


def warm_and_count_a_plain_write(manager: ShardManager, keys: list[int]) -> int:
    """Warm pools, caches, the kept ring check and psycopg's own prepared INSERT for a plain and a
    routed session (on ``keys[0]`` and ``keys[1]``); the round trips of the plain session's write."""
    engine = manager.engine("shard-1")
    plain, routed = sessionmaker(engine), manager.sessionmaker()
    for _ in range(WARM):
        insert_order(plain, keys[0])
        insert_order(routed, keys[1])
    return round_trips(engine, lambda: insert_order(plain, keys[0]))


@pytest.fixture
def one_shard_keys(manager: ShardManager, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Two customers on shard-1, on a fleet that stores no ring; the process does not look for
    one while the test counts (conftest makes it look every 0.2 s)."""
    monkeypatch.setenv(RECHECK_ENV, "3600")
    manager.placement.refresh_seconds = 3600
    Base.metadata.create_all(manager.engine("shard-1"))
    keys = [k for k in range(1, 200) if manager.shard_for(k) == "shard-1"][:2]
    with manager.engine("shard-1").begin() as conn:
        conn.execute(insert(Customer), [{"customer_id": k, "name": f"c{k}"} for k in keys])
        assert conn.execute(text("SELECT to_regclass(:t)"), {"t": STATE_TABLE}).scalar() is None
    return keys


def test_routed_write_transaction_makes_a_plain_sessions_round_trips(
    manager: ShardManager, one_shard_keys: list[int]
) -> None:
    engine = manager.engine("shard-1")
    routed = manager.sessionmaker()
    stock = warm_and_count_a_plain_write(manager, one_shard_keys)
    ours = round_trips(engine, lambda: insert_order(routed, one_shard_keys[1]))
    assert stock >= 3  # the checkout ping, BEGIN, INSERT, COMMIT: the trace sees them
    assert ours == stock - 1  # BEGIN, the ring check and the INSERT in one pipeline (fused_write)


def get_order(factory: Callable[[], Session], key: int, order_id: uuid.UUID) -> None:
    with factory() as session:
        assert session.get(Order, (key, order_id)) is not None


@pytest.mark.parametrize("read", ["select", "get"])
def test_routed_read_makes_one_round_trip_fewer_than_a_plain_session(
    manager: ShardManager, one_shard_keys: list[int], read: str
) -> None:
    """A plain Session's read transaction: BEGIN, SELECT, ROLLBACK; the routed session's BEGIN
    rides on its SELECT (fused_write.begin_with_next_statement)."""
    engine = manager.engine("shard-1")
    plain, routed = sessionmaker(engine), manager.sessionmaker()
    ids = {key: uuid.uuid4() for key in one_shard_keys}
    with plain() as session, session.begin():
        session.add_all(
            Order(customer_id=k, order_id=i, status="new", total=Decimal(1)) for k, i in ids.items()
        )

    def work(factory: Callable[[], Session], key: int) -> Callable[[], None]:
        if read == "get":
            return lambda: get_order(factory, key, ids[key])
        return lambda: get_orders(factory, key)

    for _ in range(WARM):
        work(plain, one_shard_keys[0])()
        work(routed, one_shard_keys[1])()
    stock = round_trips(engine, work(plain, one_shard_keys[0]))
    ours = round_trips(engine, work(routed, one_shard_keys[1]))
    assert stock == 3
    assert ours == stock - 1


def test_ring_check_survives_a_dropped_prepared_statement(
    manager: ShardManager, one_shard_keys: list[int]
) -> None:
    """DEALLOCATE ALL (psycopg runs it after DDL) drops the kept check: the next write still
    checks, the ordinary way, and the one after that rides on its INSERT again."""
    engine = manager.engine("shard-1")
    routed = manager.sessionmaker()
    plain = sessionmaker(engine)
    for _ in range(WARM):
        insert_order(routed, one_shard_keys[0])
        insert_order(plain, one_shard_keys[0])
    with engine.connect() as conn:
        conn.exec_driver_sql("DEALLOCATE ALL")
        conn.commit()
    for _ in range(WARM):  # the first prepares the check again, psycopg its INSERT later
        insert_order(routed, one_shard_keys[0])
        insert_order(plain, one_shard_keys[0])
    assert round_trips(engine, lambda: insert_order(routed, one_shard_keys[0])) == (
        round_trips(engine, lambda: insert_order(plain, one_shard_keys[0])) - 1
    )
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT count(*) FROM orders WHERE customer_id = :k"), {"k": one_shard_keys[0]}
        ).scalar()
    assert stored == 4 * WARM + 2


def test_with_a_stored_ring_the_fence_rides_on_begin_too(
    manager: ShardManager, one_shard_keys: list[int]
) -> None:
    """Once a ring is stored, a write transaction's fence locks the shard's state row (``FOR KEY
    SHARE``) as its first statement: sent with the BEGIN and the flush's INSERT in one pipeline,
    checked against the routed version by the server (the INSERT does not run otherwise)."""
    install_ring(manager)
    manager.placement.refresh()
    assert manager.placement.state.version == 1
    engine = manager.engine("shard-1")
    routed = manager.sessionmaker()
    stock = warm_and_count_a_plain_write(manager, one_shard_keys)
    ours = round_trips(engine, lambda: insert_order(routed, one_shard_keys[1]))
    assert ours == stock - 1  # BEGIN, the fence's lock and the INSERT in one pipeline
    with engine.connect() as conn:  # every routed insert landed, fenced or not
        stored = conn.execute(
            text("SELECT count(*) FROM orders WHERE customer_id = :k"), {"k": one_shard_keys[1]}
        ).scalar()
    assert stored == WARM + 1


def test_a_write_after_a_read_keeps_its_round_trip(manager: ShardManager, one_shard_keys: list[int]) -> None:
    """A read transaction ends with ROLLBACK, after which psycopg deallocates every prepared
    statement of the connection (once it prepared one of its own: the INSERT, used 5 times): the
    next write's check is prepared again in its pipeline, not found missing, so it still makes one
    round trip fewer than a plain Session's."""
    engine = manager.engine("shard-1")
    routed = manager.sessionmaker()
    stock = warm_and_count_a_plain_write(manager, one_shard_keys)
    for _ in range(3):
        for _ in range(WARM):  # psycopg prepares the INSERT again after each DEALLOCATE ALL
            insert_order(routed, one_shard_keys[1])
        get_orders(routed, one_shard_keys[1])  # ROLLBACK, then DEALLOCATE ALL
        ours = round_trips(engine, lambda: insert_order(routed, one_shard_keys[1]))
        assert ours == stock - 1

"""Scatter-gather through the ShardedSession: ORM entities, identity map, transactions, faults."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event, func, inspect, over, select, text
from sqlalchemy.orm import Session, joinedload, sessionmaker

from sa_shardkit import ShardManager, errors
from sa_shardkit.demo.models import Customer, Order
from sa_shardkit.scatter import ScatterResult
from tests.fleet import TestFleet
from tests.session_support import SqlLog, create_schema

N = 16
START = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
def filled(manager: ShardManager) -> sessionmaker[Session]:
    """Customers 1..16 (every shard holds some), two orders each, totals not in shard order."""
    create_schema(manager)
    factory = manager.sessionmaker()
    for cid in range(1, N + 1):  # one transaction per customer: a transaction covers one shard
        with factory() as session, session.begin():
            customer = Customer(customer_id=cid, name=f"c{cid}", balance=Decimal(cid))
            for k in range(2):
                customer.orders.append(
                    Order(
                        order_id=uuid.UUID(int=cid * 10 + k),
                        status="pending" if k == 0 else "paid",
                        total=Decimal((cid * 37 + k * 11) % 50),
                        created_at=START + dt.timedelta(hours=(cid * 7 + k) % 23),
                    )
                )
            session.add(customer)
    assert len({manager.shard_for(c) for c in range(1, N + 1)}) == 4
    return factory


def all_orders(manager: ShardManager) -> list[tuple[Any, ...]]:
    rows = manager.run_on_all("SELECT customer_id, order_id, status, total, created_at FROM orders")
    return [tuple(r) for shard_rows in rows.values() for r in shard_rows]


def test_orm_order_by_limit_returns_the_global_first_entities(
    manager: ShardManager, filled: sessionmaker[Session]
) -> None:
    expected = sorted(all_orders(manager), key=lambda r: (-r[3], r[1]))[:5]
    with filled() as session:
        orders = session.scalars(select(Order).order_by(Order.total.desc(), Order.order_id).limit(5)).all()
        assert [o.order_id for o in orders] == [r[1] for r in expected]


def test_entities_carry_their_shard_as_identity_token(
    manager: ShardManager, filled: sessionmaker[Session]
) -> None:
    with filled() as session:
        customers = session.scalars(select(Customer).order_by(Customer.customer_id)).all()
        assert [c.customer_id for c in customers] == list(range(1, N + 1))
        for customer in customers:
            assert inspect(customer).identity_token == manager.shard_for(customer.customer_id)


def test_identity_map_returns_the_same_objects_across_scatters(filled: sessionmaker[Session]) -> None:
    with filled() as session:
        first = session.scalars(select(Customer).order_by(Customer.name).limit(3)).all()
        first[0].name = "changed in memory"
        again = session.scalars(select(Customer).order_by(Customer.customer_id)).all()
        assert first[0] in again and any(c is first[1] for c in again)
        assert first[0].name == "changed in memory" or session.is_modified(first[0])


def test_count_through_session_scalar(filled: sessionmaker[Session]) -> None:
    with filled() as session:
        assert session.scalar(select(func.count()).select_from(Order)) == 2 * N
        assert session.scalar(select(func.count(Order.order_id)).where(Order.status == "paid")) == N


def test_aggregates_with_group_by_through_the_session(
    manager: ShardManager, filled: sessionmaker[Session]
) -> None:
    rows = all_orders(manager)
    with filled() as session:
        result = session.execute(
            select(Order.status, func.count().label("n"), func.sum(Order.total), func.max(Order.total))
            .group_by(Order.status)
            .order_by(Order.status)
        ).all()
    expected = [
        (
            s,
            sum(1 for r in rows if r[2] == s),
            sum(r[3] for r in rows if r[2] == s),
            max(r[3] for r in rows if r[2] == s),
        )
        for s in ("paid", "pending")
    ]
    assert [tuple(r) for r in result] == expected
    assert result[0].n == N


def test_legacy_query_returns_entities_in_global_order(filled: sessionmaker[Session]) -> None:
    with filled() as session:
        customers = session.query(Customer).order_by(Customer.balance.desc()).limit(3).all()
        assert [c.customer_id for c in customers] == [16, 15, 14]
        assert session.query(Order).count() == 2 * N


def assert_top_customers_with_orders(session: Session) -> None:
    """A joined eager load under a global LIMIT: the four highest customers, each with both orders."""
    stmt = (
        select(Customer).options(joinedload(Customer.orders)).order_by(Customer.customer_id.desc()).limit(4)
    )
    customers = session.scalars(stmt).unique().all()
    assert [c.customer_id for c in customers] == [16, 15, 14, 13]
    assert all(len(c.orders) == 2 for c in customers)


def test_joined_eager_load_with_global_limit(filled: sessionmaker[Session]) -> None:
    with filled() as session:
        assert_top_customers_with_orders(session)


def test_scatter_sees_the_sessions_own_uncommitted_rows(
    manager: ShardManager, filled: sessionmaker[Session]
) -> None:
    with filled() as session, session.begin():
        session.add(Customer(customer_id=999, name="pending-autoflush", balance=Decimal(1)))
        assert session.scalar(select(func.count()).select_from(Customer)) == N + 1  # autoflushed, same txn
        session.rollback()
    counts = manager.run_on_all("SELECT count(*) FROM customers")
    assert sum(r[0][0] for r in counts.values()) == N  # nothing leaked outside the transaction


def test_yield_per_streams_through_the_merge(filled: sessionmaker[Session]) -> None:
    with filled() as session:
        result = session.execute(
            select(Order).order_by(Order.created_at, Order.order_id).execution_options(yield_per=3)
        )
        partitions = list(result.partitions())
        orders = [row[0] for part in partitions for row in part]
        assert len(orders) == 2 * N and all(len(p) <= 3 for p in partitions)
        keys = [(o.created_at, o.order_id) for o in orders]
        assert keys == sorted(keys)


def test_session_scatter_runs_shards_in_parallel(filled: sessionmaker[Session]) -> None:
    """Every shard's statement has started before the first one finishes (no wall-clock bound: each
    server reports when its statement began and ended, and the shards share this machine's clock)."""
    with filled() as session:
        session.scalars(select(Customer)).all()  # warm every shard's connection
        stmt = (
            select(
                func.statement_timestamp(),
                func.clock_timestamp(),
                text("(SELECT pg_sleep(0.4)) IS NOT NULL"),
                func.clock_timestamp(),
            )
            .select_from(Customer)
            .limit(1)
            .execution_options(per_shard_results=True)
        )
        rows = session.execute(stmt).all()
    assert len(rows) == 4
    starts, ends = [r[1] for r in rows], [r[3] for r in rows]
    assert max(starts) < min(ends)  # sequential: each shard would start after the previous one ended


def test_unsupported_query_raises_and_per_shard_results_opt_in(filled: sessionmaker[Session]) -> None:
    stmt = select(Order.customer_id, over(func.row_number(), order_by=Order.total)).limit(1)
    with filled() as session:
        with pytest.raises(errors.UnsupportedScatterError, match="window"):
            session.execute(stmt)
        rows = session.execute(stmt.execution_options(per_shard_results=True)).all()
        assert len(rows) == 4


def test_stopped_shard_fails_the_query_naming_it(
    pg_fleet: TestFleet, manager: ShardManager, filled: sessionmaker[Session]
) -> None:
    healthy = next(c for c in range(1, N + 1) if manager.shard_for(c) != "shard-2")
    pg_fleet.server(1).stop()
    with filled() as session:
        started = time.perf_counter()
        with pytest.raises(errors.ShardUnavailableError, match="shard-2") as info:
            session.scalars(select(Customer)).all()
        assert info.value.shard_id == "shard-2"
        assert time.perf_counter() - started < manager.config("shard-2").connect_timeout + 1
        session.rollback()
        assert session.get(Customer, healthy) is not None  # the other shards are unaffected


def test_allow_partial_returns_healthy_shards_and_names_the_missing(
    pg_fleet: TestFleet, manager: ShardManager, filled: sessionmaker[Session]
) -> None:
    pg_fleet.server(1).stop()
    with filled() as session:
        result = session.execute(
            select(Customer).order_by(Customer.customer_id).execution_options(allow_partial=True)
        )
        assert isinstance(result, ScatterResult) and result.missing_shards == ("shard-2",)
        ids = [c.customer_id for c in result.scalars()]
    assert ids == [c for c in range(1, N + 1) if manager.shard_for(c) != "shard-2"]


def test_limit_scatter_loads_only_the_returned_entities(filled: sessionmaker[Session]) -> None:
    loaded: list[Any] = []

    def count(target: Any, context: Any) -> None:
        loaded.append(target)

    event.listen(Order, "load", count)
    try:
        with filled() as session:
            stmt = select(Order).order_by(Order.created_at, Order.order_id).offset(2).limit(5)
            assert len(session.scalars(stmt).all()) == 5
    finally:
        event.remove(Order, "load", count)
    # each shard sent up to 7 rows; only the 7 the merge used became entities (not 4 x 7)
    assert len(loaded) == 7


def test_frozen_shard_is_reported_missing_within_the_connect_timeout(
    pg_fleet: TestFleet, manager: ShardManager, filled: sessionmaker[Session]
) -> None:
    with filled() as session:
        session.scalars(select(Customer)).all()  # pooled connections everywhere
    pg_fleet.server(2).pause()
    try:
        with filled() as session:
            started = time.perf_counter()
            stmt = select(Customer).order_by(Customer.customer_id).execution_options(allow_partial=True)
            result = session.execute(stmt)
            assert time.perf_counter() - started < manager.config("shard-3").connect_timeout + 2
            assert result.missing_shards == ("shard-3",)  # type: ignore[attr-defined]
            ids = [c.customer_id for c in result.scalars()]
        assert ids == [c for c in range(1, N + 1) if manager.shard_for(c) != "shard-3"]
    finally:
        pg_fleet.server(2).resume()


def test_a_lean_scatter_the_merge_cannot_use_runs_again_with_the_sort_columns(
    manager: ShardManager, filled: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net behind the lean plan's pre-check: a joined eager load the check missed (made
    to miss here) is found after the round trip, and the scatter runs again with the hidden sort
    columns: the right entities, in the right order, and the statements say so."""
    import sa_shardkit.scatter.session as scatter_session

    monkeypatch.setattr(scatter_session._ScatterRun, "_lean_statement", lambda self: self.plan.lean)
    log = SqlLog(manager)
    try:
        with filled() as session:
            assert_top_customers_with_orders(session)
    finally:
        log.close()
    selects = [sql for _, sql in log.statements if "FROM" in sql and "customers" in sql]
    lean = [sql for sql in selects if "_shardkit_o" not in sql]
    assert len(lean) == 4 and len(selects) == 8  # the lean try on each shard, then the full one


def test_limit_scatter_of_an_entity_sends_no_hidden_sort_columns(
    manager: ShardManager, filled: sessionmaker[Session]
) -> None:
    log = SqlLog(manager)
    try:
        with filled() as session:
            stmt = select(Order).order_by(Order.created_at.desc(), Order.order_id).offset(1).limit(5)
            rows = session.scalars(stmt).all()
            joined = session.scalars(stmt.options(joinedload(Order.customer))).all()
    finally:
        log.close()
    every = sorted(all_orders(manager), key=lambda r: (-r[4].timestamp(), r[1]))
    assert [(o.customer_id, o.order_id) for o in rows] == [(r[0], r[1]) for r in every[1:6]]
    assert joined == rows  # with a loader option: the hidden columns, the same answer
    selects = [sql for _, sql in log.statements if "FROM orders" in sql]
    assert len(selects) == 8
    assert not any("_shardkit_o" in sql for sql in selects[:4])
    assert all("_shardkit_o" in sql for sql in selects[4:])


def test_a_deferred_sort_column_keeps_the_hidden_columns_and_one_statement_per_shard(
    manager: ShardManager, filled: sessionmaker[Session]
) -> None:
    """A lean statement would leave a deferred ORDER BY column out of the rows: the plan's full
    statement runs at once (never a lean try and a second round trip), and the answer is right."""
    from sqlalchemy.orm import DeclarativeBase, deferred

    class _Base(DeclarativeBase):
        pass

    class LazyOrder(_Base):
        __table__ = Order.__table__
        created_at = deferred(Order.__table__.c.created_at)

    log = SqlLog(manager)
    try:
        with filled() as session:
            rows = session.scalars(
                select(LazyOrder).order_by(LazyOrder.created_at, LazyOrder.order_id).limit(3)
            ).all()
    finally:
        log.close()
    every = sorted(all_orders(manager), key=lambda r: (r[4], r[1]))
    assert [(o.customer_id, o.order_id) for o in rows] == [(r[0], r[1]) for r in every[:3]]
    selects = [sql for _, sql in log.statements if "FROM orders" in sql]
    assert len(selects) == 4 and all("_shardkit_o" in sql for sql in selects)


def test_a_lean_limit_scatter_with_a_frozen_shard_names_it_and_merges_the_rest(
    pg_fleet: TestFleet, manager: ShardManager, filled: sessionmaker[Session]
) -> None:
    """The lean path with a shard frozen (SIGSTOP) under ``allow_partial``: the frozen shard is
    reported missing within its connect timeout, and the healthy shards' rows come in the global
    order the servers' own rows give (read from each server before the freeze), no hidden column sent."""
    every = sorted(all_orders(manager), key=lambda r: (r[4], r[1]))  # each server read directly
    expected = [(r[0], r[1]) for r in every if manager.shard_for(r[0]) != "shard-3"][:5]
    with filled() as session:
        session.scalars(select(Order)).all()  # pooled connections everywhere
    log = SqlLog(manager)
    pg_fleet.server(2).pause()
    try:
        with filled() as session:
            started = time.perf_counter()
            stmt = (
                select(Order)
                .order_by(Order.created_at, Order.order_id)
                .limit(5)
                .execution_options(allow_partial=True)
            )
            result = session.execute(stmt)
            assert time.perf_counter() - started < manager.config("shard-3").connect_timeout + 2
            assert result.missing_shards == ("shard-3",)  # type: ignore[attr-defined]
            assert isinstance(result.shard_errors["shard-3"], errors.ShardUnavailableError)  # type: ignore[attr-defined]
            rows = [(o.customer_id, o.order_id) for o in result.scalars()]
    finally:
        pg_fleet.server(2).resume()
        log.close()
    assert rows == expected
    selects = [sql for _, sql in log.statements if "FROM orders" in sql and "LIMIT" in sql]
    assert selects and not any("_shardkit_o" in sql for sql in selects)

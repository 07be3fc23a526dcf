"""ShardedSession reads: get(), statement routing, relationship loads, overrides, shards_for().

Rows are written through the session, then each test proves which shards a read touched (SQL
captured per shard engine) and that it found the right rows.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy import and_, bindparam, event, inspect, or_, select, text
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import ORMExecuteState, aliased, joinedload, selectinload, sessionmaker

from sa_shardkit import ShardedSession, ShardManager, errors
from sa_shardkit.demo.models import Customer, Order, OrderItem, Product
from sa_shardkit.routing import ring_shards
from tests.session_support import (  # noqa: F401 - fixtures
    SqlLog,
    Ticket,
    keys_on_distinct_shards,
    make_customer,
    schema_fixture,
    session_factory_fixture,
    shards_holding,
    sql_log_fixture,
)

N_CUSTOMERS = 12


@pytest.fixture
def filled(Session: sessionmaker[Any], schema: ShardManager, sql_log: SqlLog) -> ShardManager:  # noqa: N803
    for customer_id in range(1, N_CUSTOMERS + 1):
        with Session() as session, session.begin():
            session.add(make_customer(customer_id, orders=2, items=2))
            session.add(Ticket(ticket_id=100 + customer_id, customer_id=customer_id, subject="help"))
    sql_log.clear()
    return schema


def test_get_with_the_key_in_the_primary_key_queries_one_shard(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    with Session() as session:
        customer = session.get(Customer, 5)
        assert customer is not None and customer.customer_id == 5
    assert sql_log.shards("FROM customers") == {filled.shard_for(5)}


def test_get_without_the_key_in_the_primary_key_searches_every_shard_and_logs_it(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="sa_shardkit"), Session() as session:
        ticket = session.get(Ticket, 107)
        assert ticket is not None and ticket.customer_id == 7
        assert session.get(Ticket, 999) is None
    assert sql_log.shards("FROM tickets") == set(filled.shard_ids)
    assert "lacks the shard key" in caplog.text


def test_equality_on_the_key_targets_one_shard(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    with Session() as session:
        orders = session.scalars(select(Order).where(Order.customer_id == 3)).all()
    assert len(orders) == 2 and {o.customer_id for o in orders} == {3}
    assert sql_log.shards("FROM orders") == {filled.shard_for(3)}


def test_in_list_targets_one_shard_per_distinct_key_group(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    a, b = keys_on_distinct_shards(filled, 2)
    with Session() as session:
        orders = session.scalars(select(Order).where(Order.customer_id.in_([a, b]))).all()
    assert {o.customer_id for o in orders} == {a, b} and len(orders) == 4
    assert sql_log.shards("FROM orders") == {filled.shard_for(a), filled.shard_for(b)}


def test_bound_parameters_are_read_at_execute_time(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    stmt = select(Order).where(Order.customer_id == bindparam("cid"))
    with Session() as session:
        orders = session.scalars(stmt, {"cid": 4}).all()
    assert {o.customer_id for o in orders} == {4}
    assert sql_log.shards("FROM orders") == {filled.shard_for(4)}


def test_and_intersects_and_or_unites(filled: ShardManager) -> None:
    a, b = keys_on_distinct_shards(filled, 2)
    both = select(Order).where(or_(Order.customer_id == a, Order.customer_id == b))
    assert set(filled.shards_for(both)) == {filled.shard_for(a), filled.shard_for(b)}
    narrowed = select(Order).where(and_(Order.customer_id.in_([a, b]), Order.customer_id == a))
    assert filled.shards_for(narrowed) == (filled.shard_for(a),)
    loose = select(Order).where(or_(Order.customer_id == a, Order.status == "pending"))
    assert filled.shards_for(loose) == ring_shards(filled)


def test_equality_through_a_join_on_the_key_targets_one_shard(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    stmt = select(OrderItem).join(OrderItem.order).join(Order.customer).where(Customer.customer_id == 6)
    with Session() as session:
        items = session.scalars(stmt).all()
    assert len(items) == 4 and {i.customer_id for i in items} == {6}
    assert sql_log.shards("FROM order_items") == {filled.shard_for(6)}


def test_aliased_entity_is_routed_by_its_key(filled: ShardManager) -> None:
    o = aliased(Order)
    assert filled.shards_for(select(o).where(o.customer_id == 2)) == (filled.shard_for(2),)


def test_query_without_the_key_scatters_to_every_shard(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    with Session() as session:
        pending = session.scalars(select(Order).where(Order.status == "pending")).all()
    assert len(pending) == 2 * N_CUSTOMERS
    assert sql_log.shards("FROM orders") == set(filled.shard_ids)


def test_lazy_load_stays_on_the_parents_shard(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    with Session() as session:
        customer = session.get(Customer, 9)
        assert customer is not None
        sql_log.clear()
        assert len(customer.orders) == 2
        assert all(len(order.items) == 2 for order in customer.orders)
        order = customer.orders[0]
        session.expire(order, ["customer"])
        assert order.customer is customer
    assert {s for s, _ in sql_log.statements} == {filled.shard_for(9)}


@pytest.mark.parametrize("loader", [selectinload, joinedload], ids=["selectinload", "joinedload"])
def test_eager_loads_stay_on_the_parents_shard(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
    loader: Any,
) -> None:
    with Session() as session:
        customers = session.scalars(select(Customer).options(loader(Customer.orders))).unique().all()
        assert len(customers) == N_CUSTOMERS
        for customer in customers:
            assert {o.customer_id for o in customer.orders} == {customer.customer_id}
    by_shard = {s for s, sql in sql_log.statements if "FROM orders" in sql or "JOIN orders" in sql}
    assert by_shard == set(filled.shard_ids)
    for shard, sql in sql_log.statements:
        if "customer_id IN" in sql:  # each selectin query names only its own shard's customers
            assert "orders" in sql and shard in filled.shard_ids


def test_update_with_the_key_runs_on_one_shard(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    from sqlalchemy import update

    with Session() as session, session.begin():
        result = session.execute(update(Order).where(Order.customer_id == 2).values(status="paid"))
        assert result.rowcount == 2  # type: ignore[attr-defined]
    assert sql_log.shards("UPDATE orders") == {filled.shard_for(2)}


def test_update_and_delete_without_the_key_run_everywhere_and_sum_rowcounts(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    from sqlalchemy import delete, update

    with Session() as session, session.begin():
        updated = session.execute(update(Order).where(Order.status == "pending").values(status="late"))
        assert updated.rowcount == 2 * N_CUSTOMERS  # type: ignore[attr-defined]
        deleted = session.execute(delete(Ticket).where(Ticket.subject == "help"))
        assert deleted.rowcount == N_CUSTOMERS  # type: ignore[attr-defined]
    assert sql_log.shards("UPDATE orders") == set(filled.shard_ids)
    assert sql_log.shards("DELETE FROM tickets") == set(filled.shard_ids)
    assert shards_holding(filled, "SELECT 1 FROM tickets") == set()
    assert shards_holding(filled, "SELECT 1 FROM orders WHERE status <> 'late'") == set()


def test_set_shard_id_and_execution_option_pin_a_statement(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    with Session() as session:
        pinned = session.scalars(select(Order).options(set_shard_id("shard-3"))).all()
        assert {filled.shard_for(o.customer_id) for o in pinned} <= {"shard-3"}
        by_option = session.scalars(select(Order).execution_options(shard_id="shard-1")).all()
        assert {filled.shard_for(o.customer_id) for o in by_option} <= {"shard-1"}
        by_bind = session.scalars(select(Order), bind_arguments={"shard_id": "shard-2"}).all()
        assert {filled.shard_for(o.customer_id) for o in by_bind} <= {"shard-2"}
    assert sql_log.shards("FROM orders") == {"shard-1", "shard-2", "shard-3"}


def test_unknown_shard_override_raises_unknown_shard(
    Session: sessionmaker[Any], filled: ShardManager
) -> None:  # noqa: N803
    with Session() as session, pytest.raises(errors.UnknownShardError, match="shard-9"):
        session.scalars(select(Order).execution_options(shard_id="shard-9")).all()


def test_shards_for_answers_without_running(filled: ShardManager, sql_log: SqlLog) -> None:
    assert filled.shards_for(select(Order).where(Order.customer_id == 1)) == (filled.shard_for(1),)
    assert filled.shards_for(select(Order)) == ring_shards(filled)
    assert filled.shards_for(select(Product)) == (ring_shards(filled)[0],)
    stmt = select(Order).where(Order.customer_id == bindparam("c"))
    assert filled.shards_for(stmt, {"c": 2}) == (filled.shard_for(2),)
    assert sql_log.statements == []


def test_text_statement_needs_an_explicit_shard(Session: sessionmaker[Any], filled: ShardManager) -> None:  # noqa: N803
    with Session() as session:
        with pytest.raises(errors.NotShardedError, match="text"):
            session.execute(text("SELECT count(*) FROM orders"))
        count = session.execute(text("SELECT count(*) FROM orders"), bind_arguments={"shard_id": "shard-1"})
        assert count.scalar() == sum(2 for k in range(1, N_CUSTOMERS + 1) if filled.shard_for(k) == "shard-1")


def test_get_with_an_identity_token_asks_only_that_shard(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    home = filled.shard_for(10)
    other = next(s for s in filled.shard_ids if s != home)
    with Session() as session:
        assert session.get(Customer, 10, identity_token=other) is None
        assert session.get(Customer, 10, identity_token=home) is not None
    assert sql_log.shards("FROM customers") == {home, other}


def test_legacy_query_api_is_routed_like_select(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    with Session() as session:
        orders = session.query(Order).filter(Order.customer_id == 8).all()
        assert {o.customer_id for o in orders} == {8} and len(orders) == 2
        on_shard_1 = sum(2 for k in range(1, N_CUSTOMERS + 1) if filled.shard_for(k) == "shard-1")
        assert session.query(Order).set_shard("shard-1").count() == on_shard_1
    assert sql_log.shards("WHERE orders.customer_id") == {filled.shard_for(8)}
    assert sql_log.shards("count(*)") == {"shard-1"}


def test_one_statement_shape_routes_every_key_to_its_own_shard(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    """Routing analyses a keyed SELECT's shape once (its cache key); each value still picks its shard."""
    for customer_id in range(1, N_CUSTOMERS + 1):
        sql_log.clear()
        with Session() as session:
            orders = session.scalars(select(Order).where(Order.customer_id == customer_id)).all()
            assert {o.customer_id for o in orders} == {customer_id} and len(orders) == 2
            assert {inspect(o).identity_token for o in orders} == {filled.shard_for(customer_id)}
            found = session.get(Customer, customer_id)
            assert found is not None and inspect(found).identity_token == filled.shard_for(customer_id)
        assert sql_log.shards("FROM orders") == {filled.shard_for(customer_id)}
        assert sql_log.shards("FROM customers") == {filled.shard_for(customer_id)}


def test_keyed_reads_run_a_do_orm_execute_listener_added_later(
    Session: sessionmaker[Any],  # noqa: N803
    filled: ShardManager,
    sql_log: SqlLog,
) -> None:
    """Keyed SELECTs and get() skip the execute hooks only while no one else listens."""
    seen: list[tuple[str, Any]] = []

    def listener(orm_context: ORMExecuteState) -> None:
        seen.append((type(orm_context.statement).__name__, orm_context.bind_arguments.get("shard_id")))

    event.listen(ShardedSession, "do_orm_execute", listener)
    try:
        with Session() as session:
            assert len(session.scalars(select(Order).where(Order.customer_id == 3)).all()) == 2
            assert session.get(Customer, 4) is not None
    finally:
        event.remove(ShardedSession, "do_orm_execute", listener)
    assert seen == [("Select", filled.shard_for(3)), ("Select", filled.shard_for(4))]
    assert sql_log.shards("FROM orders") == {filled.shard_for(3)}
    with Session() as session:  # and without it, the same answers
        assert len(session.scalars(select(Order).where(Order.customer_id == 3)).all()) == 2
    assert len(seen) == 2

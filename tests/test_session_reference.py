"""Reference tables through ShardedSession: written to every shard, read from one."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import sessionmaker

from sa_shardkit import ShardManager
from sa_shardkit.demo.models import Order, Product
from sa_shardkit.routing import reference_read_shard
from tests.session_support import (  # noqa: F401 - fixtures
    SqlLog,
    make_customer,
    rows_by_shard,
    schema_fixture,
    session_factory_fixture,
    sql_log_fixture,
)


def _add_products(Session: sessionmaker[Any]) -> None:  # noqa: N803
    with Session() as session, session.begin():
        session.add_all([Product(sku=f"SKU-{i}", name=f"P{i}", price=Decimal(i)) for i in range(3)])


def test_new_reference_rows_are_written_to_every_shard(
    Session: sessionmaker[Any], schema: ShardManager
) -> None:  # noqa: N803
    _add_products(Session)
    placed = rows_by_shard(schema, "SELECT sku, name, price FROM products ORDER BY sku")
    expected = [(f"SKU-{i}", f"P{i}", Decimal(i)) for i in range(3)]
    assert placed == {shard: expected for shard in schema.shard_ids}


def test_reference_rows_are_read_from_one_shard(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
    sql_log: SqlLog,
) -> None:
    _add_products(Session)
    sql_log.clear()
    with Session() as session:
        assert len(session.scalars(select(Product)).all()) == 3
        assert session.get(Product, "SKU-1") is not None
    assert sql_log.shards("FROM products") == {reference_read_shard(schema)}


def test_changed_and_deleted_reference_rows_change_on_every_shard(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
) -> None:
    _add_products(Session)
    with Session() as session, session.begin():
        product = session.get(Product, "SKU-1")
        assert product is not None
        product.price = Decimal(99)
        session.delete(session.get(Product, "SKU-2"))
    placed = rows_by_shard(schema, "SELECT sku, price FROM products ORDER BY sku")
    assert placed == {s: [("SKU-0", Decimal(0)), ("SKU-1", Decimal(99))] for s in schema.shard_ids}


def test_reference_rows_join_with_sharded_rows_on_their_shard(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
    sql_log: SqlLog,
) -> None:
    _add_products(Session)
    with Session() as session, session.begin():
        session.add(make_customer(5, orders=1, items=0))
    sql_log.clear()
    stmt = (
        select(Order.customer_id, Product.sku)
        .join(Product, Product.sku == "SKU-0")
        .where(Order.customer_id == 5)
    )
    with Session() as session:
        assert session.execute(stmt).all() == [(5, "SKU-0")]
    assert sql_log.shards("FROM orders") == {schema.shard_for(5)}


def test_reference_writes_may_share_a_transaction_with_one_shards_rows(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
) -> None:
    with Session() as session, session.begin():
        session.add(Product(sku="SKU-9", name="nine", price=Decimal(9)))
        session.add(make_customer(5, orders=1, items=0))
    assert all(rows == [(1,)] for rows in rows_by_shard(schema, "SELECT count(*) FROM products").values())


def test_bulk_reference_statements_run_on_every_shard_and_count_rows_once(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
) -> None:
    with Session() as session, session.begin():
        session.execute(
            insert(Product), [{"sku": f"B{i}", "name": "b", "price": Decimal(1)} for i in range(4)]
        )
        updated = session.execute(update(Product).where(Product.sku.in_(["B1", "B2"])).values(name="c"))
        assert updated.rowcount == 2  # type: ignore[attr-defined]
        deleted = session.execute(delete(Product).where(Product.sku == "B3"))
        assert deleted.rowcount == 1  # type: ignore[attr-defined]
    placed = rows_by_shard(schema, "SELECT sku, name FROM products ORDER BY sku")
    assert placed == {s: [("B0", "b"), ("B1", "c"), ("B2", "c")] for s in schema.shard_ids}

"""Routing decisions (sa_shardkit.routing) that need no rows: which shards a statement would hit."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    Table,
    and_,
    bindparam,
    func,
    insert,
    select,
    union_all,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sa_shardkit import ShardKeyWarning, ShardManager, errors, route_statement, sharding_of
from sa_shardkit.demo.models import Customer, Order, OrderItem, Product
from sa_shardkit.routing import ring_shards
from tests.fleet import TestFleet

metadata = MetaData()
events = Table(
    "events", metadata, Column("tenant", BigInteger), Column("n", Integer), info={"shard_key": "tenant"}
)
loose = Table("loose", metadata, Column("n", Integer))


@pytest.fixture(scope="module")
def router(pg_fleet: TestFleet) -> Iterator[ShardManager]:
    """A manager over the reset fleet (routing reads the ring the shards store: none here)."""
    pg_fleet.reset()  # a ring stored by an earlier test would be followed
    with ShardManager.from_urls({f"shard-{i}": u for i, u in enumerate(pg_fleet.urls, 1)}) as manager:
        yield manager


def _two_keys_on_two_shards(manager: ShardManager) -> tuple[int, int]:
    second = next(k for k in range(2, 1000) if manager.shard_for(k) != manager.shard_for(1))
    return 1, second


def test_outer_join_condition_does_not_narrow_the_route(router: ShardManager) -> None:
    stmt = select(Customer).outerjoin(
        Order, and_(Order.customer_id == Customer.customer_id, Order.customer_id == 5)
    )
    assert router.shards_for(stmt) == ring_shards(router)


def test_inner_join_condition_on_the_key_narrows_the_route(router: ShardManager) -> None:
    stmt = select(Customer).join(
        Order, and_(Order.customer_id == Customer.customer_id, Order.customer_id == 5)
    )
    assert router.shards_for(stmt) == (router.shard_for(5),)


def test_union_targets_the_union_of_its_parts(router: ShardManager) -> None:
    a, b = _two_keys_on_two_shards(router)
    stmt = union_all(
        select(Order.order_id).where(Order.customer_id == a),
        select(Order.order_id).where(Order.customer_id == b),
    )
    assert set(router.shards_for(stmt)) == {router.shard_for(a), router.shard_for(b)}


def test_subquery_with_a_key_narrows_the_outer_query(router: ShardManager) -> None:
    inner = select(Order).where(Order.customer_id == 9).subquery()
    assert router.shards_for(select(func.count()).select_from(inner)) == (router.shard_for(9),)


def test_comparisons_other_than_equality_scatter(router: ShardManager) -> None:
    assert router.shards_for(select(Order).where(Order.customer_id > 5)) == ring_shards(router)
    assert router.shards_for(select(Order).where(Order.customer_id != 5)) == ring_shards(router)


def test_contradicting_keys_still_run_on_one_shard(router: ShardManager) -> None:
    a, b = _two_keys_on_two_shards(router)
    stmt = select(Order).where(Order.customer_id == a, Order.customer_id == b)
    route = route_statement(router, stmt)
    assert len(route.shard_ids) == 1 and "exclude every shard" in route.reason


def test_core_table_declared_through_info_is_routed(router: ShardManager) -> None:
    assert router.shards_for(select(events).where(events.c.tenant == 3)) == (router.shard_for(3),)
    with pytest.raises(errors.NotShardedError, match="loose"):
        router.shards_for(select(loose))


def test_insert_rows_are_grouped_by_key_and_a_missing_key_raises(router: ShardManager) -> None:
    a, b = _two_keys_on_two_shards(router)
    rows = [{"customer_id": a, "name": "a"}, {"customer_id": b, "name": "b"}]
    assert set(router.shards_for(insert(Customer), rows)) == {router.shard_for(a), router.shard_for(b)}
    with pytest.raises(errors.ShardKeyMissingError, match="row 1"):
        router.shards_for(insert(Customer), [{"customer_id": a}, {"name": "no key"}])


def test_reference_only_read_hits_one_shard_and_write_hits_all(router: ShardManager) -> None:
    from sqlalchemy import update

    assert router.shards_for(select(Product)) == (ring_shards(router)[0],)
    assert router.shards_for(update(Product).values(name="x")) == router.shard_ids


def test_join_to_a_reference_table_follows_the_sharded_key(router: ShardManager) -> None:
    stmt = (
        select(OrderItem, Product)
        .join(Product, Product.sku == OrderItem.sku)
        .where(OrderItem.customer_id == 4)
    )
    assert router.shards_for(stmt) == (router.shard_for(4),)


def test_declaring_both_key_and_reference_is_rejected() -> None:
    class Base(DeclarativeBase):
        pass

    class Both(Base):
        __tablename__ = "both"
        __shard_key__ = "k"
        __shard_reference__ = True
        k: Mapped[int] = mapped_column(primary_key=True)

    with pytest.raises(errors.NotShardedError, match="both"):
        sharding_of(Both)


def test_a_key_outside_primary_key_and_unique_constraints_warns() -> None:
    class Base(DeclarativeBase):
        pass

    class Loose(Base):
        __tablename__ = "loose_model"
        __shard_key__ = "tenant"
        id: Mapped[int] = mapped_column(primary_key=True)
        tenant: Mapped[int]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sharding_of(Loose)
    assert any(issubclass(w.category, ShardKeyWarning) and "Loose.tenant" in str(w.message) for w in caught)


def test_a_key_naming_no_column_is_rejected() -> None:
    class Base(DeclarativeBase):
        pass

    class Typo(Base):
        __tablename__ = "typo"
        __shard_key__ = "tenant_idd"
        tenant_id: Mapped[int] = mapped_column(primary_key=True)

    with pytest.raises(errors.NotShardedError, match="tenant_idd"):
        sharding_of(Typo)


def test_one_select_shape_routes_each_bound_value_by_itself(router: ShardManager) -> None:
    """The shape of a keyed SELECT is analysed once; every execution routes its own values."""
    by_literal = [route_statement(router, select(Order).where(Order.customer_id == k)) for k in range(1, 40)]
    assert [r.shard_ids for r in by_literal] == [(router.shard_for(k),) for k in range(1, 40)]
    stmt = select(Order).where(Order.customer_id == bindparam("key"))
    for key in range(1, 40):
        assert route_statement(router, stmt, {"key": key}).shard_ids == (router.shard_for(key),)
    a, b = _two_keys_on_two_shards(router)
    listed = select(Order).where(Order.customer_id.in_([a, b]))
    assert set(route_statement(router, listed).shard_ids) == {router.shard_for(a), router.shard_for(b)}
    assert route_statement(router, select(Order).where(Order.customer_id.in_([a]))).shard_ids == (
        router.shard_for(a),
    )
    for _ in range(2):  # an OR, or two keys, is analysed in full each time
        either = select(Order).where((Order.customer_id == a) | (Order.customer_id == b))
        assert set(route_statement(router, either).shard_ids) == {router.shard_for(a), router.shard_for(b)}
        both = route_statement(router, select(Order).where(Order.customer_id == a, Order.customer_id == b))
        assert "exclude every shard" in both.reason
    for _ in range(2):  # a None key routes nowhere in particular, however often the shape is seen
        assert route_statement(router, stmt, {"key": None}).shard_ids == ring_shards(router)


def test_an_undeclared_table_raises_every_time_its_shape_is_routed(router: ShardManager) -> None:
    for _ in range(2):
        with pytest.raises(errors.NotShardedError, match="loose"):
            router.shards_for(select(loose).where(events.c.tenant == 3))

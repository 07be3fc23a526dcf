"""Scatter-gather through ShardManager.query_all_shards: global order, limits, aggregates, faults."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Numeric, String, Table, func, over, select, text
from sqlalchemy.dialects.postgresql import distinct_on

from sa_shardkit import ShardManager, errors
from sa_shardkit.demo.models import Customer, Order, OrderItem, Product
from sa_shardkit.scatter import RowPlan, plan_scatter
from tests.fleet import TestFleet

meta = MetaData()
items = Table(
    "items",
    meta,
    Column("customer_id", Integer, primary_key=True, autoincrement=False),
    Column("item_id", Integer, primary_key=True, autoincrement=False),
    Column("kind", String(10)),
    Column("price", Numeric(10, 2)),
    info={"shard_key": "customer_id"},
)
c = items.c


def load(manager: ShardManager, rows: list[tuple[int, int, str | None, str | None]]) -> dict[str, int]:
    """Insert each row on its customer's shard; returns how many rows each shard got."""
    manager.run_on_all(lambda conn: meta.create_all(conn))
    placed: dict[str, int] = dict.fromkeys(manager.shard_ids, 0)
    for customer, item, kind, price in rows:
        shard = manager.shard_for(customer)
        with manager.engine(shard).begin() as conn:
            conn.execute(
                items.insert(),
                {
                    "customer_id": customer,
                    "item_id": item,
                    "kind": kind,
                    "price": Decimal(price) if price else None,
                },
            )
        placed[shard] += 1
    return placed


def spread(manager: ShardManager, n: int) -> list[tuple[int, int, str | None, str | None]]:
    """``n`` rows over customers 1..n (every shard gets some), prices n..1 so order != shard order."""
    rows = [(i, i, "ab"[i % 2], f"{(n - i) % 7}.50") for i in range(1, n + 1)]
    placed = load(manager, rows)
    assert all(placed.values()), placed
    return rows


def test_order_by_limit_returns_global_first_rows(manager: ShardManager) -> None:
    rows = spread(manager, 40)
    result = manager.query_all_shards(select(c.item_id).order_by(c.price.desc(), c.item_id).limit(5))
    expected = sorted(rows, key=lambda r: (-Decimal(r[3] or 0), r[1]))[:5]
    assert [r.item_id for r in result] == [r[1] for r in expected]


def test_offset_is_applied_once_globally(manager: ShardManager) -> None:
    spread(manager, 30)
    result = manager.query_all_shards(select(c.item_id).order_by(c.item_id).offset(10).limit(5))
    assert result.scalars().all() == [11, 12, 13, 14, 15]


def test_limit_is_pushed_down_as_offset_plus_limit() -> None:
    plan = plan_scatter(select(c.item_id).order_by(c.item_id).offset(10).limit(5))
    assert isinstance(plan, RowPlan)
    assert plan.statement._limit == 15 and plan.statement._offset is None


def test_nulls_sort_as_postgresql_defaults_and_explicit(manager: ShardManager) -> None:
    load(manager, [(1, 1, None, "1.00"), (2, 2, "b", None), (3, 3, "a", "3.00"), (4, 4, None, None)])
    asc = manager.query_all_shards(select(c.item_id).order_by(c.kind, c.item_id)).scalars().all()
    desc = manager.query_all_shards(select(c.item_id).order_by(c.kind.desc(), c.item_id)).scalars().all()
    first = manager.query_all_shards(select(c.item_id).order_by(c.price.nulls_first(), c.item_id))
    assert asc == [3, 2, 1, 4]  # NULLS LAST by default when ascending
    assert desc == [1, 4, 2, 3]  # NULLS FIRST by default when descending
    assert first.scalars().all() == [2, 4, 1, 3]


def test_aggregates_without_group_by_cover_every_shard(manager: ShardManager) -> None:
    load(manager, [(i, i, "a", f"{i}.25") for i in range(1, 21)] + [(21, 21, "a", None)])
    row = manager.query_all_shards(
        select(
            func.count(),
            func.count(c.price),
            func.sum(c.price),
            func.min(c.price),
            func.max(c.price),
            func.avg(c.price),
        )
    ).one()
    assert row == (21, 20, Decimal("215.00"), Decimal("1.25"), Decimal("20.25"), Decimal("10.75"))


def test_avg_is_rounded_like_postgresql(manager: ShardManager) -> None:
    load(manager, [(1, 1, "a", "1.00"), (2, 2, "a", "1.00"), (3, 3, "a", "2.00"), (9, 9, "a", "0.01")])
    avg = manager.query_all_shards(select(func.avg(c.price))).scalar()
    with manager.engine("shard-1").connect() as conn:  # what one PostgreSQL returns for these values
        expected = conn.execute(
            text("SELECT avg(x) FROM (VALUES (1.00), (1.00), (2.00), (0.01)) v(x)")
        ).scalar()
    assert str(avg) == str(expected) == "1.00250000000000000000"


def test_group_by_returns_one_row_per_group(manager: ShardManager) -> None:
    spread(manager, 40)
    result = manager.query_all_shards(select(c.kind, func.count()).group_by(c.kind).order_by(c.kind))
    assert result.all() == [("a", 20), ("b", 20)]


def test_having_is_evaluated_on_merged_groups(manager: ShardManager) -> None:
    spread(manager, 40)  # no shard holds 15 rows of one kind, but globally each kind has 20
    stmt = select(c.kind, func.count().label("n")).group_by(c.kind).having(func.count() > 15).order_by("kind")
    assert manager.query_all_shards(stmt).all() == [("a", 20), ("b", 20)]


def test_order_by_aggregate_not_selected(manager: ShardManager) -> None:
    load(manager, [(i, i, "a" if i < 5 else "b", "1.00") for i in range(1, 30)])
    stmt = select(c.kind).group_by(c.kind).order_by(func.count().desc())
    assert manager.query_all_shards(stmt).scalars().all() == ["b", "a"]


def test_distinct_removes_duplicates_across_shards(manager: ShardManager) -> None:
    spread(manager, 40)
    assert manager.query_all_shards(select(c.kind).distinct().order_by(c.kind)).scalars().all() == ["a", "b"]


def test_count_of_empty_tables_is_zero(manager: ShardManager) -> None:
    load(manager, [])
    assert manager.query_all_shards(select(func.count()).select_from(items)).scalar() == 0


@pytest.mark.parametrize(
    ("statement", "reason"),
    [
        (select(c.item_id, over(func.row_number(), order_by=c.item_id)), "window"),
        (select(func.string_agg(c.kind, ",")), "string_agg"),
        (select(func.count(c.kind.distinct())), "DISTINCT"),
        (select(c.kind).ext(distinct_on(c.kind)), "DISTINCT ON"),
        (select(func.sum(c.price) / func.count()), "aggregate"),
        (select(c.kind).group_by(c.kind).having(func.sum(c.price) + 1 > 2), "HAVING"),
        (select(select(c.item_id).order_by(c.item_id).limit(3).subquery()), "subquery"),
        (select(c.item_id).order_by(text("item_id DESC")), "ORDER BY"),
    ],
    ids=[
        "window",
        "string_agg",
        "count-distinct",
        "distinct-on",
        "agg-expression",
        "having-expr",
        "subquery",
        "text-order-by",
    ],
)
def test_unmergeable_queries_raise_with_reason(statement: Any, reason: str) -> None:
    with pytest.raises(errors.UnsupportedScatterError, match=reason):
        plan_scatter(statement)


def test_per_shard_results_opt_in_skips_the_merge(manager: ShardManager) -> None:
    spread(manager, 40)
    stmt = select(c.item_id, over(func.row_number(), order_by=c.item_id)).order_by(c.item_id).limit(1)
    rows = manager.query_all_shards(stmt, per_shard_results=True).all()
    assert len(rows) == 4 and {r[1] for r in rows} == {1}  # one first row per shard


def test_rows_are_tagged_with_their_shard_when_asked(manager: ShardManager) -> None:
    rows = spread(manager, 12)
    result = manager.query_all_shards(select(c.customer_id).order_by(c.customer_id), with_shard_id=True)
    assert result.keys() == ["customer_id", "shard_id"]
    tagged = result.all()
    assert [r.customer_id for r in tagged] == [r[0] for r in rows]
    assert all(r.shard_id == manager.shard_for(r.customer_id) for r in tagged)


def test_raw_sql_runs_on_every_shard_with_params(manager: ShardManager) -> None:
    placed = load(manager, [(i, i, "a", "1.00") for i in range(1, 30)])
    result = manager.query_all_shards(
        "SELECT count(*) AS n FROM items WHERE kind = :k", {"k": "a"}, with_shard_id=True
    )
    assert {r.shard_id: r.n for r in result} == placed


def test_shards_are_queried_in_parallel(manager: ShardManager) -> None:
    """Every shard's statement starts before the first one ends (no wall-clock bound)."""
    sql = "SELECT clock_timestamp() AS a, (SELECT pg_sleep(0.3)) IS NOT NULL, clock_timestamp() AS b"
    manager.query_all_shards("SELECT 1")  # reads the stored ring
    for cold in (True, False):  # new connections (worker threads), then pooled ones (the hubs)
        if cold:
            for engine in manager.engines.values():
                engine.dispose()
        rows = manager.query_all_shards(sql).all()
        assert max(r.a for r in rows) < min(r.b for r in rows)  # one after another fails this


def test_stopped_shard_raises_shard_unavailable_naming_it(pg_fleet: TestFleet, manager: ShardManager) -> None:
    spread(manager, 12)
    pg_fleet.server(2).stop()
    started = time.perf_counter()
    with pytest.raises(errors.ShardUnavailableError, match="shard-3") as info:
        manager.query_all_shards(select(c.item_id).order_by(c.item_id))
    assert info.value.shard_id == "shard-3"
    assert time.perf_counter() - started < manager.config("shard-3").connect_timeout + 1


def test_allow_partial_returns_healthy_shards_and_reports_missing(
    pg_fleet: TestFleet, manager: ShardManager
) -> None:
    rows = spread(manager, 24)
    pg_fleet.server(2).stop()
    result = manager.query_all_shards(select(c.customer_id).order_by(c.customer_id), allow_partial=True)
    assert result.missing_shards == ("shard-3",)
    assert isinstance(result.shard_errors["shard-3"], errors.ShardUnavailableError | Exception)
    healthy = [r[0] for r in rows if manager.shard_for(r[0]) != "shard-3"]
    assert result.scalars().all() == healthy


def test_sql_error_on_one_shard_names_that_shard(manager: ShardManager) -> None:
    spread(manager, 12)
    with manager.engine("shard-2").begin() as conn:
        conn.execute(text("DROP TABLE items"))
    with pytest.raises(Exception, match="items") as info:
        manager.query_all_shards(select(c.item_id), allow_partial=True)  # a SQL error is never skipped
    assert getattr(info.value, "shard_id", None) == "shard-2"


@pytest.mark.parametrize(
    "statement",
    [
        select(Customer).join(Customer.orders),
        select(Order).join(OrderItem),
        select(Customer, Order).where(Customer.customer_id == Order.customer_id),
        select(OrderItem, Product).join(Product, Product.sku == OrderItem.sku),
    ],
    ids=["relationship", "foreign-key", "where-equality", "reference-table"],
)
def test_joins_on_the_shard_key_or_with_reference_tables_are_merged(statement: Any) -> None:
    plan_scatter(statement)  # co-located rows meet on their shard: no error


@pytest.mark.parametrize(
    "statement",
    [
        select(Order).join(Customer, Customer.name == Order.status),
        select(Customer, Order),
    ],
    ids=["non-key-condition", "cross-product"],
)
def test_joins_of_sharded_tables_off_their_shard_keys_are_refused(statement: Any) -> None:
    with pytest.raises(errors.UnsupportedScatterError, match="Customer and Order .* shard keys"):
        plan_scatter(statement)


def test_frozen_shard_fails_within_the_connect_timeout(
    pg_fleet: TestFleet, shard_map: dict[str, str]
) -> None:
    with ShardManager.from_urls(shard_map, connect_timeout=1) as fast:
        spread(fast, 12)
        fast.query_all_shards(select(c.item_id))  # every pool now holds a connection to ping
        pg_fleet.server(1).pause()  # SIGSTOP: connections hang instead of failing
        try:
            started = time.perf_counter()
            with pytest.raises(errors.ShardUnavailableError, match="shard-2") as info:
                fast.query_all_shards(select(c.item_id))
            assert info.value.shard_id == "shard-2"
            assert time.perf_counter() - started < 3
            partial = fast.query_all_shards(select(c.item_id), allow_partial=True)
            assert partial.missing_shards == ("shard-2",) and len(partial.all()) > 0, partial.shard_errors
        finally:
            pg_fleet.server(1).resume()

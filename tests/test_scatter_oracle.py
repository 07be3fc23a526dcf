"""The oracle test: a scatter over 4 shards answers exactly what one database holding every row does.

The same random data (thousands of rows, many customers, NULLs, ties) is loaded into the shards and
into an extra "oracle" database; hypothesis generates queries (filters, orderings, limits, offsets,
aggregates, GROUP BY, HAVING, DISTINCT) and both answers must match: exactly when the ORDER BY
fixes the order, as multisets (and sort-key sequences) when ties leave it open.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase

from sa_shardkit import ShardManager
from tests.fleet import TestFleet
from tests.scatter_data import load, orders, random_orders
from tests.session_support import SqlLog

o = orders.c
COLUMNS = {
    name: o[name] for name in ["customer_id", "order_id", "status", "total", "qty", "note", "created_at"]
}
SORTABLE = ["status", "total", "qty", "note", "created_at", "customer_id"]
FILTERS = [
    None,
    o.status == "paid",
    o.total > 250,
    o.qty.is_(None),
    o.note.in_(["gift", "Gift"]),
    o.customer_id < 120,
    o.total.is_(None),
    o.status == "no-such-status",
]
AGGREGATES = {
    "n": func.count(),
    "n_total": func.count(o.total),
    "sum_total": func.sum(o.total),
    "sum_qty": func.sum(o.qty),
    "min_total": func.min(o.total),
    "max_total": func.max(o.total),
    "first_at": func.min(o.created_at),
    "max_note": func.max(o.note),
    "avg_total": func.avg(o.total),
    "avg_qty": func.avg(o.qty),
}
HAVINGS = [
    None,
    func.count() > 60,
    func.sum(o.qty) >= 250,
    func.avg(o.total) > 240,
    func.min(o.total).is_(None),
]


@pytest.fixture(scope="module")
def data(pg_fleet: TestFleet) -> Iterator[tuple[ShardManager, Engine]]:
    """The shards and the oracle loaded once for the module (these tests only read)."""
    pg_fleet.reset()
    admin = make_url(pg_fleet.urls[0])
    with psycopg.connect(
        host=admin.host, port=admin.port, user=admin.username, dbname="postgres", autocommit=True
    ) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'scatter_oracle'").fetchone():
            conn.execute("CREATE DATABASE scatter_oracle")
    oracle = create_engine(admin.set(database="scatter_oracle"))
    shard_map = {f"shard-{i}": url for i, url in enumerate(pg_fleet.urls, 1)}
    manager = ShardManager.from_urls(shard_map)
    load(manager, oracle, random_orders(3000))
    yield manager, oracle
    manager.dispose()
    oracle.dispose()


def sharded_rows(manager: ShardManager, via: str, statement: Any) -> list[tuple[Any, ...]]:
    """The scatter's answer, through ShardManager.query_all_shards or through a ShardedSession."""
    if via == "manager":
        return [tuple(r) for r in manager.query_all_shards(statement)]
    with manager.sessionmaker()() as session:
        return [tuple(r) for r in session.execute(statement)]


VIA = pytest.mark.parametrize("via", ["manager", "session"])


def oracle_rows(oracle: Engine, statement: Any) -> list[tuple[Any, ...]]:
    with oracle.connect() as conn:
        return [tuple(r) for r in conn.execute(statement)]


def assert_same_rows(
    sharded: list[tuple[Any, ...]], expected: list[tuple[Any, ...]], terms: list[Any], tiebreak: bool
) -> None:
    """Exactly the oracle's rows when the ORDER BY fixes the order; else the same sort keys in order."""
    names = list(COLUMNS)
    if tiebreak:
        assert sharded == expected
    elif terms:
        positions = [names.index(t[0]) for t in terms]
        assert [[r[i] for i in positions] for r in sharded] == [[r[i] for i in positions] for r in expected]
    else:
        assert len(sharded) == len(expected)


order_terms = st.lists(
    st.tuples(st.sampled_from(SORTABLE), st.booleans(), st.sampled_from([None, "first", "last"])),
    max_size=3,
    unique_by=lambda t: t[0],
)


def ordered(term: tuple[str, bool, str | None], column: Any) -> Any:
    name, descending, nulls = term
    expression = column.desc() if descending else column.asc()
    if nulls == "first":
        expression = expression.nulls_first()
    elif nulls == "last":
        expression = expression.nulls_last()
    return expression


@VIA
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    where=st.sampled_from(FILTERS),
    terms=order_terms,
    tiebreak=st.booleans(),
    limit=st.none() | st.integers(0, 40),
    offset=st.none() | st.integers(0, 30),
)
def test_row_queries_match_the_oracle(
    via: str,
    data: tuple[ShardManager, Engine],
    where: Any,
    terms: list[Any],
    tiebreak: bool,
    limit: Any,
    offset: Any,
) -> None:
    manager, oracle = data
    statement = select(*COLUMNS.values())
    if where is not None:
        statement = statement.where(where)
    statement = statement.order_by(*(ordered(t, COLUMNS[t[0]]) for t in terms))
    if tiebreak:
        statement = statement.order_by(o.customer_id, o.order_id)
    statement = statement.limit(limit).offset(offset)
    sharded = sharded_rows(manager, via, statement)
    expected = oracle_rows(oracle, statement)
    assert_same_rows(sharded, expected, terms, tiebreak)
    if limit is None and not offset:
        assert Counter(sharded) == Counter(expected)


@VIA
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    where=st.sampled_from(FILTERS),
    group=st.lists(st.sampled_from(["status", "qty", "note"]), max_size=2, unique=True),
    aggregates=st.lists(st.sampled_from(sorted(AGGREGATES)), min_size=1, max_size=4, unique=True),
    having=st.sampled_from(HAVINGS),
    descending=st.booleans(),
    order_by_aggregate=st.booleans(),
    limit=st.none() | st.integers(0, 10),
    offset=st.none() | st.integers(0, 5),
)
def test_aggregate_queries_match_the_oracle(
    via: str,
    data: tuple[ShardManager, Engine],
    where: Any,
    group: list[str],
    aggregates: list[str],
    having: Any,
    descending: bool,
    order_by_aggregate: bool,
    limit: Any,
    offset: Any,
) -> None:
    manager, oracle = data
    columns = [COLUMNS[g] for g in group] + [AGGREGATES[a].label(a) for a in aggregates]
    statement = select(*columns).select_from(orders)
    if where is not None:
        statement = statement.where(where)
    if group:
        statement = statement.group_by(*(COLUMNS[g] for g in group))
    if having is not None:
        statement = statement.having(having)
    if order_by_aggregate:
        first = AGGREGATES[aggregates[0]]
        statement = statement.order_by(first.desc() if descending else first)
    # ordering by every group column as well makes the order total (groups are unique)
    statement = statement.order_by(*(COLUMNS[g].desc() if descending else COLUMNS[g] for g in group))
    statement = statement.limit(limit).offset(offset)
    sharded = sharded_rows(manager, via, statement)
    assert sharded == oracle_rows(oracle, statement)


@VIA
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    columns=st.lists(st.sampled_from(["status", "qty", "note"]), min_size=1, max_size=3, unique=True),
    where=st.sampled_from(FILTERS),
    limit=st.none() | st.integers(0, 20),
)
def test_distinct_queries_match_the_oracle(
    via: str, data: tuple[ShardManager, Engine], columns: list[str], where: Any, limit: Any
) -> None:
    manager, oracle = data
    statement = select(*(COLUMNS[c] for c in columns)).distinct().order_by(*(COLUMNS[c] for c in columns))
    if where is not None:
        statement = statement.where(where)
    statement = statement.limit(limit)
    assert sharded_rows(manager, via, statement) == oracle_rows(oracle, statement)


@VIA
def test_count_star_over_all_shards_matches_the_oracle(via: str, data: tuple[ShardManager, Engine]) -> None:
    manager, oracle = data
    statement = select(func.count()).select_from(orders)
    assert sharded_rows(manager, via, statement) == oracle_rows(oracle, statement) == [(3000,)]


class _Base(DeclarativeBase):
    pass


class OrderRow(_Base):
    """The oracle's ``orders`` table as an ORM entity (the shard key is the table's)."""

    __table__ = orders


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    where=st.sampled_from(FILTERS),
    terms=order_terms,
    tiebreak=st.booleans(),
    limit=st.integers(0, 40),
    offset=st.none() | st.integers(0, 30),
)
def test_orm_entity_limit_queries_read_sort_keys_from_the_entity_and_match_the_oracle(
    data: tuple[ShardManager, Engine],
    where: Any,
    terms: list[Any],
    tiebreak: bool,
    limit: int,
    offset: Any,
) -> None:
    """``select(Entity).order_by(<its columns>).limit(n)`` on the hub: the shards send no hidden sort
    columns (the merge reads the entity's own columns on the raw rows), and the entities are the
    oracle's rows, in its order."""
    manager, oracle = data
    entity_columns = {name: getattr(OrderRow, name) for name in COLUMNS}
    statement = select(OrderRow)
    core = select(*COLUMNS.values())
    if where is not None:
        statement, core = statement.where(where), core.where(where)
    statement = statement.order_by(*(ordered(t, entity_columns[t[0]]) for t in terms))
    core = core.order_by(*(ordered(t, COLUMNS[t[0]]) for t in terms))
    if tiebreak:
        statement = statement.order_by(OrderRow.customer_id, OrderRow.order_id)
        core = core.order_by(o.customer_id, o.order_id)
    statement, core = statement.limit(limit).offset(offset), core.limit(limit).offset(offset)
    log = SqlLog(manager)
    try:
        with manager.sessionmaker()() as session:
            found = session.scalars(statement).all()
            sharded = [tuple(getattr(row, name) for name in COLUMNS) for row in found]
            tokens = {inspect(row).identity_token for row in found}
    finally:
        log.close()
    assert_same_rows(sharded, oracle_rows(oracle, core), terms, tiebreak)
    assert tokens <= set(manager.shard_ids)
    selects = [sql for _, sql in log.statements if "FROM orders" in sql]
    assert len(selects) == 4  # one statement per shard: the lean one was enough
    if terms or tiebreak:
        assert not any("_shardkit_o" in s for s in selects)  # no hidden sort columns sent

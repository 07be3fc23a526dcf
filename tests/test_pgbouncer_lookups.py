"""Lookups through a real PgBouncer in transaction pooling mode in front of every shard.

Lookup reads (one autocommitted statement on a kept connection) go through PgBouncer like every
other statement. Lookup *writes* hold a session-level advisory lock per value from before the entry
is committed until the owning transaction has ended, which no single transaction can span (the
entry commits first): they use each shard's ``direct_url``, and without one they refuse with
``ConfigError`` before anything is written (docs/concepts/lookups.md says why).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from sa_shardkit import ConfigError, DuplicateKeyError, ShardConfig, ShardManager
from sa_shardkit.lookups.store import forget_readiness
from sa_shardkit.testing import LocalPgBouncer
from tests.fleet import _connect
from tests.lookup_models import LkCustomer, LkOrder, create_schema
from tests.test_lookups import entries
from tests.test_pgbouncer import bouncers, configs  # noqa: F401 - the module's PgBouncer fixture

ORDERS, EMAILS = "LkOrder.order_id", "LkCustomer.email"


@pytest.fixture
def bounced(bouncers: list[LocalPgBouncer], shard_urls: list[str]) -> Iterator[ShardManager]:  # noqa: F811
    """Shards through PgBouncer (transaction pooling), ``direct_url`` the servers, lookups built."""
    with ShardManager(configs(bouncers, shard_urls, pgbouncer=True)) as manager:
        create_schema(manager)
        forget_readiness()
        yield manager


def _physical(shard_urls: list[str], sql: str) -> dict[int, list[tuple[object, ...]]]:
    """Rows of ``sql`` on each server, read directly (server index from 1)."""
    found = {}
    for i, url in enumerate(shard_urls, 1):
        with _connect(url) as conn:
            found[i] = [tuple(r) for r in conn.execute(sql).fetchall()]
    return found


def _advisory_locks(shard_urls: list[str]) -> int:
    return sum(
        len(rows)
        for rows in _physical(shard_urls, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'").values()
    )


def test_lookup_writes_reads_uniqueness_and_deletes_through_pgbouncer(
    bounced: ShardManager, shard_urls: list[str]
) -> None:
    maker = bounced.sessionmaker()
    owners: dict[int, int] = {}
    for cid in range(1, 13):
        with maker() as session:
            orders = [LkOrder(customer_id=cid) for _ in range(2)]
            session.add(LkCustomer(customer_id=cid, email=f"c{cid}@example.com"))
            session.add_all(orders)
            session.commit()
            owners.update({o.order_id: cid for o in orders})
    stored = entries(bounced, ORDERS)  # on the servers: each entry on its value's shard, naming its owner
    assert {p for pairs in stored.values() for p in pairs} == set(owners.items())
    assert all(bounced.shard_for(v) == s for s, pairs in stored.items() for v, _ in pairs)

    with (
        maker() as session
    ):  # lookup-routed reads, each statement many times (past psycopg's prepare threshold)
        for _ in range(3):
            for order_id, cid in owners.items():
                stmt = select(LkOrder).where(LkOrder.order_id == order_id)
                assert bounced.shards_for(stmt) == (bounced.shard_for(cid),)
                assert session.scalars(stmt).one().customer_id == cid
                session.expunge_all()
                got = session.get(LkOrder, order_id)
                assert got is not None and got.customer_id == cid
                session.expunge_all()
        some = list(owners)[:5]
        found = session.scalars(select(LkOrder).where(LkOrder.order_id.in_(some))).all()
        assert sorted(o.order_id for o in found) == sorted(some)
        customer = session.scalars(select(LkCustomer).where(LkCustomer.email == "c3@example.com")).one()
        assert customer.customer_id == 3

    other = next(c for c in range(100, 200) if bounced.shard_for(c) != bounced.shard_for(3))
    with maker() as session, pytest.raises(DuplicateKeyError) as raised:
        session.add(LkCustomer(customer_id=other, email="c3@example.com"))
        session.commit()
    assert raised.value.value == "c3@example.com"
    customers = _physical(shard_urls, f"SELECT customer_id FROM lk_customers WHERE customer_id = {other}")
    assert not any(customers.values())  # nothing half-written
    assert ("c3@example.com", 3) in {p for pairs in entries(bounced, EMAILS).values() for p in pairs}

    gone, gone_cid = next(iter(owners.items()))
    with maker() as session:
        session.delete(session.scalars(select(LkOrder).where(LkOrder.order_id == gone)).one())
        session.commit()
    assert gone not in {v for pairs in entries(bounced, ORDERS).values() for v, _ in pairs}
    with maker() as session:
        assert session.scalars(select(LkOrder).where(LkOrder.order_id == gone)).all() == []
    deadline = time.monotonic() + 30  # the value locks are released off the commit path
    while _advisory_locks(shard_urls) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _advisory_locks(shard_urls) == 0  # none left behind on any server connection


def test_lookup_writes_without_direct_url_refuse_before_writing_anything(
    bouncers: list[LocalPgBouncer],  # noqa: F811
    shard_urls: list[str],
) -> None:
    with ShardManager(configs(bouncers, shard_urls, pgbouncer=True)) as setup:
        create_schema(setup)
        forget_readiness()
        with setup.sessionmaker()() as session:
            session.add(LkOrder(order_id=7, customer_id=1))
            session.commit()
    alone = [ShardConfig(id=f"shard-{i}", url=b.url(), pgbouncer=True) for i, b in enumerate(bouncers, 1)]
    with ShardManager(alone) as no_direct:
        with no_direct.sessionmaker()() as session:  # reads need no direct_url
            assert session.scalars(select(LkOrder).where(LkOrder.order_id == 7)).one().customer_id == 1
        with no_direct.sessionmaker()() as session, pytest.raises(ConfigError, match="lookup.*direct_url"):
            session.add(LkOrder(order_id=8, customer_id=2))
            session.commit()
    assert not any(_physical(shard_urls, "SELECT 1 FROM lk_orders WHERE order_id = 8").values())
    assert not any(
        _physical(shard_urls, "SELECT 1 FROM shardkit_lookup_lk_orders_order_id WHERE value = 8").values()
    )

"""Lookup connections kept between transactions count against the connection budget and are
closed when idle like pooled ones (each server's ``pg_stat_activity`` is read directly)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from sa_shardkit import ShardConfig, ShardManager
from sa_shardkit.lookups.store import forget_readiness
from tests.fleet import TestFleet
from tests.lookup_models import LkOrder, create_schema
from tests.many_shards import backends

APP = "shardkit-lookup-budget-test"


def _manager(shard_map: dict[str, str], **options: Any) -> ShardManager:
    limit = options.pop("max_connections", None)
    idle = options.pop("idle_timeout", 60.0)
    configs = [
        ShardConfig(id=s, url=u, engine_options={"connect_args": {"application_name": APP}}, **options)
        for s, u in shard_map.items()
    ]
    return ShardManager(configs, max_connections=limit, idle_timeout=idle)


def _write_and_read(manager: ShardManager, orders: int, first: int = 10_000) -> dict[int, int]:
    """Orders with explicit ids (no sequence shard), each in its own transaction, then each read
    back through its lookup; order_id -> customer_id."""
    owners = {first + i: 1 + i % 7 for i in range(orders)}
    maker = manager.sessionmaker()
    for order_id, customer_id in owners.items():
        with maker() as session:
            session.add(LkOrder(order_id=order_id, customer_id=customer_id))
            session.commit()
    for order_id, customer_id in owners.items():  # a session holds the shards it read until it ends
        with maker() as session:
            found = session.scalars(select(LkOrder).where(LkOrder.order_id == order_id)).one()
            assert found.customer_id == customer_id
    return owners


def _wait_for(condition: Any, seconds: float = 30.0) -> None:
    """Poll until ``condition()`` (a guard against hanging; the assertion comes after)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_kept_lookup_connections_are_closed_when_idle(pg_fleet: TestFleet, shard_map: dict[str, str]) -> None:
    with ShardManager.from_urls(shard_map) as setup:
        create_schema(setup)
    forget_readiness()
    with _manager(shard_map, idle_timeout=0.3) as manager:
        _write_and_read(manager, 12)
        kept = [s for s in manager.connection_stats() if s.in_use]
        assert kept, "no lookup connection was kept (nothing to close)"
        assert backends(pg_fleet, APP) >= len(kept)
        _wait_for(lambda: manager.budget.open_connections == 0)
        assert manager.budget.open_connections == 0, manager.connection_stats()
        _wait_for(lambda: backends(pg_fleet, APP) == 0)
        assert backends(pg_fleet, APP) == 0  # on the servers too
        assert len(_write_and_read(manager, 3, first=20_000)) == 3  # and lookups reconnect


def test_a_capped_budget_closes_kept_lookup_connections_to_make_room(
    pg_fleet: TestFleet, shard_map: dict[str, str]
) -> None:
    """Two connections for four shards: every new one is made by closing an idle one, kept lookup
    connections included (before, they held the slots and the next checkout failed)."""
    with ShardManager.from_urls(shard_map) as setup:
        create_schema(setup)
    forget_readiness()
    with _manager(shard_map, max_connections=2, pool_timeout=2) as manager:
        owners = _write_and_read(manager, 16)
        assert len(owners) == 16
        assert manager.budget.peak <= 2
        assert backends(pg_fleet, APP) <= 2

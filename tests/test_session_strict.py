"""Strict mode: a session can refuse (or warn about) statements that would run on several shards."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.exc import ArgumentError

from sa_shardkit import (
    QueryEvent,
    QueryMetrics,
    ScatterForbiddenError,
    ScatterWarning,
    ShardedSession,
    ShardManager,
)
from sa_shardkit.demo.models import Customer, Order
from tests.session_support import (  # noqa: F401 - fixtures
    keys_on_distinct_shards,
    schema_fixture,
)


def _seed(manager: ShardManager) -> list[int]:
    keys = keys_on_distinct_shards(manager, 4)
    for key in keys:
        with ShardedSession(manager=manager) as session:
            session.add(Customer(customer_id=key, name=f"c{key}"))
            session.commit()
    return keys


def test_forbid_refuses_a_scatter_naming_its_tables_and_why(schema: ShardManager) -> None:
    keys = _seed(schema)
    events: list[QueryEvent] = []
    schema.events.add(events.append)
    with ShardedSession(manager=schema, scatter="forbid") as session:
        with pytest.raises(ScatterForbiddenError) as raised:
            session.scalars(select(Customer).where(Customer.name == "c1")).all()
        assert events == []  # refused before anything ran
        message = str(raised.value)
        assert "customers" in message and "4 shards" in message and "shard key" in message
        with pytest.raises(ScatterForbiddenError, match="orders"):
            session.execute(update(Order).values(status="x"))
        routed = session.scalars(select(Customer).where(Customer.customer_id == keys[0])).all()
        assert [c.customer_id for c in routed] == [keys[0]]  # keyed statements still run
        pinned = session.scalars(select(Customer), bind_arguments={"shard_id": "shard-1"}).all()
        assert all(schema.shard_for(c.customer_id) == "shard-1" for c in pinned)


def test_no_scatter_block_forbids_only_inside_it(schema: ShardManager) -> None:
    _seed(schema)
    with ShardedSession(manager=schema) as session:
        with session.no_scatter(), pytest.raises(ScatterForbiddenError, match="DELETE"):
            session.execute(delete(Customer))
        assert len(session.scalars(select(Customer)).all()) == 4  # default "allow": as stock


def test_warn_runs_the_scatter_with_a_warning(schema: ShardManager) -> None:
    _seed(schema)
    with ShardedSession(manager=schema, scatter="warn") as session:
        with pytest.warns(ScatterWarning, match="customers"):
            rows = session.scalars(select(Customer)).all()
        assert len(rows) == 4
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            session.get(Customer, rows[0].customer_id)  # routed: no warning


def test_strict_mode_applies_to_stock_hooks(schema: ShardManager) -> None:
    def execute_chooser(orm_context: Any) -> list[str]:
        return ["shard-1", "shard-2"]

    session = ShardedSession(
        shard_chooser=lambda *a, **k: "shard-1",
        identity_chooser=lambda *a, **k: ["shard-1"],
        execute_chooser=execute_chooser,
        shards={"shard-1": schema.engine("shard-1"), "shard-2": schema.engine("shard-2")},
        scatter="forbid",
    )
    with session, pytest.raises(ScatterForbiddenError, match="execute_chooser"):
        session.scalars(select(Customer)).all()


def test_an_unknown_mode_is_refused(manager: ShardManager) -> None:
    with pytest.raises(ArgumentError, match="forbid"):
        ShardedSession(manager=manager, scatter="never")


def test_multi_shard_statements_are_counted(schema: ShardManager) -> None:
    keys = _seed(schema)
    metrics = QueryMetrics()
    schema.events.add(metrics)
    with ShardedSession(manager=schema) as session:
        session.scalars(select(Customer)).all()  # one multi-shard statement: 4 shard executions
        session.scalars(select(Customer).where(Customer.customer_id == keys[0])).all()
    stats = metrics.snapshot()
    assert sum(s.multi_shard for s in stats.values()) == 4
    assert {shard for (shard, _), s in stats.items() if s.multi_shard} == set(schema.shard_ids)
    assert sum(s.count for s in stats.values()) - sum(s.multi_shard for s in stats.values()) >= 1

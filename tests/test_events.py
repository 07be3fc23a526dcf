"""Query events and metrics: per-shard query count and latency from the manager's engines."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from sa_shardkit import QueryEvent, QueryMetrics, ShardManager


def test_metrics_count_statements_per_shard(manager: ShardManager) -> None:
    metrics = QueryMetrics()
    manager.events.add(metrics)
    manager.run_on_all("SELECT 1")
    manager.run_on_all("SELECT 2", shard_ids=["shard-2"])
    stats = metrics.snapshot()
    assert {key: s.count for key, s in stats.items()} == {
        ("shard-1", "primary"): 1,
        ("shard-2", "primary"): 2,
        ("shard-3", "primary"): 1,
        ("shard-4", "primary"): 1,
    }


def test_metrics_measure_latency(manager: ShardManager) -> None:
    metrics = QueryMetrics()
    manager.events.add(metrics)
    manager.run_on_all("SELECT pg_sleep(0.2)", shard_ids=["shard-3"])
    stats = metrics.snapshot()[("shard-3", "primary")]
    assert stats.max_seconds >= 0.2 and stats.mean_seconds >= 0.2


def test_failed_statement_is_reported_with_its_error(manager: ShardManager) -> None:
    events: list[QueryEvent] = []
    manager.events.add(events.append)
    with pytest.raises(Exception, match="no_such_table"):
        manager.run_on_all("SELECT * FROM no_such_table", shard_ids=["shard-1"])
    assert len(events) == 1 and events[0].shard_id == "shard-1"
    assert events[0].error is not None and "no_such_table" in events[0].statement


def test_a_broken_listener_never_breaks_the_query(manager: ShardManager) -> None:
    def broken(event: QueryEvent) -> None:
        raise RuntimeError("metrics backend down")

    manager.events.add(broken)
    assert manager.run_on_all("SELECT 7", shard_ids=["shard-1"]) == {"shard-1": [(7,)]}


def test_removed_listener_is_not_called(manager: ShardManager) -> None:
    events: list[QueryEvent] = []
    manager.events.add(events.append)
    manager.events.remove(events.append)
    manager.run_on_all("SELECT 1")
    assert events == []


def test_replica_statements_are_reported_with_the_replica_role(replicated_manager: ShardManager) -> None:
    metrics = QueryMetrics()
    replicated_manager.events.add(metrics)
    with replicated_manager.connect("shard-1", write=False) as conn:
        conn.execute(text("SELECT 1"))
    assert metrics.snapshot() == {("shard-1", "replica"): metrics.snapshot()[("shard-1", "replica")]}
    assert metrics.snapshot()[("shard-1", "replica")].count == 1  # the lag check is not counted

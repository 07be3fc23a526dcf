"""examples/scatter_dashboard.py runs against the real fleet and shows globally correct answers."""

from __future__ import annotations

from examples.scatter_dashboard import dashboard, load_demo_data
from sa_shardkit import ShardManager
from tests.fleet import TestFleet


def test_scatter_dashboard_example_runs(pg_fleet: TestFleet, manager: ShardManager) -> None:
    load_demo_data(manager)
    lines = dashboard(manager, stop_a_shard=pg_fleet.server(3).stop)
    assert "customers: 40" in lines
    assert any(line.startswith("refused: the window") for line in lines)
    assert lines[-1] == "with a shard down: 3 rows, missing shards ['shard-4']"
    per_shard = next(line for line in lines if line.startswith("orders per shard"))
    assert sum(int(part.split("=")[1]) for part in per_shard.split(": ")[1].split(", ")) == 120

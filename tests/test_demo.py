"""`shardkit demo` runs on embedded SQLite shards and on real PostgreSQL shards."""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy import text

from sa_shardkit import ShardManager
from sa_shardkit.demo.run import run_demo


def test_demo_runs_with_no_server() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sa_shardkit", "demo", "--customers", "40"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Key distribution" in result.stdout and "shard-4" in result.stdout


def test_demo_places_every_customer_on_its_ring_shard(manager: ShardManager) -> None:
    counts = run_demo(manager, customers=100)
    assert sum(counts.values()) == 100
    for shard_id in manager.shard_ids:
        with manager.engine(shard_id).connect() as conn:
            ids = conn.execute(text("SELECT customer_id FROM customers")).scalars().all()
            products = conn.execute(text("SELECT count(*) FROM products")).scalar()
        assert all(manager.shard_for(i) == shard_id for i in ids)
        assert products == 5

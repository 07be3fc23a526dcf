"""examples/lookups_shop.py runs against the real fleet: one shard read by order_id, a refused email."""

from __future__ import annotations

import io

from examples.lookups_shop import run
from sa_shardkit import ShardManager
from sa_shardkit.lookups.store import forget_readiness


def test_lookups_shop_example_runs(manager: ShardManager) -> None:
    forget_readiness()
    out = io.StringIO()
    result = run(manager, out)
    assert result["shards"] == (manager.shard_for(result["order"].customer_id),)
    assert result["refused"] is not None and result["refused"].value == "user2@example.com"
    assert "refused: ShopCustomer.email = 'user2@example.com' is already taken" in out.getvalue()

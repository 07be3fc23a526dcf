"""Writers insert, update and delete moving keys while a mover that skips foreign-key triggers copies them.

The mover runs ``session_replication_role = replica`` on the targets' COPY and the sources'
deletes (``sa_shardkit/rebalance/trusted_rows.py``), so PostgreSQL no longer refuses an orphan
there. Writers (``manager.transaction``, fenced like session flushes) add orders and items to
moving customers, delete customers (``ON DELETE CASCADE`` takes their orders and items), update
totals, add customers (``add-session``: orders and deletes through ``ShardedSession``), and try an order without its customer (which must always be refused:
a pooled connection left in ``replica`` would accept it). After the move every server is checked
with plain SQL: no orphan, no row off its ring shard or on two servers, exactly the committed rows.
"""

from __future__ import annotations

import time

import pytest

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base
from sa_shardkit.rebalance import MoveOptions, add_shard, install_ring, remove_shard
from tests.rebalance_data import seed
from tests.trust_support import (
    ExactWriters,
    SessionWriters,
    check_consistent,
    seeded_expectation,
    watching_trust,
)

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
CUSTOMERS, ORDERS_EACH, ITEMS_EACH = 300, 2, 2


@pytest.mark.parametrize("change", ["add", "remove", "add-session"])
def test_writers_during_a_trusted_move_leave_no_orphan_and_lose_nothing(
    manager: ShardManager, shard5_url: str, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    seed(manager, FOUR, CUSTOMERS, ORDERS_EACH, ITEMS_EACH)
    install_ring(manager, FOUR)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    kind = SessionWriters if change == "add-session" else ExactWriters
    writers = kind(manager, seeded_expectation(CUSTOMERS, ORDERS_EACH, ITEMS_EACH), CUSTOMERS)
    with watching_trust(monkeypatch) as trust:
        writers.start()
        time.sleep(0.3)
        try:
            if change != "remove":
                add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=10))
                new = FOUR.add_shard("shard-5")
            else:
                remove_shard(manager, "shard-2", Base, options=MoveOptions(batch_size=10))
                new = FOUR.remove_shard("shard-2")
            time.sleep(0.3)  # writes after the move too, on the new ring
        finally:
            writers.finish()
    assert not writers.errors, writers.errors[:5]
    for op in ("new order", "new item", "new customer", "delete", "update", "orphan refused"):
        assert writers.ops[op] > 0, (op, writers.ops)
    # the move really skipped the triggers, on both ends (else this test proves nothing about them)
    assert 1 in trust.target and 1 in trust.source, (trust.target, trust.source)
    servers = [*FOUR.shard_ids, "shard-5"] if change != "remove" else list(FOUR.shard_ids)
    check_consistent(manager, new, servers, writers.expected)

"""An online shard addition keeps lookup-routed reads right: during the move every order is found by
its order_id; afterwards the lookup (built under the old ring) is not trusted until rebuilt, and the
rebuild puts the entries at the new ring's positions, shard-5 included."""

from __future__ import annotations

import threading

from sqlalchemy import select

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.lookups import lookup_named
from sa_shardkit.lookups.build import build_lookup
from sa_shardkit.lookups.store import forget_readiness, is_ready
from sa_shardkit.rebalance import MoveOptions, RingRouter, add_shard, install_ring
from tests.lookup_models import Base, LkOrder, create_schema
from tests.test_lookups import entries, seed


def test_lookup_reads_stay_right_through_an_online_move(manager: ShardManager, shard5_url: str) -> None:
    install_ring(manager, HashRing(manager.shard_ids))
    create_schema(manager)
    forget_readiness()
    owners = seed(manager, customers=40, per_customer=2)
    router = RingRouter(manager)
    stop = threading.Event()
    wrong: list[str] = []
    reads = [0]

    def reader() -> None:
        maker = manager.sessionmaker()
        while not stop.is_set():
            for order_id, customer_id in list(owners.items())[::7]:
                with maker() as session:
                    found = [
                        o.customer_id
                        for o in session.scalars(select(LkOrder).where(LkOrder.order_id == order_id))
                    ]
                if found != [customer_id]:
                    wrong.append(f"order {order_id}: {found}")
                reads[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        add_shard(
            manager, ShardConfig(id="shard-5", url=shard5_url), Base, options=MoveOptions(batch_size=10)
        )
    finally:
        stop.set()
        thread.join()
    assert not wrong, wrong[:5]
    assert reads[0] > 0
    assert "shard-5" in router.refresh().ring
    assert manager.ring == router.state.ring
    index = lookup_named("LkOrder.order_id")
    assert not is_ready(manager, index)  # entries sit at the old ring's positions: reads scatter
    some = next(iter(owners))
    assert len(manager.shards_for(select(LkOrder).where(LkOrder.order_id == some))) == 5
    build_lookup(manager, index)
    assert is_ready(manager, index)
    moved_here = [o for o in owners if manager.shard_for(o) == "shard-5"]
    assert moved_here and {v for v, _ in entries(manager, "LkOrder.order_id")["shard-5"]} >= set(moved_here)
    with manager.sessionmaker()() as session:
        for order_id, customer_id in owners.items():
            stmt = select(LkOrder).where(LkOrder.order_id == order_id)
            assert manager.shards_for(stmt) == (manager.shard_for(customer_id),)
            assert session.scalars(stmt).one().customer_id == customer_id

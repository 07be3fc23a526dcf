"""The cut-over catches up with writes made after a batch was staged (phase 1 -> phase 2)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, insert, select, update

from sa_shardkit import ShardManager
from sa_shardkit.demo.models import Order
from sa_shardkit.rebalance import RingRouter
from sa_shardkit.rebalance.mover import SourceMover
from tests.rebalance_data import start_move
from tests.test_rebalance_reads import _mover, _moving_keys

ORDERS = Order.__table__


def _orders(manager: ShardManager, shard_id: str, keys: list[int]) -> set[tuple[Any, ...]]:
    with manager.connect(shard_id) as conn:
        query = select(ORDERS.c.customer_id, ORDERS.c.order_id, ORDERS.c.total)
        return {tuple(r) for r in conn.execute(query.where(ORDERS.c.customer_id.in_(keys)))}


def test_rows_changed_after_staging_move_as_they_are_at_the_cut_over(
    manager: ShardManager, shard5_url: str, monkeypatch: Any
) -> None:
    state = start_move(manager, shard5_url)
    changed, emptied, grown = _moving_keys("shard-1")[:3]
    router = RingRouter(manager)
    mover = _mover(manager, state, "shard-1", 10_000)
    new_order = uuid.uuid4()

    take_the_fence = SourceMover._fence_and_fingerprints

    def write_before_the_fence(self: SourceMover, *args: Any) -> Any:
        if not fired:
            writes()
        return take_the_fence(self, *args)

    def writes() -> None:
        fired.append(1)  # phase 1 copied (and committed) the batch; the cut-over is about to take the fence
        with router.begin_write(changed) as wconn:
            wconn.execute(update(ORDERS).where(ORDERS.c.customer_id == changed).values(total=Decimal(99)))
        with router.begin_write(emptied) as wconn:
            wconn.execute(delete(ORDERS).where(ORDERS.c.customer_id == emptied))
        with router.begin_write(grown) as wconn:
            wconn.execute(insert(ORDERS), {"customer_id": grown, "order_id": new_order, "total": Decimal(7)})

    fired: list[int] = []
    keys = [changed, emptied, grown]
    expected = {
        *(r for r in _orders(manager, "shard-1", keys) if r[0] == grown),
        *((c, o, Decimal(99)) for c, o, _ in _orders(manager, "shard-1", [changed])),
        (grown, new_order, Decimal(7)),
    }
    monkeypatch.setattr(SourceMover, "_fence_and_fingerprints", write_before_the_fence)
    assert mover.batch()
    assert fired
    assert _orders(manager, "shard-5", keys) == expected
    assert _orders(manager, "shard-1", keys) == set()

"""A mover frozen during a ring version bump: ordinary writes and sagas fail in ``fence_timeout``.

Every write transaction locks its shard's state row ``FOR KEY SHARE`` (the fence of a key that is
not moving); only a version bump (``FOR UPDATE``, then a key update) conflicts with it. The real
CLI mover is held just before it bumps the first shard of its start bump, with that shard's row
locked ``FOR UPDATE``, and SIGSTOPped. A session insert (the fence rides on BEGIN), a session
update after a read (the fence is its own statement) and a Core ``begin_write`` of keys that are
not moving, on the frozen shard, end with FenceTimeoutError naming it instead of waiting for the
mover (on the old code they wait until the mover resumes: pytest's timeout); other shards write.
After SIGCONT the move completes and the same keys write again.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from sqlalchemy import insert, text

from sa_shardkit import FenceTimeoutError, HashRing, ShardManager
from sa_shardkit.demo.models import Customer, Order
from sa_shardkit.errors import SagaNotStartedError
from sa_shardkit.rebalance import install_ring
from sa_shardkit.saga import transfer
from tests.rebalance_kill import add_shard_argv, finish_frozen, frozen_mover, state_row_held
from tests.saga_support import seed_ring_fleet

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
CUSTOMERS = 200
TRANSFER_ID = "frozen-bump-1"


def _order(key: int) -> Order:
    return Order(customer_id=key, order_id=uuid.uuid4(), status="new", total=Decimal(1))


@pytest.mark.timeout(240)  # the old code waits for the frozen mover: this timeout is its failure
def test_a_mover_frozen_in_a_version_bump_fails_writers_in_time(
    manager: ShardManager, shard5_url: str
) -> None:
    seed_ring_fleet(manager, FOUR, CUSTOMERS, Decimal(100))
    install_ring(manager, FOUR)
    urls, argv = add_shard_argv(manager, FOUR, "shard-5", shard5_url)
    stop = {"sql": "-- never sent --", "hold": {"sql": "SET version = %(version)s", "nth": 1}}
    with frozen_mover(argv, stop, "the start bump") as mover:  # inside the bump: the row locked FOR UPDATE
        stuck = [s for s in FOUR.shard_ids if state_row_held(urls[s], "FOR KEY SHARE")]
        assert len(stuck) == 1, f"the bump's lock is held on {stuck}: the window was not hit"
        frozen = stuck[0]
        keys = [k for k in range(1, CUSTOMERS + 1) if FOUR.get_shard(k) == frozen]
        other = next(k for k in range(1, CUSTOMERS + 1) if FOUR.get_shard(k) != frozen)

        with ShardManager.from_urls(urls, fence_timeout=1.0) as writer:
            writer.placement.refresh()
            assert writer.placement.state.version == 1 and writer.placement.state.target is None
            factory = writer.sessionmaker()
            with factory() as session:  # an insert: the fence rides on the transaction's BEGIN
                session.add(_order(keys[0]))
                with pytest.raises(FenceTimeoutError, match=f"{frozen!r}.*1 s.*rebalance --status") as info:
                    session.commit()
                assert info.value.shard_id == frozen and info.value.seconds == 1.0
            with factory() as session:  # an update after a read: the fence is a statement of its own
                customer = session.get(Customer, keys[1])
                assert customer is not None
                customer.balance += 1
                with pytest.raises(FenceTimeoutError, match=repr(frozen)) as info:
                    session.commit()
                assert info.value.shard_id == frozen
            with pytest.raises(FenceTimeoutError, match=repr(frozen)):  # Core, manager.transaction
                with writer.placement.begin_write(keys[2]) as conn:
                    conn.execute(insert(Order.__table__), [{**_row(keys[2])}])
            with factory() as session:  # another shard is not held up
                session.add(_order(other))
                session.commit()
            # a saga: its one-statement fast path does not wait for the bump (NOWAIT fence) and its
            # ordinary path's fence gives up after fence_timeout (on the old code: it waited)
            with pytest.raises(SagaNotStartedError, match=f"{frozen!r}.*FenceTimeoutError") as started:
                transfer(writer, keys[3], keys[4], Decimal(1), transfer_id=TRANSFER_ID)
            assert started.value.shard_id == frozen

        finish_frozen(mover)

    with ShardManager.from_urls(urls, fence_timeout=1.0) as five:  # moved, and the keys write again
        five.placement.refresh()
        assert five.placement.state.target is None and five.placement.state.version > 1
        factory = five.sessionmaker()
        with factory() as session:
            session.add(_order(keys[0]))
            customer = session.get(Customer, keys[1])
            assert customer is not None and customer.balance == Decimal(100)
            customer.balance += 1
            session.flush()
            # the fence put the transaction's lock_timeout back after locking the row
            shard = five.placement.shard_for_write(keys[1])
            assert session.connection(bind_arguments={"shard_id": shard}).execute(
                text("SHOW lock_timeout")
            ).scalar() in ("0", "0ms")
            session.commit()
        # the refused transfer, retried with its id: moved once, nothing of the first try left
        assert transfer(five, keys[3], keys[4], Decimal(1), transfer_id=TRANSFER_ID).status == "complete"
        with factory() as session:
            sender, receiver = session.get(Customer, keys[3]), session.get(Customer, keys[4])
            assert sender is not None and receiver is not None
            assert (sender.balance, receiver.balance) == (Decimal(99), Decimal(101))


def _row(key: int) -> dict[str, object]:
    return {"customer_id": key, "order_id": uuid.uuid4(), "status": "new", "total": Decimal(1)}

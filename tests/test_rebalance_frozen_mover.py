"""A frozen mover holding a cut-over's fence: every fence wait ends in ``fence_timeout``.

The real CLI mover is held just before it advances a source's watermark, inside the cut-over
transaction that holds the source's state row ``FOR NO KEY UPDATE``, and then SIGSTOPped. A
session flush of a moving key of that source, a scatter holding the sources' fences
(``source_marks(hold=True)``) and ``list_sagas`` end within the bound (FenceTimeoutError naming
the source; the listing falls back to its unfenced read) instead of waiting for the mover; after
SIGCONT the move completes. On the old code the flush waits for the mover until pytest's timeout.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from sa_shardkit import FenceTimeoutError, HashRing, ShardManager
from sa_shardkit.demo.models import Customer
from sa_shardkit.rebalance import install_ring
from sa_shardkit.saga.inspect import list_sagas
from tests.rebalance_kill import add_shard_argv, finish_frozen, frozen_mover, state_row_held
from tests.saga_support import seed_ring_fleet

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
CUSTOMERS = 200


@pytest.mark.timeout(240)  # the old code waits for the frozen mover: this timeout is its failure
def test_a_frozen_mover_holding_a_cut_over_fails_fences_in_time(
    manager: ShardManager, shard5_url: str
) -> None:
    seed_ring_fleet(manager, FOUR, CUSTOMERS, Decimal(100))
    install_ring(manager, FOUR)
    urls, argv = add_shard_argv(manager, FOUR, "shard-5", shard5_url)
    stop = {"sql": "-- never sent --", "hold": {"sql": "SET watermark = %(wm)s", "nth": 1}}
    with frozen_mover(argv, stop, "a cut-over") as mover:  # frozen inside the cut-over, the fence held
        stuck = [s for s in FOUR.shard_ids if state_row_held(urls[s], "FOR SHARE")]
        assert stuck, "no source's fence is held: the window was not hit"

        with ShardManager.from_urls(urls, fence_timeout=1.0) as five:
            five.placement.refresh()
            assert five.placement.state.target is not None  # the move is in flight
            key, source = next(  # a moving key of a frozen source, not cut over
                (k, s)
                for s in stuck
                for k in range(1, CUSTOMERS + 1)
                if FOUR.get_shard(k) == s
                and FIVE.get_shard(k) == "shard-5"
                and five.placement.shard_for_write(k) == s
            )
            with five.sessionmaker()() as session:  # a writer of a moving key of the frozen source
                customer = session.get(Customer, key)
                assert customer is not None
                customer.balance += 1
                with pytest.raises(FenceTimeoutError, match=f"{source!r}.*1 s.*rebalance --status") as info:
                    session.commit()
                assert info.value.shard_id == source
            with pytest.raises(FenceTimeoutError, match=repr(source)) as info:  # a scatter's held marks
                five.placement.source_marks(hold=True)
            assert info.value.shard_id in stuck

        with ShardManager.from_urls(urls) as default:  # the default bound (5 s)
            default.placement.refresh()
            assert default.placement.state.target is not None
            with pytest.raises(FenceTimeoutError, match=repr(source)):
                default.placement.source_marks(hold=True)
            # list_sagas holds the sources' fences too; when one times out it lists unfenced (by
            # the sources' progress, read without the lock) instead of waiting for the mover
            listing = list_sagas(default, include_finished=True)
            assert listing.sagas == [] and listing.unreachable == {}, listing

        finish_frozen(mover)

    with ShardManager.from_urls(urls) as five:  # moved, and the key writes again
        five.placement.refresh()
        assert five.placement.state.target is None
        with five.sessionmaker()() as session:
            customer = session.get(Customer, key)
            assert customer is not None and customer.balance == Decimal(100)
            customer.balance += 1
            session.commit()
        assert five.placement.shard_for_write(key) == "shard-5"

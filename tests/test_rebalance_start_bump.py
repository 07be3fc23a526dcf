"""A reader that adopts a move from the shards bumped first scatters to a joining shard the start
bump has not reached yet: the scatter's ownership filter reads that shard's moved-keys journal,
which must already exist there (it failed with ``relation "shardkit_moved_keys" does not exist``).

The real CLI mover is held (tests.rebalance_kill) just before the joining shard's state row is
inserted, the last statement of the start bump: the four old shards store the move, shard-5 has
neither a state row nor, before the fix, a journal.
"""

from __future__ import annotations

import os
import signal

import pytest
from sqlalchemy import func, select

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.demo.models import Customer
from sa_shardkit.rebalance import install_ring
from tests.rebalance_data import check_fleet, seed
from tests.rebalance_kill import start_mover, url_args, wait_held

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
CUSTOMERS, ORDERS_EACH = 200, 1


@pytest.mark.timeout(240)
def test_a_scatter_during_the_start_bump_reaches_a_joining_shard_with_its_journal(
    manager: ShardManager, shard5_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDKIT_RING_RECHECK_SECONDS", "1")  # a short start wait (the mover inherits it)
    seed(manager, FOUR, CUSTOMERS, ORDERS_EACH, 0)
    install_ring(manager, FOUR)
    urls = {s: manager.config(s).primary_url.render_as_string(False) for s in FOUR.shard_ids}
    urls["shard-5"] = shard5_url
    argv = [*url_args(manager, FOUR.shard_ids), "--add", "shard-5", shard5_url]
    stop = {"sql": "-- never sent --", "hold": {"sql": "INSERT INTO shardkit_ring_state"}}
    mover = start_mover(argv, stop)
    assert mover.stdout is not None and mover.stdin is not None
    try:
        output = wait_held(mover, "shard-5's start bump")
        with ShardManager.from_urls(urls) as reader:
            reader.placement.refresh()
            state = reader.placement.state
            assert state.target is not None and "shard-5" in state.target.shard_ids, (
                "the reader sees the move"
            )
            with reader.sessionmaker()() as session:
                ids = session.scalars(select(Customer.customer_id)).all()
                count = session.scalar(select(func.count()).select_from(Customer))
            assert sorted(ids) == list(range(1, CUSTOMERS + 1)) and count == CUSTOMERS
        mover.stdin.write("go\n")
        mover.stdin.flush()
        rest = mover.stdout.read()
        assert mover.wait(timeout=180) == 0, "".join(output) + rest
    finally:
        if mover.poll() is None:
            os.kill(mover.pid, signal.SIGKILL)
            mover.wait(timeout=60)
    with ShardManager.from_urls(urls) as everything:
        check_fleet(everything, FOUR.add_shard("shard-5"), None, CUSTOMERS * ORDERS_EACH)

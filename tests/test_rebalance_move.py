"""Adding and removing shards online on real PostgreSQL, with writers and readers running throughout.

CI-sized data (600 customers, 3,000 orders, 6,000 items); ``benchmarks/rebalance.py`` runs the
issue's full size (5,000 customers, 50,000 orders).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import text

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base
from sa_shardkit.rebalance import (
    MoveOptions,
    RingRouter,
    add_shard,
    install_ring,
    load_ring_state,
    remove_shard,
)
from tests.rebalance_data import SessionWorkload, Workload, check_fleet, seed

CUSTOMERS, ORDERS_EACH, ITEMS_EACH = 600, 5, 2
ROOT = Path(__file__).resolve().parent.parent
FOUR = ["shard-1", "shard-2", "shard-3", "shard-4"]


def _seeded(manager: ShardManager) -> HashRing:
    ring = HashRing(FOUR)
    seed(manager, ring, CUSTOMERS, ORDERS_EACH, ITEMS_EACH)
    install_ring(manager, ring)
    return ring


def test_adding_a_shard_under_load_keeps_every_row_exactly_once(
    manager: ShardManager, shard5_url: str
) -> None:
    old = _seeded(manager)
    router = RingRouter(manager)
    workload = Workload(router, CUSTOMERS, ORDERS_EACH)
    workload.start()
    time.sleep(0.3)
    try:
        result = add_shard(
            manager, ShardConfig(id="shard-5", url=shard5_url), Base, options=MoveOptions(batch_size=40)
        )
    finally:
        workload.finish()
    assert not workload.errors, workload.errors[:5]
    assert workload.ops["insert"] and workload.ops["update"] and workload.ops["read"]
    new = old.add_shard("shard-5")
    assert result.new == new and router.state.ring == new  # the router followed without a restart
    check_fleet(manager, new, workload, 0)
    total_rows = CUSTOMERS * (1 + ORDERS_EACH * (1 + ITEMS_EACH))
    assert 0.12 < result.rows_moved / total_rows < 0.28  # ~1/5 of the data moved


def test_adding_a_shard_under_sharded_session_load_keeps_every_row_exactly_once(
    manager: ShardManager, shard5_url: str
) -> None:
    old = _seeded(manager)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))  # the application's config names it
    workload = SessionWorkload(RingRouter(manager), CUSTOMERS, ORDERS_EACH)
    workload.start()
    time.sleep(0.3)
    try:
        result = add_shard(manager, "shard-5", Base, options=MoveOptions(batch_size=40))
    finally:
        workload.finish()
    assert not workload.errors, workload.errors[:5]
    assert workload.ops["insert"] and workload.ops["update"] and workload.ops["read"]
    check_fleet(manager, old.add_shard("shard-5"), workload, 0)
    assert result.rows_moved > 0


def test_sigkilled_mover_resumes_and_converges(manager: ShardManager, shard5_url: str) -> None:
    old = _seeded(manager)
    router = RingRouter(manager)
    workload = Workload(router, CUSTOMERS, ORDERS_EACH)
    spec = {
        "shards": {s: manager.config(s).primary_url.render_as_string(False) for s in FOUR},
        "add": ["shard-5", shard5_url],
        "batch_size": 2,  # moving keys per batch: ~15 batches per source, 0.2 s apart, so 3 kills land mid-move
        "sleep": 0.2,
    }
    rnd = random.Random(7)
    # the application's configuration names the new shard before the move starts (not on the ring yet)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    workload.start()
    kills = 0
    try:
        for _ in range(3):
            mover = subprocess.Popen(
                [sys.executable, "-m", "tests.rebalance_data", json.dumps(spec)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            assert mover.stdout is not None
            line = mover.stdout.readline().strip()  # "moving": at least one batch cut over
            if line == "moving":
                time.sleep(rnd.uniform(0.0, 0.6))
                os.kill(mover.pid, signal.SIGKILL)
                kills += 1
            mover.wait(timeout=60)
        state = load_ring_state(manager)
        assert state is not None and state.in_flight  # killed mid-move, not finished
        result = add_shard(
            manager, ShardConfig(id="shard-5", url=shard5_url), Base, options=MoveOptions(batch_size=40)
        )
    finally:
        workload.finish()
    assert kills == 3
    assert not workload.errors, workload.errors[:5]
    new = old.add_shard("shard-5")
    assert result.new == new
    check_fleet(manager, new, workload, 0)


def test_removing_a_shard_under_load_drains_it(manager: ShardManager) -> None:
    old = _seeded(manager)
    router = RingRouter(manager)
    workload = Workload(router, CUSTOMERS, ORDERS_EACH)
    workload.start()
    time.sleep(0.3)
    try:
        result = remove_shard(manager, "shard-2", Base, options=MoveOptions(batch_size=40))
    finally:
        workload.finish()
    assert not workload.errors, workload.errors[:5]
    new = old.remove_shard("shard-2")
    assert result.new == new
    check_fleet(manager, new, workload, 0)
    with manager.connect("shard-2") as conn:
        assert conn.execute(text("SELECT count(*) FROM orders")).scalar() == 0


def test_running_a_finished_rebalance_again_moves_nothing(manager: ShardManager, shard5_url: str) -> None:
    _seeded(manager)
    config = ShardConfig(id="shard-5", url=shard5_url)
    first = add_shard(manager, config, Base)
    again = add_shard(manager, config, Base)
    assert first.rows_moved > 0
    assert again.rows_moved == 0 and again.version == first.version
    check_fleet(manager, first.new, None, CUSTOMERS * ORDERS_EACH)

"""Sagas during an online add: worker processes transfer money while the real CLI mover is SIGKILLed
at several phases and resumed (and one worker is SIGKILLed mid-move).

Every server is then queried directly: the fleet's money is conserved; every customer's balance is
exactly what the complete transfers in the logs say (so no step applied twice, none lost); every
saga id has one log row fleet-wide, final, on its id's shard under the new ring; every receipt and
every customer row is on its key's new shard (nothing left on an old shard). An id reused with
another payload -- during the move (by the workers) and after it, for ids whose log was carried to
another shard -- raises SagaConflictError and moves nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.cli.rebalance import rebalance_command
from sa_shardkit.demo.models import Customer
from sa_shardkit.errors import SagaConflictError
from sa_shardkit.rebalance import install_ring
from sa_shardkit.saga import (
    CREDIT_TRANSFER,
    flush_completion_marks,
    receipts_table,
    recover,
    sagas_table,
    transfer,
)
from tests.rebalance_kill import kill_mover_at, url_args
from tests.saga_support import seed_ring_fleet

ROOT = Path(__file__).resolve().parent.parent
FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
CUSTOMERS, BALANCE, WORKERS = 60, Decimal(1000), 3


def _urls(manager: ShardManager) -> list[str]:
    return url_args(manager, FOUR.shard_ids)


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def _wait_for_transfers(outputs: list[Path], alive: list[int], more: int) -> None:
    """Until each live worker has finished ``more`` transfers beyond what it had now."""
    start = [sum(1 for w in _lines(p) if w[0] == "done") for p in outputs]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = [sum(1 for w in _lines(p) if w[0] == "done") for p in outputs]
        if all(done[i] - start[i] >= more for i in alive):
            return
        time.sleep(0.2)
    raise AssertionError(f"workers made no progress: {start} -> {done}")


def _seed(manager: ShardManager) -> None:
    seed_ring_fleet(manager, FOUR, CUSTOMERS, BALANCE)


def _everything(five: ShardManager) -> tuple[dict[int, tuple[str, Decimal]], list[Any], list[Any]]:
    """Customers, saga log rows and receipts, read from every server directly (with their shard)."""
    customers: dict[int, tuple[str, Decimal]] = {}
    logs, receipts = [], []
    for shard_id in FIVE.shard_ids:
        with five.connect(shard_id) as conn:
            for customer_id, balance in conn.execute(select(Customer.customer_id, Customer.balance)):
                assert customer_id not in customers, f"customer {customer_id} on two shards"
                customers[customer_id] = (shard_id, balance)
            logs += [(shard_id, r) for r in conn.execute(select(sagas_table)).mappings()]
            receipts += [(shard_id, r) for r in conn.execute(select(receipts_table)).mappings()]
            conn.rollback()
    return customers, logs, receipts


def test_transfers_during_an_online_add_with_mover_kills(
    manager: ShardManager, shard5_url: str, tmp_path: Path
) -> None:
    _seed(manager)
    install_ring(manager, FOUR)
    urls = {s: manager.config(s).primary_url.render_as_string(False) for s in FOUR.shard_ids}
    urls["shard-5"] = shard5_url
    stop = tmp_path / "stop"
    outputs = [tmp_path / f"worker-{i}.out" for i in range(WORKERS)]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.saga_rebalance_worker",
                json.dumps(urls),
                str(i),
                str(stop),
                str(CUSTOMERS),
            ],
            cwd=ROOT,
            stdout=outputs[i].open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for i in range(WORKERS)
    ]
    alive = list(range(WORKERS))
    try:
        _wait_for_transfers(outputs, alive, 15)  # finished sagas whose log rows the move must carry
        add = [*_urls(manager), "--add", "shard-5", shard5_url, "--batch-size", "4", "--sleep", "0.05"]
        resume = [*_urls(manager), "--resume"]
        move_started = time.time()
        kill_mover_at(
            add, {"sql": "SET watermark", "nth": 3}
        )  # a key cut-over: targets committed, source not
        os.kill(workers[0].pid, signal.SIGKILL)  # a saga runner dies mid-move too
        alive.remove(0)
        _wait_for_transfers(outputs, alive, 5)
        kill_mover_at(resume, {"sql": "SET carried", "nth": 2})  # a saga-log cut-over, half done
        _wait_for_transfers(outputs, alive, 5)
        kill_mover_at(resume, {"sql": "SET version", "nth": 2})  # the final bump, one shard done
        _wait_for_transfers(outputs, alive, 5)
        result = CliRunner().invoke(rebalance_command, resume)
        assert result.exit_code == 0, result.output
        move_ended = time.time()
        _wait_for_transfers(outputs, alive, 10)  # and under the new ring
    finally:
        stop.touch()
        for worker in workers:
            try:
                worker.wait(timeout=120)
            except subprocess.TimeoutExpired:
                worker.kill()
                raise
    lines = [w for p in outputs for w in _lines(p)]
    assert not [w for w in lines if w[0] not in ("start", "done", "conflict")], lines
    # ids reused with another payload while the move was in flight, some of them ids whose log
    # row the move carries to another shard: every one raised SagaConflictError (else a BAD line)
    during = [w[1] for w in lines if w[0] == "conflict" and move_started <= float(w[2]) <= move_ended]
    assert [i for i in during if FOUR.get_shard(i) != FIVE.get_shard(i)], during
    started = {w[1]: {"from": int(w[2]), "to": int(w[3]), "amount": w[4]} for w in lines if w[0] == "start"}

    with ShardManager.from_urls(urls) as five:
        assert five.placement.refresh().ring == FIVE and five.placement.state.target is None
        recover(five, [CREDIT_TRANSFER])
        for saga_id, p in started.items():  # every id ends final: resubmitting is what a caller does
            assert transfer(five, p["from"], p["to"], p["amount"], transfer_id=saga_id).status
        assert flush_completion_marks(five)
        customers, logs, receipts = _everything(five)

        # money: conserved fleet-wide, and each balance is exactly what the complete transfers say
        assert sum(b for _, b in customers.values()) == CUSTOMERS * BALANCE
        expected = {c: BALANCE for c in range(1, CUSTOMERS + 1)}
        ids = Counter(r["saga_id"] for _, r in logs)
        assert not [i for i, n in ids.items() if n > 1], "a saga log row on two shards"
        assert set(started) <= set(ids)
        for shard_id, row in logs:
            assert row["finished_at"] is not None, row
            assert shard_id == FIVE.get_shard(row["saga_id"]), f"log row of {row['saga_id']} on its old shard"
            if row["status"] == "complete":
                amount = Decimal(row["payload"]["amount"])
                expected[row["payload"]["from"]] -= amount
                expected[row["payload"]["to"]] += amount
        assert {c: b for c, (_, b) in customers.items()} == expected
        for customer_id, (shard_id, _) in customers.items():
            assert shard_id == FIVE.get_shard(customer_id), f"customer {customer_id} left on its old shard"
        steps = Counter((r["saga_id"], r["step"], r["phase"]) for _, r in receipts)
        assert not [k for k, n in steps.items() if n > 1], "a receipt on two shards"
        for shard_id, row in receipts:
            assert shard_id == FIVE.get_shard(row["shard_key"]), f"receipt {dict(row)} on its key's old shard"
        moved_home = [i for i in ids if FOUR.get_shard(i) != FIVE.get_shard(i)]
        assert moved_home, "no saga log row had to move"

        # resubmitting every id again moves nothing; reuse with another payload after the log moved
        # (another sender on another shard, another amount) raises and moves nothing
        for saga_id, p in started.items():
            transfer(five, p["from"], p["to"], p["amount"], transfer_id=saga_id)
        for saga_id in moved_home[:10]:
            p = started.get(saga_id) or next(r["payload"] for _, r in logs if r["saga_id"] == saga_id)
            other = next(
                c
                for c in range(1, CUSTOMERS + 1)
                if c != p["to"] and FIVE.get_shard(c) != FIVE.get_shard(p["from"])
            )
            with pytest.raises(SagaConflictError):
                transfer(five, other, p["to"], Decimal(p["amount"]) + 1, transfer_id=saga_id)
        assert flush_completion_marks(five)
        after, _, _ = _everything(five)
        assert {c: b for c, (_, b) in after.items()} == expected

"""Receipts recorded before revision 0007 (``shard_key`` NULL) move with their step's key.

Receipts are set to NULL keys on every server, as a fleet upgraded from before 0007 holds them;
then the real CLI mover adds a shard. A saga crashed after its credit committed (not logged) is
recovered after the move: its credit's receipt must be where the receiver now lives, or the credit
applies a second time. Every receipt is checked on its server. A receipt whose saga type is not
known to the mover stops the move before anything moves.
"""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from click.testing import CliRunner
from sqlalchemy import insert, select, text

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.cli.rebalance import rebalance_command
from sa_shardkit.demo.models import Customer
from sa_shardkit.rebalance import install_ring
from sa_shardkit.saga import (
    CREDIT_TRANSFER,
    SagaOptions,
    flush_completion_marks,
    receipts_table,
    recover,
    sagas_table,
    transfer,
)
from sa_shardkit.saga import log as saga_log
from tests.rebalance_kill import url_args
from tests.saga_support import SimulatedCrash, crash_at, seed_ring_fleet

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
CUSTOMERS, BALANCE = 40, Decimal(100)


def _seed(manager: ShardManager) -> None:
    seed_ring_fleet(manager, FOUR, CUSTOMERS, BALANCE)
    install_ring(manager, FOUR)


def _forget_keys(manager: ShardManager) -> int:
    """Receipts as revision 0006 wrote them: no shard key."""
    count = 0
    for shard_id in FOUR.shard_ids:
        with manager.connect(shard_id) as conn, conn.begin():
            count += conn.execute(text("UPDATE shardkit_saga_receipts SET shard_key = NULL")).rowcount
    return count


def _add(manager: ShardManager, shard5_url: str) -> tuple[int, str]:
    args = [*url_args(manager, FOUR.shard_ids), "--add", "shard-5", shard5_url]
    result = CliRunner().invoke(rebalance_command, args)
    return result.exit_code, result.output + (repr(result.exception) if result.exception else "")


def test_receipts_without_a_shard_key_move_with_their_step_key(
    manager: ShardManager, shard5_url: str
) -> None:
    _seed(manager)
    receivers = [c for c in range(1, CUSTOMERS + 1) if FIVE.get_shard(c) == "shard-5"]
    senders = [c for c in range(1, CUSTOMERS + 1) if FIVE.get_shard(c) != "shard-5"]
    assert receivers and senders
    pairs = [(s, r) for s in senders for r in receivers if FOUR.get_shard(s) != FOUR.get_shard(r)][:20]
    for n, (sender, receiver) in enumerate(pairs):
        assert transfer(manager, sender, receiver, 1, transfer_id=f"old-{n}").status == "complete"
    crashed_from, crashed_to = pairs[0]
    with pytest.raises(SimulatedCrash):  # credited, not logged: recovery replays the credit
        options = SagaOptions(lease_seconds=1, on_checkpoint=crash_at("do:credit"))
        transfer(manager, crashed_from, crashed_to, 5, transfer_id="crashed", options=options)
    assert flush_completion_marks(manager)
    assert _forget_keys(manager) >= 2 * len(pairs) + 2

    code, output = _add(manager, shard5_url)
    assert code == 0, output

    urls = {s: manager.config(s).primary_url.render_as_string(False) for s in FOUR.shard_ids}
    urls["shard-5"] = shard5_url
    with ShardManager.from_urls(urls) as five:
        receipts = []
        for shard_id in FIVE.shard_ids:
            with five.connect(shard_id) as conn:
                receipts += [(shard_id, r) for r in conn.execute(select(receipts_table)).mappings()]
                conn.rollback()
        for shard_id, row in receipts:
            assert row["shard_key"] is not None, dict(row)
            assert shard_id == FIVE.get_shard(int(row["shard_key"])), (
                f"receipt {dict(row)} left on {shard_id}"
            )
        assert [s for s, r in receipts if s == "shard-5"], "no receipt had to move"

        time.sleep(1.2)  # the crashed runner's lease runs out
        report = recover(five, [CREDIT_TRANSFER], options=SagaOptions(lease_seconds=1))
        assert report.completed == ["crashed"]
        assert flush_completion_marks(five)
        balances: dict[int, Decimal] = {}
        logs = []
        for shard_id in FIVE.shard_ids:
            with five.connect(shard_id) as conn:
                balances.update(dict(conn.execute(select(Customer.customer_id, Customer.balance)).all()))
                logs += list(conn.execute(select(sagas_table)).mappings())
                conn.rollback()
        expected = {c: BALANCE for c in range(1, CUSTOMERS + 1)}
        for row in logs:
            assert row["status"] == "complete", dict(row)
            expected[row["payload"]["from"]] -= Decimal(row["payload"]["amount"])
            expected[row["payload"]["to"]] += Decimal(row["payload"]["amount"])
        assert balances == expected  # the crashed saga's credit applied once


def test_a_receipt_of_an_unknown_saga_type_stops_the_move(manager: ShardManager, shard5_url: str) -> None:
    _seed(manager)
    saga_id = next(f"mystery-{n}" for n in range(1000) if FOUR.get_shard(f"mystery-{n}") == "shard-1")
    with manager.connect("shard-1") as conn, conn.begin():
        assert saga_log.create(conn, saga_id, "mystery_saga", {"k": 1}, "worker", 60)
        conn.execute(
            insert(receipts_table).values(saga_id=saga_id, step="only", phase="do", outcome="applied")
        )
    code, output = _add(manager, shard5_url)
    assert code != 0
    assert "mystery_saga" in output and "--saga" in output, output
    for shard_id in FOUR.shard_ids:  # nothing started: the stored ring is the old one everywhere
        with manager.connect(shard_id) as conn:
            version, target = conn.execute(text("SELECT version, target_ring FROM shardkit_ring_state")).one()
            conn.rollback()
        assert target is None, (shard_id, version)

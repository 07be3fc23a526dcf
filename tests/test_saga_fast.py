"""The one-statement steps (sa_shardkit.saga.fast): a step runs as ONE autocommitted statement that
rolls itself back unless it applied as a whole -- under the ring version this process routed by.

A process whose view of the stored ring is stale must not commit a step by the fast path: its
statement finds another version on the shard's state row, rolls back, and the ordinary path
(which takes the fence, adopts the newer ring and routes again) does the step, once.
"""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import pytest

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.rebalance import RingState, install_ring
from sa_shardkit.rebalance.catalog import write_state
from sa_shardkit.saga import fast, flush_completion_marks, home_of, transfer
from tests.rebalance_data import never_refresh_by_itself
from tests.saga_support import balances, cross_shard_pair, open_accounts, receipt_count, saga_rows

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])


def _spy(monkeypatch: pytest.MonkeyPatch, *, background: list[str] | None = None) -> list[str]:
    """Guarded statements of the calling thread (and, into ``background``, of other threads: the
    completion marks): "applied" or "rolled back" each."""
    outcomes: list[str] = []
    others: list[str] = background if background is not None else []
    real = fast.run_guarded
    caller = threading.current_thread()

    def spy(conn: Any, statement: Any, params: dict[str, Any]) -> None:
        seen = outcomes if threading.current_thread() is caller else others
        try:
            real(conn, statement, params)
        except fast.FastMiss:
            seen.append("rolled back")
            raise
        seen.append("applied")

    monkeypatch.setattr(fast, "run_guarded", spy)
    return outcomes


def test_a_transfer_commits_each_step_in_one_statement(
    manager: ShardManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_accounts(manager)
    install_ring(manager, FOUR)
    sender, receiver = cross_shard_pair(manager)
    outcomes = _spy(monkeypatch)
    before = balances(manager)
    outcome = transfer(manager, sender, receiver, "2.50")
    assert outcome.status == "complete" and outcomes == ["applied", "applied"]
    after = balances(manager)
    assert after[sender] == before[sender] - Decimal("2.50") and after[receiver] == before[
        receiver
    ] + Decimal("2.50")
    assert saga_rows(manager)[outcome.saga_id]["status"] == "complete"


def test_completion_marks_are_one_guarded_statement_per_home_shard(
    manager: ShardManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_accounts(manager)
    install_ring(manager, FOUR)
    sender, receiver = cross_shard_pair(manager)
    background: list[str] = []
    outcomes = _spy(monkeypatch, background=background)
    done = [transfer(manager, sender, receiver, 1) for _ in range(3)]  # generated ids: one home
    assert outcomes == ["applied", "applied"] * 3
    assert flush_completion_marks(manager)
    # the deferred marks of one home shard: one autocommitted statement per batch, no transaction
    assert background and set(background) == {"applied"} and len(background) <= 3, background
    rows = saga_rows(manager)
    assert all(rows[o.saga_id]["status"] == "complete" and rows[o.saga_id]["finished_at"] for o in done)


def test_a_stale_ring_version_rolls_the_statement_back_and_the_step_runs_once(
    manager: ShardManager, shard_map: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    open_accounts(manager)
    install_ring(manager, FOUR)
    with ShardManager.from_urls(shard_map) as stale:
        never_refresh_by_itself(stale, read_now=True)  # it will not look again by itself
        assert stale.placement.state.version == 1
        write_state(manager, RingState(2, FOUR), FOUR.shard_ids)  # the fleet moves on (same ring)
        sender, receiver = cross_shard_pair(stale)
        outcomes = _spy(monkeypatch)
        before = balances(manager)
        outcome = transfer(stale, sender, receiver, "1.00", transfer_id="stale-1")
        assert outcome.status == "complete"
        assert outcomes[0] == "rolled back", outcomes  # the fast start found version 2, not 1
        assert stale.placement.state.version == 2  # the ordinary path's fence adopted it
        after = balances(manager)
        assert after[sender] == before[sender] - 1 and after[receiver] == before[receiver] + 1
        for step in ("debit", "credit"):
            assert receipt_count(manager, "stale-1", step) == 1
        assert saga_rows(manager)["stale-1"]["shard"] == home_of(manager, "stale-1")


def test_a_process_that_has_seen_no_stored_ring_rolls_back_once_one_is_stored(
    manager: ShardManager, shard_map: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    open_accounts(manager)
    with ShardManager.from_urls(shard_map) as unaware:
        never_refresh_by_itself(unaware, read_now=True)
        assert unaware.placement.state.version == 0
        install_ring(manager, FOUR)  # the first ring is stored; this process does not look
        sender, receiver = cross_shard_pair(unaware)
        outcomes = _spy(monkeypatch)
        before = balances(manager)
        outcome = transfer(unaware, sender, receiver, "1.00", transfer_id="unaware-1")
        assert outcome.status == "complete"
        assert outcomes[0] == "rolled back", outcomes  # the statement found the state table
        assert unaware.placement.state.version == 1
        after = balances(manager)
        assert after[sender] == before[sender] - 1 and after[receiver] == before[receiver] + 1
        for step in ("debit", "credit"):
            assert receipt_count(manager, "unaware-1", step) == 1

"""A fence decided under one ring version while another thread adopts the next one.

Found by tests/test_rebalance_trust_writers.py under CI load: a writer thread read the process's
ring state (a remove in flight) and fenced on the source, then, before it compared the source's
stored state with its own, another thread of the process adopted the finished move. The fence
asked "is what the shard stores newer than what the process holds now?" (no: already adopted)
instead of "newer than what I decided under?" (yes), went on under the old state, and wrote on
the removed shard: an order item refused by its foreign key there (its order had moved), or a
row left on a shard no ring holds any more.

The other thread is made to adopt at exactly that moment (the fence's read of the shard is
wrapped); where the row landed is checked on every server with plain SQL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

from sa_shardkit import HashRing, ShardManager
from sa_shardkit import placement as placement_module
from sa_shardkit.demo.models import Base
from sa_shardkit.rebalance import MoveOptions, RingState, install_ring, remove_shard
from sa_shardkit.rebalance.catalog import write_state
from sa_shardkit.ring_state import read_fence
from tests.rebalance_data import seed

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
THREE = FOUR.remove_shard("shard-2")


def _others_adopt_during_the_fence(
    manager: ShardManager, monkeypatch: pytest.MonkeyPatch, newer: RingState
) -> list[int]:
    """Wrap the fence's read of a shard: just before it, "another thread" adopts ``newer``."""
    calls: list[int] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        manager.placement._adopt(newer)
        return read_fence(*args, **kwargs)

    monkeypatch.setattr(placement_module, "read_fence", wrapped)
    return calls


def _customers_on(manager: ShardManager, customer_id: int) -> dict[str, int]:
    found = {}
    for shard_id in FOUR.shard_ids:
        with manager.connect(shard_id) as conn:
            found[shard_id] = int(
                conn.execute(
                    text("SELECT count(*) FROM customers WHERE customer_id = :c"), {"c": customer_id}
                ).scalar_one()
            )
            conn.rollback()
    return found


@pytest.mark.parametrize("routed_to", ["source", "target"])
def test_a_write_fenced_while_another_thread_adopts_the_finished_move_lands_on_the_new_owner(
    manager: ShardManager, monkeypatch: pytest.MonkeyPatch, routed_to: str
) -> None:
    seed(manager, FOUR, 40, 1, 1)
    install_ring(manager, FOUR)
    remove_shard(manager, "shard-2", Base, options=MoveOptions(batch_size=10))
    finished = manager.placement.refresh()  # the fleet's stored state: the move finished
    assert finished.version > 1 and finished.target is None and finished.ring == THREE
    # this thread still decides under the move in flight (it read the state before the bump) ...
    moving = RingState(finished.version - 1, FOUR, THREE, finished.key_type)
    manager.placement._state = moving
    key = next(k for k in range(10_000, 20_000) if FOUR.get_shard(k) == "shard-2")
    owner = THREE.get_shard(key)
    # ... and its routing answer for the key is the source (from before its cut-over: the write
    # landed there) or the target (that path re-read the source and was right already: a guard)
    manager.placement._sticky[key] = (moving.version, "shard-2" if routed_to == "source" else owner, 1e18)
    manager.placement._refresh_at = 1e18  # no refresh of its own: only the other thread adopts
    calls = _others_adopt_during_the_fence(manager, monkeypatch, finished)

    with manager.transaction(key) as conn:
        conn.execute(
            text("INSERT INTO customers (customer_id, name, balance) VALUES (:c, 'late', 0)"), {"c": key}
        )

    assert calls, "the fence never read the shard: this test proves nothing"
    assert _customers_on(manager, key) == {s: int(s == owner) for s in FOUR.shard_ids}


def test_a_fence_read_that_finds_a_newer_version_decides_again_even_if_it_was_adopted(
    manager: ShardManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race at the start of a move: the writer decided under the ring before the move,
    another thread adopted the move; the source's state row must then be held ``FOR SHARE``
    (what a cut-over waits for), not the ``FOR KEY SHARE`` of a key that is not moving."""
    seed(manager, FOUR, 40, 1, 1)
    install_ring(manager, FOUR)
    manager.placement.refresh()
    before = manager.placement._state
    assert before.version > 0 and before.target is None
    moving = RingState(before.version + 1, FOUR, THREE, before.key_type)
    write_state(manager, moving, moving.shard_ids)  # the move's start bump, on every shard
    manager.placement._state = before
    manager.placement._refresh_at = 1e18
    calls = _others_adopt_during_the_fence(manager, monkeypatch, moving)
    key = next(k for k in range(10_000, 20_000) if FOUR.get_shard(k) == "shard-2")
    locks: list[str] = []
    adopting: Callable[..., Any] = placement_module.read_fence

    def recording(conn: Any, k: Any, key_type: Any, lock: str = "", **kwargs: Any) -> Any:
        locks.append(lock)
        return adopting(conn, k, key_type, lock, **kwargs)

    monkeypatch.setattr(placement_module, "read_fence", recording)
    with manager.transaction(key) as conn:
        conn.execute(
            text("INSERT INTO customers (customer_id, name, balance) VALUES (:c, 'x', 0)"), {"c": key}
        )
    assert calls and locks[-1] == "FOR SHARE", locks
    assert _customers_on(manager, key) == {s: int(s == "shard-2") for s in FOUR.shard_ids}

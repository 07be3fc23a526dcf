"""Planning a ring change: which ranges move where, and how many rows per table."""

from __future__ import annotations

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base
from sa_shardkit.rebalance import install_ring, plan_change, range_moves
from sa_shardkit.ring import key_hash
from tests.rebalance_data import seed

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])


def _in(h: int, start: int, end: int) -> bool:
    return start <= h < end if start < end else (h >= start or h < end)


def test_adding_a_shard_moves_about_a_fifth_of_the_ring_all_to_the_new_shard() -> None:
    moves = range_moves(FOUR, FOUR.add_shard("shard-5"))
    assert {m.target for m in moves} == {"shard-5"}
    assert {m.source for m in moves} == set(FOUR.shard_ids)
    assert 0.17 < sum(m.share for m in moves) < 0.23


def test_removing_a_shard_moves_only_its_ranges() -> None:
    moves = range_moves(FOUR, FOUR.remove_shard("shard-2"))
    assert {m.source for m in moves} == {"shard-2"}
    assert "shard-2" not in {m.target for m in moves}
    assert abs(sum(m.share for m in moves) - FOUR.shares()["shard-2"]) < 1e-9


def test_ranges_match_the_rings_key_by_key() -> None:
    new = FOUR.add_shard("shard-5")
    moves = range_moves(FOUR, new)
    for key in range(5000):
        h = key_hash(key)
        hit = [m for m in moves if _in(h, m.start, m.end)]
        if FOUR.get_shard(key) == new.get_shard(key):
            assert not hit
        else:
            assert [(m.source, m.target) for m in hit] == [(FOUR.get_shard(key), new.get_shard(key))]


def test_plan_counts_the_rows_that_move_per_table(manager: ShardManager, shard5_url: str) -> None:
    seed(manager, FOUR, 200, 3, 2)
    install_ring(manager, FOUR)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    new = FOUR.add_shard("shard-5")
    plan = plan_change(manager, new, Base)
    moving = [c for c in range(1, 201) if new.get_shard(c) == "shard-5"]
    by_table: dict[str, int] = {}
    for (_, target, table), n in plan.rows.items():
        assert target == "shard-5"
        by_table[table] = by_table.get(table, 0) + n
    assert by_table == {"customers": len(moving), "orders": 3 * len(moving), "order_items": 6 * len(moving)}
    assert sum(plan.keys.values()) == len(moving)
    assert plan.total_rows == 200 * (1 + 3 + 6)
    with manager.connect("shard-5") as conn:  # a plan writes nothing
        assert conn.exec_driver_sql("SELECT to_regclass('orders')").scalar() is None

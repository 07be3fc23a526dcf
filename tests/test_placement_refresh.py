"""The periodic stored-ring check is O(1): one shard's state row, the fleet only after a change.

Checked by counting the statements each server receives (an engine event on every shard), on
real PostgreSQL servers: a refresh with nothing new reads one shard; a version written to the
shards one by one (as every bump of a move is) is seen as soon as the first shard holds it; a
probed shard that is down is replaced by another one, and the log names it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import pytest
from sqlalchemy import event

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.rebalance import install_ring
from sa_shardkit.rebalance.catalog import write_state
from sa_shardkit.ring_state import STATE_TABLE, RingState
from tests.fleet import TestFleet
from tests.rebalance_data import never_refresh_by_itself

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
THREE = FOUR.remove_shard("shard-4")


@pytest.fixture
def reader(shard_map: dict[str, str]) -> Iterator[ShardManager]:
    """An application process: no periodic refresh of its own (the test calls refresh())."""
    with ShardManager.from_urls(shard_map, connect_timeout=1, refresh_seconds=3600) as mgr:
        never_refresh_by_itself(mgr)  # refresh_seconds alone is capped at the recheck horizon
        yield mgr


def state_reads(manager: ShardManager) -> Counter[str]:
    """Statements reading the ring state (its row, or whether its table exists), per shard, from now on."""
    seen: Counter[str] = Counter()
    for shard_id in manager.shard_ids:

        def count(conn, cursor, statement, params, context, executemany, s=shard_id):  # type: ignore[no-untyped-def]
            if STATE_TABLE in statement or "to_regclass" in statement:
                seen[s] += 1

        event.listen(manager.engine(shard_id), "before_cursor_execute", count)
    return seen


def test_a_refresh_with_nothing_new_reads_one_shard(manager: ShardManager, reader: ShardManager) -> None:
    install_ring(manager, FOUR)
    reader.placement.refresh()  # first use: a change from "nothing stored", so the fleet is read
    assert reader.placement.state.version == 1
    seen = state_reads(reader)
    for _ in range(5):
        reader.placement.refresh()
    assert dict(seen) == {"shard-1": 5}
    assert reader.placement.fleet_reads == 1 and reader.placement.probes == 6


def test_a_fleet_with_no_stored_ring_reads_one_shard_per_check(reader: ShardManager) -> None:
    seen = state_reads(reader)
    for _ in range(3):
        reader.placement.refresh()
    assert reader.placement.state.version == 0
    assert dict(seen) == {"shard-1": 3}  # the other shards are never asked
    assert reader.placement.fleet_reads == 0


def test_a_version_written_shard_by_shard_is_seen_once_the_first_shard_holds_it(
    manager: ShardManager, reader: ShardManager
) -> None:
    install_ring(manager, FOUR)
    reader.placement.refresh()
    moving = RingState(2, FOUR, THREE, "BIGINT")
    write_state(manager, moving, ["shard-1"])  # a start bump killed after its first shard
    state = reader.placement.refresh()
    assert state.version == 2 and state.target == THREE
    assert reader.placement.fleet_reads == 2  # the change made it read every shard once
    write_state(manager, moving, FOUR.shard_ids)
    final = RingState(3, THREE)
    write_state(manager, final, ["shard-1", "shard-2"])  # the finish, half way
    assert reader.placement.refresh().version == 3
    assert reader.placement.state.ring == THREE
    seen = state_reads(reader)
    reader.placement.refresh()
    assert dict(seen) == {"shard-1": 1}  # settled again: one shard


def test_a_version_seen_only_on_another_shard_is_adopted_after_the_change_is_noticed(
    manager: ShardManager, reader: ShardManager
) -> None:
    install_ring(manager, FOUR)
    reader.placement.refresh()
    write_state(manager, RingState(2, FOUR, THREE, "BIGINT"), ["shard-1", "shard-2"])
    write_state(manager, RingState(3, THREE), ["shard-2"])  # only shard-2 has the newest
    assert reader.placement.refresh().version == 3  # shard-1 changed, so every shard was read


def test_a_down_probe_shard_is_replaced_by_another_and_named(
    pg_fleet: TestFleet,
    manager: ShardManager,
    reader: ShardManager,
    caplog: pytest.LogCaptureFixture,
) -> None:
    install_ring(manager, FOUR)
    reader.placement.refresh()
    pg_fleet.server(0).stop()
    try:
        write_state(manager, RingState(2, FOUR, THREE, "BIGINT"), ["shard-2", "shard-3", "shard-4"])
        with caplog.at_level(logging.WARNING, logger="sa_shardkit.placement"):
            state = reader.placement.refresh()
        assert state.version == 2  # read on shard-2, then on every shard that answers
        assert "could not read the stored ring on shard-1" in caplog.text
        seen = state_reads(reader)
        caplog.clear()
        reader.placement.refresh()
        assert dict(seen) == {"shard-2": 1}  # later checks start from the shard that answered
        assert "shard-1" not in caplog.text
    finally:
        pg_fleet.server(0).start()

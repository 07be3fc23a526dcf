"""A process that read the ring just before a move started scatters by the old ring until it
re-reads it (at most every ``refresh_seconds``, capped at ``SHARDKIT_RING_RECHECK_SECONDS``): it
does not know to hide the copies the mover commits on the targets. So the mover commits no copy
before every process must have seen the move (the start wait), and such a reader never sees a row
twice or misses one.

The move is a REMOVE (its targets are members of the old ring, so a stale scatter reads them), the
reader's own manager re-reads the stored ring at the default interval, which the recheck horizon
caps (1.5 s here), and the first batch's cut-over is held back for longer than that after its copies
were committed, so the copies sit on the targets while the reader scatters.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, select

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.demo.models import Base, Customer
from sa_shardkit.rebalance import MoveOptions, RebalanceProgress, install_ring, remove_shard
from sa_shardkit.rebalance.catalog import move_started_at
from tests.rebalance_data import rows_everywhere, seed, start_move

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
CUSTOMERS = 400
HORIZON = 1.5
HOLD_CUT_OVER = 2.5  # > HORIZON: without the start wait the copies are visible to a stale reader


def _hold_first_cut_over(
    monkeypatch: pytest.MonkeyPatch, port: int
) -> tuple[threading.Event, threading.Event]:
    """Hold the mover's first fence on the source (``FOR NO KEY UPDATE``, sent after the batch's
    copies were committed on the targets) for HOLD_CUT_OVER seconds; returns (held, released)."""
    held, released = threading.Event(), threading.Event()
    original = psycopg.Cursor.execute

    def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sql = query if isinstance(query, str) else str(query)
        if "FOR NO KEY UPDATE" in sql and int(self.connection.info.port) == port and not held.is_set():
            held.set()
            time.sleep(HOLD_CUT_OVER)
            released.set()
        return original(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", execute)
    return held, released


def test_a_reader_that_read_the_ring_before_a_remove_started_never_sees_a_copy(
    manager: ShardManager, shard_map: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDKIT_RING_RECHECK_SECONDS", str(HORIZON))
    seed(manager, FOUR, CUSTOMERS, 2, 0)
    install_ring(manager, FOUR)
    everyone = list(range(1, CUSTOMERS + 1))
    held, released = _hold_first_cut_over(monkeypatch, manager.config("shard-2").primary_url.port or 5432)
    with ShardManager.from_urls(shard_map) as reader:  # another process: default refresh_seconds
        with reader.sessionmaker()() as session:
            assert session.scalar(select(func.count()).select_from(Customer)) == CUSTOMERS
        read_before: list[int] = []

        def progress(p: RebalanceProgress) -> None:
            if p.phase == "start" and not read_before:  # just before the start bump: the freshest stale read
                reader.placement.refresh()
                read_before.append(reader.placement.state.version)

        result: list[Any] = []
        errors: list[BaseException] = []

        def move() -> None:
            try:
                result.append(
                    remove_shard(
                        manager, "shard-2", Base, options=MoveOptions(batch_size=15), progress=progress
                    )
                )
            except BaseException as error:  # noqa: BLE001 - reported by the test
                errors.append(error)

        mover = threading.Thread(target=move)
        mover.start()
        wrong: list[tuple[int, int, int, int]] = []  # (version routed by, count, ids, distinct ids)
        scatters = in_window = 0
        while mover.is_alive():
            with reader.sessionmaker()() as session:
                count = session.scalar(select(func.count()).select_from(Customer))
                ids = session.scalars(select(Customer.customer_id)).all()
                window = held.is_set() and not released.is_set()
            version = reader.placement.state.version
            scatters += 1
            in_window += window
            if count != CUSTOMERS or sorted(ids) != everyone:
                wrong.append((version, int(count or 0), len(ids), len(set(ids))))
        mover.join()
    assert not errors, errors
    assert read_before == [1], "the reader read the ring before the move started"
    assert held.is_set() and in_window > 0, "the reader scattered while copies sat on the targets"
    assert wrong == [], f"{len(wrong)} of {scatters} scatters saw a row twice or missed one: {wrong[:5]}"
    assert result[0].start_wait_seconds > 0
    copies = rows_everywhere(manager, list(FOUR.shard_ids))
    assert sorted(pk for (pk,) in copies["customers"]) == everyone
    assert set(copies["customers"].values()) == {1}


def test_a_longer_refresh_interval_is_capped_at_the_recheck_horizon(
    manager: ShardManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SHARDKIT_RING_RECHECK_SECONDS", str(HORIZON))
    install_ring(manager, FOUR)
    with caplog.at_level(logging.WARNING, logger="sa_shardkit.placement"):
        manager.placement.refresh_seconds = 3600
    assert "capped at 1.5 s" in caplog.text
    before = time.monotonic()
    manager.placement.refresh()
    # the next periodic re-read is due by the horizon, not in an hour
    assert manager.placement._refresh_at <= before + 60.0


def test_a_resumed_move_knows_when_its_start_bump_happened(manager: ShardManager, shard5_url: str) -> None:
    before = time.time()
    state = start_move(manager, shard5_url)
    after = time.time()
    started = move_started_at(manager, state)
    assert before - 1.0 <= started <= after + 1.0  # the servers run on this host's clock

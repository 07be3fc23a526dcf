"""The background job API: start, progress, pause/resume, cancel (safe between batches), wait, and
``shardkit rebalance --status`` showing the same figures from another connection."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.cli.rebalance import rebalance_command
from sa_shardkit.demo.models import Base
from sa_shardkit.errors import RebalanceCancelled
from sa_shardkit.rebalance import MoveOptions, install_ring, move_status, start_rebalance
from sa_shardkit.rebalance.record import read_records
from tests.rebalance_data import check_fleet, rows_everywhere, seed

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
CUSTOMERS = 400
SLOW = MoveOptions(batch_size=2, sleep=0.05)  # ~40 batches: time to watch, pause and cancel


def _until(condition: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_job_reports_progress_pauses_resumes_and_finishes(manager: ShardManager, shard5_url: str) -> None:
    seed(manager, FOUR, CUSTOMERS, 2, 1)
    install_ring(manager, FOUR)
    job = start_rebalance(manager, Base, add=ShardConfig(id="shard-5", url=shard5_url), options=SLOW)
    _until(lambda: job.progress().batches >= 3, "three batches")
    job.pause()
    _until(lambda: job.progress().paused, "the pause to show")
    time.sleep(0.3)  # the batch in flight finishes; then nothing moves while paused
    held = job.progress().rows_moved
    time.sleep(0.5)
    assert job.progress().rows_moved == held and not job.done
    stored = move_status(manager)  # what --status shows, read from the shards
    assert stored is not None and stored.phase == "move" and stored.rows_moved == held
    job.resume()
    result = job.wait(timeout=120)
    assert result is not None and result.new == FOUR.add_shard("shard-5") and job.done
    assert result.rows_moved > held and job.progress().phase == "done"
    check_fleet(manager, result.new, None, CUSTOMERS * 2)


def test_a_cancelled_job_leaves_a_consistent_move_that_resume_finishes(
    manager: ShardManager, shard_urls: list[str], shard5_url: str
) -> None:
    seed(manager, FOUR, CUSTOMERS, 2, 1)
    install_ring(manager, FOUR)
    job = start_rebalance(manager, Base, add=ShardConfig(id="shard-5", url=shard5_url), options=SLOW)
    _until(lambda: job.progress().batches >= 2, "two batches")
    job.cancel()
    with pytest.raises(RebalanceCancelled):
        job.wait(timeout=60)
    status = move_status(manager)
    assert status is not None and status.phase == "move" and 0 < status.rows_moved
    copies = rows_everywhere(manager, [*FOUR.shard_ids, "shard-5"])  # mid-move: each row once, somewhere
    assert all(n == 1 for n in copies["orders"].values()) and len(copies["orders"]) == CUSTOMERS * 2
    cli = CliRunner().invoke(rebalance_command, [*(a for u in shard_urls for a in ("--url", u)), "--status"])
    assert cli.exit_code == 0, cli.output
    assert f"{status.rows_moved:,}" in cli.output and "Move in flight (move)" in cli.output
    finished = start_rebalance(manager, Base).wait(timeout=120)  # no request: finish the move in flight
    assert finished is not None and finished.new == FOUR.add_shard("shard-5")
    _, counts = read_records(manager, status.version)
    assert sum(c.rows_moved for c in counts.values()) == status.rows_moved + finished.rows_moved
    check_fleet(manager, finished.new, None, CUSTOMERS * 2)


def test_a_job_with_nothing_to_do_returns_none(manager: ShardManager) -> None:
    seed(manager, FOUR, 10, 1, 0)
    install_ring(manager, FOUR)
    assert start_rebalance(manager, Base).wait(timeout=30) is None

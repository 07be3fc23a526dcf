"""`shardkit rebalance`: dry run, a real move with progress, status, and clear usage errors."""

from __future__ import annotations

from click.testing import CliRunner
from sqlalchemy import text

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.cli.rebalance import rebalance_command
from sa_shardkit.rebalance import load_ring_state
from tests.rebalance_data import check_fleet, seed

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])


def _url_args(shard_urls: list[str]) -> list[str]:
    return [arg for url in shard_urls for arg in ("--url", url)]


def test_dry_run_prints_the_plan_and_moves_nothing(
    manager: ShardManager, shard_urls: list[str], shard5_url: str
) -> None:
    seed(manager, FOUR, 100, 2, 1)
    result = CliRunner().invoke(
        rebalance_command, [*_url_args(shard_urls), "--add", "shard-5", shard5_url, "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "shard-5" in result.output and "Dry run" in result.output and "rows move" in result.output
    assert load_ring_state(manager) is None  # nothing stored
    with ShardManager.from_urls({"s5": shard5_url}) as five, five.connect("s5") as conn:
        assert conn.execute(text("SELECT to_regclass('orders')")).scalar() is None
    check_fleet(manager, FOUR, None, 200)


def test_add_moves_rows_and_reports_rate_and_a_second_run_is_a_no_op(
    manager: ShardManager, shard_urls: list[str], shard5_url: str
) -> None:
    seed(manager, FOUR, 100, 2, 1)
    args = [*_url_args(shard_urls), "--add", "shard-5", shard5_url, "--batch-size", "50"]
    first = CliRunner().invoke(rebalance_command, args)
    assert first.exit_code == 0, first.output
    assert "Done:" in first.output and "rows/s" in first.output
    state = load_ring_state(manager)
    five = FOUR.add_shard("shard-5")
    assert state is not None and state.ring == five and not state.in_flight
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    check_fleet(manager, five, None, 200)
    again = CliRunner().invoke(rebalance_command, args)
    assert again.exit_code == 0, again.output
    assert "moved 0 rows" in again.output
    status = CliRunner().invoke(rebalance_command, [*_url_args(shard_urls), "--status"])
    assert status.exit_code == 0 and "shard-1" in status.output


def test_conflicting_options_are_a_usage_error(shard_urls: list[str]) -> None:
    result = CliRunner().invoke(
        rebalance_command, [*_url_args(shard_urls), "--remove", "shard-1", "--resume"]
    )
    assert result.exit_code == 2
    assert "exactly one of" in result.output

"""`shardkit locate` and `shardkit ring`: the application's routing, seen from the command line."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.cli import cli
from sa_shardkit.cli.ring import ring_fingerprint
from sa_shardkit.rebalance import RebalancePlan, install_ring, range_moves
from sa_shardkit.ring import moved_share

FOUR = [arg for i in range(1, 5) for arg in ("--url", f"postgresql+psycopg://app:s3cret@db{i}/app")]


@pytest.fixture
def four_shards() -> ShardManager:
    """The manager the application would build from the same four URLs (no server is contacted)."""
    return ShardManager.from_urls([f"postgresql+psycopg://app:s3cret@db{i}/app" for i in range(1, 5)])


def shardkit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sa_shardkit", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_locate_names_the_shard_the_application_routes_to(four_shards: ShardManager) -> None:
    keys = [str(k) for k in range(1, 30)]
    result = CliRunner().invoke(cli, ["locate", "--offline", *FOUR, *keys])
    assert result.exit_code == 0, result.output
    located = dict(line.split("\t")[:2] for line in result.stdout.splitlines())
    assert located == {k: four_shards.shard_for(int(k)) for k in keys}


def test_locate_offline_prints_the_configured_ring(four_shards: ShardManager) -> None:
    result = CliRunner().invoke(cli, ["locate", "--offline", *FOUR, "alice"])
    assert f"configured ring {ring_fingerprint(four_shards.ring)}" in result.stdout


def test_locate_uses_the_ring_version_the_shards_store(manager: ShardManager, shard_urls: list[str]) -> None:
    stored = HashRing(manager.shard_ids, weights={"shard-1": 3})
    install_ring(manager, stored)
    keys = [str(k) for k in range(1, 30)]
    result = CliRunner().invoke(cli, ["locate", *[a for u in shard_urls for a in ("--url", u)], *keys])
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert {k: shard for k, shard, _ in lines} == {k: stored.get_shard(int(k)) for k in keys}
    assert all("ring version 1" in where for _, _, where in lines)


def test_locate_reads_uuid_keys(four_shards: ShardManager) -> None:
    key = uuid.UUID("12345678-1234-5678-1234-567812345678")
    result = CliRunner().invoke(cli, ["locate", "--offline", *FOUR, "--type", "uuid", str(key).upper()])
    assert result.stdout.split("\t")[1] == four_shards.shard_for(key)


def test_locate_rejects_a_malformed_uuid_in_one_line(tmp_path: Path) -> None:
    result = shardkit("locate", "--offline", *FOUR, "--type", "uuid", "not-a-uuid", cwd=tmp_path)
    assert result.returncode == 2 and "is not a UUID" in result.stderr and "Traceback" not in result.stderr


def test_locate_with_a_bad_url_is_one_line_without_password(tmp_path: Path) -> None:
    result = shardkit(
        "locate", "--url", "postgresql+psycopg://app:s3cret@db1:notaport/app", "42", cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.startswith("shardkit: error: shard 'shard-1'")
    assert result.stderr.count("\n") == 1 and "s3cret" not in result.stderr


def test_ring_shows_each_shards_share(four_shards: ShardManager) -> None:
    result = CliRunner().invoke(cli, ["ring", *FOUR])
    assert result.exit_code == 0, result.output
    for shard_id, share in four_shards.ring.shares().items():
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(shard_id))
        assert f"{share:.2%}" in line and "█" in line


def test_ring_plan_shows_the_new_shard_and_the_keys_that_move() -> None:
    result = CliRunner().invoke(cli, ["ring", *FOUR, "--add", "shard-5"])
    assert result.exit_code == 0, result.output
    planned = HashRing([f"shard-{i}" for i in range(1, 6)])
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("shard-5"))
    assert f"{planned.shares()['shard-5']:.2%}" in line
    moved = sum(moved_share(HashRing([f"shard-{i}" for i in range(1, 5)]), planned).values())
    assert f"Keys that change shard: {moved:.2%}" in result.stdout


def test_ring_plan_remove_and_weight_change() -> None:
    result = CliRunner().invoke(cli, ["ring", *FOUR, "--remove", "shard-4", "--weight", "shard-1=2"])
    assert result.exit_code == 0, result.output
    planned = HashRing(["shard-1", "shard-2", "shard-3"], weights={"shard-1": 2})
    assert f"ring {ring_fingerprint(planned)}" in result.stdout
    assert "shard-4 -> " in result.stdout  # its keys go somewhere


def test_ring_plan_naming_an_unknown_shard_is_one_clear_line(tmp_path: Path) -> None:
    result = shardkit("ring", *FOUR, "--remove", "shard-9", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "shardkit: error: cannot remove unknown shard 'shard-9'\n"


def test_moved_shares_of_an_added_shard_all_go_to_it() -> None:
    old = HashRing(["a", "b", "c"])
    moves = moved_share(old, old.add_shard("d"))
    assert {target for _, target in moves} == {"d"}
    assert sum(moves.values()) == pytest.approx(old.add_shard("d").shares()["d"])


def test_moved_shares_match_the_keys_that_actually_move() -> None:
    old, new = HashRing(["a", "b", "c", "d"]), HashRing(["a", "b", "c"], weights={"a": 2})
    keys = [f"customer-{i}" for i in range(20_000)]
    moved = sum(old.get_shard(k) != new.get_shard(k) for k in keys) / len(keys)
    assert moved == pytest.approx(sum(moved_share(old, new).values()), abs=0.01)


def test_rebalance_plan_and_ring_command_agree_on_the_moved_share() -> None:
    old = HashRing(["a", "b", "c", "d"])
    new = old.add_shard("e").remove_shard("b")
    plan_flows = RebalancePlan(old, new, tuple(range_moves(old, new))).flows()
    assert plan_flows == moved_share(old, new)
    from_b = sum(share for (source, _), share in plan_flows.items() if source == "b")
    assert from_b == pytest.approx(old.shares()["b"])  # all of the removed shard's keys move

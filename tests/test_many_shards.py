"""64 shards (databases on the four test servers): reports summarise, scatters and status still work."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.engine import make_url

from sa_shardkit import ShardManager
from sa_shardkit.aio import AsyncShardManager
from sa_shardkit.cli import cli
from sa_shardkit.rebalance.catalog import install_ring
from tests.alembic_support import AlembicProject, execute_on, revision_on
from tests.fleet import TestFleet, _connect
from tests.many_shards import many_databases

COUNT = 64


@pytest.fixture(scope="module")
def wide(pg_fleet: TestFleet) -> Iterator[dict[str, str]]:
    with many_databases(pg_fleet, COUNT, "wide") as shards:
        yield shards


def _connections_to(fleet: TestFleet, databases: list[str]) -> int:
    """Client connections to ``databases`` on the fleet's servers now."""
    total = 0
    for url in fleet.urls:
        with _connect(url) as conn:
            sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(%s)"
            total += int(conn.execute(sql, (databases,)).fetchone()[0])  # type: ignore[index]
    return total


def test_a_64_shard_manager_creates_engines_only_for_the_shards_it_uses(
    pg_fleet: TestFleet, wide: dict[str, str]
) -> None:
    """First in this module: no ring is stored yet (the first read of a stored one reads every shard)."""
    with ShardManager.from_urls(wide) as manager:
        assert manager.created_engines() == {} and manager.connection_stats() == []
        key = 42
        with manager.transaction(key) as conn:  # routing probes one shard for a stored ring
            conn.execute(text("SELECT 1"))
        shard = manager.shard_for(key)
        with manager.sessionmaker()() as session:
            session.execute(text("SELECT 1"), bind_arguments={"shard_id": shard})
        assert list(manager.engines) == list(wide) and len(manager.engines) == COUNT  # ids: no engine
        created = set(manager.created_engines())
        assert shard in created and len(created) <= 2, created  # the key's shard, the ring probe's
        assert {s.shard_id for s in manager.connection_stats()} == created
        untouched = [make_url(u).database for s, u in wide.items() if s not in created]
        assert len(untouched) >= COUNT - 2 and _connections_to(pg_fleet, untouched) == 0
        assert len(manager.run_on_all("SELECT 1")) == COUNT  # a fan-out still reaches every shard
        assert len(manager.created_engines()) == COUNT


def test_a_64_shard_async_manager_creates_engines_only_for_the_shards_it_uses(
    pg_fleet: TestFleet, wide: dict[str, str]
) -> None:
    """AsyncShardManager is lazy too: touching 2 of 64 shards leaves the other 62 without an engine
    and without a connection (counted in pg_stat_activity on every server)."""
    key, other = 42, "shard-40"

    async def main(manager: ShardManager) -> tuple[set[str], set[str], int, int]:
        async with AsyncShardManager(manager) as shards:
            assert shards.created_engines() == {}
            async with shards.transaction(key) as conn:  # the key's shard (routing may probe one)
                await conn.execute(text("SELECT 1"))
            async with shards.sessionmaker()() as session:
                await session.execute(text("SELECT 1"), bind_arguments={"shard_id": other})
            assert list(shards.engines) == list(wide) and len(shards.engines) == COUNT  # ids: no engine
            touched = set(shards.created_engines())
            used = touched | set(manager.created_engines())  # the sync side's ring probe
            untouched = [make_url(u).database for s, u in wide.items() if s not in used]
            idle = _connections_to(pg_fleet, untouched)
            assert (await shards.query_all_shards("SELECT 1 AS one")).all() == [(1,)] * COUNT
            return touched, used, idle, len(shards.created_engines())

    with ShardManager.from_urls(wide) as manager:
        touched, used, idle, after_scatter = asyncio.run(main(manager))
    assert touched == {manager.shard_for(key), other}
    assert len(used) <= 3 and idle == 0  # 61+ databases nobody connected to
    assert after_scatter == COUNT  # a fan-out still reaches every shard


def test_status_over_64_shards_lists_only_the_shard_that_is_down(
    wide: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no alembic.ini: revisions are not judged here (see the next test)
    missing = next(iter(wide.values())).rsplit("/", 1)[0] + "/no_such_database"
    args = ["status"] + [f"--url={u}" for u in [*wide.values(), missing]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "65 shard(s), 0 replica(s): 64 ok, 1 DOWN" in result.output
    assert "64 server(s) without a problem not listed" in result.output
    assert "shard-65" in result.output and "shard-17 " not in result.output
    assert "fewest on a shard" not in result.output  # no tables yet

    verbose = CliRunner().invoke(cli, [*args, "--verbose"])
    assert verbose.exit_code == 1
    assert all(f"shard-{i} " in verbose.output for i in range(1, 66))


def test_migrations_over_64_shards_summarise_and_show_the_shard_behind(
    tmp_path: Path, wide: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    project = AlembicProject(tmp_path, wide)
    command.upgrade(project.config(), "head")
    output = project.output()
    summary = output[output.index(f"shardkit: upgrade to head on {COUNT} shard(s)") :]
    assert f"by state: {COUNT} migrated" in summary
    assert f"{COUNT} shard(s) that ended ok not listed" in summary
    assert "shard-17 " not in summary
    assert all(revision_on(url) == (project.head,) for url in wide.values())

    execute_on(wide["shard-7"], "DELETE FROM alembic_version")  # shard-7 now looks never migrated
    result = CliRunner().invoke(cli, ["migrations", "status", "--config", str(project.ini)])
    assert result.exit_code == 1
    assert f"by state: {COUNT - 1} at head, 1 empty" in result.output
    assert "shard-7 " in result.output and "shard-8 " not in result.output

    status = CliRunner().invoke(cli, ["status", "--config", str(project.ini)])
    assert status.exit_code == 1
    assert f"{COUNT} shard(s), 0 replica(s): {COUNT - 1} ok, 1 BEHIND" in status.output
    assert "shard-7 " in status.output and "shard-8 " not in status.output
    assert "fewest on a shard" in status.output  # rows per table: no column per shard

    monkeypatch.setenv("SHARDKIT_VERBOSE", "1")
    result = CliRunner().invoke(cli, ["migrations", "status", "--config", str(project.ini)])
    assert all(f"shard-{i} " in result.output for i in range(1, COUNT + 1))


def test_a_scatter_over_64_shards_with_a_small_budget(wide: dict[str, str]) -> None:
    with ShardManager.from_urls(wide, max_connections=8) as manager:
        result = manager.query_all_shards("SELECT current_database() AS db", with_shard_id=True)
        assert {(row.shard_id, row.db) for row in result} == {
            (s, u.rsplit("/", 1)[1]) for s, u in wide.items()
        }
        assert manager.budget.open_connections <= 8


def test_rebalance_status_over_64_shards_lists_only_the_shard_behind(wide: dict[str, str]) -> None:
    with ShardManager.from_urls(wide) as manager:
        install_ring(manager)
        args = ["rebalance", "--status"] + [f"--url={u}" for u in wide.values()]
        execute_on(wide["shard-9"], "UPDATE shardkit_ring_state SET version = 0")  # an older version
        result = CliRunner().invoke(cli, args)
        assert result.exit_code in (0, 1), result.output
        assert f"{COUNT} shard(s) store a ring:" in result.output
        assert f"{COUNT - 1} version 1" in result.output and "1 version 0" in result.output
        assert "shard-9 " in result.output and "shard-10 " not in result.output
        assert "64 shards" in result.output and "shard-33" not in result.output  # rings shown compactly

        verbose = CliRunner().invoke(cli, [*args, "--verbose"])
        assert all(f"shard-{i} " in verbose.output for i in range(1, COUNT + 1))

"""ShardManager against real PostgreSQL servers: engines, routing, parallel work, health, faults."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import text

from sa_shardkit import ShardConfig, ShardManager, errors
from tests.fleet import TestFleet


def test_each_shard_has_its_own_server(manager: ShardManager) -> None:
    ports = manager.run_on_all("SELECT inet_server_port()")
    assert len({rows[0][0] for rows in ports.values()}) == 4


def test_engine_for_key_matches_the_ring(manager: ShardManager) -> None:
    for key in ["alice", 42, "bob"]:
        assert manager.engine_for(key) is manager.engine(manager.ring.get_shard(key))


def test_unknown_shard_raises_unknown_shard_error(manager: ShardManager) -> None:
    with pytest.raises(errors.UnknownShardError, match="shard-9"):
        manager.engine("shard-9")
    with pytest.raises(errors.UnknownShardError):
        manager.run_on_all("SELECT 1", shard_ids=["shard-1", "nope"])


def test_run_on_all_runs_in_parallel(manager: ShardManager) -> None:
    """Every shard's statement starts before the first one ends (no wall-clock bound)."""
    sql = "SELECT clock_timestamp() AS a, (SELECT pg_sleep(0.3)) IS NOT NULL, clock_timestamp() AS b"
    manager.run_on_all("SELECT 1")  # reads the stored ring
    for cold in (True, False):  # new connections (worker threads), then pooled ones (the hubs)
        if cold:
            for engine in manager.engines.values():
                engine.dispose()
        rows = [row for rows in manager.run_on_all(sql).values() for row in rows]
        assert max(r.a for r in rows) < min(r.b for r in rows)  # one after another fails this


def test_run_on_all_with_callable(manager: ShardManager) -> None:
    manager.run_on_all("CREATE TABLE t (x int)")
    manager.run_on_all(lambda conn: conn.execute(text("INSERT INTO t VALUES (1), (2)")))
    counts = manager.run_on_all(lambda conn: conn.execute(text("SELECT count(*) FROM t")).scalar())
    assert counts == {f"shard-{i}": 2 for i in range(1, 5)}


def test_health_reports_every_shard_reachable(manager: ShardManager) -> None:
    report = manager.health()
    assert set(report) == set(manager.shard_ids)
    assert all(h.reachable and h.latency_ms is not None for h in report.values())


def test_stopped_shard_raises_shard_unavailable_within_connect_timeout(
    pg_fleet: TestFleet, shard_map: dict[str, str]
) -> None:
    configs = [
        ShardConfig(id=i, url=u.replace("postgres@", "postgres:s3cret@"), connect_timeout=2)
        for i, u in shard_map.items()
    ]
    with ShardManager(configs) as mgr:
        pg_fleet.server(2).stop()
        started = time.perf_counter()
        with pytest.raises(errors.ShardUnavailableError, match="shard-3") as info:
            with mgr.connect("shard-3"):
                pass
        assert time.perf_counter() - started < 3
        assert info.value.shard_id == "shard-3"
        assert "s3cret" not in str(info.value)
        report = mgr.health()
        assert not report["shard-3"].reachable and report["shard-1"].reachable
        assert "s3cret" not in str(report)


def test_paused_shard_health_check_does_not_hang(pg_fleet: TestFleet, shard_map: dict[str, str]) -> None:
    with ShardManager.from_urls(shard_map, connect_timeout=1) as mgr:
        pg_fleet.server(1).pause()
        try:
            started = time.perf_counter()
            report = mgr.health()
            assert time.perf_counter() - started < 4
            assert not report["shard-2"].reachable
            assert report["shard-1"].reachable
        finally:
            pg_fleet.server(1).resume()


def test_from_env_reads_design_variable_names(shard_urls: list[str]) -> None:
    env = {"SHARD_1_URL": shard_urls[0], "SHARD_2_URL": shard_urls[1], "SHARD_2_WEIGHT": "2"}
    with ShardManager.from_env(env) as mgr:
        assert mgr.shard_ids == ("shard-1", "shard-2")
        assert mgr.ring.weights == {"shard-1": 1, "shard-2": 2}
        assert mgr.run_on_all("SELECT 1") == {"shard-1": [(1,)], "shard-2": [(1,)]}


def test_from_config_reads_shardkit_section(tmp_path: Path, shard_urls: list[str]) -> None:
    ini = tmp_path / "alembic.ini"
    ini.write_text(
        "[shardkit]\nshards = a, b\npool_size = 5\n"
        f"a.url = {shard_urls[0]}\nb.url = {shard_urls[1]}\nb.pool_size = 7\n"
    )
    with ShardManager.from_config(ini) as mgr:
        assert mgr.shard_ids == ("a", "b")
        assert mgr.config("a").pool_size == 5 and mgr.config("b").pool_size == 7
        assert mgr.engine("b").pool.size() == 7  # type: ignore[attr-defined]


def test_config_errors_are_specific(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="SHARD_"):
        ShardManager.from_env({})
    with pytest.raises(errors.ConfigError, match="shard-1.*not a database URL"):
        ShardManager.from_env({"SHARD_1_URL": "::nonsense::"})
    ini = tmp_path / "x.ini"
    ini.write_text("[shardkit]\nshards = a\n")
    with pytest.raises(errors.ConfigError, match="'a' has no 'a.url'"):
        ShardManager.from_config(ini)
    with pytest.raises(errors.DuplicateShardError):
        ShardManager([ShardConfig(id="a", url="sqlite://"), ShardConfig(id="a", url="sqlite://")])


def test_repr_masks_passwords() -> None:
    with ShardManager([ShardConfig(id="a", url="postgresql+psycopg://u:hunter2@h/db")]) as mgr:
        assert "hunter2" not in repr(mgr)

"""Read replicas at the manager level, against a real streaming replica of shard-1."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from sa_shardkit import ShardManager
from sa_shardkit.testing import LocalPostgres
from tests.fleet import TestFleet
from tests.replica_support import manager_with_replica, pause_replay, wait_for_replay, where


def test_reads_go_to_the_replica(replicated_manager: ShardManager, pg_replica: LocalPostgres) -> None:
    with replicated_manager.connect("shard-1", write=False) as conn:
        assert where(conn) == (True, pg_replica.port)


def test_writes_go_to_the_primary(replicated_manager: ShardManager, pg_fleet: TestFleet) -> None:
    with replicated_manager.connect("shard-1") as conn:
        assert where(conn) == (False, pg_fleet.server(0).port)


def test_shard_without_replica_reads_from_its_primary(
    replicated_manager: ShardManager, pg_fleet: TestFleet
) -> None:
    with replicated_manager.connect("shard-2", write=False) as conn:
        assert where(conn) == (False, pg_fleet.server(1).port)


def test_replica_serves_rows_written_on_the_primary(
    replicated_manager: ShardManager, pg_fleet: TestFleet, pg_replica: LocalPostgres
) -> None:
    replicated_manager.run_on_all("CREATE TABLE t (x int)", shard_ids=["shard-1"])
    replicated_manager.run_on_all("INSERT INTO t VALUES (7)", shard_ids=["shard-1"])
    wait_for_replay(pg_fleet.server(0), pg_replica)
    rows = replicated_manager.run_on_all(
        "SELECT x, pg_is_in_recovery() FROM t", shard_ids=["shard-1"], write=False
    )
    assert rows == {"shard-1": [(7, True)]}


def test_stopped_replica_falls_back_to_the_primary_with_a_warning(
    replicated_manager: ShardManager,
    pg_fleet: TestFleet,
    pg_replica: LocalPostgres,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pg_replica.stop()
    with caplog.at_level(logging.WARNING, logger="sa_shardkit.replicas"):
        with replicated_manager.connect("shard-1", write=False) as conn:
            assert where(conn) == (False, pg_fleet.server(0).port)
    assert "shard 'shard-1': replica" in caplog.text and "unreachable" in caplog.text
    assert not replicated_manager.replicas.status("shard-1").usable


def test_fallback_warning_is_logged_once_not_per_read(
    replicated_manager: ShardManager, pg_replica: LocalPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    pg_replica.stop()
    with caplog.at_level(logging.WARNING, logger="sa_shardkit.replicas"):
        for _ in range(5):
            replicated_manager.engine("shard-1", write=False)
    assert len(caplog.records) == 1


def test_restarted_replica_is_used_again(replicated_manager: ShardManager, pg_replica: LocalPostgres) -> None:
    pg_replica.stop()
    assert replicated_manager.engine("shard-1", write=False) is replicated_manager.engine("shard-1")
    pg_replica.start()
    with replicated_manager.connect("shard-1", write=False) as conn:
        assert where(conn) == (True, pg_replica.port)


def test_lagging_replica_falls_back_to_the_primary(
    replicated_manager: ShardManager,
    shard_map: dict[str, str],
    pg_fleet: TestFleet,
    pg_replica: LocalPostgres,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pause_replay(pg_replica)
    replicated_manager.run_on_all("CREATE TABLE t (x int)", shard_ids=["shard-1"])
    time.sleep(0.6)  # the replica received the write but has not applied it for > 0.3 s
    with manager_with_replica(shard_map, pg_replica, max_replica_lag=0.3) as strict:
        with caplog.at_level(logging.WARNING, logger="sa_shardkit.replicas"):
            with strict.connect("shard-1", write=False) as conn:
                assert where(conn) == (False, pg_fleet.server(0).port)
        status = strict.replicas.status("shard-1")
    assert not status.usable and status.lag_seconds is not None and status.lag_seconds > 0.3
    assert "lagging" in caplog.text


def test_lag_within_the_bound_keeps_reads_on_the_replica(
    replicated_manager: ShardManager, pg_replica: LocalPostgres
) -> None:
    pause_replay(pg_replica)
    replicated_manager.run_on_all("CREATE TABLE t (x int)", shard_ids=["shard-1"])
    time.sleep(0.3)  # behind, but well within the default 5 s bound
    status = replicated_manager.replicas.status("shard-1")
    assert status.usable and status.lag_seconds is not None and status.lag_seconds > 0
    with replicated_manager.connect("shard-1", write=False) as conn:
        assert where(conn) == (True, pg_replica.port)


def test_idle_caught_up_replica_is_not_counted_as_lagging(
    replicated_manager: ShardManager,
    shard_map: dict[str, str],
    pg_fleet: TestFleet,
    pg_replica: LocalPostgres,
) -> None:
    replicated_manager.run_on_all("CREATE TABLE t (x int)", shard_ids=["shard-1"])
    wait_for_replay(pg_fleet.server(0), pg_replica)
    time.sleep(0.5)  # the last replayed transaction is now older than the bound, but nothing is missing
    with manager_with_replica(shard_map, pg_replica, max_replica_lag=0.2) as strict:
        status = strict.replicas.status("shard-1")
    assert status.usable and status.lag_seconds == 0


def test_verdict_is_reused_within_the_check_interval(
    replicated_manager: ShardManager, pg_fleet: TestFleet, pg_replica: LocalPostgres
) -> None:
    replicated_manager.replicas.check_interval = 60
    first = replicated_manager.replicas.status("shard-1")
    pg_replica.stop()
    assert replicated_manager.replicas.status("shard-1") is first
    assert not replicated_manager.replicas.status("shard-1", refresh=True).usable


def test_max_replica_lag_is_read_from_the_config_file(tmp_path: Path, shard_urls: list[str]) -> None:
    ini = tmp_path / "alembic.ini"
    ini.write_text(
        "[shardkit]\nshards = a, b\nmax_replica_lag = 2.5\n"
        f"a.url = {shard_urls[0]}\nb.url = {shard_urls[1]}\nb.max_replica_lag = 10\n"
    )
    with ShardManager.from_config(ini) as mgr:
        assert mgr.config("a").max_replica_lag == 2.5
        assert mgr.config("b").max_replica_lag == 10


def test_replica_password_is_never_logged(
    shard_map: dict[str, str], caplog: pytest.LogCaptureFixture, pg_fleet: TestFleet
) -> None:
    from sa_shardkit import ShardConfig

    dead = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/postgres"
    with ShardManager([ShardConfig(id="shard-1", url=shard_map["shard-1"], replica_url=dead)]) as mgr:
        with caplog.at_level(logging.WARNING, logger="sa_shardkit.replicas"):
            with mgr.connect("shard-1", write=False) as conn:
                assert conn.execute(text("SELECT pg_is_in_recovery()")).scalar() is False
    assert "shard-1" in caplog.text and "s3cret" not in caplog.text

"""`shardkit status` against the real shard servers (and shard-1's streaming replica)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.cli import cli
from sa_shardkit.rebalance import install_ring
from sa_shardkit.testing import LocalPostgres
from tests.fleet import TestFleet


@pytest.fixture(autouse=True)
def _no_local_alembic_ini(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from an empty directory: the repository's alembic.ini must not leak into these tests."""
    monkeypatch.chdir(tmp_path)


def run_status(*args: str) -> Result:
    return CliRunner().invoke(cli, ["status", *args])


def url_args(urls: list[str]) -> list[str]:
    return [arg for url in urls for arg in ("--url", url)]


def json_report(result: Result) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def write_scripts(directory: Path, revisions: list[str]) -> None:
    """A linear chain of empty Alembic revisions (enough for heads and `behind`)."""
    versions = directory / "versions"
    versions.mkdir(parents=True)
    previous = None
    for rev in revisions:
        (versions / f"{rev}_step.py").write_text(f"revision = {rev!r}\ndown_revision = {previous!r}\n")
        previous = rev


def write_ini(
    path: Path, urls: dict[str, str], *, scripts: Path | None = None, replica: str | None = None
) -> Path:
    lines = []
    if scripts is not None:
        lines += ["[alembic]", f"script_location = {scripts}", ""]
    lines += ["[shardkit]", f"shards = {', '.join(urls)}"]
    lines += [f"{shard_id}.url = {url}" for shard_id, url in urls.items()]
    if replica is not None:
        lines.append(f"shard-1.replica_url = {replica}")
    path.write_text("\n".join(lines) + "\n")
    return path


def set_revision(manager: ShardManager, revisions: dict[str, str]) -> None:
    for shard_id, rev in revisions.items():
        manager.run_on_all(
            lambda conn, rev=rev: conn.exec_driver_sql(
                f"CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY); "
                f"INSERT INTO alembic_version VALUES ('{rev}')"
            ),
            shard_ids=[shard_id],
        )


def test_status_reports_every_shard_reachable(shard_urls: list[str]) -> None:
    result = run_status(*url_args(shard_urls))
    assert result.exit_code == 0, result.output
    for i in range(1, 5):
        assert f"shard-{i}" in result.stdout
    assert "OK: 4 shard(s)" in result.stdout


def test_status_json_has_version_latency_and_ring_share(shard_urls: list[str], manager: ShardManager) -> None:
    report = json_report(run_status("--json", *url_args(shard_urls)))
    nodes = {n["shard_id"]: n for n in report["nodes"]}
    assert report["healthy"] is True
    shares = manager.ring.shares()
    for shard_id, node in nodes.items():
        assert node["reachable"] and node["latency_ms"] > 0
        assert node["server_version"].split(".")[0].isdigit()
        assert node["ring_share"] == pytest.approx(shares[shard_id])


def test_status_counts_rows_per_table_on_each_shard(shard_urls: list[str], manager: ShardManager) -> None:
    manager.run_on_all("CREATE TABLE orders (id int)")
    for n, shard_id in enumerate(manager.shard_ids, 1):
        manager.run_on_all(f"INSERT INTO orders SELECT generate_series(1, {n})", shard_ids=[shard_id])
    report = json_report(run_status("--json", *url_args(shard_urls)))
    counts = {n["shard_id"]: n["row_counts"] for n in report["nodes"]}
    assert counts == {f"shard-{n}": {"orders": n} for n in range(1, 5)}
    table = run_status(*url_args(shard_urls)).stdout
    assert "Rows per table" in table and "orders" in table


def test_status_exits_nonzero_when_a_shard_is_down(pg_fleet: TestFleet, shard_urls: list[str]) -> None:
    pg_fleet.server(2).stop()
    result = run_status(*url_args(shard_urls))
    assert result.exit_code == 1
    assert "DOWN" in result.stdout and "PROBLEM: shard-3 primary: unreachable" in result.stdout


def test_status_shows_the_alembic_revision_and_flags_shards_that_differ(
    shard_urls: list[str], manager: ShardManager
) -> None:
    set_revision(manager, {"shard-1": "aaa1", "shard-2": "aaa1", "shard-3": "aaa1", "shard-4": "bbb2"})
    result = run_status(*url_args(shard_urls))
    assert result.exit_code == 1
    assert "aaa1" in result.stdout and "bbb2" in result.stdout
    assert "Alembic revision differs" in result.stdout


def test_status_flags_shards_behind_the_migration_scripts(
    tmp_path: Path, shard_map: dict[str, str], manager: ShardManager
) -> None:
    write_scripts(tmp_path / "scripts", ["aaa1", "bbb2"])
    ini = write_ini(tmp_path / "alembic.ini", shard_map, scripts=tmp_path / "scripts")
    set_revision(manager, {"shard-1": "bbb2", "shard-2": "bbb2", "shard-3": "aaa1", "shard-4": "bbb2"})
    result = run_status("--config", str(ini), "--json")
    assert result.exit_code == 1
    report = json_report(result)
    assert report["script_heads"] == ["bbb2"]
    states = {n["shard_id"]: n["revision_state"] for n in report["nodes"]}
    assert states == {"shard-1": "at head", "shard-2": "at head", "shard-3": "behind", "shard-4": "at head"}


def test_status_is_healthy_when_every_shard_is_at_head(
    tmp_path: Path, shard_map: dict[str, str], manager: ShardManager
) -> None:
    write_scripts(tmp_path / "scripts", ["aaa1", "bbb2"])
    ini = write_ini(tmp_path / "alembic.ini", shard_map, scripts=tmp_path / "scripts")
    set_revision(manager, dict.fromkeys(shard_map, "bbb2"))
    result = run_status("--config", str(ini))
    assert result.exit_code == 0, result.output
    assert "bbb2 (at head)" in result.stdout


def test_status_reports_the_replica_and_its_lag(
    tmp_path: Path, replicated_manager: ShardManager, shard_map: dict[str, str], pg_replica: LocalPostgres
) -> None:
    ini = write_ini(tmp_path / "shards.ini", shard_map, replica=pg_replica.url)
    report = json_report(run_status("--config", str(ini), "--json"))
    replica = [n for n in report["nodes"] if n["role"] == "replica"]
    assert len(replica) == 1 and replica[0]["shard_id"] == "shard-1"
    assert replica[0]["reachable"] and replica[0]["lag_seconds"] == 0 and replica[0]["problem"] is None


def test_status_exits_nonzero_when_the_replica_is_down(
    tmp_path: Path, replicated_manager: ShardManager, shard_map: dict[str, str], pg_replica: LocalPostgres
) -> None:
    ini = write_ini(tmp_path / "shards.ini", shard_map, replica=pg_replica.url)
    pg_replica.stop()
    result = run_status("--config", str(ini))
    assert result.exit_code == 1
    assert "PROBLEM: shard-1 replica: unreachable" in result.stdout


def test_status_never_shows_a_password(shard_urls: list[str]) -> None:
    urls = [u.replace("postgres@", "postgres:s3cret@") for u in shard_urls]
    result = run_status("--json", *url_args(urls))
    assert result.exit_code == 0 and "s3cret" not in result.output
    assert "***" in result.stdout


def test_status_without_configuration_is_one_clear_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "sa_shardkit", "status"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 2
    assert result.stderr.startswith("shardkit: error: no shards configured")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_status_reports_the_ring_version_the_shards_store(
    shard_urls: list[str], manager: ShardManager
) -> None:
    stored = HashRing(manager.shard_ids, weights={"shard-1": 3})
    install_ring(manager, stored)
    report = json_report(run_status("--json", *url_args(shard_urls)))
    assert report["ring_version"] == 1
    shares = {n["shard_id"]: n["ring_share"] for n in report["nodes"]}
    assert shares == pytest.approx(stored.shares())

"""What the CLI prints when stdout is a pipe or a file, and what its numbers mean.

- rich must not cut data to 80 columns off a terminal (``| grep``, ``> report.txt``);
- ``status --estimate`` must not print 0 for a table PostgreSQL never analyzed;
- a fresh replica (right after ``pg_basebackup``) is judged by one definition of lag, the same for
  ``shardkit status`` and for the session's routing.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from sa_shardkit import ShardConfig, ShardManager
from sa_shardkit.cli import cli
from sa_shardkit.status import collect_status
from tests.cli_support import shardkit
from tests.fleet import TestFleet

LONG_ID = "shard-with-a-very-long-identifier-for-the-orders-of-europe"


def write_ini(path: Path, shards: dict[str, str]) -> Path:
    lines = ["[shardkit]", f"shards = {', '.join(shards)}", *(f"{k}.url = {v}" for k, v in shards.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_piped_status_and_ring_print_every_value_in_full(shard_urls: list[str], tmp_path: Path) -> None:
    ini = write_ini(tmp_path / "shards.ini", {LONG_ID: shard_urls[0], "shard-2": shard_urls[1]})
    status = shardkit("status", "--config", str(ini), cwd=tmp_path)  # stdout is a pipe
    assert status.returncode == 0, status.stderr
    ring = shardkit("ring", "--config", str(ini), "--add", "shard-3", cwd=tmp_path)
    assert ring.returncode == 0, ring.stderr
    for out in (status.stdout, ring.stdout):
        assert "…" not in out and "..." not in out
        assert any(line.split()[:1] == [LONG_ID] for line in out.splitlines())
    assert [line.split()[1] for line in status.stdout.splitlines() if line.strip().startswith(LONG_ID)] == [
        "primary"
    ]


def test_a_long_problem_stays_on_one_line(shard_urls: list[str], tmp_path: Path) -> None:
    ini = write_ini(
        tmp_path / "shards.ini", {"shard-1": shard_urls[0], LONG_ID: "postgresql+psycopg://a@127.0.0.1:1/x"}
    )
    result = shardkit("status", "--config", str(ini), cwd=tmp_path)
    assert result.returncode == 1
    problem = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM:")]
    assert len(problem) == 1 and "Connection refused" in problem[0] and LONG_ID in problem[0]


def test_estimate_counts_a_table_never_analyzed_instead_of_saying_0(
    manager: ShardManager, shard_urls: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no alembic.ini: no migration verdict in the way
    manager.run_on_all("CREATE TABLE notes (customer_id bigint PRIMARY KEY)")
    manager.run_on_all("INSERT INTO notes SELECT generate_series(1, 3)", shard_ids=["shard-1"])
    args = ["status", "--estimate", "--json", *[a for u in shard_urls for a in ("--url", u)]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    nodes = json.loads(result.stdout)["nodes"]
    counts = {n["shard_id"]: n["row_counts"] for n in nodes if n["role"] == "primary"}
    assert counts["shard-1"] == {"notes": 3}
    assert counts["shard-2"] == {"notes": 0}


def test_a_fresh_replica_gets_one_verdict_from_status_and_routing(
    pg_fleet: TestFleet, shard_map: dict[str, str]
) -> None:
    primary = pg_fleet.server(0)
    replica = primary.make_replica(f"fresh-{uuid.uuid4().hex[:8]}")  # pg_basebackup -R, just now
    try:
        shard = ShardConfig(id="shard-1", url=primary.url, replica_url=replica.url)
        with ShardManager([shard]) as manager:
            assert set(manager.health()) == {
                "shard-1",
                "shard-1:replica",
            }  # as docs/concepts/manager.md shows
            node = next(n for n in collect_status(manager).nodes if n.role == "replica")
            routing = manager.replicas.cached_status("shard-1")
            assert routing is not None
            assert node.lag_seconds == routing.lag_seconds  # one measurement, one definition
            assert (node.problem is None) == routing.usable
            with manager.engine("shard-1", write=False).connect() as conn:
                in_recovery = conn.exec_driver_sql("SELECT pg_is_in_recovery()").scalar()
            assert in_recovery == routing.usable  # reads go where the status says they can
    finally:
        replica.stop("immediate")
        shutil.rmtree(replica.data_dir, ignore_errors=True)

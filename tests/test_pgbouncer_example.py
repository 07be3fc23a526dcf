"""examples/pgbouncer_budget.py: sixteen shards behind real PgBouncers, under a budget of 4."""

from __future__ import annotations

import sys
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from sa_shardkit.testing import LocalPgBouncer, find_pgbouncer
from tests.fleet import TestFleet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.pgbouncer_budget import BUDGET, budgeted, create_shards, report, run  # noqa: E402

POOL_SIZE = 2


def test_the_example_runs_sixteen_shards_through_pgbouncer_within_the_budget(pg_fleet: TestFleet) -> None:
    if find_pgbouncer() is None:
        pytest.skip("no pgbouncer binary (apt-get install pgbouncer; .ci/run installs it)")
    servers = [pg_fleet.server(0), pg_fleet.server(1)]
    bouncers = [LocalPgBouncer(server, pool_size=POOL_SIZE) for server in servers]
    shards: list[tuple[str, str]] = []
    try:
        shards = create_shards([s.url for s in servers], [b.url() for b in bouncers], 16)
        with budgeted(shards) as manager:
            figures = run(manager)
            assert all(manager.config(s).pgbouncer for s in manager.shard_ids)
        lines = report(figures)
    finally:
        for bouncer in bouncers:
            bouncer.stop()
        for _, direct in shards:
            url = make_url(direct)
            with psycopg.connect(
                host=url.host, port=url.port, user=url.username, dbname="postgres", autocommit=True
            ) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {url.database} WITH (FORCE)")
    assert (figures.shards, figures.scatter_rows, figures.session_customers) == (16, 16, 16)
    assert figures.peak_in_process == BUDGET  # used in full, never exceeded
    assert 0 < figures.server_connections <= POOL_SIZE * 16  # PgBouncer's pools, not ours, reach the servers
    assert lines[0].startswith("16 shards behind PgBouncer") and "at most 4 connections" in lines[3]

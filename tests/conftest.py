"""Real PostgreSQL shards for the test suite (see tests/fleet.py for where the servers come from)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from sa_shardkit import ShardManager
from sa_shardkit.testing import LocalPostgres, PostgresFleet
from tests.fleet import TestFleet, start_fleet
from tests.replica_support import manager_with_replica, ready_replica, start_replica

SHARD_COUNT = 4

# a process with no stored ring looks for one this often (sa_shardkit.placement.unstored_recheck_seconds;
# safety does not depend on it, only how soon such a process routes by a new ring): short here, where
# every test installs a ring; subprocesses (the CLI under test) inherit it
os.environ.setdefault("SHARDKIT_RING_RECHECK_SECONDS", "0.2")


@pytest.fixture(scope="session")
def pg_fleet() -> Iterator[TestFleet]:
    """Four independent PostgreSQL servers (one per shard) for the whole test session."""
    fleet = start_fleet(SHARD_COUNT)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def shard_urls(pg_fleet: TestFleet) -> list[str]:
    """The shard URLs, every server running and every schema empty."""
    pg_fleet.reset()
    return pg_fleet.urls


@pytest.fixture
def shard_map(shard_urls: list[str]) -> dict[str, str]:
    """``{"shard-1": url, ...}`` for the reset fleet."""
    return {f"shard-{i}": url for i, url in enumerate(shard_urls, 1)}


@pytest.fixture
def manager(shard_map: dict[str, str]) -> Iterator[ShardManager]:
    """A ShardManager over the four reset shards, disposed afterwards."""
    with ShardManager.from_urls(shard_map, connect_timeout=3) as mgr:
        yield mgr


@pytest.fixture(scope="session")
def pg_replica(pg_fleet: TestFleet) -> Iterator[LocalPostgres]:
    """A real streaming replica (``pg_basebackup -R``) of shard-1's server, for the whole session."""
    yield from start_replica(pg_fleet)


@pytest.fixture
def replicated_manager(
    pg_fleet: TestFleet, shard_map: dict[str, str], pg_replica: LocalPostgres
) -> Iterator[ShardManager]:
    """The four reset shards; shard-1 has its streaming replica (running, caught up), checked on every read."""
    ready_replica(pg_fleet.server(0), pg_replica)
    with manager_with_replica(shard_map, pg_replica) as mgr:
        yield mgr


@pytest.fixture(scope="session")
def fifth_server() -> Iterator[PostgresFleet]:
    """One more PostgreSQL server: the shard the tests add."""
    fleet = PostgresFleet(1)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def shard5_url(fifth_server: PostgresFleet) -> str:
    """The fifth server's URL, its schema emptied."""
    url = fifth_server.urls[0]
    with ShardManager.from_urls({"x": url}) as mgr, mgr.connect("x") as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
        conn.commit()
    return url

"""Real PostgreSQL shards for the test suite (see tests/fleet.py for where the servers come from)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sa_shardkit import ShardManager
from tests.fleet import TestFleet, start_fleet

SHARD_COUNT = 4


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

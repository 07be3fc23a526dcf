"""Where the test servers come from, in order of preference.

1. ``SHARDKIT_TEST_URLS`` (comma-separated URLs of running servers; fault tests that stop a server
   are skipped with a reason, since we cannot stop servers we do not own).
2. Local PostgreSQL binaries (``initdb``/``pg_ctl``): throwaway servers in a temp dir.
3. A reachable Docker engine: testcontainers' PostgreSQL.
4. Otherwise the session fails with instructions (never a silent skip).
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from sqlalchemy.engine import make_url

from sa_shardkit.testing import LocalPostgres, PostgresFleet, find_pg_bin, urls_from_env, wait_until_accepting


def _connect(url: str) -> psycopg.Connection:
    parsed = make_url(url)
    return psycopg.connect(
        host=parsed.host,
        port=parsed.port,
        user=parsed.username,
        password=parsed.password,
        dbname=parsed.database,
        autocommit=True,
        connect_timeout=5,
    )


class TestFleet:
    """The shard servers of a test session, with reset and fault controls."""

    __test__ = False  # not a test class

    def __init__(
        self, urls: list[str], servers: list[LocalPostgres] | None, close: Callable[[], None]
    ) -> None:
        self._urls = urls
        self.servers = servers
        self._close = close

    @property
    def urls(self) -> list[str]:
        """Current URLs (a restarted server may have had to move to a new port)."""
        if self.servers is not None:
            return [s.url for s in self.servers]
        return list(self._urls)

    def server(self, index: int) -> LocalPostgres:
        """The index-th (0-based) server, for tests that stop, pause or restart a shard."""
        if self.servers is None:
            pytest.skip("shard servers come from SHARDKIT_TEST_URLS/containers; cannot stop them here")
        return self.servers[index]

    def reset(self) -> None:
        """Every server running and resumed, prepared transactions rolled back, schemas emptied."""
        if self.servers is not None:
            for server in self.servers:
                server.resume()
                if not server.is_running():
                    server.start()
                    wait_until_accepting(server.url)
        for url in self.urls:
            with _connect(url) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND backend_type = 'client backend'"
                )
                for (gid,) in conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall():
                    conn.execute(f"ROLLBACK PREPARED '{gid}'")
                conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
                conn.execute("CREATE SCHEMA public")

    def close(self) -> None:
        self._close()


def _docker_reachable() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no usable engine"
        return False


def start_fleet(count: int) -> TestFleet:
    external = urls_from_env()
    if external:
        return TestFleet(list(external), None, lambda: None)
    if find_pg_bin() is not None:
        fleet = PostgresFleet(count)
        return TestFleet(fleet.urls, fleet.servers, fleet.close)
    if _docker_reachable():
        from testcontainers.postgres import PostgresContainer

        containers = [PostgresContainer("postgres:15", driver="psycopg").start() for _ in range(count)]
        return TestFleet(
            [c.get_connection_url() for c in containers], None, lambda: [c.stop() for c in containers]
        )
    pytest.exit(
        "No PostgreSQL for the test shards: install the server binaries (apt-get install postgresql), "
        "set SHARDKIT_PG_BIN, set SHARDKIT_TEST_URLS=url1,url2,... or start a Docker engine.",
        returncode=2,
    )

"""Many shards on few servers: N databases spread round-robin over the test fleet's servers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import make_url

from tests.fleet import TestFleet, _connect


@contextmanager
def many_databases(fleet: TestFleet, count: int, prefix: str) -> Iterator[dict[str, str]]:
    """``{"shard-1": url, ...}`` for ``count`` fresh databases, dropped afterwards."""
    fleet.reset()  # every server running and resumed (a test before may have left one frozen)
    servers = fleet.urls
    shards: dict[str, str] = {}
    for i in range(count):
        server = servers[i % len(servers)]
        name = f"{prefix}_{i + 1}"
        with _connect(server) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        shards[f"shard-{i + 1}"] = make_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        yield shards
    finally:
        for url in shards.values():
            parsed = make_url(url)
            with _connect(parsed.set(database="postgres").render_as_string(hide_password=False)) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {parsed.database} WITH (FORCE)")


def backends(fleet: TestFleet, application_name: str, *, active: bool = False) -> int:
    """Connections with ``application_name`` on all the fleet's servers now (``active``: running a query).

    A connection the client just closed can stay listed for a moment while its backend exits, so
    "at most N open" is checked on running queries (those need an open connection).
    """
    total = 0
    for url in fleet.urls:
        with _connect(url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                + (" AND state = 'active'" if active else ""),
                (application_name,),
            ).fetchone()
            total += int(row[0]) if row else 0
    return total

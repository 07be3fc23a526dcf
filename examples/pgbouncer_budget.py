"""Many shards behind PgBouncer, with a per-process connection budget.

Sixteen shards (databases on two PostgreSQL servers), each server behind one PgBouncer in
transaction pooling mode; the application's shard URLs point at PgBouncer (``pgbouncer=True``:
psycopg's prepared statements off), each shard's ``direct_url`` at the server itself (migration and
mover locks), and ``max_connections=4`` caps this process's connections across all sixteen. It runs a
manager scatter and a session scatter over the sixteen shards and prints how many connections each
side used: at most 4 in this process, at most PgBouncer's ``default_pool_size`` per database on the
servers. See docs/operations/scale.md for sizing.

Run it against your own shards (``SHARD_<N>_URL`` = PgBouncer, ``SHARD_<N>_DIRECT_URL`` = the server,
``SHARDKIT_PGBOUNCER=1``), or with no such variable it starts two throwaway PostgreSQL servers and a
PgBouncer in front of each (Debian package ``pgbouncer``)::

    python examples/pgbouncer_budget.py
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from sqlalchemy import func, insert, select, text
from sqlalchemy.engine import make_url

from sa_shardkit import ShardConfig, ShardManager
from sa_shardkit.demo.models import Base, Customer

BUDGET = 4
SLOW = text("(SELECT pg_sleep(0.1)) IS NOT NULL")  # each shard's part takes a moment


@dataclass
class Figures:
    shards: int
    scatter_rows: int
    session_customers: int
    peak_in_process: int
    """Most connections this process had open at once (the budget's high-water mark)."""
    server_connections: int
    """Connections PgBouncer opened to the servers for this run's databases."""


def budgeted(shards: Sequence[tuple[str, str]], budget: int = BUDGET) -> ShardManager:
    """``(pgbouncer url, direct url)`` per shard -> a manager capped at ``budget`` connections."""
    configs = [
        ShardConfig(id=f"shard-{i}", url=bounced, direct_url=direct, pgbouncer=True)
        for i, (bounced, direct) in enumerate(shards, 1)
    ]
    return ShardManager(configs, max_connections=budget)


def run(manager: ShardManager) -> Figures:
    """A manager scatter and a session scatter over every shard, under the budget; the figures."""
    manager.run_on_all(lambda conn: Base.metadata.create_all(conn))  # DDL: one transaction per shard
    manager.run_on_all("TRUNCATE customers CASCADE")
    keys: dict[str, int] = {}
    key = 0
    while len(keys) < len(manager.shard_ids):  # one customer on each shard
        key += 1
        keys.setdefault(manager.shard_for(key), key)
    for customer_id in keys.values():
        with manager.transaction(customer_id) as conn:
            conn.execute(
                insert(Customer), {"customer_id": customer_id, "name": f"c{customer_id}", "balance": 0}
            )

    rows = manager.query_all_shards("SELECT current_database() AS db, pg_sleep(0.1)").all()
    with manager.sessionmaker()() as session:
        customers = session.scalars(select(Customer).where(SLOW)).all()
        counted = session.scalar(select(func.count()).select_from(Customer))
    assert counted == len(customers)
    return Figures(
        shards=len(manager.shard_ids),
        scatter_rows=len(rows),
        session_customers=len(customers),
        peak_in_process=manager.budget.peak,
        server_connections=_server_connections(manager),
    )


def _server_connections(manager: ShardManager) -> int:
    """Connections to the shards' databases on their servers (asked through ``direct_url``)."""
    by_server: dict[tuple[str | None, int | None], list[str]] = {}
    for shard_id in manager.shard_ids:
        direct = manager.config(shard_id).direct
        by_server.setdefault((direct.host, direct.port), []).append(str(direct.database))
    total = 0
    for (host, port), databases in by_server.items():
        direct = manager.config(
            next(s for s in manager.shard_ids if manager.config(s).direct.port == port)
        ).direct
        with psycopg.connect(
            host=host, port=port, user=direct.username, password=direct.password, dbname=direct.database
        ) as conn:
            sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(%s) AND pid <> pg_backend_pid()"
            row = conn.execute(sql, (databases,)).fetchone()
            total += int(row[0]) if row else 0
    return total


def report(figures: Figures) -> list[str]:
    return [
        f"{figures.shards} shards behind PgBouncer (transaction pooling), max_connections={BUDGET}",
        f"manager scatter: {figures.scatter_rows} rows, one per shard",
        f"session scatter: {figures.session_customers} customers, one per shard",
        f"this process: at most {figures.peak_in_process} connections open at once",
        f"the servers: {figures.server_connections} connections from PgBouncer for these databases",
    ]


@contextmanager
def local_shards(servers: int = 2, shards: int = 16, pool_size: int = 2) -> Iterator[list[tuple[str, str]]]:
    """Throwaway servers, one PgBouncer each, ``shards`` databases spread over them."""
    from sa_shardkit.testing import LocalPgBouncer, local_fleet

    with local_fleet(servers) as fleet:
        bouncers = [LocalPgBouncer(server, pool_size=pool_size) for server in fleet.servers]
        try:
            yield create_shards(fleet.urls, [b.url() for b in bouncers], shards)
        finally:
            for bouncer in bouncers:
                bouncer.stop()


def create_shards(server_urls: list[str], bouncer_urls: list[str], count: int) -> list[tuple[str, str]]:
    """``count`` databases round-robin over the servers; ``(pgbouncer url, direct url)`` of each."""
    shards = []
    for i in range(count):
        server = make_url(server_urls[i % len(server_urls)])
        name = f"bounced_{i + 1}"
        with psycopg.connect(
            host=server.host, port=server.port, user=server.username, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        bounced = make_url(bouncer_urls[i % len(bouncer_urls)]).set(database=name)
        shards.append((bounced.render_as_string(False), server.set(database=name).render_as_string(False)))
    return shards


def main() -> None:
    if any(k.startswith("SHARD_") and k.endswith("_URL") for k in os.environ):
        with ShardManager.from_env(max_connections=BUDGET) as manager:
            print("\n".join(report(run(manager))))
        return
    print(
        "no SHARD_<N>_URL set: starting 2 local PostgreSQL servers, each behind a PgBouncer", file=sys.stderr
    )
    with local_shards() as shards, budgeted(shards) as manager:
        print("\n".join(report(run(manager))))


if __name__ == "__main__":
    main()

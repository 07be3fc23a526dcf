"""Where a 4-shard ``ORDER BY ... LIMIT 50`` scatter's time goes: the session against bare executes.

Run: python benchmarks/scatter_breakdown.py      (starts 4 throwaway local PostgreSQL servers)

Same data and statement as ``benchmarks/scatter.py`` (100k rows, 25k per shard). One session holds
a connection (in its transaction) on every shard; every line below uses those connections, so no
line pays a checkout, ping or BEGIN. Interleaved rounds, best and mean per line:

* ``session one shard`` / ``session scatter``: what ``benchmarks/scatter.py`` compares;
* ``Connection.execute one`` / ``... 4 in turn`` / ``... 4 on the hub``: the shard statement (LIMIT
  pushed down, hidden ORDER BY columns) through SQLAlchemy Core on the held connections, one shard,
  four one after another, four as greenlets on one selector (``sa_shardkit.multiplex.Hub``);
* ``psycopg one`` / ``psycopg 4 in turn`` / ``psycopg 4 on the hub``: the same SQL on the driver's
  cursors, no SQLAlchemy at all.

It ends with the floor this machine sets: the session's one-shard time plus what three more shards'
bare driver round trips add (``psycopg 4 on the hub`` minus ``psycopg one``), as a ratio to one shard.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.horizontal_shard import set_shard_id

from sa_shardkit import ShardManager
from sa_shardkit.multiplex import Hub
from sa_shardkit.scatter.plan import plan_scatter
from sa_shardkit.testing import PostgresFleet

sys.path.insert(0, str(Path(__file__).parent))
import scatter as data  # noqa: E402 - the sibling benchmark's model and loader

ROUNDS = 300


def timed(runs: dict[str, Callable[[], Any]]) -> dict[str, float]:
    best = dict.fromkeys(runs, float("inf"))
    total = dict.fromkeys(runs, 0.0)
    for _ in range(ROUNDS):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            took = time.perf_counter() - started
            best[name] = min(best[name], took)
            total[name] += took
    for name in runs:
        print(f"  {name:32s} best {best[name] * 1e3:6.3f} ms   mean {total[name] / ROUNDS * 1e3:6.3f} ms")
    return best


def print_floor(best: dict[str, float]) -> None:
    """What a scatter with no client work beyond the one-shard query's would reach: the session's
    one-shard query plus what three more shards' bare round trips add on this machine."""
    one = best["session one shard"]
    extra = best["psycopg 4 on the hub"] - best["psycopg one"]
    print(
        f"  three more shards' bare round trips add {extra * 1e3:.3f} ms to one shard's"
        f" {best['psycopg one'] * 1e3:.3f} ms: a scatter with no other client work would be"
        f" {(one + extra) / one:.2f}x the session's one shard (it is"
        f" {best['session scatter'] / one:.2f}x)"
    )


def on_hub(tasks: dict[str, Callable[[], Any]]) -> None:
    _, errors = Hub().run(tasks.items())
    if errors:
        raise next(iter(errors.values()))


def main() -> None:
    with PostgresFleet(4) as fleet:
        manager = ShardManager.from_urls(fleet.urls)
        try:
            data.load(manager, 25_000)
            top = select(data.Event).order_by(data.Event.created_at, data.Event.event_id).limit(50)
            shard_statement = plan_scatter(top).statement
            session = manager.sessionmaker()()
            session.scalars(top).all()  # every shard's connection now held, in the transaction
            conns = {s: session.connection(bind_arguments={"shard_id": s}) for s in manager.shard_ids}
            first = next(iter(conns))
            compiled = shard_statement.compile(dialect=conns[first].dialect)
            sql, params = compiled.string, compiled.construct_params()
            raw = {s: c.connection.dbapi_connection for s, c in conns.items()}

            def fetch(dbapi: Any) -> list[Any]:
                cursor = dbapi.cursor()
                cursor.execute(sql, params)
                return list(cursor.fetchall())

            def raw_hub() -> None:
                cursors = {s: dbapi.cursor() for s, dbapi in raw.items()}
                on_hub({s: (lambda c=c: c.execute(sql, params)) for s, c in cursors.items()})
                for cursor in cursors.values():
                    cursor.fetchall()

            runs: dict[str, Callable[[], Any]] = {
                "session one shard": lambda: session.scalars(top.options(set_shard_id(first))).all(),
                "session scatter": lambda: session.scalars(top).all(),
                "Connection.execute one": lambda: conns[first].execute(shard_statement).fetchall(),
                "Connection.execute 4 in turn": lambda: [
                    c.execute(shard_statement).fetchall() for c in conns.values()
                ],
                "Connection.execute 4 on the hub": lambda: on_hub(
                    {s: (lambda c=c: c.execute(shard_statement).fetchall()) for s, c in conns.items()}
                ),
                "psycopg one": lambda: fetch(raw[first]),
                "psycopg 4 in turn": lambda: [fetch(dbapi) for dbapi in raw.values()],
                "psycopg 4 on the hub": raw_hub,
            }
            for _ in range(2):
                print_floor(timed(runs))
                print()
            session.close()
        finally:
            manager.dispose()


if __name__ == "__main__":
    main()

"""Fan-out latency: a scatter over 1..256 latency-bound shards vs one shard, old path vs new.

Shards are databases in a few local PostgreSQL clusters (``--servers``, default 4; each cluster
holds N / servers databases), each answering ``SELECT pg_sleep(0.05)``. Two paths are timed:

* ``thread pool (before)``: the path ``manager.query_all_shards`` took before the flat fan-out, kept
  here for comparison: a reachability probe (one checkout per shard), then the query in a shared
  32-thread pool, each shard in its own BEGIN/COMMIT (``SHARDKIT_SCATTER_WORKERS`` was 32).
* ``thread per shard``: the flat fan-out as it was before the hub (last session's path, kept here
  for comparison): one checkout per shard whose pre-ping is the reachability check, the statement
  autocommitted on it, each shard in its own worker thread.
* ``greenlet hub``: last stop's path, kept here for comparison: the same checkout and statement,
  but every shard with a warm pooled connection runs as a greenlet, 16 to a thread, each thread's
  waits sharing one selector (``sa_shardkit.multiplex``).
* ``query_all_shards`` and ``run_on_all`` (now): the SQL text rendered once, each warm shard's idle
  connection borrowed from its pool, a ping and the statement sent at the libpq level, and one
  selector loop on the calling thread waiting for every shard (``sa_shardkit.scatter.lean``).

Each figure is the best of ``--rounds`` (default 5) after a warm-up round; every path runs in the
same process, interleaved round by round, so all see the same machine load. Targets: <= 1.3x one
shard at 64 shards, <= 2.0x at 256.

Run: python benchmarks/fanout.py [--shards 1,4,16,64,256] [--servers 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import Connection

from sa_shardkit import ShardManager
from sa_shardkit.scatter.connected import fan_out_connected
from sa_shardkit.scatter.fanout import probe
from sa_shardkit.testing import PostgresFleet

SLEEP = "SELECT pg_sleep(0.05)"
TARGETS = {64: 1.3, 256: 2.0}


def create_databases(fleet: PostgresFleet, count: int) -> list[str]:
    """``count`` databases spread round-robin over the fleet's servers; their URLs."""
    urls = []
    for i in range(count):
        server = fleet.servers[i % len(fleet.servers)]
        with psycopg.connect(
            host="127.0.0.1", port=server.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f"CREATE DATABASE shard_{i} STRATEGY FILE_COPY")
        urls.append(server.url.rsplit("/", 1)[0] + f"/shard_{i}")
    return urls


def thread_pool_before(manager: ShardManager, pool: ThreadPoolExecutor) -> Callable[[], Any]:
    """The pre-flat-fan-out scatter: probe every shard, then BEGIN/query/COMMIT in 32 threads."""
    ids = list(manager.shard_ids)

    def one(shard_id: str) -> Any:
        with manager.connect(shard_id) as conn, conn.begin():
            return conn.execute(text(SLEEP)).freeze()()

    def run() -> Any:
        probe({s: manager.engine(s) for s in ids}, {s: manager.config(s).connect_timeout for s in ids})
        return list(pool.map(one, ids))

    return run


def connected_fan_out(manager: ShardManager, *, cooperative: bool) -> Callable[[], Any]:
    """The checkout and the autocommitted statement through SQLAlchemy's execute, per shard: in a
    thread each (last session's flat fan-out) or, ``cooperative``, as greenlets 16 per thread (last
    stop's hub)."""
    ids = list(manager.shard_ids)
    engines = {s: manager.engine(s) for s in ids}
    statement = text(SLEEP)

    def one(shard_id: str, conn: Connection) -> Any:
        return conn.execution_options(isolation_level="AUTOCOMMIT").execute(statement).freeze()()

    def run() -> Any:
        outcome = fan_out_connected(engines, manager.scatter_timeouts(ids), one, cooperative=cooperative)
        assert not outcome.errors, outcome.errors
        return outcome.results

    return run


def best_of(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    best = dict.fromkeys(runs, float("inf"))
    for round_no in range(rounds + 1):  # round 0 opens the connections
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            if round_no:
                best[name] = min(best[name], (time.perf_counter() - started) * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shards", default="1,4,16,64,256", help="shard counts, comma-separated")
    parser.add_argument("--servers", type=int, default=4, help="local PostgreSQL clusters")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per path")
    args = parser.parse_args()
    counts = [int(c) for c in args.shards.split(",") if c.strip()]
    paths = ("thread pool (before)", "thread per shard", "greenlet hub", "query_all_shards", "run_on_all")
    with PostgresFleet(args.servers) as fleet:
        started = time.perf_counter()
        urls = create_databases(fleet, max(counts))
        print(f"{max(counts)} databases on {args.servers} servers in {time.perf_counter() - started:.0f}s")
        print(f"best of {args.rounds}, each shard answering {SLEEP}; {_load()}\n")
        print(f"{'shards':>6}" + "".join(f"{p:>22}{'x one':>7}" for p in paths))
        baseline: dict[str, float] = {}
        old_pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="before")
        for count in counts:
            with ShardManager.from_urls(urls[:count]) as manager:
                times = best_of(
                    {
                        paths[0]: thread_pool_before(manager, old_pool),
                        paths[1]: connected_fan_out(manager, cooperative=False),
                        paths[2]: connected_fan_out(manager, cooperative=True),
                        paths[3]: lambda: manager.query_all_shards(SLEEP).all(),
                        paths[4]: lambda: manager.run_on_all(SLEEP),
                    },
                    args.rounds,
                )
            baseline = baseline or times
            line = f"{count:>6}"
            for path in paths:
                line += f"{times[path]:>19.1f} ms{times[path] / baseline[path]:>6.2f}x"
            target = TARGETS.get(count)
            print(line + (f"   (target <= {target}x)" if target else ""), flush=True)
        old_pool.shutdown()
        print(f"\n{_load()}")


def _load() -> str:
    """The machine's load: the figures are only comparable at a similar load."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()

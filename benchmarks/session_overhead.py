"""Routing overhead: ShardedSession (routed by the ring) vs a plain Session on the same database.

The same workload runs through both, alternating, in one process: insert N orders (one
transaction each), get each by primary key, select each customer's orders by shard key. The
sharded session has four shards configured; every key used routes to ``shard-1``, whose engine
is the plain Session's bind, so the only difference is the routing work.

Run: python benchmarks/session_overhead.py [--n 1000] [--rounds 5]
(uses SHARD_1_URL when set, else starts one throwaway local PostgreSQL server)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from sa_shardkit import ShardManager
from sa_shardkit.demo.models import Base, Customer, Order

PHASES = ("insert", "get", "select")


@contextlib.contextmanager
def database_url() -> Iterator[str]:
    if os.environ.get("SHARD_1_URL"):
        yield os.environ["SHARD_1_URL"]
        return
    from sa_shardkit.testing import PostgresFleet

    with PostgresFleet(1) as fleet:
        yield fleet.urls[0]


def workload(factory: Callable[[], Session], keys: list[int]) -> dict[str, float]:
    """Seconds per phase for one pass over ``keys``."""
    order_ids = [uuid.uuid4() for _ in keys]
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for key, order_id in zip(keys, order_ids, strict=True):
        with factory() as session, session.begin():
            session.add(Order(customer_id=key, order_id=order_id, status="pending", total=Decimal(5)))
    timings["insert"] = time.perf_counter() - started
    started = time.perf_counter()
    for key, order_id in zip(keys, order_ids, strict=True):
        with factory() as session:
            assert session.get(Order, (key, order_id)) is not None
    timings["get"] = time.perf_counter() - started
    started = time.perf_counter()
    for key in keys:
        with factory() as session:
            assert len(session.scalars(select(Order).where(Order.customer_id == key)).all()) == 1
    timings["select"] = time.perf_counter() - started
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="orders per pass")
    parser.add_argument("--rounds", type=int, default=5, help="passes per session kind (best is kept)")
    args = parser.parse_args()
    with database_url() as url:
        # four configured shards, all keys on shard-1 (the plain Session's database)
        shard_urls = {f"shard-{i}": url for i in range(1, 5)}
        with ShardManager.from_urls(shard_urls) as manager:
            engine = manager.engine("shard-1")
            Base.metadata.drop_all(engine)
            Base.metadata.create_all(engine)
            keys = [k for k in range(1, 100 * args.n) if manager.shard_for(k) == "shard-1"][: args.n]
            with engine.begin() as conn:
                conn.execute(insert(Customer), [{"customer_id": k, "name": f"c{k}"} for k in keys])
            kinds: dict[str, sessionmaker[Any]] = {
                "plain Session": sessionmaker(engine),
                "ShardedSession": manager.sessionmaker(),
            }
            best: dict[str, dict[str, float]] = {kind: dict.fromkeys(PHASES, float("inf")) for kind in kinds}
            for round_no in range(args.rounds + 1):  # round 0 warms pools and caches
                for kind, factory in kinds.items():
                    with engine.begin() as conn:
                        conn.execute(text("DELETE FROM orders"))
                    timings = workload(factory, keys if round_no else keys[:100])
                    if round_no:
                        for phase, seconds in timings.items():
                            best[kind][phase] = min(best[kind][phase], seconds)
            report(best, len(keys))


def report(best: dict[str, dict[str, float]], n: int) -> None:
    plain, sharded = best["plain Session"], best["ShardedSession"]
    print(f"{'phase':<8}{'plain Session':>16}{'ShardedSession':>17}{'ratio':>8}   (ops/s, best pass, N={n})")
    for phase in PHASES:
        p, s = n / plain[phase], n / sharded[phase]
        print(f"{phase:<8}{p:>16,.0f}{s:>17,.0f}{s / p:>7.2f}x")
    p_all, s_all = 3 * n / sum(plain.values()), 3 * n / sum(sharded.values())
    print(f"{'all':<8}{p_all:>16,.0f}{s_all:>17,.0f}{s_all / p_all:>7.2f}x")


if __name__ == "__main__":
    main()

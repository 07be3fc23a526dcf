"""Routing overhead: ShardedSession (routed by the ring) vs a plain Session on the same database.

The same workload runs through both in one process: insert N orders (one transaction each), get
each by primary key, select each customer's orders by shard key. The sharded session has four
shards configured; every key used routes to ``shard-1``, whose engine is the plain Session's bind,
so the only difference is the routing work.

The two sessions take turns in small chunks (who goes first alternates), each on its own
customers, and the time of every chunk is summed per session: both see the same machine load,
which matters on a shared machine where a best-of-N of whole passes is mostly noise.

Run: python benchmarks/session_overhead.py [--n 1000] [--rounds 3] [--chunk 25]
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

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from sa_shardkit import ShardManager
from sa_shardkit.demo.models import Base, Customer, Order

PHASES = ("insert", "get", "select")
KINDS = ("plain Session", "ShardedSession")


@contextlib.contextmanager
def database_url() -> Iterator[str]:
    if os.environ.get("SHARD_1_URL"):
        yield os.environ["SHARD_1_URL"]
        return
    from sa_shardkit.testing import PostgresFleet

    with PostgresFleet(1) as fleet:
        yield fleet.urls[0]


def insert_one(factory: Callable[[], Session], key: int, order_id: uuid.UUID) -> None:
    with factory() as session, session.begin():
        session.add(Order(customer_id=key, order_id=order_id, status="pending", total=Decimal(5)))


def get_one(factory: Callable[[], Session], key: int, order_id: uuid.UUID) -> None:
    with factory() as session:
        assert session.get(Order, (key, order_id)) is not None


def select_one(factory: Callable[[], Session], key: int, order_id: uuid.UUID) -> None:
    with factory() as session:
        assert len(session.scalars(select(Order).where(Order.customer_id == key)).all()) == 1


OPERATIONS = {"insert": insert_one, "get": get_one, "select": select_one}


def run_round(
    factories: dict[str, Callable[[], Session]],
    work: dict[str, list[tuple[int, uuid.UUID]]],
    chunk: int,
    totals: dict[str, dict[str, float]] | None,
) -> None:
    """One pass of every phase, the sessions alternating chunk by chunk."""
    n = len(next(iter(work.values())))
    for phase in PHASES:
        operation = OPERATIONS[phase]
        for number, start in enumerate(range(0, n, chunk)):
            for kind in KINDS if number % 2 else KINDS[::-1]:
                factory = factories[kind]
                started = time.perf_counter()
                for key, order_id in work[kind][start : start + chunk]:
                    operation(factory, key, order_id)
                if totals is not None:
                    totals[kind][phase] += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="orders per session kind and round")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up)")
    parser.add_argument("--chunk", type=int, default=25, help="operations per turn")
    args = parser.parse_args()
    with database_url() as url:
        shard_urls = {f"shard-{i}": url for i in range(1, 5)}  # four shards, all keys on shard-1
        with ShardManager.from_urls(shard_urls) as manager:
            engine = manager.engine("shard-1")
            Base.metadata.drop_all(engine)
            Base.metadata.create_all(engine)
            keys = [k for k in range(1, 200 * args.n) if manager.shard_for(k) == "shard-1"][: 2 * args.n]
            with engine.begin() as conn:
                conn.execute(insert(Customer), [{"customer_id": k, "name": f"c{k}"} for k in keys])
            factories: dict[str, Callable[[], Session]] = {
                "plain Session": sessionmaker(engine),
                "ShardedSession": manager.sessionmaker(),
            }
            totals: dict[str, dict[str, float]] = {kind: dict.fromkeys(PHASES, 0.0) for kind in KINDS}
            for round_no in range(args.rounds + 1):  # round 0 warms pools and caches
                with engine.begin() as conn:
                    conn.execute(text("TRUNCATE order_items, orders"))
                work = {
                    kind: [(k, uuid.uuid4()) for k in keys[i :: len(KINDS)]] for i, kind in enumerate(KINDS)
                }
                run_round(factories, work, args.chunk, totals if round_no else None)
            report(totals, args.n * args.rounds)


def report(totals: dict[str, dict[str, float]], ops: int) -> None:
    plain, sharded = totals["plain Session"], totals["ShardedSession"]
    print(
        f"{'phase':<8}{'plain Session':>16}{'ShardedSession':>17}{'ratio':>8}   (ops/s over {ops} ops each)"
    )
    for phase in PHASES:
        p, s = ops / plain[phase], ops / sharded[phase]
        print(f"{phase:<8}{p:>16,.0f}{s:>17,.0f}{s / p:>7.2f}x")
    p_all, s_all = 3 * ops / sum(plain.values()), 3 * ops / sum(sharded.values())
    print(f"{'all':<8}{p_all:>16,.0f}{s_all:>17,.0f}{s_all / p_all:>7.2f}x")


if __name__ == "__main__":
    main()

"""What a saga costs: cross-shard transfers/s vs a same-shard transfer in one plain transaction.

Baseline: debit and credit of two customers on the SAME shard in one ordinary transaction (what a
single database would do). Saga: the same transfer between customers on DIFFERENT shards, durable
log + receipts + two shard transactions. Same process, same servers (4 throwaway local PostgreSQL
servers unless SHARD_<N>_URL is set), sequential then 4 threads.

Run: python benchmarks/saga.py
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.orm import Session

from sa_shardkit import ShardManager
from sa_shardkit.demo.models import Base, Customer
from sa_shardkit.saga import create_saga_tables, transfer

CUSTOMERS = 400
TRANSFERS = 400


@contextlib.contextmanager
def shards() -> Iterator[ShardManager]:
    if any(k.startswith("SHARD_") and k.endswith("_URL") for k in os.environ):
        with ShardManager.from_env() as manager:
            yield manager
        return
    from sa_shardkit.testing import PostgresFleet

    with PostgresFleet(4) as fleet, ShardManager.from_urls(fleet.urls) as manager:
        yield manager


def same_shard_transfer(manager: ShardManager, sender: int, receiver: int, amount: Decimal) -> None:
    with manager.engine_for(sender).begin() as conn:
        update = "UPDATE customers SET balance = balance + :delta WHERE customer_id = :id"
        conn.execute(text(update), {"delta": -amount, "id": sender})
        conn.execute(text(update), {"delta": amount, "id": receiver})


def rate(work: Callable[[int], None], threads: int) -> float:
    started = time.perf_counter()
    if threads == 1:
        for n in range(TRANSFERS):
            work(n)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(TRANSFERS)))
    return TRANSFERS / (time.perf_counter() - started)


def main() -> None:
    with shards() as manager:
        for shard_id in manager.shard_ids:
            Base.metadata.create_all(manager.engine(shard_id))
        create_saga_tables(manager)
        for customer_id in range(1, CUSTOMERS + 1):
            with Session(manager.engine_for(customer_id)) as session, session.begin():
                session.merge(Customer(customer_id=customer_id, name="c", balance=Decimal(10**6)))
        rnd = random.Random(7)
        ids = list(range(1, CUSTOMERS + 1))
        same = [
            (a, b) for a in ids for b in ids[:40] if a != b and manager.shard_for(a) == manager.shard_for(b)
        ]
        cross = [(a, b) for a in ids for b in ids[:40] if manager.shard_for(a) != manager.shard_for(b)]

        def baseline(n: int) -> None:
            a, b = rnd.choice(same)
            same_shard_transfer(manager, a, b, Decimal(1))

        def saga(n: int) -> None:
            a, b = rnd.choice(cross)
            assert transfer(manager, a, b, 1).status == "complete"

        for threads in (1, 4):
            base, sagas = rate(baseline, threads), rate(saga, threads)
            print(f"{threads} thread(s): same-shard transaction {base:8.0f} transfers/s")
            print(f"{threads} thread(s): cross-shard saga       {sagas:8.0f} transfers/s")
            print(f"{threads} thread(s): saga / baseline        {sagas / base:8.2f}x")


if __name__ == "__main__":
    main()

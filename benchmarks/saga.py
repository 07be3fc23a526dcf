"""What a saga costs: cross-shard transfers/s vs a same-shard transfer in one plain transaction.

Baseline: debit and credit of two customers on the SAME shard in one ordinary transaction (what a
single database would do). Saga: the same transfer between customers on DIFFERENT shards, durable
log + receipts + two shard transactions. Same process, same servers (4 throwaway local PostgreSQL
servers unless SHARD_<N>_URL is set), sequential then 4 threads. A repetition times TRANSFERS of
each kind in chunks of CHUNK taken in turn (baseline, saga, caller's ids, baseline, ...), so load
that swings on a shared machine hits every kind alike; a ratio is taken within one repetition and
the median of REPEATS repetitions is reported with their range. Each chunk's time includes writing
the completion marks that sagas defer to the background (``flush_completion_marks``).

Two kinds of saga ids: *generated* (``transfer_id=None``: the id is placed on the sender's shard, so
the log row commits with the debit) and *caller's* (a random id, whose log lands on any shard: one
more commit when that is not the sender's). Round trips and commits per transfer are counted with
engine events (a round trip: each statement, BEGIN, COMMIT/ROLLBACK and pool pre-ping checkout).

Run: python benchmarks/saga.py
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session

from sa_shardkit import ShardManager
from sa_shardkit.demo.models import Base, Customer
from sa_shardkit.saga import create_saga_tables, flush_completion_marks, transfer

CUSTOMERS = 400
TRANSFERS = 200
REPEATS = 5
"""Repetitions per thread count; ratios are taken within each repetition."""
CHUNK = 20
"""Transfers of one kind timed back to back before the next kind's turn."""


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


def timed_chunk(manager: ShardManager, work: Callable[[int], None], pool: ThreadPoolExecutor | None) -> float:
    """Seconds for CHUNK calls of ``work`` (on ``pool``'s threads if given), marks written."""
    started = time.perf_counter()
    if pool is None:
        for n in range(CHUNK):
            work(n)
    else:
        list(pool.map(work, range(CHUNK)))
    assert flush_completion_marks(manager)
    return time.perf_counter() - started


def rates(manager: ShardManager, works: dict[str, Callable[[int], None]], threads: int) -> dict[str, float]:
    """Transfers/s of each kind over TRANSFERS calls, timed in chunks of CHUNK taken in turn
    (base, saga, caller's ids, base, ...): load that swings on a shared machine hits all alike."""
    seconds = dict.fromkeys(works, 0.0)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(threads)) if threads > 1 else None
        for _ in range(TRANSFERS // CHUNK):
            for key, work in works.items():
                seconds[key] += timed_chunk(manager, work, pool)
    return {key: TRANSFERS // CHUNK * CHUNK / spent for key, spent in seconds.items()}


def count_round_trips(
    manager: ShardManager, work: Callable[[int], None], n: int = 50
) -> tuple[float, float, float, float]:
    """(round trips, commits) per call of ``work`` on the caller's thread, then (round trips,
    commits) in background threads (the deferred completion marks), averaged over ``n`` calls.

    A round trip is a message exchange with a server: a statement, a BEGIN, a COMMIT or ROLLBACK,
    and the pool's pre-ping at checkout (a connection kept between saga steps is not checked out
    again); on an autocommit connection SQLAlchemy's BEGIN/COMMIT/ROLLBACK send nothing, and each
    statement is its own commit.
    """
    caller_thread = threading.current_thread()
    caller: Counter[str] = Counter()
    background: Counter[str] = Counter()

    def bucket() -> Counter[str]:
        return caller if threading.current_thread() is caller_thread else background

    def auto(conn: Any) -> bool:
        return bool(getattr(conn.connection.driver_connection, "autocommit", False))

    def statement(conn: Any, *args: object) -> None:
        bucket()["trips"] += 1
        if auto(conn):
            bucket()["commits"] += 1

    def begin(conn: Any) -> None:
        if not auto(conn):
            bucket()["trips"] += 1

    def commit(conn: Any) -> None:
        if not auto(conn):
            bucket()["trips"] += 1
            bucket()["commits"] += 1

    def checkout(*args: object) -> None:
        bucket()["trips"] += 1  # pool_pre_ping

    hooks = [("before_cursor_execute", statement), ("begin", begin), ("commit", commit), ("rollback", begin)]
    engines = list(manager.engines.values())
    for engine in engines:
        for name, fn in hooks:
            event.listen(engine, name, fn)
        event.listen(engine.pool, "checkout", checkout)
    try:
        for i in range(n):
            work(i)
        assert flush_completion_marks(manager)
    finally:
        for engine in engines:
            for name, fn in hooks:
                event.remove(engine, name, fn)
            event.remove(engine.pool, "checkout", checkout)
    return caller["trips"] / n, caller["commits"] / n, background["trips"] / n, background["commits"] / n


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

        def saga_caller_id(n: int) -> None:
            a, b = rnd.choice(cross)
            assert transfer(manager, a, b, 1, transfer_id=str(uuid.uuid4())).status == "complete"

        for label, work in (
            ("same-shard transaction", baseline),
            ("saga, generated ids", saga),
            ("saga, caller's ids", saga_caller_id),
        ):
            trips, commits, bg_trips, bg_commits = count_round_trips(manager, work)
            print(
                f"per transfer: {label:<24} caller waits {trips:4.1f} round trips, {commits:4.2f} commits;"
                f" background {bg_trips:4.2f} round trips, {bg_commits:4.2f} commits"
            )
        works = {"base": baseline, "saga": saga, "caller": saga_caller_id}
        for threads in (1, 4):
            runs: dict[str, list[float]] = {"base": [], "saga": [], "caller": []}
            for _ in range(REPEATS):  # interleaved: chunks of the three kinds taken in turn
                for key, value in rates(manager, works, threads).items():
                    runs[key].append(value)
            base = statistics.median(runs["base"])
            print(
                f"{threads} thread(s): same-shard transaction  {base:8.0f} transfers/s (median of {REPEATS})"
            )
            for label, key in (("saga, generated ids", "saga"), ("saga, caller's ids", "caller")):
                ratios = sorted(s / b for s, b in zip(runs[key], runs["base"], strict=True))
                print(
                    f"{threads} thread(s): {label:<23} {statistics.median(runs[key]):8.0f} transfers/s  "
                    f"{statistics.median(ratios):5.2f}x median ({ratios[0]:.2f}-{ratios[-1]:.2f}x over {REPEATS})"
                )


if __name__ == "__main__":
    main()

"""Lookups and sequences: what routing by a lookup saves, what maintaining one costs.

Run: python benchmarks/lookups.py      (starts 4 throwaway local PostgreSQL servers)

1. ``select(Order).where(Order.order_id == x)`` through ShardedSession: routed by the lookup (one
   lookup query, then the owner's shard) vs the same select on an identical table without a lookup
   (a parallel scatter to every shard), at N = 2, 4 and 8 shards (8: two databases per server).
2. Inserting one order per transaction with its lookup entry vs without a lookup (4 shards).
3. Fleet-wide sequence ids per second from one allocator with blocks of 1,000.

At N=4 it also prints the lookup query alone against a bare round trip to the same server (the
lookup's fixed cost beyond one round trip).

Every figure is a ratio against a baseline measured in the same run (the machine is shared).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import psycopg
from sqlalchemy import BigInteger, String, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sa_shardkit import SequenceAllocator, ShardManager, create_sequence_tables
from sa_shardkit.lookups import lookup_named
from sa_shardkit.lookups.build import build_lookup, create_lookup_tables
from sa_shardkit.lookups.store import resolve
from sa_shardkit.testing import PostgresFleet

ORDERS = 8_000
SELECTS = 300
INSERTS = 300


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "bench_orders"
    __shard_key__ = "customer_id"
    __shard_lookups__ = ("order_id",)
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(String(40))


class PlainOrder(Base):
    __tablename__ = "bench_orders_plain"
    __shard_key__ = "customer_id"
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(String(40))


def medians(fns: list[Callable[[int], object]], count: int) -> list[float]:
    """Median seconds of each ``fn(i)``, the functions taking turns call by call (same machine load)."""
    for i in range(count, count + 20):  # warm-up; distinct arguments: inserts must not collide
        for fn in fns:
            fn(i)
    samples: list[list[float]] = [[] for _ in fns]
    for i in range(count):
        for fn, out in zip(fns, samples, strict=True):
            started = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - started)
    return [statistics.median(out) for out in samples]


def load(manager: ShardManager) -> None:
    for shard in manager.shard_ids:
        Base.metadata.drop_all(manager.engine(shard))
        Base.metadata.create_all(manager.engine(shard))
    create_lookup_tables(manager, [lookup_named("Order.order_id")])
    rows: dict[str, list[dict[str, object]]] = {}
    for oid in range(1, ORDERS + 1):
        cid = oid % 997 + 1
        rows.setdefault(manager.shard_for(cid), []).append({"customer_id": cid, "order_id": oid, "note": "x"})
    for shard, batch in rows.items():
        with manager.connect(shard) as conn:
            conn.execute(insert(Order), batch)
            conn.execute(insert(PlainOrder), batch)
            conn.commit()
    build_lookup(manager, lookup_named("Order.order_id"), batch_size=5000)


def select_ratio(manager: ShardManager) -> tuple[float, float, float]:
    load(manager)
    maker = manager.sessionmaker()

    def by_lookup(i: int) -> None:
        with maker() as session:
            assert session.scalars(select(Order).where(Order.order_id == i * 7 % ORDERS + 1)).one()

    def by_scatter(i: int) -> None:
        with maker() as session:
            assert session.scalars(select(PlainOrder).where(PlainOrder.order_id == i * 7 % ORDERS + 1)).one()

    def by_key(i: int) -> None:  # the floor: the shard key in the WHERE clause, one shard
        oid = i * 7 % ORDERS + 1
        with maker() as session:
            stmt = select(PlainOrder).where(
                PlainOrder.customer_id == oid % 997 + 1, PlainOrder.order_id == oid
            )
            assert session.scalars(stmt).one()

    looked, scattered, keyed = medians([by_lookup, by_scatter, by_key], SELECTS)
    return looked, scattered, keyed


def lookup_query_cost(manager: ShardManager) -> tuple[float, float]:
    """The lookup query alone (``resolve``: ring state, prebuilt SQL, kept connection, watchdog)
    vs a bare ``SELECT 1`` round trip on a raw autocommit connection to the same server: what the
    lookup adds to a read beyond one round trip."""
    index = lookup_named("Order.order_id")
    value = 5
    url = manager.config(manager.shard_for(value)).primary_url
    raw = psycopg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database
    )
    raw.autocommit = True

    def lookup(i: int) -> None:
        assert resolve(manager, index, [value])

    def bare(i: int) -> None:
        raw.execute("SELECT 1").fetchall()

    try:
        looked, trip = medians([lookup, bare], SELECTS * 3)
    finally:
        raw.close()
    return looked, trip


def insert_ratio(manager: ShardManager) -> tuple[float, float]:
    maker = manager.sessionmaker()

    def with_lookup(i: int) -> None:
        with maker() as session:
            session.add(Order(customer_id=i % 50 + 1, order_id=1_000_000 + i, note="y"))
            session.commit()

    def without(i: int) -> None:
        with maker() as session:
            session.add(PlainOrder(customer_id=i % 50 + 1, order_id=1_000_000 + i, note="y"))
            session.commit()

    for table in ("bench_orders", "bench_orders_plain"):
        manager.run_on_all(f"DELETE FROM {table} WHERE order_id >= 1000000")
    manager.run_on_all(f"DELETE FROM {lookup_named('Order.order_id').name} WHERE value >= 1000000")
    looked, plain = medians([with_lookup, without], INSERTS)
    return looked, plain


def sequence_rate(manager: ShardManager) -> tuple[float, int]:
    create_sequence_tables(manager)
    allocator = SequenceAllocator(manager, block_size=1000)
    count = 200_000
    started = time.perf_counter()
    for _ in range(count):
        allocator.next_id("bench")
    elapsed = time.perf_counter() - started
    return count / elapsed, count // 1000


def eight_shards(fleet: PostgresFleet) -> dict[str, str]:
    """Two databases on each of the 4 servers: 8 shards (each its own connections and round trips)."""
    urls = {}
    for i, url in enumerate(fleet.urls):
        with ShardManager.from_urls({"x": url}) as admin, admin.engine("x").connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            if not conn.execute(text("SELECT 1 FROM pg_database WHERE datname = 'second'")).first():
                conn.execute(text("CREATE DATABASE second"))
        urls[f"shard-{2 * i + 1}"] = url
        urls[f"shard-{2 * i + 2}"] = url.rsplit("/", 1)[0] + "/second"
    return urls


def main() -> None:
    fleet = PostgresFleet(4)
    try:
        four = {f"shard-{i}": u for i, u in enumerate(fleet.urls, 1)}
        print(f"select by order_id ({ORDERS} orders; median of {SELECTS} sessions each, taking turns):")
        for label, urls in (("2", dict(list(four.items())[:2])), ("4", four), ("8", eight_shards(fleet))):
            with ShardManager.from_urls(urls) as manager:
                looked, scattered, keyed = select_ratio(manager)
                query, trip = lookup_query_cost(manager) if label == "4" else (0.0, 0.0)
            print(
                f"  N={label}: lookup {looked * 1000:.2f} ms, scatter {scattered * 1000:.2f} ms "
                f"(by shard key: {keyed * 1000:.2f} ms): lookup is {scattered / looked:.2f}x faster than the scatter"
            )
            if query:
                print(
                    f"    the lookup query alone {query * 1000:.3f} ms, a bare round trip {trip * 1000:.3f} ms: "
                    f"{query / trip:.2f}x (+{(query - trip) * 1e6:.0f} us of Python)"
                )
        with ShardManager.from_urls(four) as manager:
            looked, plain = insert_ratio(manager)
            print(
                f"insert one order per transaction (4 shards): with its lookup entry {looked * 1000:.2f} ms, "
                f"without {plain * 1000:.2f} ms: {looked / plain:.2f}x"
            )
            rate, trips = sequence_rate(manager)
            print(f"sequence ids, block 1000: {rate:,.0f} ids/s ({trips} round trips for 200,000 ids)")
    finally:
        fleet.close()


if __name__ == "__main__":
    main()

"""Adding a 5th shard online: rows moved per second and the longest write stall, against the
design's OFFSET-paged move-while-deleting loop on the same data (which also skips rows).

Run: python benchmarks/rebalance.py [--customers 5000] [--orders 10] [--items 2] [--batch-size 500]

Starts five throwaway local PostgreSQL servers (sa_shardkit.testing). Issue-sized by default:
5,000 customers, 50,000 orders, 100,000 order items on 4 shards.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, insert, select, text, tuple_

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base, Customer, Order, OrderItem, Product
from sa_shardkit.placement import RECHECK_ENV, unstored_recheck_seconds
from sa_shardkit.rebalance import (
    MoveOptions,
    RebalanceProgress,
    add_shard,
    install_ring,
    misplaced_rows,
)
from sa_shardkit.testing import PostgresFleet

FOUR = ["shard-1", "shard-2", "shard-3", "shard-4"]
TABLES = [Customer.__table__, Order.__table__, OrderItem.__table__]


def seed(manager: ShardManager, ring: HashRing, customers: int, orders: int, items: int) -> int:
    placed: dict[str, list[list[dict[str, Any]]]] = {s: [[], [], []] for s in ring.shard_ids}
    for c in range(1, customers + 1):
        rows = placed[ring.get_shard(c)]
        rows[0].append({"customer_id": c, "name": f"c{c}", "balance": Decimal(100)})
        for n in range(orders):
            oid = uuid.UUID(int=(c << 32) | n)
            rows[1].append({"customer_id": c, "order_id": oid, "status": "new", "total": Decimal(10)})
            for i in range(items):
                rows[2].append(
                    {
                        "customer_id": c,
                        "order_id": oid,
                        "item_no": i,
                        "sku": "SKU-1",
                        "quantity": 1,
                        "unit_price": Decimal(5),
                    }
                )
    for shard_id in ring.shard_ids:
        with manager.connect(shard_id) as conn, conn.begin():
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        Base.metadata.create_all(manager.engine(shard_id))
        with manager.connect(shard_id) as conn, conn.begin():
            conn.execute(insert(Product.__table__), [{"sku": "SKU-1", "name": "p", "price": Decimal(5)}])
            for table, rows in zip(TABLES, placed[shard_id], strict=True):
                conn.execute(insert(table), rows)
            conn.execute(text("ANALYZE"))
    return sum(len(r) for rows in placed.values() for r in rows)


class Writer(threading.Thread):
    """Updates random customers' orders in a loop and records the longest single write."""

    def __init__(self, write: Any, customers: int) -> None:
        super().__init__(daemon=True)
        self.write = write
        self.customers = customers
        self.stop = threading.Event()
        self.max_stall = 0.0
        self.max_stall_at = 0.0
        self.writes = 0

    def run(self) -> None:
        rnd = random.Random(1)
        orders = Order.__table__
        while not self.stop.is_set():
            c = rnd.randint(1, self.customers)
            started = time.perf_counter()
            self.write(c, orders.update().where(orders.c.customer_id == c).values(total=orders.c.total + 1))
            took = time.perf_counter() - started
            if took > self.max_stall:
                self.max_stall, self.max_stall_at = took, started
            self.writes += 1


def reset_shard5(manager: ShardManager) -> None:
    with manager.connect("shard-5") as conn, conn.begin():
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))


def ours(manager: ShardManager, args: argparse.Namespace, total: int) -> None:
    def write(key: int, statement: Any) -> None:
        with manager.transaction(key) as conn:
            conn.execute(statement)

    writer = Writer(write, args.customers)
    writer.start()
    time.sleep(1.0)
    idle_stall, writer.max_stall = writer.max_stall, 0.0
    phases: list[tuple[float, str]] = []

    def progress(p: RebalanceProgress) -> None:
        if not phases or phases[-1][1] != p.phase:
            phases.append((time.perf_counter(), p.phase))

    result = add_shard(
        manager,
        "shard-5",
        Base,
        options=MoveOptions(batch_size=args.batch_size, fence_seconds=args.fence_seconds),
        progress=progress,
    )
    writer.stop.set()
    writer.join()
    wrong = misplaced_rows(manager, result.new, Base)
    print(
        f"sa_shardkit rebalance (adaptive batches of <= {args.batch_size} moving keys aiming at a "
        f"{args.fence_seconds * 1000:.0f} ms cut-over, sources in parallel):"
    )
    print(
        f"  rows moved:              {result.rows_moved:>10,} of {total:,} ({result.rows_moved / total:.1%})"
    )
    print(f"  time:                    {result.seconds:>10.2f} s (start wait included)")
    print(
        f"  start wait:              {result.start_wait_seconds:>10.2f} s (fixed per move: every process must "
        f"see it, {RECHECK_ENV}={unstored_recheck_seconds():g})"
    )
    print(f"  rows/s:                  {result.moving_rows_per_second:>10,.0f} (start wait left out)")
    print(f"  rows/s, whole run:       {result.rows_per_second:>10,.0f} (start wait included)")
    print(
        f"  longest write stall:     {writer.max_stall * 1000:>10.0f} ms (writer idle baseline {idle_stall * 1000:.0f} ms)"
    )
    during = next((name for at, name in reversed(phases) if at <= writer.max_stall_at), "before the move")
    print(f"    (it started in the {during!r} step)")
    print(f"  longest cut-over fence:  {result.max_fence_seconds * 1000:>10.0f} ms")
    print(f"  writes during the move:  {writer.writes:>10,}")
    print(f"  batches:                 {result.batches:>10,}")
    print("  time per step (s; copy and cut-over are summed over the sources, which run in parallel):")
    for step, seconds in result.phase_seconds.items():
        print(f"    {step:<22} {seconds:>10.3f}")
    print(f"  rows on the wrong shard: {sum(sum(t.values()) for t in wrong.values()):>10,}")
    RESULTS["ours"] = result.moving_rows_per_second  # the OFFSET loop has no start wait either


def offset_loop(manager: ShardManager, new: HashRing, page: int) -> tuple[int, float]:
    """The design's sketch: page each source table with OFFSET, copy the moving rows, delete them."""
    moved = 0
    started = time.perf_counter()
    for source in FOUR:
        for table in reversed(TABLES):  # children first, so deleting parents cannot cascade
            key = table.c.customer_id
            pk = list(table.primary_key.columns)
            offset = 0
            while True:
                with manager.connect(source) as src, src.begin():
                    rows = src.execute(select(table).order_by(*pk).limit(page).offset(offset)).all()
                    if not rows:
                        break
                    moving = [r._asdict() for r in rows if new.get_shard(r.customer_id) != source]
                    if moving:
                        with manager.connect("shard-5") as dst, dst.begin():
                            dst.execute(text("SET LOCAL session_replication_role = replica"))
                            dst.execute(insert(table), moving)
                        src.execute(
                            delete(table).where(
                                tuple_(*pk).in_([tuple(r[c.name] for c in pk) for r in moving])
                            )
                        )
                        moved += len(moving)
                    offset += page
            del key
    return moved, time.perf_counter() - started


def raw_copy(manager: ShardManager, new: HashRing) -> tuple[int, float]:
    """The same-run ceiling: the moving rows streamed with binary COPY from each source into the
    new shard's tables (parents first, the sources in parallel, one transaction each), and nothing
    else: no key scan, no verification, no fence, no delete. Leaves the sources as they were."""
    moved = [0]
    lock = threading.Lock()

    def one(source: str) -> None:
        with manager.connect(source) as src:
            keys = [
                k
                for k in src.execute(select(Customer.__table__.c.customer_id)).scalars()
                if new.get_shard(k) != source
            ]
            with manager.connect("shard-5") as dst:
                src_raw, dst_raw = src.connection.driver_connection, dst.connection.driver_connection
                assert src_raw is not None and dst_raw is not None
                count = 0
                for table in TABLES:
                    columns = ", ".join(c.name for c in table.c)
                    order = ", ".join(c.name for c in table.primary_key.columns)
                    out_sql = (
                        f"COPY (SELECT {columns} FROM {table.name} WHERE customer_id = ANY(%s)"
                        f" ORDER BY {order}) TO STDOUT (FORMAT binary)"
                    )
                    src_cursor = src_raw.cursor()
                    with (
                        src_cursor.copy(out_sql, (keys,)) as out,
                        dst_raw.cursor().copy(
                            f"COPY {table.name} ({columns}) FROM STDIN (FORMAT binary)"
                        ) as into,
                    ):
                        for block in out:
                            into.write(block)
                    count += src_cursor.rowcount
                dst.commit()
            src.rollback()
        with lock:
            moved[0] += count

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(s,)) for s in FOUR]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return moved[0], time.perf_counter() - started


def fresh_shard5(manager: ShardManager) -> None:
    reset_shard5(manager)
    Base.metadata.create_all(manager.engine("shard-5"))


RESULTS: dict[str, float] = {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--orders", type=int, default=10)
    parser.add_argument("--items", type=int, default=2)
    parser.add_argument(
        "--batch-size", type=int, default=MoveOptions.batch_size, help="most moving keys per batch (ours)"
    )
    parser.add_argument(
        "--fence-seconds",
        type=float,
        default=MoveOptions.fence_seconds,
        help="cut-over length the adaptive batch aims at (ours)",
    )
    parser.add_argument("--page-size", type=int, default=1000, help="rows per OFFSET page (the sketch)")
    args = parser.parse_args()
    with PostgresFleet(5) as fleet:
        urls = dict(zip([*FOUR, "shard-5"], fleet.urls, strict=True))
        ring = HashRing(FOUR)
        new = ring.add_shard("shard-5")
        with ShardManager.from_urls({s: urls[s] for s in FOUR}) as manager:
            manager.add_shard(ShardConfig(id="shard-5", url=urls["shard-5"]))
            total = seed(manager, ring, args.customers, args.orders, args.items)
            print(
                f"data: {args.customers:,} customers, {args.customers * args.orders:,} orders, "
                f"{args.customers * args.orders * args.items:,} items = {total:,} rows on 4 shards"
            )
            fresh_shard5(manager)
            copied, copy_seconds = raw_copy(manager, new)
            reset_shard5(manager)
            install_ring(manager, ring)
            ours(manager, args, total)

            total = seed(manager, ring, args.customers, args.orders, args.items)
            reset_shard5(manager)
            Base.metadata.create_all(manager.engine("shard-5"))
            should_move = sum(
                n for t in misplaced_rows(manager, new, Base, shard_ids=FOUR).values() for n in t.values()
            )
            fresh_shard5(manager)
            copied2, copy_seconds2 = raw_copy(manager, new)
            fresh_shard5(manager)
            ceiling = (copied + copied2) / (copy_seconds + copy_seconds2)
            print("raw binary COPY of the moving rows into shard-5, nothing else (same-run ceiling):")
            print(
                f"  rows/s, before and after ours: {copied / copy_seconds:>10,.0f} {copied2 / copy_seconds2:>10,.0f}"
            )
            print(f"ratio rows/s sa_shardkit / raw COPY: {RESULTS['ours'] / ceiling:.2f}x")
            moved, seconds = offset_loop(manager, new, args.page_size)
            left = sum(
                n for t in misplaced_rows(manager, new, Base, shard_ids=FOUR).values() for n in t.values()
            )
            print("OFFSET-paged move-while-deleting loop (the design's sketch, same data):")
            print(f"  rows moved:              {moved:>10,} of {should_move:,} that should move")
            print(f"  rows/s:                  {moved / seconds:>10,.0f}")
            lost = should_move - moved - left
            print(f"  rows SKIPPED by OFFSET:  {left + lost:>10,} ({(left + lost) / should_move:.1%})")
            print(f"    left on the old shard: {left:>10,}")
            print(f"    deleted, never copied: {lost:>10,} (a skipped child cascaded away with its parent)")
            print(f"ratio rows/s sa_shardkit / OFFSET loop: {RESULTS['ours'] / (moved / seconds):.2f}x")


if __name__ == "__main__":
    main()

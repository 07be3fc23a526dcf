"""Add a fifth shard while the application keeps writing, then take one shard off again.

Starts five throwaway local PostgreSQL servers, puts 1,000 customers (and their orders) on four,
and runs ``add_shard`` while a thread keeps creating orders through ``ShardedSession``. Then
a background job (``start_rebalance``: progress, a pause, wait) drains shard-2. After each move it prints where the rows are.

    python examples/rebalance_online.py
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from decimal import Decimal

from sqlalchemy import func, select, text

from sa_shardkit import HashRing, ShardConfig, ShardManager, StaleRingError
from sa_shardkit.demo.models import Base, Customer, Order
from sa_shardkit.rebalance import (
    MoveOptions,
    RebalanceProgress,
    add_shard,
    install_ring,
    misplaced_rows,
    start_rebalance,
)
from sa_shardkit.testing import local_fleet

CUSTOMERS = 1000


def orders_per_shard(manager: ShardManager) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for shard_id in manager.shard_ids:
        with manager.connect(shard_id) as conn:
            if conn.execute(text("SELECT to_regclass('orders')")).scalar() is not None:
                counts[shard_id] = conn.execute(select(func.count()).select_from(Order)).scalar() or 0
    return dict(counts)


def main() -> None:
    with local_fleet(5) as fleet:
        four = {f"shard-{i}": url for i, url in enumerate(fleet.urls[:4], 1)}
        with ShardManager.from_urls(four) as manager:
            for shard_id in four:
                Base.metadata.create_all(manager.engine(shard_id))
            install_ring(manager, HashRing(list(four)))
            # the application process lists the new shard; routing follows the stored ring by itself
            manager.add_shard(ShardConfig(id="shard-5", url=fleet.urls[4]))
            Session = manager.sessionmaker()
            for c in range(1, CUSTOMERS + 1):
                with Session.begin() as session:
                    session.add(Customer(customer_id=c, name=f"customer {c}", balance=Decimal(0)))
                    session.add_all(Order(customer_id=c, total=Decimal(n)) for n in range(5))
            print("before:", orders_per_shard(manager))

            stop = threading.Event()
            written: list[uuid.UUID] = []

            def keep_writing() -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    order_id = uuid.uuid4()
                    try:
                        with Session.begin() as session:
                            session.add(
                                Order(customer_id=n % CUSTOMERS + 1, order_id=order_id, total=Decimal(1))
                            )
                        written.append(order_id)
                    except StaleRingError:
                        pass  # the key moved under the transaction: nothing was written; retry

            writer = threading.Thread(target=keep_writing)
            writer.start()

            def progress(p: RebalanceProgress) -> None:
                if p.last_batch is not None:
                    print(f"  {p.phase}: {p.rows_moved:,} rows, {p.rows_per_second:,.0f} rows/s", end="\r")

            result = add_shard(
                manager, "shard-5", Base, options=MoveOptions(batch_size=200), progress=progress
            )
            print(
                f"\nadded shard-5: {result.rows_moved:,} rows in {result.seconds:.1f} s, ring v{result.version}"
            )
            # the second move in the background, as an admin endpoint would run it
            job = start_rebalance(manager, Base, remove="shard-2", options=MoveOptions(batch_size=100))
            while not job.done:
                p = job.progress()
                print(f"  job {p.phase}: {p.rows_moved_total:,} rows, {p.batches} batches", end="\r")
                if p.batches == 3 and not p.paused:
                    job.pause()  # stops between batches; readers and writers carry on
                    time.sleep(0.5)
                    job.resume()
                time.sleep(0.05)
            removed = job.wait()
            assert removed is not None
            print(
                f"\nremoved shard-2: {removed.rows_moved:,} rows in {removed.seconds:.1f} s, ring v{removed.version}"
            )
            stop.set()
            writer.join()

            print("after:", orders_per_shard(manager))
            print(f"orders written during the moves: {len(written):,}")
            print(
                "rows on a shard the ring does not assign:",
                misplaced_rows(manager, removed.new, Base) or "none",
            )


if __name__ == "__main__":
    main()

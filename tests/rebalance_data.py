"""Shared data and workload for the rebalance tests (and the SIGKILL subprocess mover)."""

from __future__ import annotations

import json
import math
import random
import sys
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import insert, select, text

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base, Customer, Order, OrderItem, Product
from sa_shardkit.errors import StaleRingError
from sa_shardkit.rebalance import RingRouter, RingState, install_ring, table_set
from sa_shardkit.rebalance.catalog import write_state
from sa_shardkit.rebalance.rebalancer import _prepare
from sa_shardkit.ring_state import MOVED_KEYS_TABLE

ORDERS = Order.__table__
CUSTOMERS = Customer.__table__
ITEMS = OrderItem.__table__


def order_id(customer_id: int, n: int) -> uuid.UUID:
    return uuid.UUID(int=(customer_id << 32) | n)


def seed(manager: ShardManager, ring: HashRing, customers: int, orders_each: int, items_each: int) -> int:
    """Schema on the ring's shards and rows placed by ``ring``; returns the number of rows."""
    placed: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for c in range(1, customers + 1):
        rows = placed.setdefault(ring.get_shard(c), {"c": [], "o": [], "i": []})
        rows["c"].append({"customer_id": c, "name": f"c{c}", "balance": Decimal(100)})
        for n in range(orders_each):
            oid = order_id(c, n)
            rows["o"].append({"customer_id": c, "order_id": oid, "status": "pending", "total": Decimal(10)})
            for i in range(items_each):
                rows["i"].append(
                    {
                        "customer_id": c,
                        "order_id": oid,
                        "item_no": i,
                        "sku": f"SKU-{i}",
                        "quantity": 1,
                        "unit_price": Decimal(5),
                    }
                )
    total = 0
    for shard_id in ring.shard_ids:
        Base.metadata.create_all(manager.engine(shard_id))
        rows = placed.get(shard_id, {"c": [], "o": [], "i": []})
        with manager.connect(shard_id) as conn, conn.begin():
            conn.execute(insert(Product.__table__), [{"sku": "SKU-0", "name": "p", "price": Decimal(5)}])
            for table, key in ((CUSTOMERS, "c"), (ORDERS, "o"), (ITEMS, "i")):
                if rows[key]:
                    conn.execute(insert(table), rows[key])
                    total += len(rows[key])
    return total


def start_move(manager: ShardManager, shard5_url: str, customers: int = 100) -> RingState:
    """Seed, store the 4-shard ring, and put the fleet into the in-flight state (no rows moved)."""
    four = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
    seed(manager, four, customers, 2, 1)
    install_ring(manager, four)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))
    tables = table_set(Base)
    _prepare(manager, tables, four, ["shard-5"])
    state = RingState(2, four, four.add_shard("shard-5"), tables.key_sql_type)
    write_state(manager, state, state.shard_ids)
    return state


def rows_everywhere(manager: ShardManager, shard_ids: list[str]) -> dict[str, Counter[tuple[Any, ...]]]:
    """``{table: Counter(primary key -> copies)}`` plus ``{table+'@': Counter((pk, shard))}``."""
    found: dict[str, Counter[tuple[Any, ...]]] = {}
    for shard_id in shard_ids:
        with manager.connect(shard_id) as conn:
            for table in (CUSTOMERS, ORDERS, ITEMS):
                for row in conn.execute(select(*table.primary_key.columns)):
                    found.setdefault(table.name, Counter())[tuple(row)] += 1
                    found.setdefault(table.name + "@", Counter())[(*tuple(row), shard_id)] += 1
    return found


def totals_everywhere(manager: ShardManager, shard_ids: list[str]) -> dict[uuid.UUID, Decimal]:
    totals: dict[uuid.UUID, Decimal] = {}
    for shard_id in shard_ids:
        with manager.connect(shard_id) as conn:
            for oid, total in conn.execute(select(ORDERS.c.order_id, ORDERS.c.total)):
                totals[oid] = total
    return totals


class WorkerThreads:
    """``threads`` daemon threads running ``_run(index)`` until ``stop`` is set (test workloads)."""

    threads: int
    stop: threading.Event
    _workers: list[threading.Thread]

    def _run(self, index: int) -> None:
        raise NotImplementedError

    def start(self) -> None:
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, args=(i,), daemon=True)
            worker.start()
            self._workers.append(worker)

    def finish(self) -> None:
        self.stop.set()
        for worker in self._workers:
            worker.join(timeout=60)
        assert not any(w.is_alive() for w in self._workers), f"a {type(self).__name__} thread hung"


@dataclass
class Workload(WorkerThreads):
    """Four threads inserting, updating and reading orders through the router during a move."""

    router: RingRouter
    customers: int
    orders_each: int
    threads: int = 4
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    committed: dict[uuid.UUID, int] = field(default_factory=dict)
    """order id -> customer id of every order known committed (seeded or inserted)."""
    increments: Counter[uuid.UUID] = field(default_factory=Counter)
    new_customers: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        for c in range(1, self.customers + 1):
            for n in range(self.orders_each):
                self.committed[order_id(c, n)] = c

    def _run(self, index: int) -> None:
        rnd = random.Random(index)
        seq = 0
        while not self.stop.is_set():
            try:
                choice = rnd.random()
                if choice < 0.3:
                    seq += 1
                    self._insert(rnd, index, seq)
                elif choice < 0.65:
                    self._update(rnd)
                else:
                    self._read(rnd)
            except StaleRingError:
                self.ops["retried"] += 1  # the transaction was rolled back; retrying is the contract
            except Exception as error:  # noqa: BLE001 - collected and asserted by the test
                self.errors.append(f"{type(error).__name__}: {error}")
                return

    def _insert(self, rnd: random.Random, index: int, seq: int) -> None:
        new_customer = rnd.random() < 0.2
        customer_id = 1_000_000 + index * 100_000 + seq if new_customer else rnd.randint(1, self.customers)
        oid = uuid.uuid4()
        with self.router.begin_write(customer_id) as conn:
            if new_customer:
                conn.execute(insert(CUSTOMERS), {"customer_id": customer_id, "name": "new", "balance": 0})
            conn.execute(
                insert(ORDERS), {"customer_id": customer_id, "order_id": oid, "status": "new", "total": 10}
            )
            conn.execute(
                insert(ITEMS),
                {
                    "customer_id": customer_id,
                    "order_id": oid,
                    "item_no": 0,
                    "sku": "SKU-0",
                    "quantity": 1,
                    "unit_price": 10,
                },
            )
        with self.lock:
            self.committed[oid] = customer_id
            if new_customer:
                self.new_customers.add(customer_id)
        self.ops["insert"] += 1

    def _pick(self, rnd: random.Random) -> tuple[uuid.UUID, int]:
        with self.lock:
            oid = rnd.choice(list(self.committed)) if rnd.random() < 0.2 else None
            if oid is None:
                c = rnd.randint(1, self.customers)
                oid = order_id(c, rnd.randrange(self.orders_each))
            return oid, self.committed[oid]

    def _update(self, rnd: random.Random) -> None:
        oid, customer_id = self._pick(rnd)
        with self.router.begin_write(customer_id) as conn:
            updated = conn.execute(
                ORDERS.update()
                .where(ORDERS.c.customer_id == customer_id, ORDERS.c.order_id == oid)
                .values(total=ORDERS.c.total + 1)
            ).rowcount
        if updated != 1:
            self.errors.append(f"update of order {oid} (customer {customer_id}) matched {updated} rows")
            return
        with self.lock:
            self.increments[oid] += 1
        self.ops["update"] += 1

    def _read(self, rnd: random.Random) -> None:
        oid, customer_id = self._pick(rnd)

        def count(conn: Any) -> int:
            query = select(ORDERS.c.order_id).where(
                ORDERS.c.customer_id == customer_id, ORDERS.c.order_id == oid
            )
            return len(conn.execute(query).all())

        seen = self.router.read(customer_id, count)
        if seen != 1:
            self.errors.append(f"reader saw order {oid} (customer {customer_id}) {seen} times")
        self.ops["read"] += 1


def check_fleet(manager: ShardManager, ring: HashRing, workload: Workload | None, seeded_orders: int) -> None:
    """Every committed row exactly once, on the shard ``ring`` assigns, with every update applied."""
    shard_ids = list(manager.shard_ids)
    found = rows_everywhere(manager, shard_ids)
    for table in ("customers", "orders", "order_items"):
        duplicates = [k for k, n in found.get(table, Counter()).items() if n != 1]
        assert not duplicates, f"{table}: {len(duplicates)} rows stored more than once"
        misplaced = [k for k in found.get(table + "@", Counter()) if ring.get_shard(k[0]) != k[-1]]
        assert not misplaced, f"{table}: {len(misplaced)} rows on the wrong shard, e.g. {misplaced[:3]}"
    orders = found["orders"]
    if workload is not None:
        missing = [oid for oid, c in workload.committed.items() if (c, oid) not in orders]
        assert not missing, f"{len(missing)} committed orders lost, e.g. {missing[:3]}"
        totals = totals_everywhere(manager, shard_ids)
        for oid, n in workload.increments.items():
            base = Decimal(10)
            assert totals[oid] == base + n, f"order {oid}: total {totals[oid]}, expected {base + n}"
    else:
        assert len(orders) == seeded_orders


def subprocess_mover(argv: list[str]) -> None:
    """``python -m tests.rebalance_data '{"shards": {...}, "add": [id, url]}'``: the mover to SIGKILL."""
    from sa_shardkit.rebalance import MoveOptions, add_shard

    spec = json.loads(argv[0])
    with ShardManager.from_urls(spec["shards"]) as manager:

        def progress(p: Any) -> None:
            if p.batches == 1:
                print("moving", flush=True)

        add_shard(
            manager,
            ShardConfig(id=spec["add"][0], url=spec["add"][1]),
            Base,
            options=MoveOptions(batch_size=spec.get("batch_size", 20), sleep=spec.get("sleep", 0.02)),
            progress=progress,
        )
    print("done", flush=True)


if __name__ == "__main__":
    subprocess_mover(sys.argv[1:])


class SessionWorkload(Workload):
    """The same workload through ``ShardedSession`` (ORM objects, flushes fenced by the router)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sessions = self.router.manager.sessionmaker()

    def _insert(self, rnd: random.Random, index: int, seq: int) -> None:
        new_customer = rnd.random() < 0.2
        customer_id = 2_000_000 + index * 100_000 + seq if new_customer else rnd.randint(1, self.customers)
        oid = uuid.uuid4()
        with self.sessions() as session, session.begin():
            if new_customer:
                session.add(Customer(customer_id=customer_id, name="new", balance=Decimal(0)))
            order = Order(customer_id=customer_id, order_id=oid, status="new", total=Decimal(10))
            order.items = [
                OrderItem(customer_id=customer_id, item_no=0, sku="SKU-0", quantity=1, unit_price=Decimal(10))
            ]
            session.add(order)
        with self.lock:
            self.committed[oid] = customer_id
            if new_customer:
                self.new_customers.add(customer_id)
        self.ops["insert"] += 1

    def _update(self, rnd: random.Random) -> None:
        oid, customer_id = self._pick(rnd)
        with self.sessions() as session, session.begin():
            order = session.get(Order, (customer_id, oid))
            if order is None:
                self.errors.append(f"session update: order {oid} (customer {customer_id}) not found")
                return
            # an SQL increment: two threads may pick the same order, and a Python read-modify-write
            # (order.total += 1) loses one of the increments under READ COMMITTED, rebalance or not
            order.total = Order.total + 1  # type: ignore[assignment]
        with self.lock:
            self.increments[oid] += 1
        self.ops["update"] += 1

    def _read(self, rnd: random.Random) -> None:
        oid, customer_id = self._pick(rnd)
        with self.sessions() as session:
            if session.get(Order, (customer_id, oid)) is None:
                self.errors.append(f"session reader missed order {oid} (customer {customer_id})")
        self.ops["read"] += 1


def never_refresh_by_itself(manager: ShardManager, *, read_now: bool = False) -> None:
    """Model a process whose next periodic ring check has not come yet: its manager no longer
    re-reads the stored ring by the clock (``refresh_seconds`` is capped at the recheck horizon,
    0.2 s in the tests); explicit ``refresh()``, empty keyed reads and fences still do. Call it
    before the manager's first use, or with ``read_now=True`` (the stored ring is read now)."""
    setattr(manager.placement, "_interval", lambda: math.inf)  # noqa: B010 - a test's override
    if read_now:
        manager.placement.refresh()


def leftovers(manager: ShardManager) -> dict[str, tuple[int, int]]:
    """``{shard: (staging tables, journal entries)}`` where either is left: a finished move leaves
    neither on any shard (removed ones included, when ``manager`` still lists them)."""
    found = {}
    for shard_id in manager.shard_ids:
        with manager.connect(shard_id) as conn:
            staged = conn.execute(
                text("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'shardkit_in_%'")
            ).scalar_one()
            journaled = 0
            if conn.execute(text("SELECT to_regclass(:t)"), {"t": MOVED_KEYS_TABLE}).scalar() is not None:
                journaled = conn.execute(text(f"SELECT count(*) FROM {MOVED_KEYS_TABLE}")).scalar_one()
            conn.rollback()
        found[shard_id] = (int(staged), int(journaled))
    return {s: v for s, v in found.items() if v != (0, 0)}

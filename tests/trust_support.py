"""Adversarial checks of the mover's trusted rows (``sa_shardkit/rebalance/trusted_rows.py``).

When the mover skips PostgreSQL's foreign-key triggers, nothing on the servers complains any more
about an orphan or a half-moved key; these helpers check every server directly with plain SQL:
no child row whose parent (same key) is missing on its server, no row on a shard the ring does not
assign it to, no row on two servers, and exactly the rows the writers committed.

:class:`ExactWriters` are writers (``manager.transaction``) that insert customers, orders and items,
update totals, delete customers (``ON DELETE CASCADE`` removes their orders and items) and try an
order whose customer does not exist (the server must refuse it: a connection left with
``session_replication_role = replica`` would accept it). Each thread owns its own customers, so
what was committed is known exactly.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.errors import StaleRingError
from sa_shardkit.rebalance import mover as mover_module
from sa_shardkit.rebalance.trusted_rows import TRUST_SOURCE, TRUST_TARGET
from tests.rebalance_data import WorkerThreads, order_id

INSERT_ITEM = text(
    "INSERT INTO order_items (customer_id, order_id, item_no, sku, quantity, unit_price)"
    " VALUES (:c, :o, :i, 'SKU-0', 1, 5)"
)
"""One order item of sku SKU-0 (the writers' and the tests' insert)."""

MISSING_CUSTOMER = 999_999_999
"""No writer ever creates this customer: an order for it must always be refused."""


@dataclass
class Expected:
    """What the writers committed (the seed included)."""

    customers: set[int] = field(default_factory=set)
    orders: dict[uuid.UUID, tuple[int, Decimal]] = field(default_factory=dict)
    items: set[tuple[int, uuid.UUID, int]] = field(default_factory=set)

    def delete_customer(self, customer_id: int) -> None:
        self.customers.discard(customer_id)
        for oid in [o for o, (c, _) in self.orders.items() if c == customer_id]:
            del self.orders[oid]
        self.items = {i for i in self.items if i[0] != customer_id}


def seeded_expectation(customers: int, orders_each: int, items_each: int) -> Expected:
    """The rows :func:`tests.rebalance_data.seed` writes."""
    expected = Expected()
    for c in range(1, customers + 1):
        expected.customers.add(c)
        for n in range(orders_each):
            oid = order_id(c, n)
            expected.orders[oid] = (c, Decimal(10))
            for i in range(items_each):
                expected.items.add((c, oid, i))
    return expected


@dataclass
class ExactWriters(WorkerThreads):
    """Writer threads through ``manager.transaction`` whose committed rows are tracked exactly."""

    manager: ShardManager
    expected: Expected
    seeded: int
    threads: int = 3
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[str] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _owned(self, index: int) -> list[int]:
        with self.lock:
            return sorted(c for c in self.expected.customers if c % self.threads == index)

    def _run(self, index: int) -> None:
        rnd = random.Random(1000 + index)
        seq = 0
        deleted = 0
        while not self.stop.is_set():
            choice = rnd.random()
            try:
                owned = self._owned(index)
                if choice < 0.22 and owned:
                    self._new_order(rnd, rnd.choice(owned))
                elif choice < 0.32 and owned and deleted < self.seeded // (3 * self.threads):
                    self._delete(rnd.choice([c for c in owned if c <= self.seeded] or owned))
                    deleted += 1
                elif choice < 0.55 and owned:
                    self._update(rnd, rnd.choice(owned))
                elif choice < 0.70:
                    seq += 1
                    self._new_customer((6_000_000 // self.threads + seq) * self.threads + index)
                elif choice < 0.90 and owned:
                    self._new_item(rnd, rnd.choice(owned))
                else:
                    self._orphan_refused()
            except StaleRingError:
                self.ops["retried"] += 1  # rolled back: nothing committed
            except Exception as error:  # noqa: BLE001 - collected and asserted by the test
                self.errors.append(f"{type(error).__name__}: {error}")
                return

    def _orders_of(self, customer_id: int) -> list[uuid.UUID]:
        with self.lock:
            return [o for o, (c, _) in self.expected.orders.items() if c == customer_id]

    def _new_order(self, rnd: random.Random, customer_id: int) -> None:
        oid = uuid.uuid4()
        with self.manager.transaction(customer_id) as conn:
            conn.execute(
                text("INSERT INTO orders (customer_id, order_id, status, total) VALUES (:c, :o, 'new', 10)"),
                {"c": customer_id, "o": oid},
            )
            for item in range(2):
                conn.execute(
                    INSERT_ITEM,
                    {"c": customer_id, "o": oid, "i": item},
                )
        with self.lock:
            self.expected.orders[oid] = (customer_id, Decimal(10))
            self.expected.items |= {(customer_id, oid, 0), (customer_id, oid, 1)}
        self.ops["new order"] += 1

    def _new_item(self, rnd: random.Random, customer_id: int) -> None:
        orders = self._orders_of(customer_id)
        if not orders:
            return
        oid = rnd.choice(orders)
        with self.lock:
            item = 1 + max((i for c, o, i in self.expected.items if o == oid), default=-1)
        with self.manager.transaction(customer_id) as conn:
            conn.execute(
                INSERT_ITEM,
                {"c": customer_id, "o": oid, "i": item},
            )
        with self.lock:
            self.expected.items.add((customer_id, oid, item))
        self.ops["new item"] += 1

    def _new_customer(self, customer_id: int) -> None:
        oid = uuid.uuid4()
        with self.manager.transaction(customer_id) as conn:
            conn.execute(
                text("INSERT INTO customers (customer_id, name, balance) VALUES (:c, 'new', 0)"),
                {"c": customer_id},
            )
            conn.execute(
                text("INSERT INTO orders (customer_id, order_id, status, total) VALUES (:c, :o, 'new', 10)"),
                {"c": customer_id, "o": oid},
            )
            conn.execute(
                INSERT_ITEM,
                {"c": customer_id, "o": oid, "i": 0},
            )
        with self.lock:
            self.expected.customers.add(customer_id)
            self.expected.orders[oid] = (customer_id, Decimal(10))
            self.expected.items.add((customer_id, oid, 0))
        self.ops["new customer"] += 1

    def _delete(self, customer_id: int) -> None:
        with self.manager.transaction(customer_id) as conn:
            deleted = conn.execute(
                text("DELETE FROM customers WHERE customer_id = :c"), {"c": customer_id}
            ).rowcount
        if deleted != 1:
            self.errors.append(f"delete of customer {customer_id} matched {deleted} rows")
            return
        with self.lock:
            self.expected.delete_customer(customer_id)
        self.ops["delete"] += 1

    def _update(self, rnd: random.Random, customer_id: int) -> None:
        orders = self._orders_of(customer_id)
        if not orders:
            return
        oid = rnd.choice(orders)
        with self.manager.transaction(customer_id) as conn:
            updated = conn.execute(
                text("UPDATE orders SET total = total + 1 WHERE customer_id = :c AND order_id = :o"),
                {"c": customer_id, "o": oid},
            ).rowcount
        if updated != 1:
            self.errors.append(f"update of order {oid} (customer {customer_id}) matched {updated} rows")
            return
        with self.lock:
            c, total = self.expected.orders[oid]
            self.expected.orders[oid] = (c, total + 1)
        self.ops["update"] += 1

    def _orphan_refused(self) -> None:
        """An order for a customer that does not exist: the foreign key must refuse it."""
        try:
            with self.manager.transaction(MISSING_CUSTOMER) as conn:
                conn.execute(
                    text(
                        "INSERT INTO orders (customer_id, order_id, status, total)"
                        " VALUES (:c, :o, 'orphan', 10)"
                    ),
                    {"c": MISSING_CUSTOMER, "o": uuid.uuid4()},
                )
        except IntegrityError as error:
            assert "foreign key" in str(error)
            self.ops["orphan refused"] += 1
            return
        self.errors.append("an order without its customer was committed: foreign-key triggers were off")


def fleet_rows(manager: ShardManager, shard_ids: list[str]) -> dict[str, dict[str, list[tuple[Any, ...]]]]:
    """``{shard: {table: rows}}`` read with plain SQL on every server."""
    queries = {
        "customers": "SELECT customer_id FROM customers",
        "orders": "SELECT customer_id, order_id, total FROM orders",
        "order_items": "SELECT customer_id, order_id, item_no FROM order_items",
    }
    found: dict[str, dict[str, list[tuple[Any, ...]]]] = {}
    for shard_id in shard_ids:
        with manager.connect(shard_id) as conn:
            found[shard_id] = {t: [tuple(r) for r in conn.execute(text(q))] for t, q in queries.items()}
            conn.rollback()
    return found


def orphans(manager: ShardManager, shard_ids: list[str]) -> dict[str, tuple[int, int]]:
    """``{shard: (orders without their customer, items without their order)}`` where any is, each
    server checked on its own (a parent on another server does not count)."""
    found = {}
    for shard_id in shard_ids:
        with manager.connect(shard_id) as conn:
            row = conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM orders o WHERE NOT EXISTS"
                    " (SELECT 1 FROM customers c WHERE c.customer_id = o.customer_id)),"
                    " (SELECT count(*) FROM order_items i WHERE NOT EXISTS (SELECT 1 FROM orders o"
                    " WHERE o.customer_id = i.customer_id AND o.order_id = i.order_id))"
                )
            ).one()
            conn.rollback()
        if row[0] or row[1]:
            found[shard_id] = (int(row[0]), int(row[1]))
    return found


def check_consistent(
    manager: ShardManager, ring: HashRing, shard_ids: list[str], expected: Expected | None = None
) -> None:
    """No orphan on any server, every row on its ring shard and on one server only, and (with
    ``expected``) exactly the committed rows, totals included."""
    assert orphans(manager, shard_ids) == {}
    rows = fleet_rows(manager, shard_ids)
    for table in ("customers", "orders", "order_items"):
        pk_len = {"customers": 1, "orders": 2, "order_items": 3}[table]
        copies = Counter(r[:pk_len] for shard in rows.values() for r in shard[table])
        twice = [k for k, n in copies.items() if n > 1]
        assert not twice, f"{table}: {len(twice)} rows on two servers, e.g. {twice[:3]}"
        misplaced = [
            (r[0], s) for s, shard in rows.items() for r in shard[table] if ring.get_shard(r[0]) != s
        ]
        assert not misplaced, f"{table}: {len(misplaced)} rows off their ring shard, e.g. {misplaced[:3]}"
    if expected is None:
        return
    customers = {r[0] for shard in rows.values() for r in shard["customers"]}
    assert customers == expected.customers, (
        f"customers: {len(customers - expected.customers)} extra, {len(expected.customers - customers)} missing"
    )
    orders = {r[1]: (r[0], r[2]) for shard in rows.values() for r in shard["orders"]}
    assert set(orders) == set(expected.orders), (
        f"orders: {len(set(orders) - set(expected.orders))} extra, "
        f"{len(set(expected.orders) - set(orders))} missing"
    )
    wrong = [o for o, v in expected.orders.items() if orders[o] != v]
    assert not wrong, f"{len(wrong)} orders with another total than committed, e.g. {wrong[:3]}"
    items = {tuple(r) for shard in rows.values() for r in shard["order_items"]}
    assert items == expected.items, (
        f"items: {len(items - expected.items)} extra, {len(expected.items - items)} missing"
    )


@dataclass
class TrustSeen:
    """Transactions of the movers in this process that skipped the triggers (``TRUST_*`` returned a row)."""

    source: list[int] = field(default_factory=list)
    target: list[int] = field(default_factory=list)


@contextmanager
def watching_trust(monkeypatch: pytest.MonkeyPatch) -> Iterator[TrustSeen]:
    """Record each ``TRUST_SOURCE`` / ``TRUST_TARGET`` statement's row count (1: triggers skipped)."""
    seen = TrustSeen()
    original = mover_module._pipeline

    def watched(conn: Any, statements: list[tuple[str, Any]]) -> list[Any]:
        cursors = original(conn, statements)
        for (sql, _), cursor in zip(statements, cursors, strict=True):
            if sql == TRUST_SOURCE:
                seen.source.append(int(cursor.rowcount))
            elif sql == TRUST_TARGET:
                seen.target.append(int(cursor.rowcount))
        return cursors

    monkeypatch.setattr(mover_module, "_pipeline", watched)
    yield seen


class SessionWriters(ExactWriters):
    """The same writers through ``ShardedSession`` (ORM objects; a customer's delete cascades in
    the session: its orders and items are loaded and deleted children first)."""

    def start(self) -> None:
        self.sessions = self.manager.sessionmaker()
        super().start()

    def _new_order(self, rnd: random.Random, customer_id: int) -> None:
        from sa_shardkit.demo.models import Order, OrderItem

        oid = uuid.uuid4()
        with self.sessions() as session, session.begin():
            order = Order(customer_id=customer_id, order_id=oid, status="new", total=Decimal(10))
            order.items = [
                OrderItem(customer_id=customer_id, item_no=i, sku="SKU-0", quantity=1, unit_price=Decimal(5))
                for i in range(2)
            ]
            session.add(order)
        with self.lock:
            self.expected.orders[oid] = (customer_id, Decimal(10))
            self.expected.items |= {(customer_id, oid, 0), (customer_id, oid, 1)}
        self.ops["new order"] += 1

    def _delete(self, customer_id: int) -> None:
        from sa_shardkit.demo.models import Customer

        with self.sessions() as session, session.begin():
            customer = session.get(Customer, customer_id)
            if customer is None:
                self.errors.append(f"session delete: customer {customer_id} not found")
                return
            session.delete(customer)
        with self.lock:
            self.expected.delete_customer(customer_id)
        self.ops["delete"] += 1


def sql_on(manager: ShardManager, shard_ids: Sequence[str], sql: str) -> None:
    """Run ``sql`` (one or more statements) and commit on each of ``shard_ids``, directly."""
    for shard_id in shard_ids:
        with manager.connect(shard_id) as conn:
            conn.execute(text(sql))
            conn.commit()


def scalar_on(manager: ShardManager, shard_id: str, sql: str) -> int:
    """One integer read from ``shard_id`` directly."""
    with manager.connect(shard_id) as conn:
        value = conn.execute(text(sql)).scalar_one()
        conn.rollback()
    return int(value)

"""The design's order service as a repository over ``ShardedSession``: plain SQLAlchemy code.

Every method that names a customer runs on that customer's shard only; ``find_pending_overdue``
names no customer, so it scatters to every shard and the rows come back sorted by ``created_at``.

Run it against your shards (``SHARD_1_URL``, ``SHARD_2_URL``, ...), or with no such variable it
starts four throwaway local PostgreSQL servers::

    SHARD_1_URL=postgresql+psycopg://app@db1/app SHARD_2_URL=... python examples/order_service.py
    python examples/order_service.py
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import selectinload

from sa_shardkit import ShardManager
from sa_shardkit.demo.models import Base, Customer, Order, OrderItem, Product
from sa_shardkit.testing import manager_from_env_or_local_fleet


class InsufficientFundsError(Exception):
    """The customer's balance does not cover the order (nothing was written)."""


class OrderService:
    """create / find_by_id / find_by_customer / place_order / find_pending_overdue."""

    def __init__(self, manager: ShardManager) -> None:
        self.manager = manager
        self.Session = manager.sessionmaker(expire_on_commit=False)

    def create(self, customer_id: int, name: str, balance: Decimal = Decimal(0)) -> Customer:
        """A new customer, written to the shard its id hashes to."""
        with self.Session.begin() as session:
            customer = Customer(customer_id=customer_id, name=name, balance=balance)
            session.add(customer)
        return customer

    def add_products(self, products: Sequence[tuple[str, str, Decimal]]) -> None:
        """Catalogue rows: a reference table, so every shard gets a copy."""
        with self.Session.begin() as session:
            for sku, name, price in products:
                session.merge(Product(sku=sku, name=name, price=price))

    def find_by_id(self, customer_id: int, order_id: uuid.UUID) -> Order | None:
        """One order; the primary key holds the shard key, so one shard is asked."""
        with self.Session() as session:
            return session.get(Order, (customer_id, order_id), options=[selectinload(Order.items)])

    def find_by_customer(self, customer_id: int) -> list[Order]:
        """A customer's orders, newest first, from that customer's shard."""
        with self.Session() as session:
            stmt = (
                select(Order)
                .where(Order.customer_id == customer_id)
                .options(selectinload(Order.items))
                .order_by(Order.created_at.desc())
            )
            return list(session.scalars(stmt))

    def place_order(self, customer_id: int, items: Sequence[tuple[str, int]]) -> Order:
        """Order + items + balance debit + status change in ONE transaction on the customer's shard.

        Any failure (unknown product, unknown customer, insufficient funds) rolls all of it back.
        """
        with self.Session.begin() as session:
            customer = session.get(Customer, customer_id, with_for_update=True)
            if customer is None:
                raise LookupError(f"no customer {customer_id}")
            skus = [sku for sku, _ in items]
            # products is a reference table: read from the shard this transaction is on
            stmt = select(Product.sku, Product.price).where(Product.sku.in_(skus))
            prices: dict[str, Decimal] = {sku: price for sku, price in session.execute(stmt)}
            missing = sorted(set(skus) - set(prices))
            if missing:
                raise LookupError(f"unknown product(s): {', '.join(missing)}")
            order = Order(customer_id=customer_id, order_id=uuid.uuid4(), status="pending")
            order.items = [
                OrderItem(item_no=i, sku=sku, quantity=qty, unit_price=prices[sku])
                for i, (sku, qty) in enumerate(items, 1)
            ]
            order.total = sum((item.unit_price * item.quantity for item in order.items), Decimal(0))
            customer.orders.append(order)
            session.flush()  # the order and its items exist in this transaction from here on
            if customer.balance < order.total:
                raise InsufficientFundsError(
                    f"customer {customer_id} has {customer.balance}, the order costs {order.total}"
                )
            customer.balance -= order.total
            order.status = "placed"
        return order

    def find_pending_overdue(self, older_than: dt.timedelta = dt.timedelta(hours=1)) -> list[Order]:
        """Pending orders older than ``older_than`` across ALL customers: a scatter, oldest first."""
        cutoff = dt.datetime.now(dt.timezone.utc) - older_than
        with self.Session() as session:
            stmt = (
                select(Order)
                .where(Order.status == "pending", Order.created_at < cutoff)
                .order_by(Order.created_at, Order.order_id)
            )
            return list(session.scalars(stmt))


def create_schema(manager: ShardManager) -> None:
    for shard_id in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard_id))


def run(manager: ShardManager, out: Any = sys.stdout) -> dict[str, Any]:
    """The story: customers, a catalogue, orders (one refused), then the overdue report."""
    create_schema(manager)
    service = OrderService(manager)
    service.add_products([("SKU-1", "Widget", Decimal("2.50")), ("SKU-2", "Gadget", Decimal("10.00"))])
    customers = range(1, 13)
    for customer_id in customers:
        service.create(customer_id, f"Customer {customer_id}", balance=Decimal(40))
    placed = [service.place_order(cid, [("SKU-1", 2), ("SKU-2", 1)]) for cid in customers]
    refused = 0
    try:
        service.place_order(1, [("SKU-2", 100)])
    except InsufficientFundsError as error:
        refused += 1
        print(f"refused: {error}", file=out)
    for customer_id in customers:  # orders left pending, back-dated (shuffled) so they are overdue
        age = dt.timedelta(hours=2 + (customer_id * 5) % 12)
        with service.Session.begin() as session:
            session.add(
                Order(
                    customer_id=customer_id,
                    status="pending",
                    created_at=dt.datetime.now(dt.timezone.utc) - age,
                )
            )
    first = service.find_by_id(1, placed[0].order_id)
    assert first is not None
    print(f"order {first.order_id} of customer 1: {first.status}, total {first.total}", file=out)
    print(f"customer 3 has {len(service.find_by_customer(3))} orders", file=out)
    overdue = service.find_pending_overdue()
    for order in overdue:
        print(f"overdue: customer {order.customer_id} since {order.created_at:%H:%M}", file=out)
    for shard_id in manager.shard_ids:
        with manager.engine(shard_id).connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM orders")).scalar()
        print(f"{shard_id}: {count} orders", file=out)
    return {"placed": placed, "refused": refused, "overdue": overdue}


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    with manager_from_env_or_local_fleet() as manager:
        run(manager)


if __name__ == "__main__":
    main()

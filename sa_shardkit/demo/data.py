"""Steps 2 and 3: writes through ``ShardedSession`` (where each row went), one-shard transactions."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

from rich.console import RenderableType
from rich.text import Text
from sqlalchemy import func, select

from ..errors import CrossShardTransactionError
from ..manager import ShardManager
from .models import Customer, Order, OrderItem, Product
from .render import simple_table

STATUSES = ("pending", "paid", "shipped")
START_BALANCE = Decimal(100)
SHOWN = 6
NEW_IDS = 100_000
"""Customer ids from here on are the refused cross-shard transaction's (never written)."""


def shard_counts(manager: ShardManager, model: type[Any]) -> dict[str, int]:
    """Rows of ``model`` per shard, asked of each shard directly (not through the session)."""
    counts: dict[str, int] = {}
    for shard_id in manager.shard_ids:
        with manager.connect(shard_id) as conn:
            counts[shard_id] = conn.execute(select(func.count()).select_from(model)).scalar() or 0
    return counts


def misplaced_customers(manager: ShardManager) -> int:
    """Customers stored on a shard the ring does not assign them to (always 0)."""
    wrong = 0
    for shard_id in manager.shard_ids:
        with manager.connect(shard_id) as conn:
            ids = conn.execute(select(Customer.customer_id)).scalars().all()
        wrong += sum(1 for c in ids if manager.shard_for(c) != shard_id)
    return wrong


def write_customers(manager: ShardManager, customers: int) -> tuple[list[RenderableType], dict[str, Any]]:
    """Products (a reference table) once, then each customer with its orders in its own transaction."""
    rnd = random.Random(2026)
    Session = manager.sessionmaker()
    with Session.begin() as session:  # reference rows: the session copies them to every shard
        session.add_all(
            Product(sku=f"SKU-{i}", name=f"Product {i}", price=Decimal(rnd.randint(1, 99))) for i in range(5)
        )
    orders_of: dict[int, int] = {}
    for customer_id in range(1, customers + 1):
        with Session.begin() as session:  # one customer = one shard key = one shard transaction
            customer = Customer(
                customer_id=customer_id, name=f"Customer {customer_id}", balance=START_BALANCE
            )
            customer.orders = [
                Order(status=rnd.choice(STATUSES), total=Decimal(rnd.randint(5, 500)))
                for _ in range(rnd.randint(0, 4))
            ]
            orders_of[customer_id] = len(customer.orders)
            session.add(customer)
    per_shard = shard_counts(manager, Customer)
    orders = shard_counts(manager, Order)
    products = shard_counts(manager, Product)
    shares = manager.ring.shares()
    where = simple_table(
        "Where the first customers went (shard = ring lookup of customer_id)",
        ("customer_id", "shard", "orders"),
        [(c, manager.shard_for(c), orders_of[c]) for c in range(1, min(customers, SHOWN) + 1)],
    )
    dist = simple_table(
        "Rows per shard, counted on each shard directly",
        ("shard", "ring share", "customers", "orders", "products"),
        [(s, f"{shares.get(s, 0):.1%}", per_shard[s], orders[s], products[s]) for s in manager.shard_ids],
    )
    body: list[RenderableType] = [
        Text(
            "Session = manager.sessionmaker(); each customer and its orders in one `with Session.begin()`; "
            "__shard_key__ = 'customer_id' picks the shard, orders follow their customer."
        ),
        where,
        dist,
    ]
    figures = {
        "customers": sum(per_shard.values()),
        "orders": sum(orders.values()),
        "misplaced": misplaced_customers(manager),
        "products_per_shard": min(products.values()),
        "products_on_every_shard": set(products.values()) == {5},
        "customers_per_shard": per_shard,
    }
    return body, figures


class PaymentDeclined(Exception):
    """The business failure that aborts the second transaction of step 3."""


def transactions(manager: ShardManager) -> tuple[list[RenderableType], dict[str, Any]]:
    """Order + items + status change committed together; a failing one leaves nothing behind."""
    Session = manager.sessionmaker()
    customer_id = 42 if _exists(manager, 42) else 1
    shard = manager.shard_for(customer_id)
    paid_id = uuid.uuid4()
    with Session.begin() as session:
        order = Order(customer_id=customer_id, order_id=paid_id, status="pending", total=Decimal(0))
        order.items = [
            OrderItem(item_no=n, sku=f"SKU-{n}", quantity=n, unit_price=Decimal(10)) for n in range(1, 4)
        ]
        session.add(order)
        session.flush()  # the rows exist in the transaction now
        order.total = sum((i.unit_price * i.quantity for i in order.items), Decimal(0))
        order.status = "paid"
    committed = _order_rows(manager, paid_id)

    failed_id = uuid.uuid4()
    seen_inside = 0
    try:
        with Session.begin() as session:
            order = Order(customer_id=customer_id, order_id=failed_id, status="pending", total=Decimal(30))
            order.items = [
                OrderItem(item_no=n, sku=f"SKU-{n}", quantity=1, unit_price=Decimal(15)) for n in range(1, 3)
            ]
            session.add(order)
            session.flush()
            seen_inside = 1 + (
                session.scalar(
                    select(func.count())
                    .select_from(OrderItem)
                    .where(OrderItem.customer_id == customer_id, OrderItem.order_id == failed_id)
                )
                or 0
            )
            raise PaymentDeclined("card declined")
    except PaymentDeclined:
        pass
    left = _order_rows(manager, failed_id)

    left_id = NEW_IDS
    right_id = next(
        c for c in range(NEW_IDS + 1, 2 * NEW_IDS) if manager.shard_for(c) != manager.shard_for(left_id)
    )
    refused = ""
    try:
        with Session.begin() as session:
            session.add(Customer(customer_id=left_id, name="Left", balance=Decimal(0)))
            session.add(Customer(customer_id=right_id, name="Right", balance=Decimal(0)))
    except CrossShardTransactionError as error:
        refused = type(error).__name__
    cross_left = sum(shard_counts_where(manager, Customer.customer_id >= NEW_IDS).values())

    rows = [
        (
            "order + 3 items, then status -> paid",
            shard,
            committed["orders"],
            committed["items"],
            committed["status"],
        ),
        ("order + 2 items flushed, then PaymentDeclined", shard, left["orders"], left["items"], "-"),
    ]
    body: list[RenderableType] = [
        Text(
            f"Customer {customer_id} lives on {shard}: all of its rows are in one shard transaction.\n"
            f"The failed one had {seen_inside} rows visible inside the transaction before the exception; "
            "the rollback removed them.\n"
            f"Two customers on different shards in one transaction: {refused or 'allowed?!'} at flush, "
            f"{cross_left} rows written."
        ),
        simple_table(
            "Rows on the shard afterwards, read directly",
            ("transaction", "shard", "orders", "items", "status"),
            rows,
        ),
    ]
    figures = {
        "committed_items": committed["items"],
        "committed_status": committed["status"],
        "failed_rows_inside": seen_inside,
        "failed_rows_left": left["orders"] + left["items"],
        "cross_shard_refused": refused,
        "cross_shard_rows_left": cross_left,
    }
    return body, figures


def _exists(manager: ShardManager, customer_id: int) -> bool:
    with manager.connect(manager.shard_for(customer_id)) as conn:
        return (
            conn.execute(select(Customer.customer_id).where(Customer.customer_id == customer_id)).first()
            is not None
        )


def shard_counts_where(manager: ShardManager, condition: Any) -> dict[str, int]:
    counts = Counter[str]()
    for shard_id in manager.shard_ids:
        with manager.connect(shard_id) as conn:
            counts[shard_id] = (
                conn.execute(select(func.count()).select_from(Customer).where(condition)).scalar() or 0
            )
    return dict(counts)


def _order_rows(manager: ShardManager, order_id: uuid.UUID) -> dict[str, Any]:
    """The order's rows on every shard (so a row on a wrong shard would be counted too)."""
    orders = items = 0
    status = "-"
    for shard_id in manager.shard_ids:
        with manager.connect(shard_id) as conn:
            found = conn.execute(select(Order.status).where(Order.order_id == order_id)).scalars().all()
            orders += len(found)
            status = found[0] if found else status
            items += (
                conn.execute(
                    select(func.count()).select_from(OrderItem).where(OrderItem.order_id == order_id)
                ).scalar()
                or 0
            )
    return {"orders": orders, "items": items, "status": status}

"""A dashboard over every shard: cross-shard queries that give the same answer as one database.

Shows the oldest pending orders of all customers (ORDER BY ... LIMIT across shards), revenue per
status (GROUP BY with count/sum/avg), per-shard row counts from raw SQL (``query_all_shards``),
a query the merge refuses (with its reason), and ``allow_partial`` while a shard is down.

Run it against your shards (``SHARD_1_URL``, ...), or with no such variable it starts four throwaway
local PostgreSQL servers (and then also stops one to show ``allow_partial``)::

    python examples/scatter_dashboard.py
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Callable
from decimal import Decimal

from sqlalchemy import func, over, select

from sa_shardkit import ShardManager, UnsupportedScatterError
from sa_shardkit.demo.models import Base, Customer, Order

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def load_demo_data(manager: ShardManager, customers: int = 40) -> None:
    """Schema on every shard, then each customer with three orders (one transaction per customer)."""
    for shard_id in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard_id))
    Session = manager.sessionmaker()
    for cid in range(1, customers + 1):
        with Session() as session, session.begin():
            customer = Customer(customer_id=cid, name=f"customer {cid}", balance=Decimal(100))
            for k in range(3):
                customer.orders.append(
                    Order(
                        order_id=uuid.UUID(int=cid * 10 + k),
                        status=("pending", "paid", "shipped")[(cid + k) % 3],
                        total=Decimal((cid * 37 + k * 11) % 90) + Decimal("0.99"),
                        created_at=START + dt.timedelta(hours=(cid * 13 + k * 5) % 97),
                    )
                )
            session.add(customer)


def dashboard(manager: ShardManager, stop_a_shard: Callable[[], None] | None = None) -> list[str]:
    """Print (and return) the dashboard's lines."""
    lines: list[str] = []
    say = lines.append
    Session = manager.sessionmaker()
    with Session() as session:
        say("oldest pending orders, all customers:")
        oldest = session.scalars(
            select(Order).where(Order.status == "pending").order_by(Order.created_at, Order.order_id).limit(5)
        )
        for order in oldest:
            say(f"  {order.created_at:%Y-%m-%d %H:%M}  customer {order.customer_id:>3}  {order.total:>6}")
        say("revenue per status:")
        revenue = session.execute(
            select(Order.status, func.count(), func.sum(Order.total), func.avg(Order.total))
            .group_by(Order.status)
            .order_by(func.sum(Order.total).desc())
        )
        for status, count, total, average in revenue:
            say(f"  {status:<8} {count:>3} orders  {total:>8}  avg {average:.2f}")
        say(f"customers: {session.scalar(select(func.count()).select_from(Customer))}")
        try:
            session.execute(select(Order.order_id, over(func.rank(), order_by=Order.total)))
        except UnsupportedScatterError as error:
            say(f"refused: {str(error).split(': ', 1)[1].split('.')[0]}")
    counts = manager.query_all_shards("SELECT count(*) AS orders FROM orders", with_shard_id=True)
    say("orders per shard: " + ", ".join(f"{row.shard_id}={row.orders}" for row in counts))
    if stop_a_shard is not None:
        stop_a_shard()
        with Session() as session:
            result = session.execute(
                select(Order).order_by(Order.created_at).limit(3).execution_options(allow_partial=True)
            )
            rows = result.scalars().all()
            say(f"with a shard down: {len(rows)} rows, missing shards {list(result.missing_shards)}")
    for line in lines:
        print(line)
    return lines


def main() -> None:
    if os.environ.get("SHARD_1_URL"):
        with ShardManager.from_env() as manager:
            load_demo_data(manager)
            dashboard(manager)
        return
    from sa_shardkit.testing import local_fleet

    with local_fleet(4) as fleet, ShardManager.from_urls(fleet.urls) as manager:
        load_demo_data(manager)
        dashboard(manager, stop_a_shard=fleet.servers[2].stop)


if __name__ == "__main__":
    main()

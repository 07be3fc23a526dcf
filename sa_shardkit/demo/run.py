"""`shardkit demo`: the sharding story on SQLite file shards (no server) or on given URLs."""

from __future__ import annotations

import random
import tempfile
from collections import Counter
from decimal import Decimal
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..manager import ShardManager
from .models import Base, Customer, Order, Product

DEMO_SHARDS = 4


def sqlite_manager(directory: Path, count: int = DEMO_SHARDS) -> ShardManager:
    """SQLite files as shards: the embedded default for the demo (not for correctness claims)."""
    return ShardManager.from_urls(
        {f"shard-{i}": f"sqlite:///{directory / f'shard-{i}.db'}" for i in range(1, count + 1)}
    )


def run_demo(
    manager: ShardManager | None = None, *, customers: int = 200, console: Console | None = None
) -> dict[str, int]:
    """Create the schema, place customers and orders by the ring, and print where they landed."""
    console = console or Console()
    owned = manager is None
    tmp = tempfile.TemporaryDirectory(prefix="shardkit-demo-") if owned else None
    if manager is None:
        assert tmp is not None
        manager = sqlite_manager(Path(tmp.name))
        console.print(f"[bold]Embedded demo:[/] {DEMO_SHARDS} SQLite shards in {tmp.name}")
    try:
        for shard_id in manager.shard_ids:
            Base.metadata.create_all(manager.engine(shard_id))
        rnd = random.Random(2026)
        products = [
            Product(sku=f"SKU-{i}", name=f"Product {i}", price=Decimal(rnd.randint(1, 99))) for i in range(5)
        ]
        for shard_id in manager.shard_ids:  # reference table: same rows on every shard
            with Session(manager.engine(shard_id)) as session, session.begin():
                for p in products:
                    session.merge(Product(sku=p.sku, name=p.name, price=p.price))
        placed: dict[str, list[int]] = {s: [] for s in manager.shard_ids}
        for customer_id in range(1, customers + 1):
            placed[manager.shard_for(customer_id)].append(customer_id)
        for shard_id, ids in placed.items():
            with Session(manager.engine(shard_id)) as session, session.begin():
                for customer_id in ids:
                    customer = Customer(
                        customer_id=customer_id, name=f"Customer {customer_id}", balance=Decimal(100)
                    )
                    customer.orders = [
                        Order(
                            status=rnd.choice(["pending", "paid", "shipped"]),
                            total=Decimal(rnd.randint(5, 500)),
                        )
                        for _ in range(rnd.randint(0, 4))
                    ]
                    session.add(customer)
        table = Table(title="Where the first customers live")
        table.add_column("customer_id", justify="right")
        table.add_column("shard")
        for customer_id in range(1, 9):
            table.add_row(str(customer_id), manager.shard_for(customer_id))
        console.print(table)

        counts: dict[str, int] = {}
        orders: Counter[str] = Counter()
        for shard_id in manager.shard_ids:
            with Session(manager.engine(shard_id)) as session:
                counts[shard_id] = session.scalar(select(func.count()).select_from(Customer)) or 0
                orders[shard_id] = session.scalar(select(func.count()).select_from(Order)) or 0
        dist = Table(title=f"Key distribution ({customers} customers)")
        for column in ("shard", "customers", "orders", "ring share", ""):
            dist.add_column(column)
        shares = manager.ring.shares()
        widest = max(counts.values()) or 1
        for shard_id in manager.shard_ids:
            bar = "█" * round(30 * counts[shard_id] / widest)
            dist.add_row(
                shard_id, str(counts[shard_id]), str(orders[shard_id]), f"{shares.get(shard_id, 0):.1%}", bar
            )
        console.print(dist)
        return counts
    finally:
        if owned:
            manager.dispose()
            if tmp is not None:
                tmp.cleanup()

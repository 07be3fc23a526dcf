"""Step 4: keyed reads go to one shard; reads without a key scatter and merge to the one-database answer."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any

from rich.console import RenderableType
from rich.text import Text
from sqlalchemy import func, select

from ..manager import ShardManager
from .models import Customer, Order
from .render import simple_table

TOP = 5


def every_order(manager: ShardManager) -> list[tuple[Any, ...]]:
    """Brute force: every order of every shard, read shard by shard without the scatter engine."""
    rows: list[tuple[Any, ...]] = []
    for shard_id in manager.shard_ids:
        with manager.connect(shard_id) as conn:
            rows += [tuple(r) for r in conn.execute(select(Order.order_id, Order.status, Order.total))]
    return rows


def reads(manager: ShardManager) -> tuple[list[RenderableType], dict[str, Any]]:
    Session = manager.sessionmaker()
    keys = [1, 2, 3]
    by_key = select(Order).where(Order.customer_id.in_(keys))
    top = select(Order.customer_id, Order.order_id, Order.total).order_by(Order.total.desc(), Order.order_id)
    top = top.limit(TOP)
    per_status = (
        select(Order.status, func.count(), func.sum(Order.total))
        .group_by(Order.status)
        .order_by(Order.status)
    )
    with Session() as session:
        customer = session.get(Customer, 1)
        key_orders = session.scalars(by_key).all()
        scatter_top: list[tuple[Any, ...]] = [tuple(r) for r in session.execute(top)]
        groups = [(s, n, Decimal(t)) for s, n, t in session.execute(per_status)]
        total = session.scalar(select(func.count()).select_from(Order)) or 0

    brute = every_order(manager)
    expected_top = sorted(brute, key=lambda r: (-r[2], r[0]))[:TOP]
    top_ok = [r[1] for r in scatter_top] == [r[0] for r in expected_top]
    counted: dict[str, list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
    for _, status, amount in brute:
        counted[status][0] += 1
        counted[status][1] += amount
    expected_groups = [(s, int(v[0]), v[1]) for s, v in sorted(counted.items())]
    groups_ok = groups == expected_groups

    body: list[RenderableType] = [
        Text(
            f"session.get(Customer, 1) -> {manager.shards_for(select(Customer).where(Customer.customer_id == 1))[0]} "
            f"only ({customer.name if customer else '?'}).\n"
            f"select(Order).where(Order.customer_id.in_({keys})) -> "
            f"{', '.join(manager.shards_for(by_key))} ({len(key_orders)} orders).\n"
            f"No shard key: every shard in parallel, merged. ORDER BY total DESC LIMIT {TOP}:"
        ),
        simple_table(
            None, ("customer_id", "shard", "total"), [(c, manager.shard_for(c), t) for c, _, t in scatter_top]
        ),
        simple_table(
            "GROUP BY status across shards, and the brute-force count of every shard's rows",
            ("status", "count", "sum(total)", "brute count", "brute sum"),
            [(g[0], g[1], g[2], e[1], e[2]) for g, e in zip(groups, expected_groups, strict=False)],
        ),
    ]
    figures = {
        "keyed_shards": len(manager.shards_for(select(Customer).where(Customer.customer_id == 1))),
        "scatter_shards": len(manager.shards_for(top)),
        "orders_counted": total,
        "orders_brute_force": len(brute),
        "count_matches": total == len(brute),
        "top_matches": top_ok,
        "group_by_matches": groups_ok,
    }
    return body, figures

"""Step 6: a fifth shard joins while a writer keeps writing; rows move, nothing is lost (counted)."""

from __future__ import annotations

import random
import threading
from decimal import Decimal
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from ..config import ShardConfig
from ..errors import StaleRingError
from ..manager import ShardManager
from ..rebalance import (
    MoveOptions,
    RebalanceProgress,
    add_shard,
    install_ring,
    misplaced_rows,
    plan_change,
)
from .data import shard_counts
from .models import Base, Customer, Order, OrderItem
from .render import bar_chart, simple_table
from .schema import migrate

SHARDED = (Customer, Order, OrderItem)


def rows_per_shard(manager: ShardManager) -> dict[str, int]:
    """Rows of every sharded table, per shard, counted on each shard directly."""
    counts = [shard_counts(manager, model) for model in SHARDED]
    return {s: sum(c[s] for c in counts) for s in manager.shard_ids}


def orders_total(manager: ShardManager) -> int:
    return sum(shard_counts(manager, Order).values())


class Writer(threading.Thread):
    """The application: new orders for random customers through ShardedSession, until stopped."""

    def __init__(self, manager: ShardManager, customers: int) -> None:
        super().__init__(name="shardkit-demo-writer", daemon=True)
        self.Session = manager.sessionmaker()
        self.customers = customers
        self.stop = threading.Event()
        self.written = 0
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rnd = random.Random(6)
        while not self.stop.is_set():
            customer_id = rnd.randint(1, self.customers)
            try:
                with self.Session.begin() as session:
                    session.add(Order(customer_id=customer_id, status="pending", total=Decimal(1)))
                self.written += 1
            except StaleRingError:
                self.retries += 1  # the key moved under the transaction: nothing written; try again
            except Exception as error:  # noqa: BLE001 - reported by the step (and fails its check)
                self.error = error
                return


def add_fifth_shard(
    manager: ShardManager, spare_url: str, customers: int, console: Console
) -> tuple[list[RenderableType], dict[str, Any]]:
    new_id = f"shard-{len(manager.shard_ids) + 1}"
    install_ring(manager, manager.ring)  # stored on the shards: every process routes by it
    manager.add_shard(ShardConfig(id=new_id, url=spare_url))  # configured everywhere; not on the ring yet
    migrate(manager, [new_id])  # the new shard gets the schema the same way as the others
    before = rows_per_shard(manager)
    orders_before = orders_total(manager)
    plan = plan_change(manager, manager.ring.add_shard(new_id), Base)

    writer = Writer(manager, customers)
    writer.start()
    columns = (
        TextColumn("[bold]{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows  {task.fields[rate]:>8} rows/s"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("moving", total=plan.rows_to_move or None, rate="-")

            def on_progress(p: RebalanceProgress) -> None:
                bar.update(
                    task, completed=p.rows_moved, description=p.phase, rate=f"{p.rows_per_second:,.0f}"
                )

            batch = max(5, customers // 40)
            result = add_shard(
                manager, new_id, Base, options=MoveOptions(batch_size=batch, sleep=0.05), progress=on_progress
            )
    finally:
        writer.stop.set()
        writer.join()
    after = rows_per_shard(manager)
    orders_after = orders_total(manager)
    misplaced = misplaced_rows(manager, result.new, Base)
    lost = orders_before + writer.written - orders_after

    body: list[RenderableType] = [
        Text(
            f"add_shard(manager, '{new_id}', Base) while a thread kept writing orders through ShardedSession: "
            f"{plan.share_moved:.1%} of the ring moves to {new_id}; {result.rows_moved:,} of "
            f"{sum(before.values()):,} rows moved in {result.batches} batches "
            f"(longest cut-over {result.max_fence_seconds * 1000:.0f} ms)."
        ),
        bar_chart("Rows per shard (customers + orders + items)", {"before": before, "after": after}),
        simple_table(
            "Counted on every shard directly",
            ("orders before", "written during the move", "orders after", "lost", "on a wrong shard"),
            [
                (
                    orders_before,
                    writer.written,
                    orders_after,
                    lost,
                    sum(sum(t.values()) for t in misplaced.values()),
                )
            ],
        ),
    ]
    figures = {
        "moved_ring_share": plan.share_moved,
        "moved_rows_share": result.rows_moved / max(1, sum(before.values())),
        "rows_moved": result.rows_moved,
        "written_during_move": writer.written,
        "lost": lost,
        "misplaced": sum(sum(t.values()) for t in misplaced.values()),
        "writer_error": repr(writer.error) if writer.error else "none",
        "new_shard_rows": after.get(new_id, 0),
        "before": before,
        "after": after,
    }
    return body, figures

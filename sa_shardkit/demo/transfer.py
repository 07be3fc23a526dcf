"""Step 5: a cross-shard credit transfer saga, and one whose runner dies mid-way, finished by recovery."""

from __future__ import annotations

import contextlib
import time
import uuid
from decimal import Decimal
from typing import Any

from rich.console import RenderableType
from rich.text import Text
from sqlalchemy import func, select

from ..manager import ShardManager
from ..saga import CREDIT_TRANSFER, SagaOptions, recover, transfer
from .models import Customer
from .render import simple_table

LEASE = 0.5
"""The crashed runner's lease (seconds): recovery may claim the saga once it ran out."""


class RunnerDied(BaseException):
    """Stands in for the process dying (a BaseException: no cleanup code of the runner runs)."""


def total_balance(manager: ShardManager) -> Decimal:
    """The money of every customer, summed shard by shard (brute force, no scatter)."""
    total = Decimal(0)
    for shard_id in manager.shard_ids:
        with manager.connect(shard_id) as conn:
            total += conn.execute(select(func.coalesce(func.sum(Customer.balance), 0))).scalar() or 0
    return Decimal(total)


def balance(manager: ShardManager, customer_id: int) -> Decimal:
    with manager.connect(manager.shard_for(customer_id)) as conn:
        value = conn.execute(select(Customer.balance).where(Customer.customer_id == customer_id)).scalar()
    return Decimal(value if value is not None else 0)


def sagas(manager: ShardManager) -> tuple[list[RenderableType], dict[str, Any]]:
    sender = 1
    receiver = next(c for c in range(2, 1000) if manager.shard_for(c) != manager.shard_for(sender))
    before = total_balance(manager)
    rows: list[tuple[Any, ...]] = []

    def snapshot(what: str, status: str) -> None:
        rows.append(
            (what, status, balance(manager, sender), balance(manager, receiver), total_balance(manager))
        )

    snapshot("start", "-")
    transfer_id = f"demo-{uuid.uuid4()}"
    done = transfer(manager, sender, receiver, Decimal("25.00"), transfer_id=transfer_id)
    snapshot("transfer 25.00", done.status)
    again = transfer(manager, sender, receiver, Decimal("25.00"), transfer_id=transfer_id)
    snapshot("same transfer id again", again.status)

    def die_after_debit(_saga_id: str, checkpoint: str) -> None:
        if checkpoint == "log:debit":
            raise RunnerDied

    with contextlib.suppress(RunnerDied):
        transfer(
            manager,
            sender,
            receiver,
            Decimal("10.00"),
            options=SagaOptions(lease_seconds=LEASE, on_checkpoint=die_after_debit),
        )
    snapshot("transfer 10.00, runner dies after the debit", "pending")
    in_flight = before - total_balance(manager)
    time.sleep(LEASE)  # the dead runner's lease runs out (a live one keeps renewing it)
    report = recover(manager, [CREDIT_TRANSFER], options=SagaOptions(lease_seconds=LEASE))
    snapshot(f"recover(): {len(report.completed)} completed", "complete" if report.completed else "?")
    after = total_balance(manager)

    body: list[RenderableType] = [
        Text(
            f"Customer {sender} ({manager.shard_for(sender)}) pays customer {receiver} "
            f"({manager.shard_for(receiver)}): two shards, so no single transaction covers both. "
            "sa_shardkit.saga.transfer debits, logs, credits; each step exactly once."
        ),
        simple_table(
            "Balances, read from each customer's own shard; total = every customer on every shard",
            ("what", "status", f"customer {sender}", f"customer {receiver}", "total"),
            rows,
        ),
        Text(
            f"Mid-way the total was short by {in_flight} (the debit committed, the credit not yet): "
            "a saga is not isolated. Recovery (shardkit recover) finished it; the total is whole again."
        ),
    ]
    figures = {
        "first_status": done.status,
        "retry_status": again.status,
        "in_flight_mid_way": str(in_flight),
        "recovered": len(report.completed),
        "total_before": str(before),
        "total_after": str(after),
        "money_conserved": before == after,
    }
    return body, figures

"""Helpers for the saga tests: accounts placed by the ring, and balances read from each shard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.demo.models import Base, Customer
from sa_shardkit.saga import create_saga_tables, flush_completion_marks, receipts_table, sagas_table


def run_until_killed(script: str, *args: object) -> None:
    """Run ``script`` (Python source) in a subprocess with ``args``; it must die by SIGKILL."""
    worker = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert worker.returncode == -signal.SIGKILL, worker.stderr


def seed_ring_fleet(manager: ShardManager, ring: HashRing, customers: int, balance: Decimal) -> None:
    """Schema, saga tables and customers 1..``customers`` on the shards ``ring`` places them on."""
    for shard_id in ring.shard_ids:
        Base.metadata.create_all(manager.engine(shard_id))
    create_saga_tables(manager)
    for customer_id in range(1, customers + 1):
        with manager.connect(ring.get_shard(customer_id)) as conn, conn.begin():
            row = {"customer_id": customer_id, "name": f"c{customer_id}", "balance": balance}
            conn.execute(insert(Customer.__table__), row)


class SimulatedCrash(BaseException):
    """The process "dies" right after a commit: no cleanup code of the runner runs."""


def crash_at(point: str) -> Callable[[str, str], None]:
    """An ``on_checkpoint`` hook that "kills" the runner right after the commit named ``point``."""

    def hook(saga_id: str, checkpoint: str) -> None:
        if checkpoint == point:
            raise SimulatedCrash(checkpoint)

    return hook


def open_accounts(
    manager: ShardManager, count: int = 16, balance: Decimal = Decimal(100)
) -> dict[int, Decimal]:
    """Create the schema and ``count`` customers (ids 1..count) on the shards the ring picks."""
    for shard_id in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard_id))
    create_saga_tables(manager)
    for customer_id in range(1, count + 1):
        with Session(manager.engine_for(customer_id)) as session, session.begin():
            session.add(Customer(customer_id=customer_id, name=f"c{customer_id}", balance=balance))
    return {customer_id: balance for customer_id in range(1, count + 1)}


def balances(manager: ShardManager) -> dict[int, Decimal]:
    """Every customer's balance, read from each shard directly (and checked to be on its own shard)."""
    found: dict[int, Decimal] = {}
    for shard_id in manager.shard_ids:
        with Session(manager.engine(shard_id)) as session:
            for customer_id, balance in session.execute(select(Customer.customer_id, Customer.balance)):
                assert manager.shard_for(customer_id) == shard_id
                assert customer_id not in found
                found[customer_id] = balance
    return found


def cross_shard_pair(manager: ShardManager, start: int = 1) -> tuple[int, int]:
    """Two customer ids (from 1..16) that live on different shards."""
    for a in range(start, 17):
        for b in range(1, 17):
            if manager.shard_for(a) != manager.shard_for(b):
                return a, b
    raise AssertionError("all customers on one shard")


def saga_rows(manager: ShardManager) -> dict[str, dict[str, Any]]:
    """Every saga log row on every shard, with the shard it was found on (completion marks that
    runners write in the background are flushed first)."""
    assert flush_completion_marks(manager)
    rows: dict[str, dict[str, Any]] = {}
    for shard_id in manager.shard_ids:
        with manager.engine(shard_id).connect() as conn:
            for row in conn.execute(select(sagas_table)).mappings():
                assert row["saga_id"] not in rows, "a saga logged on two shards"
                rows[row["saga_id"]] = {**row, "shard": shard_id}
    return rows


def receipt_count(
    manager: ShardManager, saga_id: str, step: str, phase: str = "do", shard_ids: list[str] | None = None
) -> int:
    """How many ``applied`` receipts a step has (on ``shard_ids``, default every shard)."""
    total = 0
    for shard_id in shard_ids or manager.shard_ids:
        with manager.engine(shard_id).connect() as conn:
            total += conn.execute(
                select(func.count()).where(
                    receipts_table.c.saga_id == saga_id,
                    receipts_table.c.step == step,
                    receipts_table.c.phase == phase,
                    receipts_table.c.outcome == "applied",
                )
            ).scalar_one()
    return total


def expected_balances(manager: ShardManager, initial: dict[int, Decimal]) -> dict[int, Decimal]:
    """Balances implied by the saga log: each complete transfer applied once, each failed one not at all."""
    expected = dict(initial)
    for row in saga_rows(manager).values():
        assert row["finished_at"] is not None, f"saga {row['saga_id']} is not final: {row['status']}"
        if row["status"] == "complete":
            amount = Decimal(row["payload"]["amount"])
            expected[row["payload"]["from"]] -= amount
            expected[row["payload"]["to"]] += amount
        else:
            assert row["status"].startswith("failed_"), row["status"]
    return expected

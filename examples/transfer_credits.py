"""Credit transfer between two customers on different shards, as a saga.

Shows the happy path, a retried request with the same transfer id (applied once), the
insufficient-funds path (nothing moves), and recovery of a transfer whose process died after the
debit. Balances are read from each customer's own shard.

Run it against your shards (``SHARD_1_URL``, ``SHARD_2_URL``, ...), or with no such variable it
starts four throwaway local PostgreSQL servers::

    SHARD_1_URL=postgresql+psycopg://app@db1/app SHARD_2_URL=... python examples/transfer_credits.py
    python examples/transfer_credits.py
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from decimal import Decimal

from sqlalchemy.orm import Session

from sa_shardkit import ShardManager
from sa_shardkit.demo.models import Base, Customer
from sa_shardkit.saga import CREDIT_TRANSFER, SagaOptions, create_saga_tables, recover, transfer
from sa_shardkit.testing import manager_from_env_or_local_fleet


class ProcessDied(BaseException):
    """Stands in for a crash (a BaseException, so no cleanup code of the runner runs)."""


def balance(manager: ShardManager, customer_id: int) -> Decimal:
    with Session(manager.engine_for(customer_id)) as session:
        customer = session.get(Customer, customer_id)
        assert customer is not None
        return customer.balance


def show(manager: ShardManager, label: str, *customers: int) -> None:
    parts = [f"customer {c} on {manager.shard_for(c)}: {balance(manager, c)}" for c in customers]
    print(f"{label:<42} " + " | ".join(parts))


def run(manager: ShardManager) -> None:
    for shard_id in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard_id))
    create_saga_tables(manager)  # or: alembic upgrade head (revision 0002_sagas)

    alice = 1
    bob = next(c for c in range(2, 100) if manager.shard_for(c) != manager.shard_for(alice))
    for customer_id, name in ((alice, "Alice"), (bob, "Bob")):
        with Session(manager.engine_for(customer_id)) as session, session.begin():
            session.merge(Customer(customer_id=customer_id, name=name, balance=Decimal(100)))
    show(manager, "start", alice, bob)

    request = f"transfer-{uuid.uuid4()}"
    outcome = transfer(manager, alice, bob, "25.00", transfer_id=request)
    show(manager, f"transfer 25: {outcome.status}", alice, bob)

    again = transfer(manager, alice, bob, "25.00", transfer_id=request)  # the client retried
    show(manager, f"same id again: {again.status}", alice, bob)

    refused = transfer(manager, alice, bob, 1000)
    show(manager, f"transfer 1000: {refused.status}", alice, bob)

    def die_after_debit(saga_id: str, checkpoint: str) -> None:
        if checkpoint == "log:debit":
            raise ProcessDied

    lease = 1.0
    with contextlib.suppress(ProcessDied):
        transfer(
            manager, alice, bob, 10, options=SagaOptions(lease_seconds=lease, on_checkpoint=die_after_debit)
        )
    show(manager, "crash after the debit", alice, bob)

    time.sleep(lease)  # the dead runner's lease runs out; a live runner would keep renewing it
    report = recover(manager, [CREDIT_TRANSFER], options=SagaOptions(lease_seconds=lease))
    show(manager, f"recover(): {len(report.completed)} completed", alice, bob)


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    with manager_from_env_or_local_fleet() as manager:
        run(manager)


if __name__ == "__main__":
    main()

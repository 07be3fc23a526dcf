"""The worked example: move credit between two customers who may live on different shards.

Step ``debit`` takes the amount from the sender (on the sender's shard, which also holds the saga
log); step ``credit`` adds it to the receiver (on the receiver's shard, with the transfer id recorded
in the same transaction). If the credit fails, the debit's compensation refunds the sender.
Statuses: ``pending`` -> ``debit_complete`` -> ``complete``, or ``failed_insufficient_funds``,
``failed_unknown_sender``, ``failed_unknown_receiver``, ``failed_credit_error``, ...
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import Column, Numeric, column, table
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import TableClause

from ..errors import SagaInputError, SagaStepFailed
from ..manager import ShardManager
from ..ring import ShardKey
from .definition import RECEIPT_RESERVED, FusedAction, Payload, Saga, SagaOptions, SagaOutcome, Step
from .runner import run_saga

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
"""Names usable unquoted in the fused SQL; other names keep the (two round trip) Core actions."""


def _sender(payload: Payload) -> ShardKey:
    key: ShardKey = payload["from"]
    return key


def _receiver(payload: Payload) -> ShardKey:
    key: ShardKey = payload["to"]
    return key


def credit_transfer_saga(
    name: str = "credit_transfer",
    *,
    table_name: str = "customers",
    key_column: str = "customer_id",
    balance_column: str = "balance",
) -> Saga:
    """A transfer saga over any table with a shard-key column and a numeric balance column."""
    accounts: TableClause = table(table_name, column(key_column), Column(balance_column, Numeric()))
    key = accounts.c[key_column]
    balance = accounts.c[balance_column]

    def add(conn: Connection, customer: Any, delta: Decimal) -> Decimal | None:
        query = accounts.update().where(key == customer).values({balance: balance + delta})
        if delta < 0:
            query = query.where(balance >= -delta)
        value: Decimal | None = conn.execute(query.returning(balance)).scalar()
        return value

    def exists(conn: Connection, customer: Any) -> bool:
        return (
            conn.execute(accounts.select().with_only_columns(key).where(key == customer)).first() is not None
        )

    def debit(conn: Connection, payload: Payload) -> None:
        if add(conn, payload["from"], -Decimal(payload["amount"])) is None:
            if not exists(conn, payload["from"]):
                raise SagaStepFailed("unknown_sender", f"sender {payload['from']!r} does not exist")
            raise SagaStepFailed("insufficient_funds", f"sender {payload['from']!r} cannot cover the amount")

    def refund(conn: Connection, payload: Payload) -> None:
        add(conn, payload["from"], Decimal(payload["amount"]))

    def credit(conn: Connection, payload: Payload) -> None:
        if add(conn, payload["to"], Decimal(payload["amount"])) is None:
            raise SagaStepFailed("unknown_receiver", f"receiver {payload['to']!r} does not exist")

    def take_back(conn: Connection, payload: Payload) -> None:
        add(conn, payload["to"], -Decimal(payload["amount"]))

    simple = all(_IDENTIFIER.match(n) for n in (table_name, key_column, balance_column))

    def fused(sign: str, customer: str, guard: str) -> FusedAction:
        sql = (
            f"UPDATE {table_name} SET {balance_column} = {balance_column} {sign} CAST(:amount AS numeric)"
            f" WHERE {key_column} = :customer{guard} AND " + RECEIPT_RESERVED + " RETURNING 1"
        )

        def statement(payload: Payload) -> tuple[str, dict[str, Any]]:
            return sql, {"amount": payload["amount"], "customer": payload[customer]}

        return statement

    fused_debit = fused("-", "from", f" AND {balance_column} >= CAST(:amount AS numeric)")
    fused_credit = fused("+", "to", "")

    return Saga(
        name,
        [
            Step("debit", _sender, debit, refund, fused=fused_debit if simple else None),
            Step("credit", _receiver, credit, take_back, fused=fused_credit if simple else None),
        ],
    )


CREDIT_TRANSFER = credit_transfer_saga()
"""The transfer saga over the demo ``customers`` table (``customer_id``, ``balance``)."""


def transfer_payload(from_customer: ShardKey, to_customer: ShardKey, amount: Decimal | int | str) -> Payload:
    """Validate a transfer's arguments before anything is written."""
    try:
        value = Decimal(amount) if not isinstance(amount, float) else None
    except (InvalidOperation, ValueError):
        value = None
    if value is None or not value.is_finite():
        raise SagaInputError(f"transfer amount must be a Decimal, int or numeric string, got {amount!r}")
    if value <= 0:
        raise SagaInputError(f"transfer amount must be positive, got {value}")
    if value != value.quantize(Decimal("0.01")):
        raise SagaInputError(f"transfer amount {value} has more than 2 decimal places")
    if from_customer == to_customer:
        raise SagaInputError(f"cannot transfer from customer {from_customer!r} to itself")
    for who, customer in (("sender", from_customer), ("receiver", to_customer)):
        if isinstance(customer, bool) or not isinstance(customer, (int, str)):
            raise SagaInputError(f"{who} must be an int or str customer id, got {customer!r}")
    return {"from": from_customer, "to": to_customer, "amount": str(value.quantize(Decimal("0.01")))}


def transfer(
    manager: ShardManager,
    from_customer: ShardKey,
    to_customer: ShardKey,
    amount: Decimal | int | str,
    *,
    transfer_id: str | None = None,
    saga: Saga = CREDIT_TRANSFER,
    options: SagaOptions | None = None,
) -> SagaOutcome:
    """Move ``amount`` from one customer to another, exactly once per ``transfer_id``.

    Returns the final outcome (``outcome.status`` is ``complete`` or ``failed_<reason>``); raises
    :class:`~sa_shardkit.errors.SagaPendingError` when a shard outage leaves it half-done (recovery
    finishes it; calling again with the same ``transfer_id`` is safe).
    """
    payload = transfer_payload(from_customer, to_customer, amount)
    return run_saga(manager, saga, payload, saga_id=transfer_id, options=options)

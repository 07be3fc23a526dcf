"""Shared fixtures for the ShardedSession tests: schema on every shard, per-shard SQL capture.

Test modules import the ``*_fixture`` functions; pytest knows them by their ``name=``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import BigInteger, ForeignKeyConstraint, Integer, String, UniqueConstraint, event, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from sa_shardkit import ShardManager
from sa_shardkit.demo.models import Base, Customer, Order, OrderItem
from sa_shardkit.replicas import INTERNAL


class ExtraBase(DeclarativeBase):
    pass


class Ticket(ExtraBase):
    """Sharded by customer_id, but its primary key does not hold the key (get() must search)."""

    __tablename__ = "tickets"
    __shard_key__ = "customer_id"
    __table_args__ = (UniqueConstraint("ticket_id", "customer_id"),)

    ticket_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    customer_id: Mapped[int] = mapped_column(BigInteger)
    subject: Mapped[str] = mapped_column(String(100), default="")


class Invoice(ExtraBase):
    """A one-to-many without a back reference: its lines cannot name their parent themselves."""

    __tablename__ = "invoices"
    __shard_key__ = "customer_id"

    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    invoice_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    lines: Mapped[list[InvoiceLine]] = relationship(cascade="all, delete-orphan")


class InvoiceLine(ExtraBase):
    __tablename__ = "invoice_lines"
    __shard_key__ = "customer_id"
    __table_args__ = (
        ForeignKeyConstraint(["customer_id", "invoice_id"], ["invoices.customer_id", "invoices.invoice_id"]),
    )

    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    invoice_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    line_no: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


class AuditNote(ExtraBase):
    """Declares neither a shard key nor reference: the sharded session must refuse it."""

    __tablename__ = "audit_notes"

    note_id: Mapped[int] = mapped_column(Integer, primary_key=True)


def create_schema(manager: ShardManager) -> None:
    for shard_id in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard_id))
        ExtraBase.metadata.create_all(manager.engine(shard_id))


def rows_by_shard(manager: ShardManager, sql: str) -> dict[str, list[tuple[Any, ...]]]:
    """Run ``sql`` on every shard directly (no session) and return the rows per shard."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for shard_id in manager.shard_ids:
        with manager.engine(shard_id).connect() as conn:
            out[shard_id] = [tuple(r) for r in conn.execute(text(sql))]
    return out


def shards_holding(manager: ShardManager, sql: str) -> set[str]:
    return {shard for shard, rows in rows_by_shard(manager, sql).items() if rows}


def keys_on_distinct_shards(manager: ShardManager, count: int = 2) -> list[int]:
    """``count`` customer ids that the ring puts on ``count`` different shards."""
    found: dict[str, int] = {}
    key = 1
    while len(found) < count:
        found.setdefault(manager.shard_for(key), key)
        key += 1
    return list(found.values())


def make_customer(customer_id: int, orders: int = 1, items: int = 1) -> Customer:
    customer = Customer(customer_id=customer_id, name=f"c{customer_id}", balance=Decimal(10))
    for _ in range(orders):
        order = Order(order_id=uuid.uuid4(), status="pending", total=Decimal(5))
        order.items = [OrderItem(item_no=i, sku=f"SKU-{i}", unit_price=Decimal(1)) for i in range(items)]
        customer.orders.append(order)
    return customer


class SqlLog:
    """Statements each shard's engine actually ran (to prove which shards a call touched)."""

    def __init__(self, manager: ShardManager) -> None:
        self.statements: list[tuple[str, str]] = []
        self._manager = manager
        self._listeners = []
        for shard_id, engine in manager.engines.items():

            def record(conn: Any, cursor: Any, statement: str, *args: Any, _shard: str = shard_id) -> None:
                if conn.get_execution_options().get(INTERNAL):
                    return  # routing's own periodic read of the stored ring, not the application's
                self.statements.append((_shard, statement))

            event.listen(engine, "before_cursor_execute", record)
            self._listeners.append((engine, record))

    def clear(self) -> None:
        self.statements.clear()

    def shards(self, containing: str = "") -> set[str]:
        """Shards that ran a statement containing ``containing`` (case-insensitive)."""
        needle = containing.lower()
        return {s for s, sql in self.statements if needle in sql.lower()}

    def close(self) -> None:
        for engine, fn in self._listeners:
            event.remove(engine, "before_cursor_execute", fn)


@pytest.fixture(name="schema")
def schema_fixture(manager: ShardManager) -> ShardManager:
    create_schema(manager)
    return manager


@pytest.fixture(name="Session")
def session_factory_fixture(schema: ShardManager) -> sessionmaker[Any]:
    return schema.sessionmaker()


@pytest.fixture(name="sql_log")
def sql_log_fixture(schema: ShardManager) -> Iterator[SqlLog]:
    log = SqlLog(schema)
    yield log
    log.close()

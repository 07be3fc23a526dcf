"""Demo models: ordinary SQLAlchemy 2.x declarative classes with the shard key declared once.

``__shard_key__`` names the attribute whose value picks the shard; every sharded table carries that
column in its primary key, so a customer's rows (and joins between them) stay on one shard.
``__shard_reference__ = True`` marks a reference table: the same rows on every shard.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

from sqlalchemy import BigInteger, DateTime, ForeignKeyConstraint, Integer, Numeric, String, Uuid, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    __shard_key__ = "customer_id"

    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200))
    balance: Mapped[Decimal] = mapped_column(Numeric(14, 2), default=Decimal("0"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    orders: Mapped[list[Order]] = relationship(back_populates="customer", cascade="all, delete-orphan")


class Order(Base):
    __tablename__ = "orders"
    __shard_key__ = "customer_id"
    __table_args__ = (ForeignKeyConstraint(["customer_id"], ["customers.customer_id"], ondelete="CASCADE"),)

    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    order_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    status: Mapped[str] = mapped_column(String(20), default="pending", index=True)
    total: Mapped[Decimal] = mapped_column(Numeric(14, 2), default=Decimal("0"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    customer: Mapped[Customer] = relationship(back_populates="orders")
    items: Mapped[list[OrderItem]] = relationship(back_populates="order", cascade="all, delete-orphan")


class OrderItem(Base):
    __tablename__ = "order_items"
    __shard_key__ = "customer_id"
    __table_args__ = (
        ForeignKeyConstraint(
            ["customer_id", "order_id"], ["orders.customer_id", "orders.order_id"], ondelete="CASCADE"
        ),
    )

    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    order_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    item_no: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    sku: Mapped[str] = mapped_column(String(64))
    quantity: Mapped[int] = mapped_column(Integer, default=1)
    unit_price: Mapped[Decimal] = mapped_column(Numeric(14, 2))

    order: Mapped[Order] = relationship(back_populates="items")


class Product(Base):
    """A reference table: every shard holds the same rows, so joins to it stay local."""

    __tablename__ = "products"
    __shard_reference__ = True

    sku: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    price: Mapped[Decimal] = mapped_column(Numeric(14, 2))

"""Models with lookups for tests/test_lookups*.py (importable by the writer subprocesses)."""

from __future__ import annotations

from sqlalchemy import BigInteger, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from sa_shardkit import Lookup, ShardManager, ShardSequence, create_sequence_tables
from sa_shardkit.lookups.build import build_lookup, create_lookup_tables
from sa_shardkit.lookups.declaration import declared_lookups


class Base(DeclarativeBase):
    pass


class LkCustomer(Base):
    __tablename__ = "lk_customers"
    __shard_key__ = "customer_id"
    __shard_lookups__ = (Lookup("email", unique=True),)
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    email: Mapped[str | None] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(50), default="")


class LkOrder(Base):
    __tablename__ = "lk_orders"
    __table_args__ = (
        UniqueConstraint("customer_id", "order_id"),
    )  # order_id alone: fleet-unique by its sequence
    __shard_key__ = "customer_id"
    __shard_lookups__ = ("order_id",)
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, default=ShardSequence("lk_orders"))
    customer_id: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20), default="new")
    shipments: Mapped[list[LkShipment]] = relationship(
        primaryjoin="LkOrder.order_id == foreign(LkShipment.order_id)", viewonly=True
    )


class LkShipment(Base):
    __tablename__ = "lk_shipments"
    __table_args__ = (UniqueConstraint("customer_id", "shipment_id"),)
    __shard_key__ = "customer_id"
    __shard_lookups__ = ("order_id",)
    shipment_id: Mapped[int] = mapped_column(
        BigInteger, primary_key=True, default=ShardSequence("lk_shipments")
    )
    customer_id: Mapped[int] = mapped_column(BigInteger)
    order_id: Mapped[int] = mapped_column(BigInteger)


def create_schema(manager: ShardManager, *, build: bool = True) -> None:
    """Owner tables, lookup tables and sequences on every shard; lookups built (empty: instant)."""
    for shard in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard))
    create_sequence_tables(manager)
    create_lookup_tables(manager)
    if build:
        for index in declared_lookups():
            if index.owner.metadata is Base.metadata:
                build_lookup(manager, index)

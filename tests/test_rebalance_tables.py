"""Which tables a rebalance moves: read from the one declaration reader, sa_shardkit.declarative."""

from __future__ import annotations

import pytest
from sqlalchemy import ForeignKeyConstraint, Integer, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sa_shardkit.declarative import sharding_of
from sa_shardkit.demo.models import Base, Customer, Order, OrderItem, Product
from sa_shardkit.errors import NotShardedError
from sa_shardkit.rebalance import table_set


def test_models_are_read_as_declarative_reads_them_parents_first() -> None:
    tables = table_set(Base)
    assert [t.name for t in tables.sharded] == ["customers", "orders", "order_items"]
    for spec, model in zip(tables.sharded, (Customer, Order, OrderItem), strict=True):
        assert spec.key.name == sharding_of(model).column_name
    assert [t.name for t in tables.reference] == [Product.__tablename__]


def test_a_key_attribute_named_unlike_its_column_moves_by_the_column() -> None:
    class Local(DeclarativeBase):
        pass

    class Account(Local):
        __tablename__ = "accounts"
        __shard_key__ = "owner"
        owner: Mapped[int] = mapped_column("owner_id", Integer, primary_key=True)
        name: Mapped[str] = mapped_column(String)

    (spec,) = table_set(Local).sharded
    assert spec.key is Account.__table__.c.owner_id


def test_a_malformed_declaration_raises_naming_the_model() -> None:
    class Local(DeclarativeBase):
        pass

    class Ledger(Local):
        __tablename__ = "ledgers"
        __shard_key__ = "owner_id"
        __shard_reference__ = True
        owner_id: Mapped[int] = mapped_column(primary_key=True)

    with pytest.raises(NotShardedError, match="Ledger declares both"):
        table_set(Local)


def test_a_metadata_of_mapped_tables_is_read_through_their_models() -> None:
    tables = table_set(Base.metadata)
    assert [t.name for t in tables.sharded] == ["customers", "orders", "order_items"]


def test_core_tables_declare_through_info() -> None:
    from sqlalchemy import Column, Table

    metadata = MetaData()
    Table("parents", metadata, Column("tenant", Integer, primary_key=True), info={"shard_key": "tenant"})
    Table(
        "kids",
        metadata,
        Column("tenant", Integer, primary_key=True),
        Column("n", Integer, primary_key=True),
        ForeignKeyConstraint(["tenant"], ["parents.tenant"]),
        info={"shard_key": "tenant"},
    )
    Table("codes", metadata, Column("code", String, primary_key=True), info={"shard_reference": True})
    tables = table_set(metadata)
    assert [(t.name, t.key.name) for t in tables.sharded] == [("parents", "tenant"), ("kids", "tenant")]
    assert [t.name for t in tables.reference] == ["codes"]

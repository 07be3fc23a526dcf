"""Beyond the shard key: orders found by order_id alone, an email unique across the fleet, and ids
from fleet-wide sequences (``python examples/lookups_shop.py``; SHARD_<N>_URL or local servers)."""

from __future__ import annotations

import sys
from typing import Any

from sqlalchemy import BigInteger, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sa_shardkit import DuplicateKeyError, Lookup, ShardManager, ShardSequence, create_sequence_tables
from sa_shardkit.lookups import lookups_of
from sa_shardkit.lookups.build import build_lookup, create_lookup_tables
from sa_shardkit.testing import manager_from_env_or_local_fleet


class Base(DeclarativeBase):
    pass


class ShopCustomer(Base):
    __tablename__ = "shop_customers"
    __shard_key__ = "customer_id"
    __shard_lookups__ = (Lookup("email", unique=True),)  # unique across the fleet
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, default=ShardSequence("customers"))
    email: Mapped[str] = mapped_column(String(100))


class ShopOrder(Base):
    __tablename__ = "shop_orders"
    __shard_key__ = "customer_id"
    __shard_lookups__ = ("order_id",)  # find an order by its id alone
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, default=ShardSequence("orders"))
    item: Mapped[str] = mapped_column(String(50))


def create_schema(manager: ShardManager) -> None:
    for shard in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard))
    create_sequence_tables(manager)
    create_lookup_tables(manager)
    for model in (ShopCustomer, ShopOrder):
        for index in lookups_of(model.__mapper__):
            build_lookup(manager, index)  # empty tables: ready at once (existing rows: backfilled)


def run(manager: ShardManager, out: Any = sys.stdout) -> dict[str, Any]:
    create_schema(manager)
    Session = manager.sessionmaker()
    order_ids = []
    for n in range(8):
        with Session() as session:
            customer = ShopCustomer(email=f"user{n}@example.com")  # customer_id from the sequence
            session.add(customer)
            session.flush()
            order = ShopOrder(customer_id=customer.customer_id, item=f"book {n}")
            session.add(order)
            session.commit()
            order_ids.append(order.order_id)
    wanted = order_ids[3]
    stmt = select(ShopOrder).where(ShopOrder.order_id == wanted)
    with Session() as session:
        found = session.scalars(stmt).one()
    print(
        f"order {wanted}: {found.item!r} of customer {found.customer_id}, read on {manager.shards_for(stmt)}",
        file=out,
    )
    refused = None
    with Session() as session:
        session.add(ShopCustomer(email="user2@example.com"))
        try:
            session.commit()
        except DuplicateKeyError as error:
            refused = error
            print(f"refused: {error}", file=out)
    return {"order": found, "shards": manager.shards_for(stmt), "refused": refused}


def main() -> None:
    with manager_from_env_or_local_fleet() as manager:
        run(manager)


if __name__ == "__main__":
    main()

"""The owner tables of :mod:`tests.lookup_models` as plain Core tables, no lookup declared: what
``shardkit rebalance --models tests.lookup_models_core:metadata`` gets when the mover never
imports the application's models (their lookups must still move, found on the shards)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, MetaData, String, Table

metadata = MetaData()
KEY = {"shard_key": "customer_id"}

Table(
    "lk_customers",
    metadata,
    Column("customer_id", BigInteger, primary_key=True),
    Column("email", String(100)),
    Column("name", String(50)),
    info=KEY,
)
Table(
    "lk_orders",
    metadata,
    Column("order_id", BigInteger, primary_key=True),
    Column("customer_id", BigInteger),
    Column("status", String(20)),
    info=KEY,
)
Table(
    "lk_shipments",
    metadata,
    Column("shipment_id", BigInteger, primary_key=True),
    Column("customer_id", BigInteger),
    Column("order_id", BigInteger),
    info=KEY,
)

"""Code written for SQLAlchemy's stock ShardedSession runs unchanged on sa_shardkit's."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, delete, insert, select
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.horizontal_shard import set_shard_id

from sa_shardkit import ShardedSession, ShardManager
from sa_shardkit.demo.models import Customer, Order
from tests.session_support import (  # noqa: F401 - fixtures
    rows_by_shard,
    schema_fixture,
    session_factory_fixture,
)


def _stock_session(engines: dict[str, Any]) -> ShardedSession:
    """The stock example's hooks: even ids on shard-1, odd ids on shard-2."""

    def shard_chooser(mapper: Any, instance: Any, clause: Any = None) -> str:
        return "shard-1" if instance.customer_id % 2 == 0 else "shard-2"

    def identity_chooser(mapper: Any, primary_key: Any, **kw: Any) -> list[str]:
        return ["shard-1", "shard-2"]

    def execute_chooser(orm_context: Any) -> list[str]:
        return ["shard-1", "shard-2"]

    return ShardedSession(
        shard_chooser=shard_chooser,
        identity_chooser=identity_chooser,
        execute_chooser=execute_chooser,
        shards=engines,
    )


def test_stock_hooks_keep_their_meaning(schema: ShardManager) -> None:
    engines = {"shard-1": schema.engine("shard-1"), "shard-2": schema.engine("shard-2")}
    with _stock_session(engines) as session:
        session.add_all([Customer(customer_id=i, name=str(i)) for i in range(1, 5)])
        session.commit()  # stock: writing to two shards in one transaction is allowed
        assert sorted(c.customer_id for c in session.scalars(select(Customer))) == [1, 2, 3, 4]
        assert session.get(Customer, 3) is not None
        assert session.scalars(select(Customer).options(set_shard_id("shard-1"))).all() != []
        pinned = session.scalars(select(Customer), bind_arguments={"shard_id": "shard-2"}).all()
        assert {c.customer_id for c in pinned} == {1, 3}
        assert session.get(Customer, 2, identity_token="shard-1") is not None
    placed = rows_by_shard(schema, "SELECT customer_id FROM customers ORDER BY 1")
    assert placed["shard-1"] == [(2,), (4,)] and placed["shard-2"] == [(1,), (3,)]


def test_stock_session_sums_rowcount_of_a_delete_on_every_shard(schema: ShardManager) -> None:
    engines = {"shard-1": schema.engine("shard-1"), "shard-2": schema.engine("shard-2")}
    with _stock_session(engines) as session:
        session.add_all([Customer(customer_id=i, name=str(i)) for i in range(1, 5)])
        session.commit()
        assert session.execute(delete(Customer)).rowcount == 4  # type: ignore[attr-defined]
        session.commit()
    assert rows_by_shard(schema, "SELECT count(*) FROM customers")["shard-1"] == [(0,)]


def test_explicit_hooks_override_the_managers(schema: ShardManager) -> None:
    def everything_on_shard_4(mapper: Any, instance: Any, clause: Any = None) -> str:
        return "shard-4"

    with ShardedSession(manager=schema, shard_chooser=everything_on_shard_4) as session, session.begin():
        session.add_all([Customer(customer_id=i, name="x") for i in range(1, 6)])
    assert rows_by_shard(schema, "SELECT count(*) FROM customers")["shard-4"] == [(5,)]


def test_session_without_hooks_or_manager_is_an_argument_error() -> None:
    with pytest.raises(ArgumentError, match="manager"):
        ShardedSession()


def test_manager_session_splits_a_bulk_insert_by_shard_key(Session: Any, schema: ShardManager) -> None:  # noqa: N803
    rows = [{"customer_id": i, "name": f"c{i}"} for i in range(1, 21)]
    with schema.sessionmaker(allow_cross_shard=True)() as session, session.begin():
        session.execute(insert(Customer), rows)
    placed = rows_by_shard(schema, "SELECT customer_id FROM customers")
    assert sum(len(r) for r in placed.values()) == 20
    for shard_id, ids in placed.items():
        assert all(schema.shard_for(cid) == shard_id for (cid,) in ids)


def test_sqlite_engines_work_as_shards(tmp_path: Any) -> None:
    manager = ShardManager.from_urls({f"s{i}": f"sqlite:///{tmp_path}/s{i}.db" for i in range(2)})
    with manager:
        for shard_id in manager.shard_ids:
            Customer.metadata.create_all(create_engine(f"sqlite:///{tmp_path}/{shard_id}.db"))
        with manager.sessionmaker()() as session, session.begin():
            session.add(Customer(customer_id=1, name="x"))
            session.add(Order(customer_id=1))
        with manager.sessionmaker()() as session:
            assert session.get(Customer, 1) is not None

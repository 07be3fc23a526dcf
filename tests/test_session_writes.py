"""ShardedSession writes: flush routing, cascades, missing keys, cross-shard transactions.

Every test checks where rows physically landed by querying each shard directly.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from sa_shardkit import HashRing, ShardManager, errors
from sa_shardkit.demo.models import Customer, Order, OrderItem
from tests.session_support import (  # noqa: F401 - fixtures
    AuditNote,
    Invoice,
    InvoiceLine,
    make_customer,
    rows_by_shard,
    schema_fixture,
    session_factory_fixture,
    shards_holding,
)


def test_add_writes_the_row_to_the_shard_of_its_key(Session: sessionmaker[Any], schema: ShardManager) -> None:  # noqa: N803
    with Session() as session, session.begin():
        session.add(Customer(customer_id=42, name="x"))
    assert shards_holding(schema, "SELECT 1 FROM customers WHERE customer_id = 42") == {schema.shard_for(42)}


def test_many_customers_each_land_on_their_ring_shard(
    Session: sessionmaker[Any], schema: ShardManager
) -> None:  # noqa: N803
    for customer_id in range(1, 41):
        with Session() as session, session.begin():
            session.add(Customer(customer_id=customer_id, name="x"))
    placed = rows_by_shard(schema, "SELECT customer_id FROM customers")
    assert sum(len(rows) for rows in placed.values()) == 40
    for shard_id, rows in placed.items():
        assert all(schema.shard_for(cid) == shard_id for (cid,) in rows)
    assert len([s for s, rows in placed.items() if rows]) == 4


def test_children_in_a_cascade_go_to_the_parents_shard(
    Session: sessionmaker[Any], schema: ShardManager
) -> None:  # noqa: N803
    with Session() as session, session.begin():
        session.add(make_customer(7, orders=2, items=3))
    home = {schema.shard_for(7)}
    assert shards_holding(schema, "SELECT 1 FROM orders WHERE customer_id = 7") == home
    assert shards_holding(schema, "SELECT 1 FROM order_items WHERE customer_id = 7") == home
    counts = rows_by_shard(schema, "SELECT count(*) FROM order_items")
    assert counts[schema.shard_for(7)] == [(6,)]


def test_child_added_later_to_a_loaded_parent_goes_to_the_parents_shard(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
) -> None:
    with Session() as session, session.begin():
        session.add(Customer(customer_id=8, name="x"))
    with Session() as session, session.begin():
        customer = session.get(Customer, 8)
        assert customer is not None
        customer.orders.append(Order(order_id=uuid.uuid4()))
    assert shards_holding(schema, "SELECT 1 FROM orders WHERE customer_id = 8") == {schema.shard_for(8)}


def test_children_of_a_one_way_collection_go_to_the_parents_shard(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
) -> None:
    with Session() as session, session.begin():
        session.add(Invoice(customer_id=13, invoice_id=1, lines=[InvoiceLine(line_no=i) for i in range(3)]))
    assert shards_holding(schema, "SELECT 1 FROM invoice_lines WHERE customer_id = 13") == {
        schema.shard_for(13)
    }


def test_line_appended_to_a_stored_one_way_parent_goes_to_its_shard(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
) -> None:
    with Session() as session, session.begin():
        session.add(Invoice(customer_id=14, invoice_id=1))
    with Session() as session, session.begin():
        invoice = session.get(Invoice, (14, 1))
        assert invoice is not None
        session.expire(invoice, ["customer_id"])
        invoice.lines.append(InvoiceLine(line_no=1))
    assert shards_holding(schema, "SELECT 1 FROM invoice_lines WHERE customer_id = 14") == {
        schema.shard_for(14)
    }


def test_missing_shard_key_raises_before_anything_is_written(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
) -> None:
    with Session() as session:
        session.add(Customer(customer_id=5, name="fine"))
        session.add(Customer(name="no key"))
        with pytest.raises(errors.ShardKeyMissingError, match=r"Customer\.customer_id"):
            session.commit()
    assert shards_holding(schema, "SELECT 1 FROM customers") == set()


def test_orphan_child_without_key_raises_shard_key_missing(Session: sessionmaker[Any]) -> None:  # noqa: N803
    with Session() as session:
        session.add(OrderItem(order_id=uuid.uuid4(), item_no=1, sku="x", unit_price=Decimal(1)))
        with pytest.raises(errors.ShardKeyMissingError, match=r"OrderItem\.customer_id"):
            session.flush()


def test_model_without_declaration_raises_not_sharded(
    Session: sessionmaker[Any], schema: ShardManager
) -> None:  # noqa: N803
    with Session() as session:
        session.add(AuditNote(note_id=1))
        with pytest.raises(errors.NotShardedError, match="AuditNote"):
            session.flush()
        session.rollback()
        with pytest.raises(errors.NotShardedError, match="AuditNote"):
            session.execute(select(AuditNote))
    assert shards_holding(schema, "SELECT 1 FROM audit_notes") == set()


def test_writing_two_shards_in_one_transaction_raises_naming_both(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
) -> None:
    a, b = _keys_on_two_shards(schema)
    with Session() as session:
        session.add(Customer(customer_id=a, name="a"))
        session.add(Customer(customer_id=b, name="b"))
        with pytest.raises(errors.CrossShardTransactionError) as info:
            session.commit()
    message = str(info.value)
    assert schema.shard_for(a) in message and schema.shard_for(b) in message
    assert shards_holding(schema, "SELECT 1 FROM customers") == set()


def test_cross_shard_check_spans_flushes_of_one_transaction(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
) -> None:
    a, b = _keys_on_two_shards(schema)
    with Session() as session:
        session.add(Customer(customer_id=a, name="a"))
        session.flush()
        session.add(Customer(customer_id=b, name="b"))
        with pytest.raises(errors.CrossShardTransactionError):
            session.flush()
        session.rollback()
    assert shards_holding(schema, "SELECT 1 FROM customers") == set()


def test_next_transaction_may_use_another_shard(Session: sessionmaker[Any], schema: ShardManager) -> None:  # noqa: N803
    a, b = _keys_on_two_shards(schema)
    with Session() as session:
        session.add(Customer(customer_id=a, name="a"))
        session.commit()
        session.add(Customer(customer_id=b, name="b"))
        session.commit()
    assert shards_holding(schema, "SELECT 1 FROM customers") == {schema.shard_for(a), schema.shard_for(b)}


def test_allow_cross_shard_opt_in_writes_both_shards(schema: ShardManager) -> None:
    a, b = _keys_on_two_shards(schema)
    with schema.sessionmaker(allow_cross_shard=True)() as session, session.begin():
        session.add(Customer(customer_id=a, name="a"))
        session.add(Customer(customer_id=b, name="b"))
    assert shards_holding(schema, "SELECT 1 FROM customers") == {schema.shard_for(a), schema.shard_for(b)}


def test_error_rolls_back_the_whole_shard_transaction(
    Session: sessionmaker[Any], schema: ShardManager
) -> None:  # noqa: N803
    with Session() as session:
        session.add(make_customer(3, orders=1, items=1))
        session.flush()
        session.add(Order(customer_id=3, order_id=uuid.uuid4(), status="far too long for twenty chars"))
        with pytest.raises(Exception, match="too long"):
            session.commit()
    assert shards_holding(schema, "SELECT 1 FROM customers UNION ALL SELECT 1 FROM orders") == set()


def test_loaded_object_is_written_back_to_its_shard_after_the_ring_changes(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
) -> None:
    with Session() as session, session.begin():
        session.add(Customer(customer_id=11, name="before"))
    home = schema.shard_for(11)
    others = [s for s in schema.shard_ids if s != home]
    with Session() as session:
        customer = session.get(Customer, 11)
        assert customer is not None
        schema.set_ring(HashRing(others))  # the key now maps elsewhere
        assert schema.shard_for(11) != home
        customer.name = "after"
        session.commit()
    assert rows_by_shard(schema, "SELECT name FROM customers WHERE customer_id = 11")[home] == [("after",)]
    assert shards_holding(schema, "SELECT 1 FROM customers") == {home}


def test_changing_the_shard_key_of_a_stored_row_to_another_shard_raises(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
) -> None:
    a, b = _keys_on_two_shards(schema)
    with Session() as session, session.begin():
        session.add(Customer(customer_id=a, name="x"))
    with Session() as session:
        customer = session.get(Customer, a)
        assert customer is not None
        customer.customer_id = b
        with pytest.raises(errors.ShardKeyChangeError, match="customer_id changed"):
            session.commit()
    assert rows_by_shard(schema, f"SELECT customer_id FROM customers WHERE customer_id = {a}")[
        schema.shard_for(a)
    ] == [(a,)]


def test_deleting_a_loaded_object_deletes_on_its_shard(
    Session: sessionmaker[Any], schema: ShardManager
) -> None:  # noqa: N803
    with Session() as session, session.begin():
        session.add(make_customer(9, orders=2))
    with Session() as session, session.begin():
        customer = session.get(Customer, 9)
        session.delete(customer)
    assert shards_holding(schema, "SELECT 1 FROM customers UNION ALL SELECT 1 FROM orders") == set()


def test_pinned_session_writes_every_row_to_the_pinned_shard(schema: ShardManager) -> None:
    target = "shard-2"
    keys = [k for k in range(1, 50) if schema.shard_for(k) != target][:3]
    with schema.sessionmaker(shard_id=target)() as session, session.begin():
        for key in keys:
            session.add(Customer(customer_id=key, name="pinned"))
    assert shards_holding(schema, "SELECT 1 FROM customers") == {target}


def test_pinning_to_an_unknown_shard_raises(schema: ShardManager) -> None:
    with pytest.raises(errors.UnknownShardError, match="shard-9"):
        schema.sessionmaker(shard_id="shard-9")()


def _keys_on_two_shards(manager: ShardManager) -> tuple[int, int]:
    first = 1
    second = next(k for k in range(2, 1000) if manager.shard_for(k) != manager.shard_for(first))
    return first, second


def test_flush_logs_where_each_row_went_and_why(
    Session: sessionmaker[Any],  # noqa: N803
    schema: ShardManager,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    with caplog.at_level(logging.DEBUG, logger="sa_shardkit"), Session() as session, session.begin():
        session.add(make_customer(12, orders=1, items=1))
    home = schema.shard_for(12)
    assert f"flush INSERT Customer(customer_id=12) -> {home}" in caplog.text
    assert f"flush INSERT OrderItem(customer_id=None) -> {home}" in caplog.text


def test_cross_shard_opt_in_with_twophase_commits_both_shards(schema: ShardManager) -> None:
    a, b = _keys_on_two_shards(schema)
    with schema.sessionmaker(allow_cross_shard=True, twophase=True)() as session, session.begin():
        session.add(Customer(customer_id=a, name="a"))
        session.add(Customer(customer_id=b, name="b"))
    assert shards_holding(schema, "SELECT 1 FROM customers") == {schema.shard_for(a), schema.shard_for(b)}
    assert shards_holding(schema, "SELECT gid FROM pg_prepared_xacts") == set()

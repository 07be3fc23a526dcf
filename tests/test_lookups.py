"""Lookups route by a non-key column to exactly the owners' shards, and follow every write."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.orm import selectinload

from sa_shardkit import DuplicateKeyError, LookupIndexError, QueryEvent, ShardManager, ShardUnavailableError
from sa_shardkit.lookups import lookup_named
from sa_shardkit.lookups.build import build_lookup, repair_lookup
from sa_shardkit.lookups.store import forget_readiness
from tests.fleet import TestFleet
from tests.lookup_models import LkCustomer, LkOrder, LkShipment, create_schema

ORDERS = "LkOrder.order_id"


def entries(manager: ShardManager, name: str) -> dict[str, set[tuple[int, int]]]:
    """Every entry of a lookup, by the shard it physically lives on."""
    table = lookup_named(name).table
    found = {}
    for shard in manager.shard_ids:
        with manager.connect(shard) as conn:
            found[shard] = {(v, k) for v, k in conn.execute(select(table.c.value, table.c.shard_key))}
    return found


def seed(manager: ShardManager, customers: int = 12, per_customer: int = 3) -> dict[int, int]:
    """Orders for customers 1..N through the session; order_id -> customer_id."""
    owners = {}
    maker = manager.sessionmaker()
    for cid in range(1, customers + 1):
        with maker() as session:
            orders = [LkOrder(customer_id=cid) for _ in range(per_customer)]
            session.add_all(orders)
            session.commit()
            owners.update({o.order_id: cid for o in orders})
    return owners


@pytest.fixture
def fleet(manager: ShardManager) -> ShardManager:
    create_schema(manager)
    forget_readiness()
    return manager


def test_every_entry_lives_on_its_values_shard_and_names_the_owner(fleet: ShardManager) -> None:
    owners = seed(fleet)
    stored = entries(fleet, ORDERS)
    assert sum(len(v) for v in stored.values()) == len(owners)
    for shard, pairs in stored.items():
        for value, key in pairs:
            assert fleet.shard_for(value) == shard
            assert owners[value] == key


def test_select_by_looked_up_column_routes_to_the_owner_only(fleet: ShardManager) -> None:
    owners = seed(fleet)
    order_id, customer_id = next(iter(owners.items()))
    stmt = select(LkOrder).where(LkOrder.order_id == order_id)
    assert fleet.shards_for(stmt) == (fleet.shard_for(customer_id),)
    several = list(owners)[:6]
    expected = tuple(s for s in fleet.shard_ids if s in {fleet.shard_for(owners[o]) for o in several})
    assert fleet.shards_for(select(LkOrder).where(LkOrder.order_id.in_(several))) == expected
    ran: list[str] = []
    fleet.events.add(lambda e: ran.append(e.shard_id) if "FROM lk_orders" in e.statement else None)
    with fleet.sessionmaker()() as session:
        found = session.scalars(stmt).one()
        assert (found.order_id, found.customer_id) == (order_id, customer_id)
        assert sorted(
            o.order_id for o in session.scalars(select(LkOrder).where(LkOrder.order_id.in_(several)))
        ) == sorted(several)
    assert ran[0] == fleet.shard_for(customer_id)
    assert sorted(ran[1:]) == sorted(expected)


def test_the_route_says_it_came_from_the_lookup(fleet: ShardManager) -> None:
    from sa_shardkit import route_statement

    owners = seed(fleet, customers=2, per_customer=1)
    route = route_statement(fleet, select(LkOrder).where(LkOrder.order_id == next(iter(owners))))
    assert "lookup LkOrder.order_id" in route.reason


def test_an_unknown_value_reads_one_shard_and_finds_nothing(fleet: ShardManager) -> None:
    seed(fleet, customers=2, per_customer=1)
    assert len(fleet.shards_for(select(LkOrder).where(LkOrder.order_id == 999_999))) == 1
    with fleet.sessionmaker()() as session:
        assert session.scalars(select(LkOrder).where(LkOrder.order_id == 999_999)).all() == []


def test_get_by_a_looked_up_primary_key_goes_to_the_owner(fleet: ShardManager) -> None:
    owners = seed(fleet, customers=8, per_customer=1)
    order_id, customer_id = next(iter(owners.items()))
    ran: list[QueryEvent] = []
    fleet.events.add(lambda e: ran.append(e) if "FROM lk_orders" in e.statement else None)
    with fleet.sessionmaker()() as session:
        order = session.get(LkOrder, order_id)
        assert order is not None and order.customer_id == customer_id
    assert [e.shard_id for e in ran] == [fleet.shard_for(customer_id)]


def test_relationship_loads_filtering_on_the_looked_up_column_route_by_it(fleet: ShardManager) -> None:
    owners = seed(fleet, customers=6, per_customer=1)
    with fleet.sessionmaker()() as session:
        for order_id, cid in owners.items():
            session.add(LkShipment(customer_id=cid, order_id=order_id))
            session.commit()
    ran: list[str] = []
    fleet.events.add(lambda e: ran.append(e.shard_id) if "FROM lk_shipments" in e.statement else None)
    picked = list(owners)[:2]
    with fleet.sessionmaker()() as session:
        orders = session.scalars(
            select(LkOrder).where(LkOrder.order_id.in_(picked)).options(selectinload(LkOrder.shipments))
        ).all()
        assert sorted(s.order_id for o in orders for s in o.shipments) == sorted(picked)
    assert set(ran) == {fleet.shard_for(owners[o]) for o in picked}


def test_before_the_build_a_lookup_is_not_trusted(manager: ShardManager) -> None:
    create_schema(manager, build=False)
    forget_readiness()
    seed(manager, customers=2, per_customer=1)  # writes maintain it already
    assert manager.shards_for(select(LkOrder).where(LkOrder.order_id == 1)) == manager.shard_ids
    build_lookup(manager, lookup_named(ORDERS))
    assert len(manager.shards_for(select(LkOrder).where(LkOrder.order_id == 1))) == 1


def test_delete_removes_the_entry_after_commit(fleet: ShardManager) -> None:
    owners = seed(fleet, customers=3, per_customer=2)
    order_id = next(iter(owners))
    with fleet.sessionmaker()() as session:
        session.delete(session.get(LkOrder, order_id))
        session.flush()
        assert (order_id, owners[order_id]) in entries(fleet, ORDERS)[fleet.shard_for(order_id)]
        session.commit()
    assert all(v != order_id for pairs in entries(fleet, ORDERS).values() for v, _ in pairs)


def test_changing_the_looked_up_value_moves_the_entry(fleet: ShardManager) -> None:
    owners = seed(fleet, customers=2, per_customer=1)
    order_id, cid = next(iter(owners.items()))
    with fleet.sessionmaker()() as session:
        order = session.get(LkOrder, order_id)
        order.order_id = 777_001
        session.commit()
    flat = {p for pairs in entries(fleet, ORDERS).values() for p in pairs}
    assert (777_001, cid) in flat and (order_id, cid) not in flat
    with fleet.sessionmaker()() as session:
        assert session.scalars(select(LkOrder).where(LkOrder.order_id == 777_001)).one().customer_id == cid


def test_a_rolled_back_insert_leaves_only_an_ignored_entry_that_repair_removes(fleet: ShardManager) -> None:
    with fleet.sessionmaker()() as session:
        session.add(LkOrder(order_id=555, customer_id=9))
        session.flush()
        session.rollback()
    assert (555, 9) in entries(fleet, ORDERS)[fleet.shard_for(555)]
    with fleet.sessionmaker()() as session:
        assert session.scalars(select(LkOrder).where(LkOrder.order_id == 555)).all() == []
    report = repair_lookup(fleet, lookup_named(ORDERS))
    assert report.removed == 1
    assert (555, 9) not in entries(fleet, ORDERS)[fleet.shard_for(555)]


def test_bulk_insert_statements_write_entries_and_value_updates_are_refused(fleet: ShardManager) -> None:
    with fleet.sessionmaker()() as session:
        session.execute(insert(LkOrder), [{"order_id": 901, "customer_id": 4, "status": "x"}])
        session.commit()
        assert session.scalars(select(LkOrder.customer_id).where(LkOrder.order_id == 901)).one() == 4
        with pytest.raises(LookupIndexError, match="LkOrder.order_id"):
            session.execute(update(LkOrder).where(LkOrder.customer_id == 4).values(order_id=902))
        session.rollback()
        session.execute(delete(LkOrder).where(LkOrder.order_id == 901))
        session.commit()
    assert (901, 4) in entries(fleet, ORDERS)[fleet.shard_for(901)]  # stale: ignored, repaired later
    assert repair_lookup(fleet, lookup_named(ORDERS)).removed == 1


def test_a_second_customer_with_the_same_email_is_refused(fleet: ShardManager) -> None:
    a, b = 1, next(k for k in range(2, 100) if fleet.shard_for(k) != fleet.shard_for(1))
    maker = fleet.sessionmaker()
    with maker() as session:
        session.add(LkCustomer(customer_id=a, email="ada@example.com"))
        session.commit()
    with maker() as session:
        session.add(LkCustomer(customer_id=b, email="ada@example.com"))
        with pytest.raises(
            DuplicateKeyError, match=r"LkCustomer.email = 'ada@example.com' is already taken"
        ) as info:
            session.commit()
        assert (info.value.column, info.value.value) == ("LkCustomer.email", "ada@example.com")
    counts = fleet.run_on_all("SELECT count(*) FROM lk_customers WHERE email = 'ada@example.com'")
    assert sum(rows[0][0] for rows in counts.values()) == 1
    assert {p for ps in entries(fleet, "LkCustomer.email").values() for p in ps} == {("ada@example.com", a)}


def test_a_unique_value_freed_by_a_delete_can_be_taken_again(fleet: ShardManager) -> None:
    maker = fleet.sessionmaker()
    with maker() as session:
        session.add(LkCustomer(customer_id=1, email="x@example.com"))
        session.commit()
    with maker() as session:
        session.delete(session.get(LkCustomer, 1))
        session.commit()
    with maker() as session:
        session.add(LkCustomer(customer_id=2, email="x@example.com"))
        session.commit()
        found = session.scalars(select(LkCustomer).where(LkCustomer.email == "x@example.com")).one()
        assert found.customer_id == 2


def test_a_stale_unique_entry_is_taken_over(fleet: ShardManager) -> None:
    maker = fleet.sessionmaker()
    with maker() as session:
        session.add(LkCustomer(customer_id=1, email="y@example.com"))
        session.flush()
        # a crash here would leave the entry; a rollback removes it: make it stale by hand instead
        session.rollback()
    index = lookup_named("LkCustomer.email")
    with fleet.connect(fleet.shard_for("y@example.com")) as conn:
        conn.execute(insert(index.table).values(value="y@example.com", shard_key=1))
        conn.commit()
    with maker() as session:
        session.add(LkCustomer(customer_id=2, email="y@example.com"))
        session.commit()
    assert {p for ps in entries(fleet, "LkCustomer.email").values() for p in ps} == {("y@example.com", 2)}


def test_two_rows_of_one_transaction_cannot_share_a_unique_value(fleet: ShardManager) -> None:
    with fleet.sessionmaker(allow_cross_shard=True)() as session:
        session.add_all([LkCustomer(customer_id=1, email="z@x"), LkCustomer(customer_id=2, email="z@x")])
        with pytest.raises(DuplicateKeyError, match="another row of this transaction"):
            session.commit()
    assert sum(r[0][0] for r in fleet.run_on_all("SELECT count(*) FROM lk_customers").values()) == 0
    assert not any(entries(fleet, "LkCustomer.email").values())


def test_lookup_tables_are_in_the_models_metadata() -> None:
    from tests.lookup_models import Base

    assert "shardkit_lookup_lk_orders_order_id" in Base.metadata.tables
    assert "shardkit_lookup_lk_customers_email" in Base.metadata.tables


def test_count_helper_matches(fleet: ShardManager) -> None:
    seed(fleet, customers=2, per_customer=2)
    with fleet.sessionmaker()() as session:
        assert session.scalar(select(func.count()).select_from(LkOrder)) == 4
    assert text  # keep import used


@pytest.mark.timeout(120)
def test_a_frozen_lookup_shard_fails_the_read_naming_it(
    pg_fleet: TestFleet, shard_map: dict[str, str]
) -> None:
    """The lookup read runs on the driver directly: a frozen server must still end it, named."""
    with ShardManager.from_urls(shard_map, connect_timeout=2, query_timeout=3) as bounded:
        create_schema(bounded)
        forget_readiness()
        owners = seed(bounded, customers=4, per_customer=1)
        order_id = next(iter(owners))
        lookup_shard = bounded.shard_for(order_id)  # where the value's entry lives
        query = select(LkOrder).where(LkOrder.order_id == order_id)
        with bounded.sessionmaker()() as session:
            assert session.scalars(query).one().customer_id == owners[order_id]  # keeps a read connection
        server = pg_fleet.server(int(lookup_shard.rsplit("-", 1)[1]) - 1)
        server.pause()
        try:
            with bounded.sessionmaker()() as session, pytest.raises(ShardUnavailableError) as raised:
                session.scalars(query).all()
        finally:
            server.resume()
        assert raised.value.shard_id == lookup_shard
        assert repr(lookup_shard) in str(raised.value)

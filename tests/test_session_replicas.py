"""ShardedSession reads from shard-1's real streaming replica; writes and read-your-writes use the primary.

The replica's replay is paused where a test must tell the servers apart by their data: a row written
on the primary afterwards is visible on the primary only.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
from sqlalchemy import func, select, text

from sa_shardkit import QueryEvent, ShardedSession, ShardManager
from sa_shardkit.demo.models import Customer
from sa_shardkit.testing import LocalPostgres
from tests.fleet import TestFleet
from tests.replica_support import pause_replay, seed_replicated, shard1_key


@pytest.fixture
def fleet(
    replicated_manager: ShardManager, pg_fleet: TestFleet, pg_replica: LocalPostgres
) -> Iterator[ShardManager]:
    """The demo schema on every shard (and so on the replica), customer 1 on each shard-1 copy."""
    yield seed_replicated(replicated_manager, pg_fleet.server(0), pg_replica)


@pytest.fixture
def roles(fleet: ShardManager) -> Iterator[list[tuple[str, str]]]:
    """``(shard_id, role)`` of every statement run from now on."""
    seen: list[tuple[str, str]] = []

    def record(event: QueryEvent) -> None:
        seen.append((event.shard_id, event.role))

    fleet.events.add(record)
    yield seen
    fleet.events.remove(record)


def insert_on_primary_only(manager: ShardManager, replica: LocalPostgres, customer_id: int) -> None:
    """A row the paused replica does not have: proof of which server a read went to."""
    pause_replay(replica)
    with manager.connect("shard-1") as conn, conn.begin():
        conn.execute(
            text("INSERT INTO customers (customer_id, name, balance) VALUES (:id, 'fresh', 0)"),
            {"id": customer_id},
        )


def test_read_outside_a_write_transaction_goes_to_the_replica(
    fleet: ShardManager, pg_replica: LocalPostgres, roles: list[tuple[str, str]]
) -> None:
    fresh = shard1_key(fleet, 1)
    insert_on_primary_only(fleet, pg_replica, fresh)
    roles.clear()
    with ShardedSession(manager=fleet) as session:
        assert session.get(Customer, fresh) is None  # the replica has not replayed it
        assert session.get(Customer, shard1_key(fleet, 0)) is not None
    assert roles and set(roles) == {("shard-1", "replica")}


def test_use_primary_execution_option_reads_the_primary(
    fleet: ShardManager, pg_replica: LocalPostgres
) -> None:
    fresh = shard1_key(fleet, 1)
    insert_on_primary_only(fleet, pg_replica, fresh)
    with ShardedSession(manager=fleet) as session:
        query = select(Customer).where(Customer.customer_id == fresh)
        assert session.scalars(query, execution_options={"use_primary": True}).one().name == "fresh"


def test_primary_reads_context_manager_reads_the_primary(
    fleet: ShardManager, pg_replica: LocalPostgres
) -> None:
    fresh = shard1_key(fleet, 1)
    insert_on_primary_only(fleet, pg_replica, fresh)
    with ShardedSession(manager=fleet) as session:
        with session.primary_reads():
            assert session.get(Customer, fresh) is not None


def test_reads_after_a_flush_in_the_transaction_go_to_the_primary(
    fleet: ShardManager, pg_replica: LocalPostgres, roles: list[tuple[str, str]]
) -> None:
    pause_replay(pg_replica)
    key = shard1_key(fleet, 2)
    with ShardedSession(manager=fleet) as session, session.begin():
        session.add(Customer(customer_id=key, name="mine", balance=Decimal(5)))
        session.flush()
        session.expunge_all()
        assert session.get(Customer, key) is not None  # its own write, so not from the replica
    assert ("shard-1", "replica") not in roles


def test_read_before_the_first_write_uses_the_replica_and_after_it_the_primary(
    fleet: ShardManager, roles: list[tuple[str, str]]
) -> None:
    key = shard1_key(fleet, 0)
    with ShardedSession(manager=fleet) as session, session.begin():
        customer = session.get(Customer, key)
        assert customer is not None
        customer.balance = Decimal(42)
        session.flush()
        assert session.scalar(select(Customer.balance).where(Customer.customer_id == key)) == 42
    assert roles[0] == ("shard-1", "replica")
    assert roles[-1] == ("shard-1", "primary")


def test_select_for_update_goes_to_the_primary(fleet: ShardManager, roles: list[tuple[str, str]]) -> None:
    key = shard1_key(fleet, 0)
    with ShardedSession(manager=fleet) as session, session.begin():
        session.scalars(select(Customer).where(Customer.customer_id == key).with_for_update()).one()
    assert roles == [("shard-1", "primary")]


def test_session_with_replica_reads_off_reads_the_primary(
    fleet: ShardManager, roles: list[tuple[str, str]]
) -> None:
    with ShardedSession(manager=fleet, replica_reads=False) as session:
        assert session.get(Customer, shard1_key(fleet, 0)) is not None
    assert roles == [("shard-1", "primary")]


def test_scatter_reads_use_the_replica_of_a_replicated_shard(
    fleet: ShardManager, roles: list[tuple[str, str]]
) -> None:
    with ShardedSession(manager=fleet) as session:
        assert session.scalar(select(func.count()).select_from(Customer)) == 1
    assert ("shard-1", "replica") in roles and ("shard-1", "primary") not in roles
    assert {("shard-2", "primary"), ("shard-3", "primary"), ("shard-4", "primary")} <= set(roles)


def test_replica_stopped_after_its_last_check_falls_back_to_the_primary(
    fleet: ShardManager, pg_replica: LocalPostgres, roles: list[tuple[str, str]]
) -> None:
    fleet.replicas.check_interval = 3600
    assert fleet.replicas.status("shard-1", refresh=True).usable
    pg_replica.stop()
    with ShardedSession(manager=fleet) as session:
        assert session.get(Customer, shard1_key(fleet, 0)) is not None
    assert roles == [("shard-1", "primary")]
    assert not fleet.replicas.status("shard-1").usable

"""The connection budget on real servers: a cap across shards, queued scatters, idle pools to zero."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import insert, inspect, select, text, update

from sa_shardkit import ConnectionBudgetError, ShardConfig, ShardManager
from sa_shardkit.demo.models import Base, Customer
from tests.fleet import TestFleet, _connect
from tests.many_shards import backends, many_databases

APP = "shardkit-budget-test"


@pytest.fixture(scope="module")
def sixteen(pg_fleet: TestFleet) -> Iterator[dict[str, str]]:
    with many_databases(pg_fleet, 16, "budget") as shards:
        yield shards


def budgeted(shards: dict[str, str], limit: int | None, **options: Any) -> ShardManager:
    configs = [
        ShardConfig(id=s, url=u, engine_options={"connect_args": {"application_name": APP}}, **options)
        for s, u in shards.items()
    ]
    return ShardManager(configs, max_connections=limit)


def _running(conn: Any) -> int:
    """Our queries running on this server now (each needs an open connection of ours)."""
    sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state = 'active'"
    row = conn.execute(sql, (APP,)).fetchone()
    return int(row[0]) if row else 0


class Sampler:
    """Counts our backends on every server, over and over, until stopped; keeps the maximum."""

    def __init__(self, fleet: TestFleet) -> None:
        self.fleet = fleet
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        # one connection per server for the whole run, so a sweep of the servers takes a moment
        # only (a sweep that lasted a reconnect could count a query that ended and the next one)
        conns = [_connect(url) for url in self.fleet.urls]
        try:
            while not self._stop.is_set():
                self.peak = max(self.peak, sum(_running(conn) for conn in conns))
        finally:
            for conn in conns:
                conn.close()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_scatter_over_16_shards_with_a_budget_of_4_queues_and_completes(
    pg_fleet: TestFleet, sixteen: dict[str, str]
) -> None:
    with budgeted(sixteen, 4) as manager, Sampler(pg_fleet) as sampler:
        result = manager.query_all_shards("SELECT current_database() AS db, pg_sleep(0.2)")
        ran = manager.run_on_all("SELECT current_database(), pg_sleep(0.2)")
        assert manager.budget.open_connections <= 4 and manager.budget.peak == 4
    assert sorted(row.db for row in result) == sorted(u.rsplit("/", 1)[1] for u in sixteen.values())
    assert {s: rows[0][0] for s, rows in ran.items()} == {s: u.rsplit("/", 1)[1] for s, u in sixteen.items()}
    assert sampler.peak == 4  # queries running at once: the budget was used in full, never exceeded


def test_without_a_budget_the_same_scatter_opens_a_connection_per_shard(
    pg_fleet: TestFleet, sixteen: dict[str, str]
) -> None:
    with budgeted(sixteen, None) as manager, Sampler(pg_fleet) as sampler:
        manager.query_all_shards("SELECT pg_sleep(0.5)")
        stats = manager.connection_stats()
        assert manager.budget.peak == 16
    assert sampler.peak == 16  # so the sampler does see every query of a scatter running at once
    assert {(s.shard_id, s.open, s.in_use) for s in stats} == {(s, 1, 0) for s in sixteen}


def test_a_spent_budget_raises_a_clear_error_after_pool_timeout(sixteen: dict[str, str]) -> None:
    with budgeted(sixteen, 1, pool_timeout=0.5) as manager, manager.connect("shard-1") as held:
        held.execute(text("SELECT 1"))
        with pytest.raises(ConnectionBudgetError, match="shard 'shard-2'.*all 1 connections") as info:
            manager.connect("shard-2")
        assert info.value.shard_id == "shard-2"


def test_an_idle_connection_of_another_shard_is_closed_to_make_room(
    pg_fleet: TestFleet, sixteen: dict[str, str]
) -> None:
    with budgeted(sixteen, 2) as manager:
        for shard in ("shard-1", "shard-2", "shard-3", "shard-4"):
            with manager.connect(shard) as conn:
                assert conn.execute(text("SELECT 1")).scalar() == 1
        assert manager.budget.open_connections == 2
        assert backends(pg_fleet, APP) == 2
        open_shards = {s.shard_id for s in manager.connection_stats() if s.open}
        assert len(open_shards) == 2 and "shard-4" in open_shards


def test_idle_pools_shrink_to_zero(pg_fleet: TestFleet, sixteen: dict[str, str]) -> None:
    configs = [
        ShardConfig(id=s, url=u, engine_options={"connect_args": {"application_name": APP}})
        for s, u in sixteen.items()
    ]
    with ShardManager(configs, idle_timeout=0.2) as manager:
        manager.run_on_all("SELECT 1")
        assert backends(pg_fleet, APP) == 16
        deadline = time.monotonic() + 30
        while manager.budget.open_connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert manager.budget.open_connections == 0
        assert backends(pg_fleet, APP) == 0
        assert manager.run_on_all("SELECT 1", shard_ids=["shard-3"]) == {"shard-3": [(1,)]}  # reconnects


SLOW = text("(SELECT pg_sleep(0.2)) IS NOT NULL")


def _one_customer_per_shard(manager: ShardManager) -> dict[str, int]:
    """Schema on every shard and one customer on each; customer id by shard."""
    manager.run_on_all(lambda conn: Base.metadata.create_all(conn))
    manager.run_on_all("TRUNCATE customers CASCADE")
    keys: dict[str, int] = {}
    key = 0
    while len(keys) < len(manager.shard_ids):
        key += 1
        keys.setdefault(manager.shard_for(key), key)
    for k in keys.values():
        with manager.transaction(k) as conn:
            conn.execute(insert(Customer), {"customer_id": k, "name": f"c{k}", "balance": 0})
    return keys


def test_a_session_scatter_over_16_shards_with_a_budget_of_4_queues_and_completes(
    pg_fleet: TestFleet, sixteen: dict[str, str]
) -> None:
    with budgeted(sixteen, 4) as manager:
        keys = _one_customer_per_shard(manager)
        with manager.sessionmaker()() as session, Sampler(pg_fleet) as sampler:
            found = session.scalars(select(Customer).where(SLOW).order_by(Customer.customer_id)).all()
            peak = manager.budget.peak
        assert (sampler.peak, peak) == (4, 4)  # the budget used in full, never exceeded
        assert [c.customer_id for c in found] == sorted(keys.values())
        assert {inspect(c).identity_token for c in found} == set(sixteen)
        assert {inspect(c).identity_token: c.customer_id for c in found} == keys


def test_a_session_scatter_reads_its_own_writes_on_the_shards_it_holds_within_the_budget(
    pg_fleet: TestFleet, sixteen: dict[str, str]
) -> None:
    """Shards the session's transaction holds are read in it (its uncommitted rows); the rest queue."""
    with budgeted(sixteen, 4) as manager:
        keys = _one_customer_per_shard(manager)
        with manager.sessionmaker()() as session, Sampler(pg_fleet) as sampler:
            session.get(Customer, keys["shard-5"]).name = "renamed"  # type: ignore[union-attr]
            session.flush()  # shard-5's transaction is open, its change uncommitted
            names = {c.customer_id: c.name for c in session.scalars(select(Customer).where(SLOW))}
            session.rollback()
        assert sampler.peak <= 4
        assert len(names) == 16 and names[keys["shard-5"]] == "renamed"
        with manager.sessionmaker()() as session:  # rolled back: nothing leaked
            assert session.get(Customer, keys["shard-5"]).name == f"c{keys['shard-5']}"  # type: ignore[union-attr]


SLOW_DML = "(SELECT pg_sleep(0.2)) IS NOT NULL"


def test_run_on_all_dml_over_16_shards_with_a_budget_of_4_queues_and_completes(
    pg_fleet: TestFleet, sixteen: dict[str, str]
) -> None:
    with budgeted(sixteen, 4) as manager:
        _one_customer_per_shard(manager)
        with Sampler(pg_fleet) as sampler:
            counts = manager.run_on_all(f"UPDATE customers SET balance = balance + 1 WHERE {SLOW_DML}")
            peak = manager.budget.peak
        assert (sampler.peak, peak) == (4, 4)  # the budget used in full, never exceeded
        assert counts == dict.fromkeys(sixteen, 1)
        balances = manager.run_on_all("SELECT balance FROM customers")
        assert {s: [row[0] for row in rows] for s, rows in balances.items()} == dict.fromkeys(sixteen, [1])


def test_a_session_update_without_a_key_over_16_shards_with_a_budget_of_4_queues_and_completes(
    pg_fleet: TestFleet, sixteen: dict[str, str]
) -> None:
    """An UPDATE that names no shard key touches every shard; with a budget of 4 it queues (each
    shard's part autocommitted on a connection of its own) instead of failing after pool_timeout."""
    with budgeted(sixteen, 4, pool_timeout=3) as manager:
        keys = _one_customer_per_shard(manager)
        with manager.sessionmaker(expire_on_commit=False)() as session, Sampler(pg_fleet) as sampler:
            loaded = session.get(Customer, keys["shard-7"])  # loaded in an earlier transaction
            session.commit()
            held = session.get(Customer, keys["shard-5"])  # this transaction holds shard-5
            everyone = update(Customer).where(text(SLOW_DML)).values(name="everyone")
            result = session.execute(everyone.execution_options(shardkit_queued_writes=True))
            assert manager.budget.open_connections <= 4
            session.commit()
            peak = manager.budget.peak
            assert loaded is not None and held is not None
            assert (loaded.name, held.name) == ("everyone", "everyone")  # expired and reloaded / in it
        # never more than the budget; shard-5's connection idles in the transaction meanwhile, and
        # the other 3 of the budget run queued shards (2 or 3 at once: each next one first closes an
        # idle connection of another pool)
        assert 2 <= sampler.peak <= 4 and peak == 4
        assert result.rowcount == 16  # type: ignore[attr-defined]
        names = manager.run_on_all("SELECT customer_id, name FROM customers")
        assert {s: [tuple(r) for r in rows] for s, rows in names.items()} == {
            s: [(keys[s], "everyone")] for s in sixteen
        }


def test_without_the_option_a_keyless_update_over_the_budget_fails_at_once_writing_nothing(
    sixteen: dict[str, str],
) -> None:
    """Queued parts commit outside the session's transaction, so they are never the default: the
    UPDATE raises ConnectionBudgetError before any shard runs it, naming the count and the budget."""
    with budgeted(sixteen, 4, pool_timeout=30) as manager:
        keys = _one_customer_per_shard(manager)
        started = time.monotonic()
        with manager.sessionmaker()() as session:
            with pytest.raises(ConnectionBudgetError, match="16 shards.*max_connections is 4.*queued_writes"):
                session.execute(update(Customer).values(name="nobody"))
            session.rollback()
        assert time.monotonic() - started < 25, "it waited for pool_timeout instead of failing at once"
        names = manager.run_on_all("SELECT customer_id, name FROM customers")
        assert all(name != "nobody" for rows in names.values() for _, name in rows)
        assert sorted(k for rows in names.values() for k, _ in rows) == sorted(keys.values())

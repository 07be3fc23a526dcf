"""A session flush's unstored-ring check rides on its first statement (sa_shardkit.fused_write).

The check is sent in one pipeline with the BEGIN and the flush's first statement, in a form that
fails when a ring is stored, so the statement never runs after a failed check. These tests store a
ring behind the back of a process that would not look for one for an hour and check that its next
flush still finds it (it adopts the ring, whichever statement the flush starts with), that the
check fails exactly when the state table exists, and that a statement's own failure is raised as
without the pipeline. A session's read transaction sends its BEGIN in a pipeline with its first
statement too: the transaction, its isolation level and read-only setting are the server's, and a
lost shard is named. Rows are counted on each server directly.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.orm import Session

from sa_shardkit import HashRing, ShardManager, fused_write
from sa_shardkit.demo.models import Base, Customer, Order
from sa_shardkit.errors import ShardUnavailableError, StaleRingError
from sa_shardkit.placement import RECHECK_ENV
from sa_shardkit.rebalance import add_shard, install_ring
from sa_shardkit.ring_state import STATE_TABLE
from sa_shardkit.saga import create_saga_tables
from tests.fleet import TestFleet


def counts(urls: dict[str, str], table: str) -> dict[str, int]:
    """Rows of ``table`` per server, asked directly."""
    found = {}
    for shard_id, url in urls.items():
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            found[shard_id] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
    return found


@pytest.fixture
def never_looks(
    shard_map: dict[str, str], manager: ShardManager, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ShardManager]:
    """A process that has seen no stored ring and would not look for one for an hour."""
    for shard_id in shard_map:
        Base.metadata.create_all(manager.engine(shard_id))
    monkeypatch.setenv(RECHECK_ENV, "3600")
    with ShardManager.from_urls(shard_map, refresh_seconds=3600) as process:
        assert process.placement.refresh().version == 0
        yield process


@pytest.fixture
def fused_runs(monkeypatch: pytest.MonkeyPatch) -> list[bool | None]:
    """What each fused run answered (True: the statement ran behind the check; None: it did not)."""
    answers: list[bool | None] = []
    original = fused_write._run_fused

    def spy(*args: Any) -> bool | None:
        answer = original(*args)
        answers.append(answer)
        return answer

    monkeypatch.setattr(fused_write, "_run_fused", spy)
    return answers


def key_on(process: ShardManager, shard_id: str, skip: int = 0) -> int:
    return [k for k in range(1, 500) if process.shard_for(k) == shard_id][skip]


def add_customer(process: ShardManager, key: int) -> None:
    with process.sessionmaker()() as session, session.begin():
        session.add(Customer(customer_id=key, name=f"c{key}"))


@contextmanager
def bounded_process(
    shard_map: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ShardManager, int]]:
    """A process with short fault bounds (connect 2 s, statements 3 s) that would not look for a
    stored ring for an hour, and a customer on shard-2 written through it (a pooled connection,
    the check prepared on it): the process and that customer's key."""
    monkeypatch.setenv(RECHECK_ENV, "3600")
    with ShardManager.from_urls(
        shard_map, connect_timeout=2, query_timeout=3, refresh_seconds=3600
    ) as process:
        for shard_id in shard_map:
            Base.metadata.create_all(process.engine(shard_id))
        key = key_on(process, "shard-2")
        add_customer(process, key)
        yield process, key


def test_the_check_fails_exactly_when_the_state_table_exists(shard_map: dict[str, str]) -> None:
    """The failing form is evaluated on its row, not folded by the planner into an error always."""
    url = shard_map["shard-1"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute(fused_write.unstored_check()[1]).fetchone() == (None,)
        conn.execute(f"CREATE TABLE {STATE_TABLE} (x int)")
        try:
            with pytest.raises(psycopg.errors.InvalidTextRepresentation, match="a ring is stored"):
                conn.execute(fused_write.unstored_check()[1])
            conn.execute("CREATE SCHEMA elsewhere")
            conn.execute(f"ALTER TABLE {STATE_TABLE} SET SCHEMA elsewhere")  # not on the search path
            assert conn.execute(fused_write.unstored_check()[1]).fetchone() == (None,)
        finally:
            conn.execute("DROP SCHEMA IF EXISTS elsewhere CASCADE")
            conn.execute(f"DROP TABLE IF EXISTS {STATE_TABLE}")


def test_the_stored_ring_check_fails_exactly_on_another_version(manager: ShardManager) -> None:
    """Bounded or not, the version check passes at the stored version (and puts lock_timeout
    back), and fails at any other."""
    install_ring(manager)
    url = manager.config("shard-1").url.render_as_string(hide_password=False)
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        for ms in (None, 1500):
            assert conn.execute(fused_write.stored_check(1, ms)[1]).fetchone()[0] is None  # type: ignore[index]
            assert conn.execute("SHOW lock_timeout").fetchone() == ("0",)
            conn.rollback()
            with pytest.raises(psycopg.errors.InvalidTextRepresentation, match="ring version 2"):
                conn.execute(fused_write.stored_check(2, ms)[1])
            conn.rollback()


def test_a_flush_finds_a_ring_stored_after_its_process_last_looked(
    never_looks: ShardManager, shard_map: dict[str, str], fused_runs: list[bool | None]
) -> None:
    key = key_on(never_looks, "shard-1")
    add_customer(never_looks, key)
    assert fused_runs == [True]  # the check rode on the INSERT
    with ShardManager.from_urls(shard_map) as operator:
        install_ring(operator)
    add_customer(never_looks, key + 1000)  # by the configured ring: on the key's owner, not moving
    assert fused_runs == [True, None]  # the check failed: the INSERT did not run behind it
    assert never_looks.placement.state.version == 1  # ... and the ordinary fence adopted the ring
    owner = never_looks.shard_for(key + 1000)
    found = counts(shard_map, "customers")
    assert found[owner] == (2 if owner == "shard-1" else 1)
    assert sum(found.values()) == 2


def test_a_flush_that_starts_with_an_executemany_still_checks(
    never_looks: ShardManager, shard_map: dict[str, str], fused_runs: list[bool | None]
) -> None:
    """A flush that updates several loaded rows sends one executemany (the dialect's
    do_executemany, not the pipeline): the check is made the ordinary way before it."""
    key = key_on(never_looks, "shard-2")
    add_customer(never_looks, key)
    maker = never_looks.sessionmaker(expire_on_commit=False)
    with maker() as session, session.begin():
        orders = [
            Order(customer_id=key, order_id=uuid.uuid4(), status="new", total=Decimal(1)) for _ in range(3)
        ]
        session.add_all(orders)
    with ShardManager.from_urls(shard_map) as operator:
        install_ring(operator)
    many: list[tuple[str, bool]] = []

    def seen(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        many.append((statement.split()[0].upper(), executemany))

    engine = never_looks.engine("shard-2")
    event.listen(engine, "before_cursor_execute", seen)
    runs = len(fused_runs)
    try:
        with maker() as session, session.begin():
            session.add_all(orders)
            for order in orders:
                order.status = "paid"
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    # the batch's event fires first; the ordinary fence's reads run inside its do_executemany
    assert many[0] == ("UPDATE", True) and len(many) > 1
    assert len(fused_runs) == runs  # no pipeline
    assert never_looks.placement.state.version == 1  # the check ran (and found the ring)
    assert counts(shard_map, "orders") == {s: (3 if s == "shard-2" else 0) for s in shard_map}


def test_a_statement_that_fails_behind_the_check_fails_as_usual(
    never_looks: ShardManager, shard_map: dict[str, str], fused_runs: list[bool | None]
) -> None:
    key = key_on(never_looks, "shard-3")
    add_customer(never_looks, key)
    with pytest.raises(IntegrityError, match="customers_pkey"):
        add_customer(never_looks, key)
    assert fused_runs == [True]  # the duplicate's pipeline raised (no answer): the check had passed
    add_customer(never_looks, key_on(never_looks, "shard-3", 1))  # the connection goes on
    assert counts(shard_map, "customers")["shard-3"] == 2
    assert never_looks.placement.state.version == 0


def test_a_mark_left_by_a_transaction_that_wrote_nothing_is_not_carried_by_the_next(
    never_looks: ShardManager, shard_map: dict[str, str], fused_runs: list[bool | None]
) -> None:
    """The fence marked the connection, but its transaction ended before any statement: the next
    transaction's statement runs as it is (its own fence, if any, marks it again)."""
    key = key_on(never_looks, "shard-4")
    with never_looks.connect("shard-4") as conn:
        conn.begin()
        never_looks.placement.fence_write(conn, "shard-4", key, deferrable=True)
        assert fused_write.pending_check(conn) is not None
        conn.commit()
        conn.execute(text("SELECT 1"))
        conn.commit()
    assert fused_runs == []


@pytest.mark.timeout(120)
def test_a_shard_frozen_as_the_pipeline_is_sent_is_named_and_nothing_is_written(
    pg_fleet: TestFleet, shard_map: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stops (SIGSTOP) after the connection's checkout ping, right before the flush's
    pipeline goes out: the watchdog bounds the wait, the flush raises ShardUnavailableError naming
    the shard, and once the server runs again no row of it is there."""
    server = pg_fleet.server(1)  # shard-2
    with bounded_process(shard_map, monkeypatch) as (process, key):
        engine = process.engine("shard-2")

        def freeze(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.lstrip().upper().startswith("INSERT"):
                server.pause()

        event.listen(engine, "before_cursor_execute", freeze)
        try:
            with pytest.raises(ShardUnavailableError) as raised:
                add_customer(
                    process,
                    key + 1000
                    if process.shard_for(key + 1000) == "shard-2"
                    else key_on(process, "shard-2", 1),
                )
        finally:
            event.remove(engine, "before_cursor_execute", freeze)
            server.resume()
        assert raised.value.shard_id == "shard-2"
    assert counts(shard_map, "customers") == {s: (1 if s == "shard-2" else 0) for s in shard_map}


def test_a_flush_by_an_older_stored_ring_meets_the_newer_one_in_its_pipeline(
    shard_map: dict[str, str],
    shard5_url: str,
    manager: ShardManager,
    fused_runs: list[bool | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process routes by stored ring version 1 while an online add moved the fleet on. Its flush
    of a moved key locks the old shard's state row in the pipeline and fails on the version (the
    INSERT does not run there): the ordinary fence adopts the new ring and raises StaleRingError
    naming the new shard, nothing written on the old one; the retry and later writes ride on their
    INSERTs again, each on its shard."""
    urls = {**shard_map, "shard-5": shard5_url}
    four = HashRing(list(shard_map))
    five = four.add_shard("shard-5")
    first, stayed = [k for k in range(1, 500) if four.get_shard(k) == five.get_shard(k) == "shard-1"][:2]
    moved = next(
        k for k in range(1, 500) if four.get_shard(k) == "shard-1" and five.get_shard(k) == "shard-5"
    )
    with ShardManager.from_urls(urls) as operator:
        for shard_id in urls:
            Base.metadata.create_all(operator.engine(shard_id))
        create_saga_tables(operator)
        operator.set_ring(four)
        install_ring(operator)
    monkeypatch.setenv(RECHECK_ENV, "3600")
    with ShardManager.from_urls(urls, refresh_seconds=3600) as process:
        process.set_ring(four)
        assert process.placement.refresh().version == 1  # and not again for an hour
        monkeypatch.setenv(RECHECK_ENV, "0.2")  # the operator's horizon (its move waits it out)
        add_customer(process, first)
        assert fused_runs == [True]  # the lock and the version check rode on the INSERT
        with ShardManager.from_urls(urls) as operator:
            operator.set_ring(four)
            add_shard(operator, "shard-5", Base)
        assert process.placement.state.version == 1  # it has not looked
        with pytest.raises(StaleRingError) as stale:  # routed by version 1 to shard-1
            add_customer(process, moved)
        assert stale.value.shard_id == "shard-5"
        assert fused_runs[-1] is None and process.placement.state.version > 1  # the check failed
        assert counts(urls, "customers") == {s: (1 if s == "shard-1" else 0) for s in urls}
        add_customer(process, moved)  # the retry, by the adopted ring
        add_customer(process, stayed)
        assert fused_runs[-2:] == [True, True]
    found = counts(urls, "customers")
    assert found == {s: {"shard-1": 2, "shard-5": 1}.get(s, 0) for s in urls}


@pytest.mark.timeout(120)
def test_a_connection_killed_as_the_pipeline_is_sent_is_named_and_the_next_write_lands(
    shard_map: dict[str, str], monkeypatch: pytest.MonkeyPatch, fused_runs: list[bool | None]
) -> None:
    """The server ends the session's backend (pg_terminate_backend) after its checkout ping, right
    before the flush's pipeline goes out: the flush raises ShardUnavailableError naming the shard,
    nothing of it is on the server, and the next write gets a fresh connection and lands."""
    monkeypatch.setenv(RECHECK_ENV, "3600")
    with ShardManager.from_urls(shard_map, refresh_seconds=3600) as process:
        for shard_id in shard_map:
            Base.metadata.create_all(process.engine(shard_id))
        first, killed, after = (key_on(process, "shard-2", n) for n in range(3))
        add_customer(process, first)
        engine = process.engine("shard-2")
        url = shard_map["shard-2"].replace("postgresql+psycopg://", "postgresql://")

        def kill(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.lstrip().upper().startswith("INSERT"):
                pid = cursor.connection.info.backend_pid
                with psycopg.connect(url, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))

        event.listen(engine, "before_cursor_execute", kill)
        try:
            with pytest.raises(ShardUnavailableError) as raised:
                add_customer(process, killed)
        finally:
            event.remove(engine, "before_cursor_execute", kill)
        assert raised.value.shard_id == "shard-2"
        add_customer(process, after)
        assert fused_runs == [True, None, True]  # the pipeline met the closed socket, then a fresh one
    assert counts(shard_map, "customers") == {s: (2 if s == "shard-2" else 0) for s in shard_map}


# -- a read transaction's BEGIN rides on its first statement (begin_with_next_statement) -------


def backend_of(session: Session, shard_id: str) -> int:
    conn = session.connection(bind_arguments={"shard_id": shard_id})
    pid: int = conn.connection.driver_connection.info.backend_pid  # type: ignore[union-attr]
    return pid


def server_state(url: str, pid: int) -> tuple[str, bool]:
    """(state, in a transaction) of backend ``pid``, asked from another connection."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as admin:
        row = admin.execute(
            "SELECT state, xact_start IS NOT NULL FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def test_a_read_runs_in_the_transaction_its_pipeline_began(
    never_looks: ShardManager, shard_map: dict[str, str], fused_runs: list[bool | None]
) -> None:
    """The server holds the read's transaction open after it (the BEGIN ran before the SELECT, not
    skipped), and the transaction's later statements see its snapshot: a row committed by another
    session meanwhile is not in a REPEATABLE READ transaction's second read."""
    key = key_on(never_looks, "shard-2")
    add_customer(never_looks, key)
    fused_runs.clear()
    with never_looks.sessionmaker()() as session:
        session.connection(
            bind_arguments={"shard_id": "shard-2"}, execution_options={"isolation_level": "REPEATABLE READ"}
        )
        assert session.scalars(select(Customer).where(Customer.customer_id == key)).one().name == f"c{key}"
        assert fused_runs == [True]  # the BEGIN rode on the SELECT
        assert server_state(shard_map["shard-2"], backend_of(session, "shard-2")) == (
            "idle in transaction",
            True,
        )
        level = session.execute(
            text("SELECT current_setting(:name)"),
            {"name": "transaction_isolation"},
            bind_arguments={"shard_id": "shard-2"},
        ).scalar()
        assert level == "repeatable read"
        add_customer(never_looks, key_on(never_looks, "shard-2", 1))  # another session commits a row
        seen = session.execute(
            text("SELECT count(*) FROM customers WHERE customer_id > :k"),
            {"k": -1},
            bind_arguments={"shard_id": "shard-2"},
        ).scalar()
        assert seen == 1  # the transaction's snapshot, taken by its first SELECT
    assert counts(shard_map, "customers")["shard-2"] == 2


def test_a_read_only_transaction_stays_read_only(
    never_looks: ShardManager, shard_map: dict[str, str], fused_runs: list[bool | None]
) -> None:
    """The BEGIN sent in the pipeline is the one psycopg would send: read only when asked."""
    key = key_on(never_looks, "shard-3")
    add_customer(never_looks, key)
    fused_runs.clear()
    with never_looks.sessionmaker()() as session:
        session.connection(
            bind_arguments={"shard_id": "shard-3"}, execution_options={"postgresql_readonly": True}
        )
        assert (
            session.execute(
                text("SELECT current_setting(:name)"),
                {"name": "transaction_read_only"},
                bind_arguments={"shard_id": "shard-3"},
            ).scalar()
            == "on"
        )
        assert fused_runs == [True]
        with pytest.raises(DBAPIError, match="read-only transaction"):
            session.execute(
                text("DELETE FROM customers WHERE customer_id = :k"),
                {"k": key},
                bind_arguments={"shard_id": "shard-3"},
            )
    assert counts(shard_map, "customers")["shard-3"] == 1


def test_a_read_that_fails_in_its_pipeline_fails_as_usual_and_the_session_goes_on(
    never_looks: ShardManager, fused_runs: list[bool | None]
) -> None:
    key = key_on(never_looks, "shard-1")
    add_customer(never_looks, key)
    fused_runs.clear()
    with never_looks.sessionmaker()() as session:
        with pytest.raises(ProgrammingError, match="no_such_table"):
            session.execute(
                text("SELECT * FROM no_such_table WHERE x = :x"),
                {"x": 1},
                bind_arguments={"shard_id": "shard-1"},
            )
        assert fused_runs == []  # the pipeline raised the statement's own error: no answer
        session.rollback()
        assert session.get(Customer, key) is not None  # a new transaction, its BEGIN in the pipeline again
        assert fused_runs == [True]


def test_several_statements_without_parameters_run_the_ordinary_way(
    never_looks: ShardManager, shard_map: dict[str, str], fused_runs: list[bool | None]
) -> None:
    """A statement without parameters goes to psycopg as a simple query, which may hold several
    statements: not pipelined (a pipeline would refuse it), and still in a transaction."""
    fused_runs.clear()
    with never_looks.sessionmaker()() as session:
        value = session.execute(text("SELECT 1; SELECT 2"), bind_arguments={"shard_id": "shard-4"}).scalar()
        assert value == 1  # psycopg answers with the first statement's rows
        assert fused_runs == [None]
        assert server_state(shard_map["shard-4"], backend_of(session, "shard-4")) == (
            "idle in transaction",
            True,
        )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["freeze", "kill"])
def test_a_shard_lost_as_a_reads_pipeline_is_sent_is_named_and_the_next_read_works(
    pg_fleet: TestFleet,
    shard_map: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    fused_runs: list[bool | None],
    fault: str,
) -> None:
    """After the checkout ping, right before a get()'s pipeline goes out, the server freezes
    (SIGSTOP) or ends the backend: the get raises ShardUnavailableError naming the shard (bounded
    by the watchdog), and once the server runs again the next get finds the row."""
    server = pg_fleet.server(1)  # shard-2
    url = shard_map["shard-2"].replace("postgresql+psycopg://", "postgresql://")
    with bounded_process(shard_map, monkeypatch) as (process, key):
        engine = process.engine("shard-2")

        def lose(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.lstrip().upper().startswith("SELECT"):
                if fault == "freeze":
                    server.pause()
                else:
                    with psycopg.connect(url, autocommit=True) as admin:
                        admin.execute(
                            "SELECT pg_terminate_backend(%s, 10000)", (cursor.connection.info.backend_pid,)
                        )

        fused_runs.clear()
        event.listen(engine, "before_cursor_execute", lose)
        try:
            with pytest.raises(ShardUnavailableError) as raised, process.sessionmaker()() as session:
                session.get(Customer, key)
        finally:
            event.remove(engine, "before_cursor_execute", lose)
            server.resume()
        assert raised.value.shard_id == "shard-2"
        assert fused_runs == [None]  # the pipeline met the lost socket; the ordinary path named it
        with process.sessionmaker()() as session:
            assert session.get(Customer, key) is not None
        assert fused_runs == [None, True]


def test_a_read_then_a_write_in_one_transaction_still_fences_the_write(
    never_looks: ShardManager, shard_map: dict[str, str], fused_runs: list[bool | None]
) -> None:
    """The read's pipeline began the transaction, so the flush's check cannot ride on its INSERT:
    it runs the ordinary way, and still finds a ring stored behind the process's back."""
    key = key_on(never_looks, "shard-1")
    add_customer(never_looks, key)
    with ShardManager.from_urls(shard_map) as operator:
        install_ring(operator)
    fused_runs.clear()
    with never_looks.sessionmaker()() as session, session.begin():
        assert session.get(Customer, key) is not None
        session.add(Customer(customer_id=key + 1000, name="later"))
    assert fused_runs == [True]  # the get's BEGIN; the flush's check ran on its own
    assert never_looks.placement.state.version == 1  # the ordinary fence adopted the stored ring
    owner = never_looks.shard_for(key + 1000)
    found = counts(shard_map, "customers")
    assert found[owner] == (2 if owner == "shard-1" else 1)
    assert sum(found.values()) == 2


def test_statements_psycopg_evicts_from_its_cache_are_deallocated_after_a_pipeline(
    shard_map: dict[str, str], monkeypatch: pytest.MonkeyPatch, fused_runs: list[bool | None]
) -> None:
    """psycopg keeps at most ``prepared_max`` prepared statements and deallocates the ones it
    evicts right after the statement that evicted them: a pipelined first statement does the same
    (nothing is left queued for deallocation, the server holds what psycopg's cache holds)."""
    monkeypatch.setenv(RECHECK_ENV, "3600")
    with ShardManager.from_urls(
        shard_map, refresh_seconds=3600, engine_options={"connect_args": {"prepare_threshold": 0}}
    ) as process:
        with process.engine("shard-1").connect() as conn:
            driver: Any = conn.connection.driver_connection
            driver.prepared_max = 2
        fused_runs.clear()
        for n in range(6):  # 6 different statements, each the first of its transaction, each prepared
            with process.sessionmaker()() as session:
                query = text(f"SELECT :v + {n}")
                assert (
                    session.execute(query, {"v": 1}, bind_arguments={"shard_id": "shard-1"}).scalar() == n + 1
                )
                here: Any = session.connection(
                    bind_arguments={"shard_id": "shard-1"}
                ).connection.driver_connection
                assert here is driver  # the one pooled connection
                assert not driver._prepared._to_flush  # psycopg's queue of evicted statements
        assert fused_runs == [True] * 6
        with driver.cursor() as cursor:  # psycopg's own path: the server's count, unprepared
            cursor.execute(
                "SELECT name FROM pg_prepared_statements WHERE name LIKE '\\_pg3\\_%'", prepare=False
            )
            on_server = {row[0] for row in cursor.fetchall()}
        assert on_server == {name.decode() for name in driver._prepared._names.values()}
        assert len(on_server) <= 2

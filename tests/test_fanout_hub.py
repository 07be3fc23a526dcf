"""The flat fan-out: warm shards run as greenlets of the calling thread, waiting through one selector."""

from __future__ import annotations

import contextvars
import threading
from collections import Counter
from typing import Any

import greenlet  # type: ignore[import-untyped]
import pytest
from sqlalchemy import event, text

from sa_shardkit import ShardManager
from sa_shardkit.multiplex import CooperativeConnection, Hub, is_cooperative
from sa_shardkit.scatter.connected import HUB_SHARDS
from tests.fleet import TestFleet
from tests.many_shards import many_databases

OVERLAP = (
    "SELECT clock_timestamp() AS started, (SELECT pg_sleep(1.0)) IS NOT NULL AS slept,"
    " clock_timestamp() AS ended"
)


def _threads_running_statements(manager: ShardManager) -> list[str]:
    """The thread of each statement the tests run (not routing's own reads of the stored ring, nor
    its check for a ring-state table, which may run in a scatter thread meanwhile)."""
    names: list[str] = []
    for engine in manager.engines.values():

        @event.listens_for(engine, "before_cursor_execute")
        def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "shardkit_" not in statement and "to_regclass" not in statement:
                names.append(threading.current_thread().name)

    return names


@pytest.mark.parametrize("path", ["query_all_shards", "run_on_all"])
def test_warm_shards_run_at_once_on_the_calling_thread(manager: ShardManager, path: str) -> None:
    """Every shard's statement starts before the first one ends, and none ran in a worker thread."""
    assert all(is_cooperative(e) for e in manager.engines.values())
    manager.run_on_all("SELECT 1")  # every pool now holds an idle connection
    names = _threads_running_statements(manager)
    if path == "query_all_shards":
        rows = manager.query_all_shards(OVERLAP).all()
    else:
        rows = [row for shard_rows in manager.run_on_all(OVERLAP).values() for row in shard_rows]
    assert len(rows) == 4
    assert max(r.started for r in rows) < min(r.ended for r in rows)  # one after another fails this
    assert set(names) == {threading.current_thread().name}


def test_more_warm_shards_than_one_hub_serves_share_a_few_threads(pg_fleet: TestFleet) -> None:
    """40 shards: three hubs of at most 16 (the caller's thread and two pool threads), all at once."""
    with many_databases(pg_fleet, 40, "hubs") as shards, ShardManager.from_urls(shards) as many:
        many.run_on_all("SELECT 1")
        names = _threads_running_statements(many)
        rows = [row for shard_rows in many.run_on_all(OVERLAP).values() for row in shard_rows]
    assert len(rows) == 40
    assert max(r.started for r in rows) < min(r.ended for r in rows)
    per_thread = sorted(Counter(names).values(), reverse=True)
    assert per_thread[0] <= HUB_SHARDS == 16
    # three hubs (16 + 16 + 8); a shard whose connection routing's ring check held meanwhile
    # connects in a worker thread of its own
    assert sum(per_thread[:3]) >= 38 and len(per_thread) <= 5
    assert Counter(names)[threading.current_thread().name] >= 8


def test_cold_shards_and_callables_still_use_worker_threads(shard_map: dict[str, str]) -> None:
    with ShardManager.from_urls(shard_map) as fresh:
        fresh.query_all_shards("SELECT 1")  # reads the stored ring too
        for engine in fresh.engines.values():
            engine.dispose()  # no pooled connection left: each shard connects in its own thread
        names = _threads_running_statements(fresh)
        fresh.query_all_shards("SELECT 1")
        assert len(names) == 4 and threading.current_thread().name not in names
        names.clear()
        fresh.run_on_all(lambda conn: conn.execute(text("SELECT 1")))  # a callable may hold locks
        assert threading.current_thread().name not in names


def test_an_interrupted_fan_out_closes_the_connections_it_left_mid_query(manager: ShardManager) -> None:
    """A BaseException in one task ends the others; their half-read connections are never reused."""
    manager.run_on_all("SELECT 1")
    engines = list(manager.engines.values())
    held: list[Any] = []

    def sleeper(engine: Any) -> Any:
        def run() -> Any:
            with engine.connect() as conn:
                held.append(conn.connection.dbapi_connection)
                return conn.execute(text("SELECT pg_sleep(5)")).all()

        return run

    def interrupt() -> None:
        with engines[0].connect() as conn:
            while len(held) < 3:  # each round trip lets the hub run the other tasks meanwhile
                conn.execute(text("SELECT pg_sleep(0.05)"))
            conn.execute(text("SELECT pg_sleep(0.2)"))  # the sleepers' statements reach the server
        raise KeyboardInterrupt

    tasks = [(f"s{i}", sleeper(e)) for i, e in enumerate(engines[1:])] + [("boom", interrupt)]
    with pytest.raises(KeyboardInterrupt):
        Hub().run(tasks)
    assert len(held) == 3 and all(isinstance(c, CooperativeConnection) for c in held)
    assert all(c.closed for c in held)
    rows = manager.query_all_shards("SELECT 1 AS one").all()  # the pools recover: fresh connections
    assert [r.one for r in rows] == [1, 1, 1, 1]


def test_task_errors_are_collected_by_name_and_the_others_finish(manager: ShardManager) -> None:
    manager.run_on_all("SELECT 1")
    engine = manager.engine("shard-1")

    def ok() -> int:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT 7")).scalar_one())

    def bad() -> int:
        with manager.engine("shard-2").connect() as conn:
            return int(conn.execute(text("SELECT 1/0")).scalar_one())

    results, errors = Hub().run([("ok", ok), ("bad", bad)])
    assert results == {"ok": 7}
    assert set(errors) == {"bad"} and "division by zero" in str(errors["bad"])


def test_outside_a_hub_the_connection_waits_as_psycopg_does(manager: ShardManager) -> None:
    with manager.engine("shard-1").connect() as conn:
        assert isinstance(conn.connection.dbapi_connection, CooperativeConnection)
        assert conn.execute(text("SELECT 41 + 1")).scalar_one() == 42


def test_finished_task_greenlets_serve_later_hubs_in_a_fresh_context() -> None:
    """A hub's task greenlets are reused by the next hub of the thread (a new greenlet costs ~15x a
    switch); each task still runs in its own copy of the caller's context variables."""
    seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="caller")
    first: list[Any] = []
    second: list[Any] = []

    def task(into: list[Any]) -> Any:
        def run() -> str:
            into.append(greenlet.getcurrent())
            before = seen.get()
            seen.set("task")  # stays in this task's copy
            return before

        return run

    results, errors = Hub().run([(f"t{i}", task(first)) for i in range(3)])
    assert results == {"t0": "caller", "t1": "caller", "t2": "caller"} and not errors
    results, _ = Hub().run([(f"t{i}", task(second)) for i in range(3)])
    assert set(results.values()) == {"caller"} and seen.get() == "caller"
    assert set(map(id, second)) == set(map(id, first))  # the same greenlets, not new ones
    assert all(not g.dead for g in second)

"""The lean fan-out (SQL text on warm shards, at the libpq level): same answers as SQLAlchemy's path.

Each case runs the statement twice on the real 4-shard fleet: on the lean path, and with a
``before_cursor_execute`` listener on every engine, which sends every shard down the usual
SQLAlchemy path (the lean path never runs where a listener would miss a statement).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DataError, ProgrammingError

from sa_shardkit import ShardManager
from sa_shardkit.scatter.lean import LeanRun, LeanStatement, as_result
from tests.fleet import _connect


@contextmanager
def usual_path(manager: ShardManager) -> Iterator[list[str]]:
    """Every shard through SQLAlchemy's execute: a statement listener on every engine."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    engines = list(manager.engines.values())
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)


def both(manager: ShardManager, call: Callable[[], Any]) -> tuple[Any, Any]:
    manager.run_on_all("SELECT 1")  # every pool holds an idle connection
    lean = call()
    with usual_path(manager) as seen:
        usual = call()
    assert seen  # the comparison really ran the usual path
    return lean, usual


def test_warm_shards_are_served_by_the_lean_loop(manager: ShardManager) -> None:
    manager.run_on_all("SELECT 1")
    engines = {s: manager.engine(s) for s in manager.shard_ids}
    lean = LeanStatement(text("SELECT current_database() AS db"), None, {}, {}, as_result)
    run = LeanRun(lean, engines)
    assert run.serves and run.rest == []
    outcome = run.drive()
    assert not outcome.errors and not outcome.rest
    databases = {s: [r.db for r in as_result(a)] for s, a in outcome.answers.items()}
    assert databases == manager.run_on_all("SELECT current_database() AS db") | {
        s: [rows[0][0]] for s, rows in manager.run_on_all("SELECT current_database()").items()
    }
    with usual_path(manager):
        assert LeanRun(lean, engines).rest == list(engines)  # a listener: nothing for the lean loop


TYPED = (
    "SELECT 42 AS i, 2.5::numeric AS n, 1.5::float8 AS f, 'x%' AS s, NULL AS z, true AS b,"
    " '2024-01-02 03:04:05+00'::timestamptz AS ts, '{\"a\": [1, 2]}'::jsonb AS j, ARRAY[1, 2] AS a,"
    " 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u, interval '1 day' AS d, :x AS x, :y AS y"
)


def test_values_and_types_match_the_usual_path(manager: ShardManager) -> None:
    params = {"x": 7, "y": "it's 100%"}
    lean, usual = both(
        manager, lambda: manager.query_all_shards(text(TYPED), params, with_shard_id=True).all()
    )
    assert [tuple(r) for r in lean] == [tuple(r) for r in usual] and len(lean) == 4
    assert [type(v) for v in lean[0]] == [type(v) for v in usual[0]]
    assert list(lean[0]._mapping) == list(usual[0]._mapping)
    lean_all, usual_all = both(manager, lambda: manager.run_on_all(TYPED, params))
    assert {s: [tuple(r) for r in rows] for s, rows in lean_all.items()} == {
        s: [tuple(r) for r in rows] for s, rows in usual_all.items()
    }
    assert lean_all["shard-1"][0].y == "it's 100%"


def test_dml_rowcounts_and_several_statements_match(manager: ShardManager) -> None:
    manager.run_on_all("DROP TABLE IF EXISTS lean_t; CREATE TABLE lean_t (v int)")
    manager.run_on_all("INSERT INTO lean_t SELECT generate_series(1, 3)")
    lean, usual = both(manager, lambda: manager.run_on_all("UPDATE lean_t SET v = v + 1"))
    assert lean == usual == dict.fromkeys(manager.shard_ids, 3)
    several = "SELECT count(*) AS c FROM lean_t; SELECT 2 AS two"
    lean, usual = both(manager, lambda: manager.run_on_all(several))
    assert {s: [tuple(r) for r in rows] for s, rows in lean.items()} == {
        s: [tuple(r) for r in rows] for s, rows in usual.items()
    }
    assert manager.run_on_all("VACUUM lean_t") == manager.run_on_all("VACUUM lean_t")  # no transaction
    manager.run_on_all("DROP TABLE lean_t")


def test_a_sql_error_is_raised_as_sqlalchemy_raises_it_naming_the_shard(manager: ShardManager) -> None:
    manager.run_on_all("SELECT 1")
    with pytest.raises(DataError, match="division by zero") as lean:
        manager.run_on_all("SELECT 1 / 0")
    assert getattr(lean.value, "shard_id", None) in manager.shard_ids
    with pytest.raises(ProgrammingError, match="no_such_table"):
        manager.query_all_shards("SELECT * FROM no_such_table")
    assert manager.run_on_all("SELECT 1") == dict.fromkeys(manager.shard_ids, [(1,)])  # pools fine


def test_dead_pooled_connections_reconnect(manager: ShardManager, shard_urls: list[str]) -> None:
    """Backends killed under the pool: the ping finds each dead, the usual path reconnects."""
    manager.run_on_all("SELECT 1")
    for url in shard_urls:
        with _connect(url) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'"
            )
    assert manager.run_on_all("SELECT 1") == dict.fromkeys(manager.shard_ids, [(1,)])
    assert len(manager.query_all_shards("SELECT 1").all()) == 4


def test_a_connection_left_in_a_transaction_is_not_reused(manager: ShardManager) -> None:
    manager.run_on_all("SELECT 1")
    manager.run_on_all("BEGIN")
    states = manager.run_on_all(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
        " AND datname = current_database()"
    )
    stray = {  # named when the count is wrong: whose backend was it (a leftover of an earlier test?)
        shard: manager.run_on_all(
            "SELECT pid, application_name, backend_start, xact_start, query FROM pg_stat_activity"
            " WHERE state = 'idle in transaction' AND datname = current_database()",
            shard_ids=[shard],
        )[shard]
        for shard, rows in states.items()
        if rows != [(0,)]
    }
    assert states == dict.fromkeys(manager.shard_ids, [(0,)]), stray

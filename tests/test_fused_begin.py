"""The fused BEGIN (sa_shardkit.fused_begin): a lock-free check sent with libpq's blocking PQexec
outside a hub's task is still bounded by the watchdog, still prepared once per connection, and
inside a hub's task still waits through the hub; and the session listens to ``after_flush`` /
``after_commit`` only once a feature that needs them (a lookup) is declared (sa_shardkit.armed).

No timing is asserted: a check the watchdog did not bound would sleep for ten minutes, past the
test's pytest-timeout.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import text

from sa_shardkit import ShardManager
from sa_shardkit.armed import Armed
from sa_shardkit.fused_begin import first_value_with_begin
from sa_shardkit.multiplex import CooperativeConnection, Hub


def _driver(conn: Any) -> Any:
    return conn.connection.driver_connection


@contextmanager
def _counted_waits() -> Iterator[list[int]]:
    """Every psycopg wait loop a :class:`CooperativeConnection` enters meanwhile, one entry each."""
    waits: list[int] = []
    original = CooperativeConnection.wait

    def counting(self: CooperativeConnection, gen: Any, *args: Any, **kwargs: Any) -> Any:
        waits.append(1)
        return original(self, gen, *args, **kwargs)

    CooperativeConnection.wait = counting  # type: ignore[method-assign]
    try:
        yield waits
    finally:
        CooperativeConnection.wait = original  # type: ignore[method-assign]


def test_a_lock_free_check_answers_and_is_prepared_once(shard_map: dict[str, str]) -> None:
    with ShardManager.from_urls(shard_map) as manager, manager.engine("shard-1").connect() as conn:
        sent: list[bytes] = []
        driver = _driver(conn)
        original = driver.pgconn.exec_

        class Spy:  # pgconn is a C object: wrap the one method the blocking path uses
            def __init__(self, pgconn: Any) -> None:
                self._pgconn = pgconn

            def __getattr__(self, name: str) -> Any:
                return getattr(self._pgconn, name)

            def exec_(self, query: bytes) -> Any:
                sent.append(query)
                return original(query)

        real = driver.pgconn

        def check() -> bytes | None:
            driver.pgconn = Spy(real)  # psycopg's own statements need the real one back
            try:
                return first_value_with_begin(conn, b"shardkit_test_true", b"SELECT true", lock_free=True)
            finally:
                driver.pgconn = real

        for _ in range(2):
            assert check() == b"t"
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1  # in the transaction the BEGIN began
            conn.rollback()
        assert len(sent) == 2
        assert sent[0].startswith(b"PREPARE shardkit_test_true AS SELECT true; BEGIN")
        assert sent[1].startswith(b"BEGIN") and sent[1].endswith(b"EXECUTE shardkit_test_true")
        conn.exec_driver_sql("DEALLOCATE ALL")  # the statement is gone: the next check falls back
        conn.rollback()
        assert first_value_with_begin(conn, b"shardkit_test_true", b"SELECT true", lock_free=True) is None
        conn.rollback()
        assert first_value_with_begin(conn, b"shardkit_test_true", b"SELECT true", lock_free=True) == b"t"
        conn.rollback()


def test_in_another_greenlet_the_check_does_not_block(shard_map: dict[str, str]) -> None:
    """A greenlet that is not the thread's own (gevent's, a hub's) keeps psycopg's wait loop; the
    thread's own one sends the check with PQexec (no wait call)."""
    import greenlet  # type: ignore[import-untyped]

    with ShardManager.from_urls(shard_map) as manager, manager.engine("shard-1").connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.rollback()

        def check() -> bytes | None:
            return first_value_with_begin(conn, b"shardkit_test_green", b"SELECT true", lock_free=True)

        with _counted_waits() as waits:
            with conn.begin() as transaction:  # (the BEGIN is sent behind SQLAlchemy's back)
                assert greenlet.greenlet(check).switch() == b"t"
                in_greenlet = len(waits)  # (the ROLLBACK's wait not counted)
                transaction.rollback()
            waits.clear()
            with conn.begin() as transaction:
                assert check() == b"t"
                in_thread = len(waits)
                transaction.rollback()
    assert in_greenlet >= 1 and in_thread == 0, (in_greenlet, in_thread)


@pytest.mark.timeout(120)
def test_the_watchdog_bounds_a_blocking_check(shard_map: dict[str, str]) -> None:
    """PQexec blocks in libpq with the GIL released: the watchdog thread still shuts the socket
    down at the engine's query timeout, and the check answers None (the connection is lost)."""
    with ShardManager.from_urls(shard_map, query_timeout=0.5) as manager:
        with manager.engine("shard-1").connect() as conn:
            slow = b"SELECT CAST(pg_sleep(600) AS text)"
            assert first_value_with_begin(conn, b"shardkit_test_sleep", slow, lock_free=True) is None
            assert _driver(conn).pgconn.status != 0  # CONNECTION_OK is 0: it was cut


def test_in_a_hub_task_the_check_waits_through_the_hub(shard_map: dict[str, str]) -> None:
    with ShardManager.from_urls(shard_map) as manager, manager.engine("shard-1").connect() as conn:
        conn.execute(text("SELECT 1"))  # connected outside the hub
        conn.rollback()

        def check() -> bytes | None:
            return first_value_with_begin(conn, b"shardkit_test_hub", b"SELECT true", lock_free=True)

        with _counted_waits() as waits, conn.begin() as transaction:  # (BEGIN sent behind SQLAlchemy's back)
            results, errors = Hub().run([("shard-1", check)])
            in_hub = len(waits)  # (the ROLLBACK's wait not counted)
            transaction.rollback()
    assert not errors and results == {"shard-1": b"t"}
    assert in_hub, "a blocking PQexec in a hub's task would stall every other task"


def test_armed_runs_waiting_work_once() -> None:
    flag, ran = Armed(), []
    flag.when_armed(lambda: ran.append("early"))
    assert not flag and ran == []
    flag.arm()
    flag.arm()
    flag.when_armed(lambda: ran.append("late"))
    assert flag and ran == ["early", "late"]


def test_flush_and_commit_listeners_wait_for_a_lookup() -> None:
    """In a process whose models declare no lookup, a flush and a commit call no listener of the
    lookups (not even one that returns at once); declaring one makes the session listen."""
    script = textwrap.dedent(
        """
        from sqlalchemy import event
        from sa_shardkit import ShardedSession
        from sa_shardkit import session as s
        import sa_shardkit.demo.models  # no lookups
        def listening():
            return [event.contains(ShardedSession, p, f) for p, f in s._LAZY_LISTENERS.items()]
        print(listening())
        import tests.lookup_models  # declares Lookup("email", unique=True)
        from sqlalchemy.orm import configure_mappers
        configure_mappers()
        print(listening())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=_root()
    ).stdout.split()
    assert out == ["[False,", "False]", "[True,", "True]"], out


def _root() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent)

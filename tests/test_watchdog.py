"""The fault watchdog and a late answer: a call that answers just as its deadline passes."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import create_engine, text

from sa_shardkit.faults import guard


def test_a_ping_answered_as_its_deadline_passed_gets_a_fresh_connection(shard_urls: list[str]) -> None:
    """The watchdog shuts the socket of a ping past its deadline; when the answer had come just
    before, the pool must not hand that connection out (the next statement would fail with
    'server closed the connection unexpectedly', a shard that answered reported unavailable)."""
    engine = create_engine(shard_urls[0], pool_pre_ping=True, pool_size=1)
    ping = engine.dialect.do_ping
    slow: list[bool] = []

    def answered_then_stalled(dbapi_connection: Any) -> bool:
        answer = bool(ping(dbapi_connection))
        if slow:
            slow.clear()
            time.sleep(2.5)  # past the 1 s bound: the watchdog shuts the socket meanwhile
        return answer

    engine.dialect.do_ping = answered_then_stalled  # type: ignore[method-assign]
    guard(engine, "shard-1", connect_timeout=1, query_timeout=30)
    try:
        with engine.connect() as conn:
            first = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        slow.append(True)
        with engine.connect() as conn:  # the late ping: a new connection, and it works
            second = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert second != first
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == second
    finally:
        engine.dispose()

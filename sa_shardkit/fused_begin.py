"""A transaction's BEGIN and its first statement in one round trip (sync psycopg).

A write transaction's fence reads one fixed statement before its first write (the unstored-ring
check, or with a stored ring the ``FOR KEY SHARE`` lock of the state row,
:meth:`sa_shardkit.placement.Placement.fence_write`). psycopg sends ``BEGIN`` in a round
trip of its own before a transaction's first statement, so that check alone was one more round
trip per write transaction. Sent as one simple-protocol query, ``BEGIN ...; EXECUTE <name>``, it
rides on the BEGIN's round trip: the same commands in the same order and the same snapshot rules
(the statement is still the transaction's first, run before any write). The statement is a
server-side prepared statement of the connection (prepared in the same query the first time), so the server does not plan it again for every transaction (planning the catalog join of
the unstored-ring check cost more than the round trip saved).

Anything unusual (another driver, an async or autocommit connection, a transaction the server has
begun already, any error) answers None and the caller runs the statement the ordinary way, which
also raises a failure the ordinary way (a lost connection named by the shard's engine).
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import greenlet  # type: ignore[import-untyped]  # no stubs shipped
import psycopg
from psycopg import generators, pq
from psycopg.pq import ExecStatus, TransactionStatus
from sqlalchemy.engine import Connection

from .faults import BOUND_ATTR, QUERY_TIMEOUT, WATCHDOG


class LockWaitTimedOut(Exception):
    """The fused statement's lock wait ran out of ``lock_timeout`` (SQLSTATE 55P03): the transaction
    was rolled back (the connection is idle, as before the call). The caller names the shard."""


_LOCK_NOT_AVAILABLE = b"55P03"

PREPARED_ATTR = "_shardkit_prepared"
"""Driver connection attribute: names of the statements :func:`first_value_with_begin` prepared on it."""


def first_value_with_begin(
    conn: Connection, name: bytes, sql: bytes, *, lock_free: bool = False
) -> bytes | None:
    """The first column of the first row of ``sql`` (text, as the server sent it), run as the first
    statement of ``conn``'s transaction together with its BEGIN; None when that was not possible
    (the caller then runs ``sql`` itself). ``sql`` must be a fixed, parameterless statement that
    returns exactly one row; ``name`` is the prepared statement it is kept as on the connection. It
    is bounded as the engine bounds its statements (the fault watchdog).

    ``lock_free``: ``sql`` never waits for a lock (a catalog read), so outside any greenlet task (a
    hub's, gevent's, eventlet's) the query is sent with libpq's blocking ``PQexec``, one C call
    instead of psycopg's wait loop (whose short polls exist so that Ctrl-C can cancel a long wait; a
    frozen server is still bounded by the watchdog). A statement that can wait for a lock keeps
    psycopg's loop.

    A lock wait in ``sql`` that runs out of ``lock_timeout`` raises :class:`LockWaitTimedOut` (the
    transaction rolled back) instead: running ``sql`` again the ordinary way would wait again."""
    if conn.dialect.driver != "psycopg":
        return None
    # the driver connection (a sync psycopg dialect's DBAPI connection is psycopg's own), read as
    # conn.connection.driver_connection reads it, without its four calls; and psycopg's properties
    # (autocommit, closed, prepare_threshold) by the attributes they return
    fairy = conn._dbapi_connection
    driver: Any = fairy.dbapi_connection if fairy is not None else None
    if not isinstance(driver, psycopg.Connection):
        driver = conn.connection.driver_connection
        if not isinstance(driver, psycopg.Connection):
            return None
    pgconn = driver.pgconn
    if driver._autocommit or pgconn.status == pq.ConnStatus.BAD:
        return None
    if pgconn.transaction_status != TransactionStatus.IDLE:
        return None
    limit = statement_limit(conn._execution_options, conn.engine)
    names = prepared_names(driver)
    # the BEGIN psycopg itself would send now (it caches it, and forgets it when the connection's
    # isolation level, read-only or deferrable setting changes)
    begin: bytes = driver._begin_statement or driver._get_tx_start_command()
    if driver._prepared.prepare_threshold is None:
        # Prepared statements are off (a shard behind PgBouncer in transaction pooling): a statement
        # prepared on one server connection is not there on the next, so the check is sent as text.
        query = begin + b"; " + sql
    else:
        query = begin + b"; EXECUTE " + name
        if name not in names:
            query = b"PREPARE " + name + b" AS " + sql + b"; " + query
    # blocking only in a thread's own (main) greenlet, so never in a hub's task, and not where
    # gevent or eventlet may have made the watchdog's thread a greenlet that a blocked call starves
    blocking = (
        lock_free
        and greenlet.getcurrent().parent is None
        and "gevent" not in sys.modules
        and "eventlet" not in sys.modules
    )
    try:
        # what bounded_driver_call does (the socket psycopg's fileno() would read)
        armed = None if limit is None else WATCHDOG.arm(driver, limit, pgconn.socket)
        try:
            if blocking:  # libpq's answer is the last statement's result (or the error that ended it)
                last: Any = pgconn.exec_(query)
                results = [last]
            else:
                pgconn.send_query(query)  # the connection's own wait: a hub's task waits through the hub
                results = driver.wait(generators.execute(pgconn))
                last = results[-1] if results else None
        finally:
            if armed is not None:
                WATCHDOG.disarm(armed)
    except psycopg.Error:
        return None  # the connection is lost: the ordinary statement raises it, named
    if last is not None and last.status == ExecStatus.TUPLES_OK and last.ntuples == 1:
        names.add(name)
        value: bytes | None = last.get_value(0, 0)
        return value
    failed = next((r for r in results if r.status == ExecStatus.FATAL_ERROR), None)
    if failed is not None and failed.error_field(pq.DiagnosticField.SQLSTATE) == _LOCK_NOT_AVAILABLE:
        names.add(name)  # the error came from the statement itself: it is prepared (if it is to be)
        _roll_back(driver)
        raise LockWaitTimedOut(name.decode())
    names.discard(name)  # e.g. DEALLOCATE ALL dropped it: prepared again next time
    _roll_back(driver)
    return None


def statement_limit(options: Any, engine: Any) -> float | None:
    """The bound on a statement with execution ``options`` on ``engine``: its own
    ``shardkit_query_timeout`` option, else the engine's (what ``statement_bound(engine)`` reads)."""
    limit: float | None = (
        options[QUERY_TIMEOUT] if QUERY_TIMEOUT in options else getattr(engine, BOUND_ATTR, None)
    )
    return limit


def prepared_names(driver: Any) -> set[bytes]:
    """Names of the statements this module and :mod:`sa_shardkit.fused_write` prepared on ``driver``
    (a psycopg connection), kept on it."""
    names: set[bytes] | None = getattr(driver, PREPARED_ATTR, None)
    if names is None:
        names = set()
        setattr(driver, PREPARED_ATTR, names)
        _forget_on_deallocate_all(driver, names)
    return names


def _forget_on_deallocate_all(driver: Any, names: set[bytes]) -> None:
    """Empty ``names`` whenever psycopg deallocates every statement of ``driver``: it does after
    each ROLLBACK once it has prepared a statement of its own (``Connection._deallocate(None)``,
    what its prepared-statement cache's maintenance calls). Else a write after a read would find its
    check missing from the server (one failed pipeline and the ordinary fence: three more round
    trips) instead of preparing it again in its pipeline."""
    deallocate = getattr(type(driver), "_deallocate", None)
    if deallocate is None:  # another psycopg: a missing statement is still found and prepared again
        return
    ref = weakref.ref(driver)  # the connection holds this function: no reference cycle through it

    def forgetting(name: bytes | None) -> Any:
        if name is None:
            names.clear()
        return deallocate(ref(), name)

    driver._deallocate = forgetting


def _roll_back(driver: psycopg.Connection[Any]) -> None:
    """Back to no transaction after a failed fused BEGIN (the ordinary path then begins anew)."""
    pgconn = driver.pgconn
    if pgconn.status != pq.ConnStatus.OK or pgconn.transaction_status == TransactionStatus.IDLE:
        return
    try:
        pgconn.send_query(b"ROLLBACK")
        driver.wait(generators.execute(pgconn))
    except psycopg.Error:
        pass  # lost meanwhile: the ordinary statement raises it, named


__all__ = ["PREPARED_ATTR", "LockWaitTimedOut", "first_value_with_begin", "prepared_names", "statement_limit"]

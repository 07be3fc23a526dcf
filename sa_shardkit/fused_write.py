"""A write transaction's fence check carried by its first statement (sync psycopg).

Every write transaction first holds the write fence on its shard
(:meth:`sa_shardkit.placement.Placement.fence_write`): with no ring stored, a check that none is;
with one, the shard's state row locked ``FOR KEY SHARE`` at the routed ring version (a key that is
not moving). Sent with the BEGIN (:mod:`sa_shardkit.fused_begin`) it costs no round trip of its
own, but the write still waits for it: BEGIN + fence, then the first statement, then COMMIT.

Here a session flush's fence marks the connection instead (:func:`defer_check`), and the first
statement sent on it goes out in one libpq pipeline behind the BEGIN and a form of the fence that
*fails* (SQLSTATE 22P02, a message starting ``sa_shardkit:``) when the write may not go ahead as
routed (:func:`unstored_check`, :func:`stored_check`): BEGIN, fence, statement, Sync, one round
trip. A failed command aborts the rest of the pipeline and the transaction, so the statement never
runs after a failed fence. Then the transaction is rolled back (it had run nothing else: marks are
made on an idle connection only), the fence is held the ordinary way
(:meth:`PendingCheck.fence_again`: it adopts the stored or newer ring, and raises
:class:`~sa_shardkit.StaleRingError` when a key moved), and the statement runs as usual. A lock
wait that runs out (``fence_timeout``) raises :class:`~sa_shardkit.FenceTimeoutError` naming the
shard, as the ordinary fence does.

A read transaction has no check to carry, but psycopg still sends its BEGIN in a round trip of its
own: a session marks every connection its transaction takes (:func:`begin_with_next_statement`),
and the first statement goes out behind the BEGIN alone (BEGIN, statement, Sync). A fence check
made later in the transaction replaces that mark.

Safety is the ordinary fence's: the same check, the first statement of the transaction on this
connection, before the write in it. Anything unusual (another driver or cursor class, an async or
autocommit connection, prepared statements off as behind PgBouncer, a moving key, an executemany,
a statement without parameters, which psycopg sends as a simple query that may hold several, a
statement sent past SQLAlchemy's execute) takes the ordinary path.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any, Protocol

import psycopg
from psycopg import adapt, generators, pq
from psycopg._preparing import Prepare
from psycopg.pq import ExecStatus, TransactionStatus
from sqlalchemy.engine import Connection, Engine

from .faults import WATCHDOG
from .fused_begin import prepared_names, statement_limit
from .ring_state import FENCE_VERSION_SQL, STATE_TABLE, bounded_lock_sql

_FAIL = "'sa_shardkit: {why}'"
_UNSTORED_CHECK = (
    "SELECT (CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    f" WHERE c.relname = '{STATE_TABLE}' AND n.nspname = ANY (current_schemas(false)))"
    f" THEN {_FAIL.format(why='a ring is stored on this shard')} END)::int"
).encode()
_CHECK_FAILED = b"sa_shardkit: "
_INVALID_TEXT = b"22P02"
_DUPLICATE = b"42P05"
_LOCK_NOT_AVAILABLE = b"55P03"


def unstored_check() -> tuple[bytes, bytes]:
    """(name, SQL) of the unstored-ring check that fails when the state table exists in its
    snapshot. The CASE is not a constant (a sublink), so the cast is evaluated at run time, on its
    one row, and only the failing branch fails."""
    return b"shardkit_unstored_or_fail", _UNSTORED_CHECK


@lru_cache(maxsize=64)
def stored_check(version: int, ms: int | None) -> tuple[bytes, bytes]:
    """(name, SQL) of the stored-ring fence of a key that is not moving: the fused BEGIN's lock of
    the shard's state row ``FOR KEY SHARE`` (the wait bounded by ``ms``,
    :func:`~sa_shardkit.ring_state.bounded_lock_sql`), failing unless it stores ring ``version`` (or
    when it has no row). Every column of the lock's statement is selected, so none of its side
    effects (the bound put back) is planned away."""
    locked = FENCE_VERSION_SQL if ms is None else bounded_lock_sql("version", "FOR KEY SHARE", ms)
    fail = _FAIL.format(why=f"the shard does not store ring version {version}")
    sql = f"SELECT (CASE WHEN f.version IS DISTINCT FROM {version} THEN {fail} END)::int, f.* FROM ({locked}) AS f"
    return b"shardkit_fence_or_fail_%d_%d" % (version, ms or 0), sql.encode()


_MARK = "_shardkit_pending_check"
"""Driver connection attribute: the :class:`PendingCheck` its next statement carries."""
_WRAPPED = "_shardkit_fused_write"


class PendingCheck(Protocol):
    """A deferred fence check of one shard in one transaction (made by the placement)."""

    transaction: Any
    """The SQLAlchemy transaction it belongs to: a mark left by a transaction that ran nothing is
    ignored by the next one."""

    @property
    def name(self) -> bytes | None:
        """The prepared statement the check is kept as on the connection (None: no check, the BEGIN
        alone rides on the statement)."""

    sql: bytes
    """The check: a fixed statement that fails with a message starting ``sa_shardkit:`` (SQLSTATE
    22P02) when the write may not go ahead as routed (:func:`unstored_check`, :func:`stored_check`)."""

    def checked(self, conn: Connection) -> None:
        """The check passed (the statement then runs in the same transaction)."""

    def timed_out(self, conn: Connection) -> None:
        """Raise the error of a check whose lock wait ran out (the transaction was rolled back)."""

    def fence_again(self, conn: Connection) -> None:
        """Hold the fence the ordinary way (no transaction begun on the driver connection)."""


def _driver_of(conn: Connection) -> Any:
    fairy = conn._dbapi_connection
    driver = fairy.dbapi_connection if fairy is not None else None
    return driver if isinstance(driver, psycopg.Connection) else None


def _pipeline_usable(driver: Any) -> bool:
    """Whether a pipeline may carry a check on ``driver`` now: when the mark is made and again when
    it is used (the connection may have changed meanwhile)."""
    if driver._autocommit or driver._pipeline is not None:
        return False
    if driver._prepared.prepare_threshold is None:  # behind PgBouncer: the fused BEGIN's text form
        return False
    # nothing of the transaction has run on the connection: a failed check may roll it all back
    return bool(driver.pgconn.transaction_status == TransactionStatus.IDLE)


def can_defer(conn: Connection) -> bool:
    """Whether ``conn``'s next statement can carry a fence check (:func:`defer_check`)."""
    if not getattr(conn.dialect, _WRAPPED, False):
        return False
    driver = _driver_of(conn)
    return driver is not None and _pipeline_usable(driver)


def defer_check(conn: Connection, pending: PendingCheck) -> None:
    """Make ``conn``'s next statement carry ``pending`` (call :func:`can_defer` first)."""
    setattr(_driver_of(conn), _MARK, pending)


class _BeginOnly:
    """The mark of a transaction's first statement that carries no check, only the BEGIN."""

    __slots__ = ("transaction",)
    name = None
    sql = b""

    def __init__(self, transaction: Any) -> None:
        self.transaction = transaction

    def checked(self, conn: Connection) -> None:
        """Nothing to note: there was no check."""

    def timed_out(self, conn: Connection) -> None:  # pragma: no cover - no check, no lock wait
        """Never called: only a check waits for a lock."""

    def fence_again(self, conn: Connection) -> None:
        """Nothing to hold: the statement then runs the ordinary way (psycopg sends the BEGIN)."""


def begin_with_next_statement(conn: Connection) -> None:
    """Send ``conn``'s BEGIN with its next statement, in one pipeline (what a session does for each
    connection its transaction takes, :mod:`sa_shardkit.session`): psycopg sends a transaction's
    BEGIN in a round trip of its own, the first of every read transaction. A deferred fence check
    (:func:`defer_check`) made later in the transaction replaces this mark and carries the BEGIN
    itself. Nothing happens where a pipeline cannot be used (:func:`can_defer`)."""
    if not getattr(conn.dialect, _WRAPPED, False):
        return
    fairy = conn._dbapi_connection
    driver: Any = fairy.dbapi_connection if fairy is not None else None
    if isinstance(driver, psycopg.Connection) and _pipeline_usable(driver):
        setattr(driver, _MARK, _BeginOnly(conn._transaction))


def pending_check(conn: Connection) -> Any:
    """The check ``conn``'s next statement would carry (None: none)."""
    driver = _driver_of(conn)
    return None if driver is None else getattr(driver, _MARK, None)


def install(engine: Engine) -> Engine:
    """Let ``engine``'s statements carry a deferred check (sync psycopg only; call after
    :func:`sa_shardkit.faults.guard`, so the statement's own call stays bounded by it)."""
    dialect: Any = engine.dialect
    if dialect.driver != "psycopg" or dialect.is_async or getattr(dialect, _WRAPPED, False):
        return engine
    execute = dialect.do_execute

    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        pending = _take_mark(cursor, context)
        if pending is not None and _run_fused(pending, cursor, statement, parameters, context) is None:
            pending.fence_again(context.root_connection)
            pending = None
        if pending is None:
            execute(cursor, statement, parameters, context)

    def carried(original: Callable[..., Any]) -> Callable[..., Any]:
        def run(cursor: Any, *args: Any) -> Any:
            pending = _take_mark(cursor, args[-1] if args else None)
            if pending is not None:  # resolved first, the ordinary way
                pending.fence_again(args[-1].root_connection)
            return original(cursor, *args)

        return run

    dialect.do_execute = do_execute
    dialect.do_executemany = carried(dialect.do_executemany)
    dialect.do_execute_no_params = carried(dialect.do_execute_no_params)
    setattr(dialect, _WRAPPED, True)
    return engine


def _take_mark(cursor: Any, context: Any) -> PendingCheck | None:
    """The check ``cursor``'s statement must carry, taken off its connection (None: none, or a mark
    left by a transaction that ended without a statement). A statement without an execution context
    (the dialect's own) leaves the mark for the next."""
    driver = getattr(cursor, "_conn", None)
    pending: PendingCheck | None = getattr(driver, _MARK, None)
    if pending is None or context is None:
        return None
    setattr(driver, _MARK, None)
    return pending if pending.transaction is context.root_connection._transaction else None


def _run_fused(
    pending: PendingCheck, cursor: Any, statement: str, parameters: Any, context: Any
) -> bool | None:
    """Run ``statement`` behind the BEGIN and the check (if ``pending`` has one) in one pipeline:
    True when it ran (its results are in ``cursor``; its own failure is raised as psycopg raises
    it); None when it did not (the check failed, or the pipeline could not be used): nothing of
    this transaction ran on the connection."""
    if type(cursor) is not psycopg.Cursor or cursor.closed:
        return None
    driver: Any = cursor._conn
    if not _pipeline_usable(driver):
        return None  # e.g. something ran in the transaction since the mark
    pgconn = driver.pgconn
    conn: Connection = context.root_connection
    limit = statement_limit(context.execution_options, conn.engine)
    names = prepared_names(driver)
    with driver.lock:
        # what psycopg's Cursor.execute does before it sends (_start_query, _convert_query)
        cursor._reset()
        if not cursor._last_query or cursor._last_query is not statement:
            cursor._last_query = None
            cursor._tx = adapt.Transformer(cursor)
        pgq = cursor._convert_query(statement, parameters)
        if not pgq.params:  # psycopg sends it as a simple query (it may be several): the ordinary way
            return None
        prep, prepared_name = driver._prepared.get(pgq, None)
        fmt = cursor.format
        begin = driver._begin_statement or driver._get_tx_start_command()
        name, sql = pending.name, pending.sql
        prepare_check = name is not None and name not in names
        armed = None if limit is None else WATCHDOG.arm(driver, limit, pgconn.socket)
        try:
            try:
                pgconn.enter_pipeline_mode()  # libpq buffers the commands until the sync flushes them
                pgconn.send_query_params(begin, None)
                commands = 3  # BEGIN, the statement, the Sync
                if name is not None:
                    if prepare_check:
                        pgconn.send_prepare(name, sql)
                        commands += 1
                    pgconn.send_query_prepared(name, None)
                    commands += 1
                if prep is Prepare.NO:
                    pgconn.send_query_params(
                        pgq.query,
                        pgq.params,
                        param_formats=pgq.formats,
                        param_types=pgq.types,
                        result_format=fmt,
                    )
                else:
                    if prep is Prepare.SHOULD:
                        pgconn.send_prepare(prepared_name, pgq.query, param_types=pgq.types)
                        commands += 1
                    pgconn.send_query_prepared(
                        prepared_name, pgq.params, param_formats=pgq.formats, result_format=fmt
                    )
                pgconn.pipeline_sync()
                groups = driver.wait(_pipeline_results(pgconn, commands))
                pgconn.exit_pipeline_mode()
            except psycopg.Error:
                _abandon(driver)  # the ordinary path then fails on it as a lost connection, named
                return None
            except BaseException:  # e.g. Ctrl-C mid-pipeline: the connection's state is unknown
                _abandon(driver)
                raise
        finally:
            if armed is not None:
                WATCHDOG.disarm(armed)
        if groups[0][-1].status != ExecStatus.COMMAND_OK:
            _roll_back(driver)
            return None
        at = 1
        if prepare_check and name is not None:
            prepared = groups[at][-1]
            if prepared.status != ExecStatus.COMMAND_OK:
                if prepared.error_field(pq.DiagnosticField.SQLSTATE) == _DUPLICATE:
                    names.add(name)  # prepared on the connection already (by an earlier pipeline)
                _roll_back(driver)
                return None
            at += 1
        if name is not None:
            if not _check_passed(pending, name, groups[at][-1], names, driver, conn):
                return None
            at += 1
        if prep is Prepare.SHOULD:
            prepared = groups[at][-1]
            at += 1
            if prepared.status == ExecStatus.FATAL_ERROR:
                raise psycopg.errors.error_from_result(prepared, encoding=cursor._encoding)
        results = groups[at]
        if not any(r.status == ExecStatus.FATAL_ERROR for r in results):
            key = driver._prepared.maybe_add_to_cache(pgq, prep, prepared_name)
            if key is not None:
                driver._prepared.validate(key, prep, prepared_name, results)
        cursor._query = pgq
        cursor._check_results(results)  # raises the statement's failure as psycopg does
        cursor._set_results(results)
        cursor._last_query = statement
        if driver._prepared._to_flush:  # statements psycopg evicted from its cache, to deallocate
            driver.wait(driver._prepared.maintain_gen(driver))
    return True


def _check_passed(
    pending: PendingCheck, name: bytes, check: Any, names: set[bytes], driver: Any, conn: Connection
) -> bool:
    """Whether the pipeline's check passed (then noted); else its transaction is rolled back, and a
    lock wait that ran out raises as :meth:`PendingCheck.timed_out` raises it."""
    if check.status == ExecStatus.TUPLES_OK:
        names.add(name)
        pending.checked(conn)
        return True
    state = check.error_field(pq.DiagnosticField.SQLSTATE)
    failed = state == _INVALID_TEXT and _CHECK_FAILED in (
        check.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b""
    )
    if failed or state == _LOCK_NOT_AVAILABLE:
        names.add(name)  # the statement itself ran: it is prepared
    else:
        names.discard(name)  # e.g. DEALLOCATE ALL dropped it: prepared again next time
    _roll_back(driver)
    if state == _LOCK_NOT_AVAILABLE:
        pending.timed_out(conn)  # waiting again the ordinary way would wait as long again
    return False


def _pipeline_results(pgconn: Any, commands: int) -> Any:
    """Flush the pipeline and read the results of ``commands`` commands (the last a Sync)."""
    yield from generators.send(pgconn)
    groups: list[list[Any]] = []
    while len(groups) < commands:
        results = yield from generators.fetch_many(pgconn)
        if not results:
            raise psycopg.OperationalError("the pipeline's results ended early")
        groups.append(results)
        if results[0].status == ExecStatus.PIPELINE_SYNC:
            break
    return groups


def _roll_back(driver: Any) -> None:
    """Undo the pipeline's transaction: it ran the BEGIN and at most the check."""
    pgconn = driver.pgconn
    if pgconn.transaction_status == TransactionStatus.IDLE:
        return
    try:
        pgconn.send_query(b"ROLLBACK")
        driver.wait(generators.execute(pgconn))
    except psycopg.Error:
        _abandon(driver)


def _abandon(driver: Any) -> None:
    """A pipeline that failed part-way: close the connection (its state is unknown)."""
    try:
        driver.close()
    except Exception:  # noqa: BLE001 - already gone
        pass


__all__ = [
    "PendingCheck",
    "begin_with_next_statement",
    "can_defer",
    "defer_check",
    "install",
    "pending_check",
    "stored_check",
    "unstored_check",
]

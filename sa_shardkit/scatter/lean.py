"""The lean fan-out: one SQL string on many warm shards, driven at the libpq level from one loop.

``query_all_shards(SQL text)`` and ``run_on_all(SQL text)`` spend, per shard, far more Python in
SQLAlchemy's checkout, pre-ping, execution and result setup (and in the greenlet switches of
:mod:`sa_shardkit.multiplex`) than the server needs to answer: about 0.7 ms per shard, which at 256
shards on two busy cores outlasts a 50 ms query several times over. Here the statement is compiled
and rendered once for all shards (client-side binding, psycopg's ``ClientCursor.mogrify``), and
each shard's idle pooled connection is borrowed straight from its pool's idle queue (as the
budget's reaper takes one to close it). Every shard then gets two messages on its socket, a ping
(an empty query, bounded by ``connect_timeout``: a frozen server is named) and the statement
(bounded by ``query_timeout``), and a single ``selectors`` loop in the calling thread waits for
all of them; rows are loaded by psycopg's own loaders, so values are exactly what a cursor returns.

It runs only where nothing would miss it: a ``TextClause`` with plain bound values (no bind
processors, no expanding ``IN``), a cooperative psycopg engine whose pool holds an idle connection
that is not due for recycling or invalidated, and no listener on the engine's statement events
(``manager.events``, OpenTelemetry, a user's ``before_cursor_execute``) or on pool checkouts.
Every other shard, and a shard whose borrowed connection turns out dead (the ping fails: it is
invalidated), is left to the caller's usual path, which reconnects.
"""

from __future__ import annotations

import selectors
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import pq
from psycopg.adapt import Transformer
from sqlalchemy.engine import Engine, IteratorResult, Result
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.util import queue as sqla_queue

from ..budget import put_back_idle
from ..faults import unavailable
from ..multiplex import is_cooperative
from .fanout import scatter_pool

T = TypeVar("T")

LEAN_SHARDS = 64
"""Shards per loop: past 64 the shards are split over loops in threads of the scatter pool. The GIL
serialises their Python, but on a machine shared with other processes each thread is one more
share of the CPU, and the libpq calls release the GIL."""

_IDLE_SINCE = "shardkit_idle_since"  # the budget's mark on a record checked in (sa_shardkit.budget)
_PING = 0
_QUERY = 1


@dataclass
class Answer:
    """One shard's answer: column names and rows (``keys`` None: no rows, ``rowcount`` then)."""

    keys: list[str] | None
    rows: list[tuple[Any, ...]]
    rowcount: int


@dataclass
class LeanOutcome:
    """Answers and errors by shard, and the shards left to the usual path (a dead connection)."""

    answers: dict[str, Answer] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    rest: list[str] = field(default_factory=list)


_ENGINE_EVENTS = (
    "before_cursor_execute",
    "after_cursor_execute",
    "before_execute",
    "after_execute",
    "engine_connect",
    "begin",
    "commit",
    "rollback",
    "set_connection_execution_options",
)
_DIALECT_EVENTS = ("do_execute", "do_execute_no_params", "do_setinputsizes")


def _leanable(engine: Engine) -> bool:
    pool = engine.pool
    if not is_cooperative(engine) or type(pool) is not QueuePool or pool.checkedin() == 0:
        return False
    dispatch: Any = engine.dispatch
    dialect: Any = engine.dialect.dispatch
    if any(getattr(dispatch, name) for name in _ENGINE_EVENTS) or any(
        getattr(dialect, n) for n in _DIALECT_EVENTS
    ):
        return False
    # handle_error: only the fault guard's (it names the shard, which this path does itself)
    return len(dialect.handle_error) <= 1 and not pool.dispatch.checkout and not pool.dispatch.reset


def _render(statement: TextClause, engine: Engine, params: Mapping[str, Any], conn: Any) -> bytes | None:
    """The statement as one SQL string with its values inlined (psycopg's client-side binding)."""
    compiled: Any = statement.compile(dialect=engine.dialect)
    if compiled._bind_processors or any(b.expanding or b.literal_execute for b in compiled.binds.values()):
        return None
    values = compiled.construct_params(dict(params))
    return psycopg.ClientCursor(conn).mogrify(compiled.string, values).encode(conn.info.encoding)


class _Shard:
    __slots__ = ("conn", "deadline", "engine", "fileno", "pgconn", "phase", "record", "seconds", "shard_id")

    def __init__(self, shard_id: str, engine: Engine, record: ConnectionPoolEntry, conn: Any) -> None:
        self.shard_id = shard_id
        self.engine = engine
        self.record = record
        self.conn = conn
        self.pgconn: Any = conn.pgconn
        self.fileno: int = self.pgconn.socket  # kept: a lost connection no longer tells it
        self.phase = _PING
        self.deadline = 0.0
        self.seconds: float | None = None


@dataclass(frozen=True)
class LeanStatement(Generic[T]):
    """The SQL text a fan-out may run on the lean path, and what a shard's :class:`Answer` becomes."""

    statement: TextClause
    params: Mapping[str, Any] | None
    connect_timeouts: Mapping[str, float]
    query_timeouts: Mapping[str, float | None]
    finish: Callable[[Answer], T]


class LeanRun:
    """The shards of one fan-out this path serves: their idle connections borrowed on creation
    (``rest``: the others, for the usual path), driven to their answers by :meth:`drive`."""

    def __init__(self, lean: LeanStatement[Any], engines: Mapping[str, Engine]) -> None:
        self.lean = lean
        self.engines = engines
        self.rest: list[str] = []
        self._borrowed: list[_Shard] = []
        for shard_id, engine in engines.items():
            shard = _borrow(shard_id, engine) if _leanable(engine) else None
            if shard is None:
                self.rest.append(shard_id)
            else:
                self._borrowed.append(shard)
        self._sql: bytes | None = None
        if self._borrowed:
            first = self._borrowed[0]
            self._sql = _render(lean.statement, first.engine, lean.params or {}, first.conn)
            if self._sql is None:
                for shard in self._borrowed:
                    _give_back(shard)
                self.rest.extend(s.shard_id for s in self._borrowed)
                self._borrowed = []

    @property
    def serves(self) -> bool:
        """Whether any shard runs on this path."""
        return bool(self._borrowed)

    def drive(self) -> LeanOutcome:
        """Every borrowed shard's answer or error; ``rest``: those whose connection was found dead
        (nothing ran there: the caller runs them on the usual path, which reconnects)."""
        outcome = LeanOutcome()
        sql, lean = self._sql, self.lean
        if not self._borrowed or sql is None:
            return outcome
        groups = [self._borrowed[i : i + LEAN_SHARDS] for i in range(0, len(self._borrowed), LEAN_SHARDS)]
        parts = [LeanOutcome() for _ in groups]
        pool = scatter_pool()
        others = [
            pool.submit(_drive, group, sql, lean.connect_timeouts, lean.query_timeouts, part)
            for group, part in zip(groups[1:], parts[1:], strict=True)
        ]
        try:
            _drive(groups[0], sql, lean.connect_timeouts, lean.query_timeouts, parts[0])
        finally:
            for other in others:  # every loop ends (a BaseException there is raised by result())
                other.result()
        for part in parts:
            outcome.answers.update(part.answers)
            outcome.errors.update(part.errors)
            outcome.rest.extend(part.rest)
        return outcome


def _borrow(shard_id: str, engine: Engine) -> _Shard | None:
    """An idle record of ``engine``'s pool, taken out of its idle queue (ours alone until put back)."""
    pool: Any = engine.pool
    try:
        record = pool._pool.get(False)
    except sqla_queue.Empty:
        return None
    conn = record.dbapi_connection
    usable = (
        conn is not None
        and isinstance(conn, psycopg.Connection)
        and not conn.closed
        and conn.pgconn.status == pq.ConnStatus.OK
        and conn.pgconn.transaction_status == pq.TransactionStatus.IDLE
        and not (pool._recycle > -1 and time.time() - record.starttime > pool._recycle)
        and not pool._invalidate_time > record.starttime
        and not record._soft_invalidate_time > record.starttime
    )
    shard = _Shard(shard_id, engine, record, conn) if usable else None
    if shard is None:
        put_back_idle(pool, record)
    return shard


def _give_back(shard: _Shard, error: BaseException | None = None) -> None:
    """Return the record to its pool (invalidated, so reconnected on next use, after ``error``)."""
    record = shard.record
    if error is not None:
        record.invalidate(error)
    else:
        record.info[_IDLE_SINCE] = time.monotonic()
    pool: Any = shard.engine.pool
    put_back_idle(pool, record)
    if record.dbapi_connection is not None:
        pool.dispatch.checkin(record.dbapi_connection, record)  # the budget's idle mark and waiters


def _drive(
    shards: list[_Shard],
    sql: bytes,
    connect_timeouts: Mapping[str, float],
    query_timeouts: Mapping[str, float | None],
    outcome: LeanOutcome,
) -> None:
    selector = selectors.DefaultSelector()
    live: dict[int, _Shard] = {}
    try:
        now = time.monotonic()
        for shard in shards:
            if _send(shard, b"", connect_timeouts.get(shard.shard_id, 3.0), outcome):
                selector.register(shard.fileno, selectors.EVENT_READ, shard)
                live[id(shard)] = shard
        while live:
            next_deadline = min(s.deadline for s in live.values())
            wait = None if next_deadline == float("inf") else max(0.0, next_deadline - time.monotonic())
            ready = selector.select(wait)
            for key, _ in ready:
                shard = key.data
                pgconn = shard.pgconn
                try:
                    pgconn.consume_input()
                except psycopg.OperationalError as error:
                    _finish(shard, selector, live, outcome, lost=error)
                    continue
                if pgconn.is_busy():
                    continue
                results = []
                while (result := pgconn.get_result()) is not None:
                    results.append(result)
                if shard.phase == _PING:
                    if pgconn.status != pq.ConnStatus.OK or not results:
                        _finish(shard, selector, live, outcome, dead=True)
                        continue
                    shard.phase = _QUERY
                    if not _send(shard, sql, query_timeouts.get(shard.shard_id), outcome):
                        _finish(shard, selector, live, outcome, unregister_only=True)
                    continue
                _finish(shard, selector, live, outcome, results=results)
            now = time.monotonic()
            for shard in [s for s in live.values() if s.deadline <= now]:
                _finish(
                    shard, selector, live, outcome, frozen="a ping" if shard.phase == _PING else "a statement"
                )
    except BaseException:
        for shard in list(live.values()):  # interrupted mid-exchange: never reused
            _give_back(shard, ConnectionError("fan-out interrupted"))
        raise
    finally:
        selector.close()


def _send(shard: _Shard, sql: bytes, seconds: float | None, outcome: LeanOutcome) -> bool:
    pgconn = shard.pgconn
    shard.seconds = seconds
    shard.deadline = float("inf") if seconds is None else time.monotonic() + seconds
    try:
        pgconn.send_query(sql)
        while pgconn.flush():  # a large statement: the socket's buffer fills (rare)
            pass
    except psycopg.OperationalError:
        if shard.phase == _PING:  # nothing ran: the usual path reconnects
            _give_back(shard, ConnectionError("connection lost before the ping"))
            outcome.rest.append(shard.shard_id)
        else:
            _give_back(shard, ConnectionError("connection lost sending the statement"))
            outcome.errors[shard.shard_id] = _lost(shard, "the connection was lost sending the statement")
        return False
    return True


def _finish(
    shard: _Shard,
    selector: selectors.BaseSelector,
    live: dict[int, _Shard],
    outcome: LeanOutcome,
    *,
    results: list[Any] | None = None,
    lost: BaseException | None = None,
    dead: bool = False,
    frozen: str | None = None,
    unregister_only: bool = False,
) -> None:
    del live[id(shard)]
    try:
        selector.unregister(shard.fileno)
    except (KeyError, ValueError, OSError):  # its socket is gone (connection closed)
        pass
    if unregister_only:
        return
    shard_id = shard.shard_id
    if frozen is not None:
        reason = f"no answer to {frozen} within {shard.seconds:g}s (server frozen or unreachable)"
        _give_back(shard, ConnectionError(reason))
        outcome.errors[shard_id] = unavailable(shard_id, shard.engine.url, reason)
        return
    if dead or (lost is not None and shard.phase == _PING):  # nothing ran: reconnect on the usual path
        _give_back(shard, ConnectionError("the pooled connection was dead"))
        outcome.rest.append(shard_id)
        return
    if lost is not None or shard.pgconn.status != pq.ConnStatus.OK:
        _give_back(shard, ConnectionError("connection lost during the statement"))
        outcome.errors[shard_id] = _lost(shard, str(lost or "the server closed the connection"))
        return
    assert results is not None
    first = results[0]
    if first.status == pq.ExecStatus.FATAL_ERROR or any(
        r.status == pq.ExecStatus.FATAL_ERROR for r in results
    ):
        failed = next(r for r in results if r.status == pq.ExecStatus.FATAL_ERROR)
        orig = psycopg.errors.error_from_result(failed, encoding=shard.conn.info.encoding)
        _give_back(shard)
        outcome.errors[shard_id] = _wrapped(shard, orig)
        return
    outcome.answers[shard_id] = _answer(shard, first)
    in_transaction = shard.pgconn.transaction_status != pq.TransactionStatus.IDLE  # e.g. a bare BEGIN
    _give_back(shard, ConnectionError("left in a transaction") if in_transaction else None)


def as_result(answer: Answer) -> Result[Any]:
    """A shard's answer as a buffered SQLAlchemy Result (what ``execute().freeze()()`` gives)."""
    return IteratorResult(SimpleResultMetaData(answer.keys or []), iter(answer.rows))


def _answer(shard: _Shard, result: Any) -> Answer:
    rowcount = int(result.command_tuples) if result.command_tuples is not None else -1
    if result.status != pq.ExecStatus.TUPLES_OK:
        return Answer(None, [], rowcount)
    encoding = shard.conn.info.encoding
    keys = [result.fname(i).decode(encoding) for i in range(result.nfields)]
    transformer = Transformer.from_context(shard.conn)
    transformer.set_pgresult(result)
    rows = transformer.load_rows(0, result.ntuples, tuple)
    return Answer(keys, rows, rowcount)


def _wrapped(shard: _Shard, orig: Exception) -> Exception:
    """A driver error as SQLAlchemy raises it from an execute (ProgrammingError, DataError, ...)."""
    dialect: Any = shard.engine.dialect
    return DBAPIError.instance(None, None, orig, dialect.loaded_dbapi.Error, dialect=dialect)


def _lost(shard: _Shard, message: str) -> OperationalError:
    return OperationalError(None, None, psycopg.OperationalError(message))


__all__ = ["Answer", "LeanOutcome", "LeanRun", "LeanStatement", "as_result"]

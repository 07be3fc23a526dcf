"""Shard faults at the engine: errors say which shard failed, and no wait on a shard is endless.

:func:`guard` is applied to every engine a :class:`~sa_shardkit.manager.ShardManager` creates:

* a ``handle_error`` listener marks connection failures (refused, password rejected, connection
  lost) with the shard and its password-masked URL, so the session raises
  :class:`~sa_shardkit.errors.ShardUnavailableError` naming the shard (:func:`named_unavailable`);
* a watchdog bounds each statement, ping, commit and rollback (also on an ``AsyncEngine``'s sync
  side, where the socket belongs to psycopg's async connection): a server that stopped answering (a
  frozen process still has its kernel ACK every packet, so TCP keepalives and ``tcp_user_timeout``
  never fire) gets its socket shut down after ``query_timeout`` seconds (pings: the connect
  timeout), which makes the blocked driver call fail as a lost connection. New connections are
  bounded by the driver's ``connect_timeout``.
"""

from __future__ import annotations

import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, ExceptionContext

from .errors import ShardUnavailableError

T = TypeVar("T")

QUERY_TIMEOUT = "shardkit_query_timeout"
"""Execution option: this statement's bound in seconds (None: unbounded), e.g. for a long migration."""

_SHARD = "shard_id"
_URL = "_shardkit_safe_url"
_UNAVAILABLE = "_shardkit_unavailable"
_REASON = "_shardkit_reason"
_BOUND = "_shardkit_query_timeout"
BOUND_ATTR = _BOUND
"""Engine attribute: the bound :func:`guard` put on its statements (what :func:`statement_bound` reads)."""
_local = threading.local()  # the driver call of this thread the watchdog cut short, for the error


def unavailable(shard_id: str, where: str | URL, error: BaseException | str) -> ShardUnavailableError:
    """Wrap a connection failure so the message names the shard and never shows a password.

    ``where`` is the shard's URL (rendered with the password hidden) or an already safe string.
    """
    safe_url = where if isinstance(where, str) else where.render_as_string(hide_password=True)
    reason = getattr(error, "orig", None) or error
    first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return ShardUnavailableError(
        f"shard {shard_id!r} ({safe_url}) is unavailable: {first_line}", shard_id=shard_id
    )


def named_unavailable(error: BaseException) -> ShardUnavailableError | None:
    """The :class:`ShardUnavailableError` for a guarded engine's connection failure, else None."""
    if not getattr(error, _UNAVAILABLE, False):
        return None
    return unavailable(getattr(error, _SHARD), getattr(error, _URL), getattr(error, _REASON, error))


class _Watchdog:
    """One daemon thread that shuts down the socket of a driver call past its deadline."""

    def __init__(self) -> None:
        self._armed: dict[int, tuple[float, int, weakref.ref[Any]]] = {}
        self._fired: set[int] = set()
        self.shut: weakref.WeakSet[Any] = weakref.WeakSet()
        """Connections whose socket it shut down: never to be handed out again (see :func:`_bounded`)."""
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._target = float("inf")

    def arm(self, dbapi_connection: Any, seconds: float, fd: int | None = None) -> int | None:
        """Bound the driver call about to run on ``dbapi_connection`` (socket ``fd``, when the
        caller has it: psycopg's ``pgconn.socket``) to ``seconds``; the key to :meth:`disarm`."""
        if fd is None:
            dbapi_connection = getattr(dbapi_connection, "dbapi_connection", dbapi_connection)  # a pool proxy
            try:
                try:
                    fd = int(dbapi_connection.fileno())
                except AttributeError:  # an asyncio adapter (or its cursor): its driver's connection has it
                    dbapi_connection = dbapi_connection._connection
                    fd = int(dbapi_connection.fileno())
            except Exception:  # noqa: BLE001 - closed or not a socket driver: nothing to bound
                return None
        try:
            ref = weakref.ref(dbapi_connection)
        except Exception:  # noqa: BLE001 - not a driver connection: nothing to bound
            return None
        deadline = time.monotonic() + seconds
        key = id(dbapi_connection)
        self._armed[key] = (deadline, fd, ref)  # one dict store (atomic): the common case takes no lock
        if deadline < self._target:  # the thread sleeps past this deadline (or is not started): wake it
            with self._wake:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="shardkit-watchdog", daemon=True)
                    self._thread.start()
                self._wake.notify()
        return key

    def disarm(self, key: int | None) -> bool:
        """Forget ``key``; True when the watchdog had cut its call short."""
        if key is None:
            return False
        self._armed.pop(key, None)
        if not self._fired:
            return False
        with self._wake:
            fired = key in self._fired
            self._fired.discard(key)
        return fired

    def _take(self, key: int, entry: tuple[float, int, weakref.ref[Any]]) -> bool:
        """Remove ``key`` if it still holds ``entry`` (not re-armed by a newer call meanwhile)."""
        current = self._armed.pop(key, None)
        if current is entry:
            return True
        if current is not None:
            self._armed[key] = current
        return False

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                armed = list(self._armed.items())  # a snapshot: callers store without the lock
                expired = [(k, v) for k, v in armed if v[0] <= now and self._take(k, v)]
                self._fired.update(key for key, _ in expired)
                self._target = min((v[0] for k, v in armed if k in self._armed), default=float("inf"))
                if not expired:
                    self._wake.wait(None if self._target == float("inf") else self._target - now)
                    continue
                # under the lock: a disarm() that returns False ran before the shutdown, and one
                # that returns True after it (the connection is then in ``shut``)
                for _, (_, fd, ref) in expired:
                    connection = ref()
                    if _shut_down(connection, fd):
                        self.shut.add(connection)


def _shut_down(dbapi_connection: Any, fd: int) -> bool:
    """Make the blocked call on ``fd`` fail, if it still belongs to ``dbapi_connection``."""
    try:
        if dbapi_connection is None or int(dbapi_connection.fileno()) != fd:
            return False
        sock = socket.socket(fileno=fd)
    except Exception:  # noqa: BLE001 - closed meanwhile: nothing to do
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()  # the driver still owns the descriptor
    return True


_watchdog = _Watchdog()
WATCHDOG = _watchdog
"""The process's watchdog, for driver calls bounded inline (:mod:`sa_shardkit.fused_begin`)."""


def _bounded(
    call: Callable[..., Any], seconds: float | None, on_cursor: bool, what: str, error: type[Exception]
) -> Any:
    """``call`` (a dialect's driver call on a cursor or a connection) under the watchdog.

    A call whose answer came just as its deadline passed returns it, but the watchdog has shut
    its socket down meanwhile: a ping then fails (with ``error``, the driver's OperationalError;
    the pool connects anew), and any later ping of that connection too, so the pool never hands
    out a connection whose socket is shut.
    """

    def run(target: Any, *args: Any) -> Any:
        limit = seconds
        options = getattr(args[-1], "execution_options", None) if args else None  # the context
        if options is not None:
            limit = options.get(QUERY_TIMEOUT, seconds)
        if limit is None:
            return call(target, *args)
        if not on_cursor and what == "a ping" and target in _watchdog.shut:
            _discard(target, error)
        # a cursor's connection (an asyncio adapter's cursor has none: arm() finds its driver's)
        key = _watchdog.arm(getattr(target, "connection", target) if on_cursor else target, limit)
        try:
            result = call(target, *args)
        except BaseException:
            if _watchdog.disarm(key):
                _local.timed_out = f"no answer to {what} within {limit:g}s (server frozen or unreachable)"
            raise
        if _watchdog.disarm(key) and what == "a ping":  # answered, then shut down: not usable
            _discard(target, error)
        return result

    return run


def _discard(dbapi_connection: Any, error: type[Exception]) -> None:
    """Close a connection the watchdog shut down and fail the ping with a disconnect."""
    try:
        dbapi_connection.close()
    except Exception:  # noqa: BLE001 - its socket is shut down already
        pass
    raise error("the connection's socket was shut down by the shardkit watchdog (a late answer)")


def bounded_driver_call(dbapi_connection: Any, seconds: float | None, call: Callable[[], T]) -> T:
    """``call()`` on a raw driver connection under the watchdog, as a guarded engine bounds its own
    statements: code that talks to the driver directly (one prebuilt SQL string, no SQLAlchemy
    execute) must not wait on a frozen server for ever. Past ``seconds`` the socket is shut down and
    the driver's call fails as a lost connection (the caller names the shard)."""
    if seconds is None:
        return call()
    key = _watchdog.arm(dbapi_connection, seconds)
    try:
        return call()
    finally:
        _watchdog.disarm(key)


def statement_bound(engine: Engine) -> float | None:
    """The bound in seconds :func:`guard` put on ``engine``'s statements (None: unguarded, or none)."""
    bound: float | None = getattr(engine, _BOUND, None)
    return bound


def guard(engine: Engine, shard_id: str, *, connect_timeout: float, query_timeout: float | None) -> Engine:
    """Name ``shard_id`` on ``engine``'s connection failures and bound its driver calls."""
    safe_url = engine.url.render_as_string(hide_password=True)

    def mark(context: ExceptionContext) -> None:
        timed_out, _local.timed_out = getattr(_local, "timed_out", None), None
        if timed_out is not None and context.is_pre_ping:  # frozen: a reconnect would hang as well
            raise unavailable(shard_id, safe_url, timed_out)
        error = context.sqlalchemy_exception
        if error is None or context.is_pre_ping:
            return  # a failed pre-ping is followed by a fresh connect, which may well succeed
        setattr(error, _SHARD, shard_id)
        setattr(error, _URL, safe_url)
        if timed_out is not None:
            setattr(error, _REASON, timed_out)
        if context.connection is None or context.is_disconnect or timed_out is not None:
            setattr(error, _UNAVAILABLE, True)

    event.listen(engine, "handle_error", mark)
    setattr(engine, _BOUND, query_timeout)
    dialect: Any = engine.dialect
    if dialect.name == "sqlite":
        return engine

    lost = dialect.loaded_dbapi.OperationalError  # what a late-answered ping raises: a disconnect
    for name in ("do_execute", "do_executemany", "do_execute_no_params"):
        setattr(dialect, name, _bounded(getattr(dialect, name), query_timeout, True, "a statement", lost))
    dialect.do_ping = _bounded(dialect.do_ping, connect_timeout, False, "a ping", lost)
    for name, what in (("do_commit", "COMMIT"), ("do_rollback", "ROLLBACK")):
        setattr(dialect, name, _bounded(getattr(dialect, name), query_timeout, False, what, lost))
    return engine


__all__ = ["QUERY_TIMEOUT", "guard", "named_unavailable", "statement_bound", "unavailable"]

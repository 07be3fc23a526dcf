"""One thread waits for many shards at once: cooperative psycopg connections and the hub driving them.

The flat fan-out. A thread per shard costs CPU the shards then wait for (at 256 shards on two
cores, starting and switching threads cost more than the 50 ms a shard takes to answer). Instead
each shard's task runs in its own greenlet on the calling thread, and the psycopg connections a
:class:`~sa_shardkit.manager.ShardManager` makes (:class:`CooperativeConnection`) hand their wait
for the server to the :class:`Hub`: one ``selectors`` loop waits on every shard's socket and
resumes the task whose server answered. Everything else runs as it always does, in the task:
SQLAlchemy's pool and pre-ping, events, the fault watchdog (which bounds a frozen server by
shutting down its socket, which wakes the hub), the driver's protocol handling. Only the waiting is
shared; the sync API stays sync.

Outside a hub's task a :class:`CooperativeConnection` waits exactly as psycopg does. A task must
not block the thread on a lock another task holds across a round trip (that task cannot run to
release it), so only the library's own fan-out work (one statement per shard, each on its own
connection) runs here; user callables and new connections (``connect`` blocks) go to threads.
"""

from __future__ import annotations

import select
import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterable
from contextvars import copy_context
from typing import Any, TypeVar

import greenlet  # type: ignore[import-untyped]  # no stubs shipped
import psycopg
from psycopg.abc import PQGen
from sqlalchemy.engine import Engine

T = TypeVar("T")
RV = TypeVar("RV")

_COOPERATIVE = "_shardkit_cooperative"
HUB_ATTR = "shardkit_hub"
"""Attribute of a hub's task greenlet: its :class:`Hub` (what :func:`current_hub` reads)."""


class _Task(greenlet.greenlet):  # type: ignore[misc]  # greenlet ships no stubs for subclassing
    """A greenlet running shards' work, one task after another; its connections wait through ``hub``.

    Starting a new greenlet costs ~15 us here against ~1 us for a switch into a suspended one, so a
    task that finished offers its greenlet for the next (:func:`_serve`, :data:`_idle`)."""

    shardkit_hub: Hub | None


_FINISHED = object()
"""What a task's greenlet hands the hub when its work is done (it stays alive for the next task)."""

_SMALL = 16
"""Up to this many tasks the hub waits with ``poll`` (no descriptor to create, no system call per
registration); above, with the platform's default selector (epoll: no scan of every socket)."""

_IDLE_MAX = 64
"""Finished task greenlets kept per thread for later hubs."""

_idle = threading.local()


def _serve(job: Callable[[], None]) -> None:
    """A task greenlet's life: run a job, hand back :data:`_FINISHED`, take the next job."""
    while True:
        job()
        job = greenlet.getcurrent().parent.switch(_FINISHED)


def _task(main: Any, hub: Hub) -> _Task:
    """A suspended idle task greenlet of this thread (or a new one), its parent ``main``."""
    pool: list[_Task] = getattr(_idle, "tasks", None) or []
    while pool:
        task = pool.pop()
        try:
            task.parent = main
        except ValueError:  # it is an ancestor of main: a nested hub's caller; not reusable here
            continue
        task.shardkit_hub = hub
        return task
    task = _Task(_serve, parent=main)
    task.shardkit_hub = hub
    return task


def _offer(task: _Task) -> None:
    """Keep a task greenlet that finished its job for the next hub of this thread."""
    task.shardkit_hub = None
    task.gr_context = None  # drop the finished job's context variables
    pool: list[_Task] | None = getattr(_idle, "tasks", None)
    if pool is None:
        pool = _idle.tasks = []
    if len(pool) < _IDLE_MAX:
        pool.append(task)


class Hub:
    """Runs tasks as greenlets of the calling thread; one selector waits for all their sockets."""

    def __init__(self) -> None:
        self._main = greenlet.getcurrent()
        self._ready: deque[tuple[_Task, Any]] = deque()
        self._waiting: dict[int, _Task] = {}

    # -- in a task -------------------------------------------------------------------------------

    def wait_socket(self, fileno: int, events: int) -> int:
        """Suspend the current task until ``fileno`` is ready for ``events``; the events ready."""
        ready: int = self._main.switch((fileno, events))
        return ready

    def call_in_thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a thread of its own while the current task waits through the hub.

        For a call that would block the hub's thread, such as a new connection (psycopg connects
        without ``Connection.wait``): the other tasks keep running meanwhile.
        """
        wake, signal = socket.socketpair()
        outcome: list[Any] = []
        abandoned = threading.Event()

        def run() -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as error:  # noqa: BLE001 - handed to the waiting task
                outcome.append((False, error))
            if abandoned.is_set() and outcome[0][0]:
                _close_quietly(outcome[0][1])  # nobody takes it any more
            try:
                signal.send(b"x")
            except OSError:  # the task gave up and closed its end
                pass

        try:
            threading.Thread(target=run, name="shardkit-hub-call", daemon=True).start()
            self.wait_socket(wake.fileno(), selectors.EVENT_READ)
        except BaseException:
            abandoned.set()
            raise
        finally:
            wake.close()
            signal.close()
        ok, value = outcome[0]
        if not ok:
            raise value
        result: T = value
        return result

    # -- in the calling thread -------------------------------------------------------------------

    def run(self, tasks: Iterable[tuple[str, Callable[[], T]]]) -> tuple[dict[str, T], dict[str, Exception]]:
        """Run every task to its end; results and errors by name (a BaseException is re-raised)."""
        results: dict[str, T] = {}
        errors: dict[str, Exception] = {}
        alive: list[_Task] = []
        for name, fn in tasks:
            task = _task(self._main, self)
            task.gr_context = copy_context()  # as a worker thread would: the caller's contextvars
            alive.append(task)
            self._ready.append((task, _body(name, fn, results, errors)))
        selector: _Poller | _Selector = _Poller() if len(alive) <= _SMALL and _HAS_POLL else _Selector()
        running = len(alive)
        try:
            while running:
                while self._ready:
                    task, value = self._ready.popleft()
                    request = task.switch(value)
                    if request is _FINISHED:
                        running -= 1
                        _offer(task)
                    else:
                        fileno, wanted = request
                        selector.register(fileno, wanted)
                        self._waiting[fileno] = task
                if self._waiting:
                    for fileno, ready in selector.select():
                        selector.unregister(fileno)
                        self._ready.append((self._waiting.pop(fileno), ready))
        except BaseException:
            for task in alive:  # interrupted: end every task (its connection is closed, not reused)
                for _ in range(3):  # a task's cleanup on a closed connection does not wait again
                    if task.dead or task.shardkit_hub is not self:  # ended, or finished (offered)
                        break
                    try:
                        if task.throw(greenlet.GreenletExit) is _FINISHED:
                            break  # its job ended: the greenlet itself is not reused
                    except greenlet.GreenletExit:
                        break
            raise
        finally:
            selector.close()
        return results, errors


_HAS_POLL = hasattr(select, "poll")


class _Poller:
    """``select.poll`` with the ``selectors`` event bits (what psycopg's waits use): the same answers
    as ``selectors.PollSelector`` without its key objects and per-call Python layers (about ten
    calls per wait, and a scatter waits twice per shard)."""

    __slots__ = ("_poll", "_wanted")

    def __init__(self) -> None:
        self._poll = select.poll()
        self._wanted: dict[int, int] = {}

    def register(self, fileno: int, events: int) -> None:
        self._poll.register(
            fileno,
            (select.POLLIN if events & selectors.EVENT_READ else 0)
            | (select.POLLOUT if events & selectors.EVENT_WRITE else 0),
        )
        self._wanted[fileno] = events

    def unregister(self, fileno: int) -> None:
        self._poll.unregister(fileno)
        del self._wanted[fileno]

    def select(self) -> list[tuple[int, int]]:
        # as PollSelector: an error or hang-up wakes the waiter for whatever it waits for
        wanted = self._wanted
        return [
            (
                fileno,
                wanted[fileno]
                & (
                    (selectors.EVENT_WRITE if got & ~select.POLLIN else 0)
                    | (selectors.EVENT_READ if got & ~select.POLLOUT else 0)
                ),
            )
            for fileno, got in self._poll.poll()
        ]

    def close(self) -> None:
        pass


class _Selector:
    """The platform's default selector (epoll) behind :class:`_Poller`'s interface, for many sockets."""

    __slots__ = ("_selector",)

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()

    def register(self, fileno: int, events: int) -> None:
        self._selector.register(fileno, events)

    def unregister(self, fileno: int) -> None:
        self._selector.unregister(fileno)

    def select(self) -> list[tuple[int, int]]:
        return [(key.fd, ready) for key, ready in self._selector.select()]

    def close(self) -> None:
        self._selector.close()


def _body(
    name: str, fn: Callable[[], T], results: dict[str, T], errors: dict[str, Exception]
) -> Callable[[], None]:
    def body() -> None:
        try:
            results[name] = fn()
        except Exception as error:  # noqa: BLE001 - collected, the caller's policy decides
            errors[name] = error

    return body


def _close_quietly(connection: Any) -> None:
    try:
        connection.close()
    except Exception:  # noqa: BLE001 - best effort on an abandoned connection
        pass


def current_hub() -> Hub | None:
    """The hub whose task is running now, or None (a plain thread, another greenlet)."""
    return getattr(greenlet.getcurrent(), HUB_ATTR, None)


class CooperativeConnection(psycopg.Connection[Any]):
    """A psycopg connection whose waits go through the running :class:`Hub`, if any.

    ``Connection.wait`` is psycopg's documented hook that every statement, commit and rollback
    of a connection goes through; outside a hub's task (and for timed waits) it is psycopg's own.
    """

    def wait(self, gen: PQGen[RV], *args: Any, **kwargs: Any) -> RV:
        hub = current_hub()
        if hub is None or args or kwargs:
            return super().wait(gen, *args, **kwargs)
        fileno = self.pgconn.socket
        try:
            wanted = next(gen)
            while True:
                try:
                    ready = hub.wait_socket(fileno, wanted)
                except BaseException:  # the hub gave up on this task mid-exchange
                    self.close()  # its protocol state is unknown: never reused
                    raise
                wanted = gen.send(ready)
        except StopIteration as done:
            result: RV = done.value
            return result


def make_cooperative(engine: Engine) -> bool:
    """Have a sync psycopg ``engine`` create :class:`CooperativeConnection` s; whether it does."""
    dialect: Any = engine.dialect
    if dialect.driver != "psycopg" or dialect.is_async:
        return False

    def connect(*cargs: Any, **cparams: Any) -> CooperativeConnection:
        hub = current_hub()
        if hub is None:
            return CooperativeConnection.connect(*cargs, **cparams)
        # in a hub's task (a pooled connection was invalidated): connect without stalling the others
        return hub.call_in_thread(lambda: CooperativeConnection.connect(*cargs, **cparams))

    dialect.connect = connect
    setattr(engine, _COOPERATIVE, True)
    return True


def is_cooperative(engine: Engine) -> bool:
    """Whether ``engine``'s connections wait through a hub (see :func:`make_cooperative`)."""
    return bool(getattr(engine, _COOPERATIVE, False))


__all__ = ["CooperativeConnection", "Hub", "current_hub", "is_cooperative", "make_cooperative"]

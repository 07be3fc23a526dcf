"""The Session side of a scatter: ``execute_scatter(orm_context, shard_ids)``.

Shards run concurrently only when every engine involved may be used from another thread
(:func:`fanout.runs_in_threads`: a ``QueuePool``/``NullPool`` over a thread-safe driver such as
psycopg) and no other ``do_orm_execute`` listener needs to see each shard's execution. Otherwise
(SQLite, ``SingletonThreadPool``, ``StaticPool``, a Connection bind, anything unknown, or a listener
registered after ours) each shard runs in turn in the calling thread through
``ORMExecuteState.invoke_statement``, exactly as the stock ShardedSession does: BEGIN and SELECT on
one shard, then the next, every event and listener seeing each shard's execution.

A Session is not thread-safe, so a concurrent scatter is split by thread:

1. calling thread -- plan the statement, autoflush once, and take each shard's connection from the
   session (``session.connection(bind_arguments={"shard_id": ...})``), so each shard's part runs in the
   session's transaction on that shard;
2. only ``Connection.execute`` (the database round trip), one connection each: when every engine's
   connections are cooperative (the psycopg engines a ShardManager makes), as greenlets of the
   calling thread whose waits share one selector (:func:`fanout.fan_out_on_hub`: no thread
   hand-off, the round trips still overlap); otherwise in worker threads;
3. calling thread -- ORM loading of each shard's rows (identity map, ``identity_token`` = shard id)
   and the merge. Rows of ORM entities are ordered by extra ORDER BY columns the shards return.

This mirrors what ``Session.execute`` does after its ``do_orm_execute`` hooks
(``orm_pre_session_exec`` -> ``Connection.execute`` -> ``orm_setup_cursor_result``), with the middle
step moved to the worker threads.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import weakref
from collections.abc import Iterable, Sequence
from contextvars import copy_context
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine, Result
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.sql.selectable import Select
from sqlalchemy.util.concurrency import in_greenlet

from ..errors import ShardUnavailableError
from ..faults import named_unavailable, unavailable
from ..multiplex import current_hub, is_cooperative
from .connected import fan_out_connected
from .fanout import (
    fan_out,
    fan_out_on_hub,
    is_unavailable,
    probe,
    raise_for_errors,
    runs_in_threads,
    scatter_pool,
)
from .gather import ALLOW_PARTIAL, PER_SHARD_RESULTS, gather
from .plan import RowPlan, ScatterPlan, cached_plan
from .prefix import trim_to_merged_prefix
from .result import ScatterResult


def execute_scatter(orm_context: ORMExecuteState, shard_ids: Sequence[str]) -> Result[Any]:
    """Run ``orm_context``'s statement on ``shard_ids`` and merge into one result.

    SELECTs are merged globally (ORDER BY, LIMIT/OFFSET, aggregates, DISTINCT); other statements
    run on each shard in turn, as SQLAlchemy's stock ShardedSession does.
    """
    statement = orm_context.statement
    options = orm_context.execution_options  # the statement's own options and execute()'s
    if not isinstance(statement, Select) or not orm_context.is_select or len(shard_ids) < 2:
        return _sequential(orm_context, shard_ids)
    plan = None if options.get(PER_SHARD_RESULTS) else cached_plan(statement)
    run = _ScatterRun(orm_context, list(shard_ids), plan, bool(options.get(ALLOW_PARTIAL)))
    return run.run() if run.concurrent() else run.run_in_turn()


def _sequential(orm_context: ORMExecuteState, shard_ids: Sequence[str]) -> Result[Any]:
    partial = [_invoke(orm_context, shard_id, orm_context.statement) for shard_id in shard_ids]
    return partial[0].merge(*partial[1:])


def _unlisted(session: Any, shard_ids: Sequence[str]) -> dict[str, BaseException]:
    """The shards of ``shard_ids`` the session's manager does not list (stored ring members)."""
    manager = getattr(session, "manager", None)
    if manager is None:
        return {}
    return {s: manager.placement.unlisted(s) for s in shard_ids if not manager.has_shard(s)}


def _invoke(orm_context: ORMExecuteState, shard_id: str, statement: Any) -> Result[Any]:
    """What the stock session does per shard: the rest of the listeners, then Session.execute."""
    bind_arguments = dict(orm_context.bind_arguments, shard_id=shard_id)
    orm_context.update_execution_options(identity_token=shard_id)
    return orm_context.invoke_statement(statement=statement, bind_arguments=bind_arguments)


class _ScatterRun:
    """One scatter through a session (kept as an object so each step stays a short method)."""

    def __init__(
        self,
        orm_context: ORMExecuteState,
        shard_ids: list[str],
        plan: ScatterPlan | None,
        allow_partial: bool,
    ) -> None:
        self.context = orm_context
        self.session = orm_context.session
        self.shard_ids = shard_ids
        self.plan = plan
        self.allow_partial = allow_partial
        self.compile_state_cls = orm_context._compile_state_cls
        self.statement = orm_context.statement if plan is None else plan.statement
        self.all_shard_ids = shard_ids
        self.binds: dict[str, Any] | None = None
        self.lean = False
        """Whether the shards run ``plan.lean`` (the sort keys read from the selected columns)."""
        self.lean_refused = False
        """The merge could not use the lean statement's rows: this scatter runs the full one."""
        self.sequence: list[str] | None = None
        """The shard of each merged row, when the merge ran on the raw rows already."""
        self.unlisted = _unlisted(self.session, shard_ids)
        """Ring members this process's configuration lacks: never queried; errors (``allow_partial``: missing)."""
        if self.unlisted:
            if not allow_partial:
                raise next(iter(self.unlisted.values()))
            self.shard_ids = [s for s in shard_ids if s not in self.unlisted]

    def concurrent(self) -> bool:
        """Whether the shards may run at once: thread-safe engines, no later listener to honour."""
        later = list(self.session.dispatch.do_orm_execute)[self.context._starting_event_idx + 1 :]
        if later:
            return False
        return all(runs_in_threads(bind) for bind in self._binds().values())

    def _bind_arguments(self, shard_id: str) -> dict[str, Any]:
        return dict(self.context.bind_arguments, shard_id=shard_id)

    def _binds(self) -> dict[str, Any]:
        """Each shard's bind (``session.get_bind``), looked up once per scatter."""
        if self.binds is None:
            self.binds = {s: self.session.get_bind(**self._bind_arguments(s)) for s in self.shard_ids}
        return self.binds

    def run_in_turn(self) -> ScatterResult:
        """Shard after shard in the calling thread, through the stock per-shard path."""
        results: dict[str, Result[Any]] = {}
        errors = self._probe_unheld()
        for shard_id in self.shard_ids:
            if shard_id in errors:
                continue
            try:
                results[shard_id] = _invoke(self.context, shard_id, self.statement)
            except Exception as error:  # noqa: BLE001 - the policy decides (and names the shard)
                if not (self.allow_partial and is_unavailable(error)):
                    raise_for_errors(
                        {shard_id: error}, allow_partial=False, any_result=False, describe=self._describe
                    )
                errors[shard_id] = error
        return self._merge(results, errors)

    def _merge(self, results: dict[str, Result[Any]], errors: dict[str, BaseException]) -> ScatterResult:
        errors = {**self.unlisted, **errors}
        errors = {s: self._named(s, errors[s]) for s in self.all_shard_ids if s in errors}
        raise_for_errors(
            errors, allow_partial=self.allow_partial, any_result=bool(results), describe=self._describe
        )
        merged = gather(
            self.plan, results, self.all_shard_ids, errors, sequence=self.sequence, lean=self.lean
        )
        self._restore_result_attributes(merged, results)
        yield_per = self.context.execution_options.get("yield_per")
        return merged.yield_per(yield_per) if yield_per else merged

    def run(self) -> ScatterResult:
        prepared: dict[str, Prepared] = {}
        errors: dict[str, BaseException] = {}
        if self.compile_state_cls is None:
            self.session._autoflush()
        queued = self._beyond_budget()
        lean = None if queued or self.lean_refused else self._lean_statement()
        if lean is not None:
            self.lean, self.statement = True, lean
        if not queued:
            errors.update(self._probe_unheld())
        for position, shard_id in enumerate(self.shard_ids):
            if shard_id in errors:
                continue
            try:
                prepared[shard_id] = self._prepare(
                    shard_id, autoflush=position == 0, connect=shard_id not in queued
                )
            except (OperationalError, PoolTimeoutError, DBAPIError, ShardUnavailableError) as error:
                errors[shard_id] = error
        held = {s: (p, c) for s, p in prepared.items() if (c := p[4]) is not None}
        loaded: dict[str, Result[Any]] = {}
        if _cooperative(held.values()):
            hub_tasks = {s: functools.partial(self._on_hub, s, c, p, loaded) for s, (p, c) in held.items()}
            outcome = fan_out_on_hub(hub_tasks)
        else:
            tasks = {s: functools.partial(_execute, c, p[0], p[1], p[2]) for s, (p, c) in held.items()}
            outcome = fan_out(tasks)
        errors.update(outcome.errors)
        if self.compile_state_cls is not None and isinstance(self.plan, RowPlan) and not queued:
            self.sequence = trim_to_merged_prefix(self.plan, outcome.results, self.shard_ids, lean=self.lean)
            if self.lean and (self.sequence is None or any(r._unique_filter_state for r in loaded.values())):
                # the merge needs the hidden sort columns after all (a streaming connection, a
                # joined eager load the statement did not show): run again with them
                for result in (*loaded.values(), *outcome.results.values()):
                    result.close()
                with contextlib.suppress(TypeError):  # this statement object: not lean again
                    _lean_refused[self.plan.lean] = True
                self.lean, self.lean_refused, self.sequence = False, True, None
                self.statement = self.plan.statement
                return self.run()
        results = {
            s: loaded[s] if s in loaded else self._load(s, prepared[s], r) for s, r in outcome.results.items()
        }
        if queued:
            loaded, failed = self._run_queued({s: p for s, p in prepared.items() if s not in held})
            results.update(loaded)
            errors.update(failed)
        return self._merge({s: results[s] for s in self.shard_ids if s in results}, errors)

    def _lean_statement(self) -> Select[Any] | None:
        """``plan.lean`` when the shards may run it: an ORM SELECT whose merge will run on the raw
        rows (LIMIT, the psycopg engines' hub, no streaming, no loader options, no joined eager
        load or deferred sort column configured on a selected mapper); else None. Whatever this
        misses, :meth:`run` finds out after the round trip and runs the statement again with the
        hidden columns."""
        plan = self.plan
        if not isinstance(plan, RowPlan) or plan.lean is None or self.compile_state_cls is None:
            return None
        statement = self.context.statement
        if statement._with_options or not self._hub_ready():
            return None
        options = self.context.execution_options
        if options.get("yield_per") or options.get("stream_results") or plan.lean in _lean_refused:
            return None
        for description in _descriptions(statement):
            mapper = _mapper_of(description.get("entity"))
            if mapper is not None and not _loads_lean(mapper, plan.lean_columns):
                return None
        return plan.lean

    def _hub_ready(self) -> bool:
        """Whether the shards' connections will be waited for on the hub (every engine cooperative)."""
        if in_greenlet() or current_hub() is not None:
            return False
        return all(is_cooperative(bind) for bind in self._binds().values())

    def _on_hub(
        self, shard_id: str, connection: Connection, prepared: Prepared, loaded: dict[str, Result[Any]]
    ) -> Result[Any]:
        """A shard's task on the hub: its execute, then its ORM result set-up (no I/O, this thread)
        while the other shards' answers are still on their way, not after the last one came."""
        cursor_result = _execute(connection, prepared[0], prepared[1], prepared[2])
        loaded[shard_id] = self._load(shard_id, prepared, cursor_result)
        return cursor_result

    def _beyond_budget(self) -> set[str]:
        """The shards to read outside the session's transaction: with a connection budget smaller
        than the scatter, those the session holds no connection to (else none)."""
        manager = getattr(self.session, "manager", None)
        limit = manager.budget.limit if manager is not None else None
        if limit is None or len(self.shard_ids) <= limit or in_greenlet():  # AsyncSession: its loop
            return set()
        held = self._held()
        return {s for s, b in self._binds().items() if isinstance(b, Engine) and b not in held}

    def _run_queued(
        self, prepared: dict[str, Prepared]
    ) -> tuple[dict[str, Result[Any]], dict[str, BaseException]]:
        """Each shard on a pool connection of its own, queued behind the connection budget.

        One autocommitted statement per shard, at most ``max_connections`` at once; a shard's
        connection goes back to its pool once this thread has loaded its rows (the session is
        used by this thread only), which lets the next queued shard start.
        """
        manager: Any = getattr(self.session, "manager")  # noqa: B009 - set on every ShardedSession
        arrived: queue.SimpleQueue[tuple[str, Result[Any], threading.Event] | None] = queue.SimpleQueue()
        giving_up = threading.Event()

        def work(shard_id: str, conn: Connection) -> None:
            statement, options, params, _, _ = prepared[shard_id]
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            loaded = threading.Event()
            arrived.put((shard_id, conn.execute(statement, params or {}, execution_options=options), loaded))
            while not loaded.wait(0.5) and not giving_up.is_set():
                pass

        engines = {
            s: b for s, p in prepared.items() if isinstance(b := self.session.get_bind(**p[3]), Engine)
        }
        run = functools.partial(
            fan_out_connected, engines, manager.scatter_timeouts(engines), work, limit=manager.budget.limit
        )
        runner = scatter_pool().submit(copy_context().run, run)
        runner.add_done_callback(lambda _: arrived.put(None))
        results: dict[str, Result[Any]] = {}
        errors: dict[str, BaseException] = {}
        try:
            while (item := arrived.get()) is not None:
                shard_id, cursor_result, loaded = item
                try:
                    results[shard_id] = self._load(shard_id, prepared[shard_id], cursor_result).freeze()()
                except Exception as error:  # noqa: BLE001 - the policy decides (and names the shard)
                    errors[shard_id] = error
                finally:
                    loaded.set()
        finally:
            giving_up.set()  # interrupted: no task waits for this thread any more
        errors.update(runner.result().errors)
        return results, errors

    def _held(self) -> set[Any]:
        return held_binds(self.session)

    def _probe_unheld(self) -> dict[str, BaseException]:
        """Probe the shards this session holds no connection to yet (see :func:`fanout.probe`)."""
        held = self._held()
        engines = {}
        for shard_id, bind in self._binds().items():
            if isinstance(bind, Engine) and bind not in held and runs_in_threads(bind):
                engines[shard_id] = bind
        if not engines:
            return {}
        manager = getattr(self.session, "manager", None)
        timeouts = {s: manager.config(s).connect_timeout for s in engines} if manager is not None else {}
        return probe(engines, timeouts)

    def _prepare(self, shard_id: str, *, autoflush: bool, connect: bool = True) -> Prepared:
        """Statement, options and params as Session.execute would use them, and (``connect``) the
        shard's connection in the session's transaction."""
        bind_arguments = dict(self.context.bind_arguments, shard_id=shard_id)
        options = self.context.local_execution_options.union({"identity_token": shard_id})
        statement, params = self.statement, self.context.parameters
        if self.compile_state_cls is not None:
            statement, options, params = self.compile_state_cls.orm_pre_session_exec(  # type: ignore[no-untyped-call]
                self.session, statement, params, options, bind_arguments, not autoflush
            )
        connection = self.session.connection(bind_arguments=bind_arguments) if connect else None
        return statement, options, params, bind_arguments, connection

    def _load(self, shard_id: str, prepared: tuple[Any, ...], cursor_result: Result[Any]) -> Result[Any]:
        statement, options, params, bind_arguments, _ = prepared
        if self.compile_state_cls is None:
            return cursor_result
        return self.compile_state_cls.orm_setup_cursor_result(  # type: ignore[no-any-return, no-untyped-call]
            self.session, statement, params, options, bind_arguments, cursor_result
        )

    def _named(self, shard_id: str, error: BaseException) -> BaseException:
        """An unreachable shard's error as the ShardUnavailableError naming it (``shard_errors``)."""
        if isinstance(error, ShardUnavailableError) or not is_unavailable(error):
            return error
        named = named_unavailable(error) or self._describe(shard_id, error)
        named.__cause__ = error
        return named

    def _describe(self, shard_id: str, error: BaseException) -> BaseException:
        bind = self.session.get_bind(**dict(self.context.bind_arguments, shard_id=shard_id))
        return unavailable(shard_id, bind.engine.url, error)

    def _restore_result_attributes(self, merged: ScatterResult, results: dict[str, Result[Any]]) -> None:
        """Keep what the ORM tells legacy ``Query`` about the rows (single entity, uniquing)."""
        if not results:
            return
        attributes = next(iter(results.values()))._attributes
        if isinstance(self.plan, RowPlan) and self.plan.hidden and not self.lean:
            attributes = attributes.union({"is_single_entity": _is_single_entity(self.context)})
        merged._attributes = attributes


def held_binds(session: Any) -> set[Any]:
    """The binds (engines) the session's transaction holds a connection to."""
    held: set[Any] = set()
    transaction = session.get_transaction()
    while transaction is not None:
        held.update(transaction._connections)
        transaction = transaction.parent
    return held


Prepared = tuple[Any, Any, Any, dict[str, Any], Connection | None]
"""A shard's statement, options, params and bind arguments, and its session connection (if held)."""


def _cooperative(held: Iterable[tuple[Prepared, Connection]]) -> bool:
    """Whether the held connections' round trips may be waited for together in this thread: every
    engine's connections wait through a hub (:func:`multiplex.make_cooperative`), and this thread is
    not already a hub's task nor an AsyncSession's greenlet."""
    if in_greenlet() or current_hub() is not None:
        return False
    return all(is_cooperative(connection.engine) for _, connection in held)


def _execute(connection: Connection, statement: Any, options: Any, params: Any) -> Result[Any]:
    return connection.execute(statement, params or {}, execution_options=options)


def _descriptions(statement: Any) -> list[dict[str, Any]]:
    """The statement's column descriptions, once per statement object (~30 us a call; read by the
    lean check and by the single-entity check of the merged result)."""
    try:
        return _column_descriptions[statement]
    except (KeyError, TypeError):
        pass
    descriptions: list[dict[str, Any]] = list(getattr(statement, "column_descriptions", []))
    try:
        _column_descriptions[statement] = descriptions
    except TypeError:
        pass
    return descriptions


_column_descriptions: weakref.WeakKeyDictionary[Any, list[dict[str, Any]]] = weakref.WeakKeyDictionary()


_lean_refused: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
"""Lean statements whose rows the merge could not use once: their plan's statement runs instead."""


def _mapper_of(entity: Any) -> Any:
    insp = inspect(entity, raiseerr=False) if entity is not None else None
    return getattr(insp, "mapper", None)


def _loads_lean(mapper: Any, columns: tuple[Any, ...]) -> bool:
    """Whether loading ``mapper``'s entities keeps its rows 1:1 and holding ``columns``: no
    relationship configured ``lazy="joined"`` (in the mapper, what it inherits, its subclasses) and
    none of ``columns`` deferred. Kept per mapper and columns (a configuration, not a statement)."""
    if not mapper.configured:  # its relationships may not all be there yet: not lean this time
        return False
    known = _lean_mappers.setdefault(mapper, {})
    key = tuple(map(id, columns))
    answer = known.get(key)
    if answer is None:
        mappers = (*mapper.iterate_to_root(), *mapper.self_and_descendants)
        eager = any(r.lazy == "joined" for m in mappers for r in m.relationships)
        wanted = set(key)
        deferred = any(
            getattr(prop, "deferred", False) and any(id(c) in wanted for c in getattr(prop, "columns", ()))
            for m in mappers
            for prop in m.column_attrs
        )
        answer = known[key] = not eager and not deferred
    return answer


_lean_mappers: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], bool]] = weakref.WeakKeyDictionary()


def _is_single_entity(orm_context: ORMExecuteState) -> bool:
    """Whether the caller's statement (before extra ORDER BY columns) returns bare entities."""
    if orm_context.load_options._only_return_tuples:
        return False
    descriptions = _descriptions(orm_context.statement)
    if len(descriptions) != 1:
        return False
    insp = inspect(descriptions[0].get("expr"), raiseerr=False)
    return bool(getattr(insp, "is_mapper", False) or getattr(insp, "is_aliased_class", False))


__all__ = ["execute_scatter", "held_binds", "is_unavailable"]

"""A session's UPDATE/DELETE on more shards than the connection budget allows: queued, not failed.

A write that names no shard key runs on every shard. In the session's transaction that needs one
connection per shard, held until commit: with ``max_connections`` smaller than the shards it
touches, the session waits on itself and fails with ``ConnectionBudgetError`` after
``pool_timeout``. So, as a session scatter does (:mod:`.session`), the shards the transaction
already holds run the statement in it; every other shard runs it as one autocommitted statement
on a pool connection of its own, at most the budget's free connections at once, the rest queued.

Those shards' parts are committed when the statement returns (a later rollback of the session
does not undo them), so this is never the default: the statement must ask for it with the
execution option ``shardkit_queued_writes=True`` (:data:`QUEUED_WRITES`). Without it such a write
raises :class:`ConnectionBudgetError` at once, naming the shard count and the budget, before any
shard runs it. A session created with ``twophase=True`` never takes this path. Objects
of the statement's classes that the session loaded from those shards are expired (their next access
reloads them), since the ORM's ``synchronize_session`` only saw the shards run in the session.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import Connection, CursorResult, Engine, Result
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.orm.base import instance_state
from sqlalchemy.util.concurrency import in_greenlet

from ..errors import ConnectionBudgetError
from ..faults import QUERY_TIMEOUT, unavailable
from .connected import fan_out_connected
from .fanout import raise_for_errors, runs_in_threads
from .session import held_binds

QUEUED_WRITES = "shardkit_queued_writes"
"""Execution option: a multi-shard UPDATE/DELETE over more shards than ``max_connections`` may run
each shard's part outside the session's transaction, autocommitted (not undone by a rollback)."""


def queued_writes(
    orm_context: ORMExecuteState,
    shard_ids: Sequence[str],
    invoke: Callable[[ORMExecuteState, str], Result[Any]],
) -> list[Result[Any]] | None:
    """Each shard's result (in ``shard_ids`` order), or None when the write fits the budget (or
    cannot leave the session: async, two-phase) and runs in the session's transaction as before.

    ``invoke(orm_context, shard_id)`` runs the statement in the session on one shard.
    """
    session: Any = orm_context.session
    manager: Any = getattr(session, "manager", None)
    limit = manager.budget.limit if manager is not None else None
    if limit is None or len(shard_ids) <= limit or in_greenlet() or session.twophase:
        return None
    held = held_binds(session)
    outside: dict[str, Engine] = {}
    for shard_id in shard_ids:
        bind = session.get_bind(**dict(orm_context.bind_arguments, shard_id=shard_id))
        if isinstance(bind, Engine) and bind not in held and runs_in_threads(bind):
            outside[shard_id] = bind
    if not outside:
        return None
    if not orm_context.execution_options.get(QUEUED_WRITES, False):
        raise ConnectionBudgetError(
            f"this {orm_context.statement.__visit_name__.upper()} names no shard key and runs on "
            f"{len(shard_ids)} shards in one transaction, but max_connections is {limit}: name a "
            f"shard key, raise max_connections to at least {len(shard_ids)}, or run it with "
            f".execution_options({QUEUED_WRITES}=True) (each shard's part then commits on its own "
            "and a session rollback does not undo it)"
        )
    inside = {s: invoke(orm_context, s) for s in shard_ids if s not in outside}
    statement, params = orm_context.statement, orm_context.parameters
    options = {k: v for k, v in orm_context.local_execution_options.items() if k == QUERY_TIMEOUT}

    def work(shard_id: str, conn: Connection) -> Result[Any]:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        result = conn.execute(statement, params or {}, execution_options=options)
        if result.returns_rows:
            return result.freeze()()
        if isinstance(result, CursorResult):
            result.rowcount  # noqa: B018 - memoized now, while the cursor is ours
        return result

    free = max(1, limit - len(held))  # the connections the session holds count against the budget
    outcome = fan_out_connected(outside, manager.scatter_timeouts(outside), work, limit=free)
    _expire_loaded(orm_context, set(outcome.results))
    raise_for_errors(
        outcome.errors,
        allow_partial=False,
        any_result=bool(outcome.results),
        describe=lambda shard, error: unavailable(shard, manager.safe_url(shard), error),
    )
    return [inside[s] if s in inside else outcome.results[s] for s in shard_ids]


def _expire_loaded(orm_context: ORMExecuteState, shard_ids: set[str]) -> None:
    """Expire the objects of the statement's classes the session loaded from ``shard_ids``."""
    if not orm_context.is_orm_statement or not shard_ids:
        return
    mappers = orm_context.all_mappers
    session = orm_context.session
    for obj in list(session.identity_map.values()):
        state = instance_state(obj)
        if state.identity_token in shard_ids and any(state.mapper.isa(m) for m in mappers):
            session.expire(obj)


__all__ = ["QUEUED_WRITES", "queued_writes"]

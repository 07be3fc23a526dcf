"""Scatter-gather without a Session: ``ShardManager.query_all_shards`` (the design's queryAllShards)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Result
from sqlalchemy.sql import Executable
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import Select
from sqlalchemy.util.concurrency import in_greenlet

from ..errors import StaleRingError
from ..faults import unavailable
from .connected import fan_out_connected
from .fanout import fan_out, probe, raise_for_errors
from .gather import gather
from .lean import LeanStatement, as_result
from .ownership import for_move
from .plan import AggregatePlan, ScatterPlan, plan_scatter
from .result import ScatterResult

MAX_MOVE_TRIES = 20
OPTIMISTIC_TRIES = 3
"""Tries a scatter during a move makes unfenced before it holds the sources' fences while it runs."""

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..manager import ShardManager


def query_all_shards(
    manager: ShardManager,
    statement: str | Executable,
    params: Mapping[str, Any] | None = None,
    *,
    shard_ids: Iterable[str] | None = None,
    with_shard_id: bool = False,
    allow_partial: bool = False,
    per_shard_results: bool = False,
    write: bool = True,
) -> ScatterResult:
    """Run a query on every shard in parallel and return one merged :class:`ScatterResult`.

    By default every shard of the stored ring (old and new members mid-move); a member this
    process's configuration lacks is an :class:`UnknownShardError` (``allow_partial``: missing).
    """
    if shard_ids is None:
        manager.placement.ensure_current()  # a slow ring check must not scatter by an old ring
    if shard_ids is None and manager.placement.moving():
        return _during_move(
            manager,
            statement,
            params,
            with_shard_id=with_shard_id,
            allow_partial=allow_partial,
            per_shard_results=per_shard_results,
            write=write,
        )
    return _query_all_shards(
        manager,
        statement,
        params,
        shard_ids=shard_ids,
        with_shard_id=with_shard_id,
        allow_partial=allow_partial,
        per_shard_results=per_shard_results,
        write=write,
    )


def _during_move(
    manager: ShardManager, statement: str | Executable, params: Any, **options: Any
) -> ScatterResult:
    """A query on every shard while a move is in flight: each shard's not-yet-cut-over copies
    hidden by the sources' marks, run again if they changed meanwhile (after a few tries with the
    sources' fences held), as the session does (:mod:`.ownership`). SQL text that reads a sharded
    table is refused (:class:`~sa_shardkit.errors.UnfilteredScatterError`)."""
    placement = manager.placement
    for attempt in range(MAX_MOVE_TRIES):
        hold = attempt >= OPTIMISTIC_TRIES
        marks = placement.source_marks(hold=hold)
        if marks is None:
            return _query_all_shards(manager, statement, params, shard_ids=None, **options)
        if marks.version < 0:
            continue
        try:
            result = _query_all_shards(manager, for_move(statement, marks), params, shard_ids=None, **options)
        finally:
            placement.release_marks(marks)
        if hold or placement.source_marks() == marks:
            return result
    raise StaleRingError("the ring kept changing while querying every shard; retry")


def _query_all_shards(
    manager: ShardManager,
    statement: str | Executable,
    params: Mapping[str, Any] | None = None,
    *,
    shard_ids: Iterable[str] | None = None,
    with_shard_id: bool = False,
    allow_partial: bool = False,
    per_shard_results: bool = False,
    write: bool = True,
) -> ScatterResult:
    if shard_ids is None:
        targets = list(manager.placement.scatter_shards())
        unlisted: dict[str, BaseException] = {
            s: manager.placement.unlisted(s) for s in targets if not manager.has_shard(s)
        }
    else:
        targets, unlisted = manager.require_shards(shard_ids), {}
    plan: ScatterPlan | None = None
    if isinstance(statement, str):
        statement = text(statement)
    elif isinstance(statement, Select) and not per_shard_results:
        plan = plan_scatter(statement)
        if with_shard_id and isinstance(plan, AggregatePlan):
            from .analysis import unsupported

            raise unsupported("with_shard_id=True on an aggregate query, whose rows combine shards")
    shard_statement = statement if plan is None else plan.statement

    def run(shard_id: str, conn: Connection) -> Result[Any]:
        # one statement: autocommit is as atomic as BEGIN/COMMIT and saves two round trips
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        return conn.execute(shard_statement, dict(params or {})).freeze()()

    reachable = [s for s in targets if s not in unlisted]
    engines = {s: manager.engine(s, write=write) for s in reachable}
    if in_greenlet():  # under an AsyncSession's greenlet: its connections only work on its loop
        errors = probe(engines, {s: manager.config(s).connect_timeout for s in reachable})
        outcome = fan_out(
            {
                s: functools.partial(_connect_and_run, manager, s, write, run)
                for s in reachable
                if s not in errors
            }
        )
    else:
        errors = {}
        lean = None
        if isinstance(shard_statement, TextClause):  # warm shards: one loop, no SQLAlchemy per shard
            lean = LeanStatement(
                shard_statement,
                params,
                {s: manager.config(s).connect_timeout for s in reachable},
                {s: manager.config(s).query_timeout for s in reachable},
                as_result,
            )
        outcome = fan_out_connected(
            engines,
            manager.scatter_timeouts(reachable),
            run,
            limit=manager.budget.limit,
            cooperative=True,
            lean=lean,
        )
    errors = {
        s: e for s in targets if (e := unlisted.get(s) or errors.get(s) or outcome.errors.get(s)) is not None
    }
    raise_for_errors(
        errors,
        allow_partial=allow_partial,
        any_result=bool(outcome.results),
        describe=lambda shard, error: unavailable(shard, manager.safe_url(shard), error),
    )
    return gather(plan, outcome.results, targets, errors, with_shard_id=with_shard_id)


def _connect_and_run(
    manager: ShardManager, shard_id: str, write: bool, run: Callable[[str, Connection], Result[Any]]
) -> Result[Any]:
    with manager.connect(shard_id, write=write) as conn:
        return run(shard_id, conn)

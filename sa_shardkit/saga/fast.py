"""One round trip per step: a fused step (and the fast start) as ONE autocommitted statement.

A fused step's receipt and effect (and, for a first step on the home shard, the log row) are one
data-modifying statement already (:class:`~sa_shardkit.saga.definition.FusedAction`); a single
statement is atomic by itself, so it needs no ``BEGIN``/``COMMIT`` around it. The statement guards
itself: unless every part applied -- the log row created, the receipt reserved, the action applied
and, when the fleet stores a ring, the shard's state row (read ``FOR KEY SHARE``, the write fence)
still at the version this process routed by -- it divides by zero, which rolls the whole statement
back, and the runner takes the ordinary transactional path (which reports refusals, replays and
re-routes). So the happy path costs the pool's checkout ping and one statement per step; nothing
else changes: a refused or replayed step, a move in flight, or a step that must also write the
log, take the ordinary path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import TextClause

from ..errors import ShardUnavailableError
from ..lookups.store import give_kept, take_kept
from ..manager import ShardManager
from ..ring import ShardKey
from ..ring_state import STATE_TABLE
from .log import CREATE_WITH_RECEIPT, FINISH_MANY, finish_params
from .receipts import FUSED, StepInput, fuse

DIVISION_BY_ZERO = "22012"
LOCK_NOT_AVAILABLE = "55P03"
"""The fence's ``NOWAIT`` met a version bump holding the state row (or a lock ran out of the
connection's own ``lock_timeout``): nothing applied, the ordinary path takes over."""

# NOWAIT: only a version bump (FOR UPDATE) conflicts with FOR KEY SHARE; the fast path does not wait
# for one (a frozen mover would hold it for ever) but misses, and the ordinary path's fence waits at
# most the shard's fence_timeout (FenceTimeoutError naming the shard)
_FENCE = f", sk_fence AS (SELECT version FROM {STATE_TABLE} FOR KEY SHARE NOWAIT)"
_FENCE_OK = " AND (SELECT version FROM sk_fence) = :sk_version"
# no ring stored as this process knows: the state table must not be in the statement's snapshot
# (pg_class under MVCC, as Placement's unstored-ring fence checks it: state_table_committed)
_UNSTORED_OK = (
    " AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
    f" ON n.oid = c.relnamespace WHERE c.relname = '{STATE_TABLE}' AND n.nspname = ANY (current_schemas(false)))"
)
# runtime-only (subqueries keep the planner from folding it, as it would fold 1/0): rolls back
_MISS = "1 / ((SELECT count(*) FROM {cte}) - (SELECT count(*) FROM {cte}))"


class FastMiss(Exception):
    """The guarded statement did not apply as a whole (it was rolled back): use the ordinary path."""


def fast_version(manager: ShardManager, shard_id: str, keys: Iterable[ShardKey]) -> int | None | bool:
    """The ring version the statement must find on ``shard_id`` (0: no ring stored, which the
    statement checks; None: nothing to check, a fleet that never fences); False when the fast path
    cannot be used (a move in flight, or a key that does not belong there under the current ring)."""
    placement = manager.placement
    if not placement.fences_writes():
        return None
    state = placement.state
    if state.target is not None:
        return False
    if any(state.owner(key) != shard_id for key in keys):
        return False
    return state.version


@functools.lru_cache(maxsize=256)
def guarded(
    head: str, counts: str, act_sql: str | None, version: int | None, cte: str = "receipt"
) -> TextClause:
    """``head`` (CTEs ending where the action's CTE goes) + the action + the fence, then the guard
    (``counts`` and the action applied and the fence: the state row at ``version``, or with
    ``version`` 0 no state table; else a division by zero). Cached per distinct SQL, so pass a
    version only as 0, 1 (any stored one: the value is bound) or None."""
    act, applied = fuse(act_sql) if act_sql is not None else ("", "1")
    if version is None:
        fence, fence_ok = "", ""
    elif version == 0:
        fence, fence_ok = "", _UNSTORED_OK
    else:
        fence, fence_ok = _FENCE, _FENCE_OK
    miss = _MISS.format(cte=cte)
    return text(
        f"{head}{act}{fence}\n    SELECT CASE WHEN {counts} AND {applied} > 0{fence_ok} THEN 1 ELSE {miss} END"
    )


def run_guarded(conn: Connection, statement: TextClause, params: dict[str, Any]) -> None:
    """Execute a :func:`guarded` statement in autocommit; :class:`FastMiss` when it rolled back."""
    try:
        conn.execute(statement, params)
    except DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) in (DIVISION_BY_ZERO, LOCK_NOT_AVAILABLE):
            raise FastMiss from error
        raise


def autocommit(conn: Connection) -> Connection:
    return conn.execution_options(isolation_level="AUTOCOMMIT")


KEPT = "saga"
"""Connections the fast path keeps between steps (:func:`sa_shardkit.lookups.store.take_kept`)."""


class NotSent(Exception):
    """No connection to the shard could be made: nothing was sent."""

    def __init__(self, cause: ShardUnavailableError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def execute(manager: ShardManager, shard_id: str, statement: TextClause, params: dict[str, Any]) -> None:
    """:func:`run_guarded` on an autocommit connection to ``shard_id``: one kept from an earlier
    step when there is one (no checkout ping), else a new one (:class:`NotSent` if that fails).

    A kept connection found dead is replaced and the statement sent again: safe, because a guarded
    statement applies only if the step's receipt (or the saga's log row) did not exist yet, so a
    first attempt that did commit makes the second one roll back (:class:`FastMiss`).
    """
    keep = manager.budget.limit is None  # a connection budget: never hold connections idle
    conn = take_kept(manager, shard_id, KEPT) if keep else None
    if conn is not None:
        try:
            _run_and_keep(manager, shard_id, conn, statement, params, keep)
            return
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
    try:
        conn = autocommit(manager.connect(shard_id))
    except ShardUnavailableError as error:
        raise NotSent(error) from error
    _run_and_keep(manager, shard_id, conn, statement, params, keep)


def _run_and_keep(
    manager: ShardManager,
    shard_id: str,
    conn: Connection,
    statement: TextClause,
    params: dict[str, Any],
    keep: bool,
) -> None:
    try:
        run_guarded(conn, statement, params)
        conn.commit()  # ends SQLAlchemy's own transaction object: autocommit, nothing is sent
    except FastMiss:
        conn.rollback()  # nothing is sent either
        _give(manager, shard_id, conn, keep)
        raise
    except BaseException:
        conn.close()
        raise
    _give(manager, shard_id, conn, keep)


def _give(manager: ShardManager, shard_id: str, conn: Connection, keep: bool) -> None:
    if keep and conn.engine is manager.engine(shard_id):
        give_kept(manager, shard_id, conn, KEPT)
    else:
        conn.close()


_START_HEAD = CREATE_WITH_RECEIPT.split("{act}")[0]
_START_COUNTS = "(SELECT count(*) FROM log) = 1 AND (SELECT count(*) FROM receipt) = 1"
_STEP_HEAD = FUSED.split("{act}")[0]
_STEP_COUNTS = "(SELECT count(*) FROM receipt) = 1"


def _kind(version: int | None) -> int | None:
    """What :func:`guarded` is built for: no check, no ring stored, or a stored ring (bound)."""
    return None if version is None else min(version, 1)


def start(
    manager: ShardManager, shard_id: str, params: dict[str, Any], act_sql: str, version: int | None
) -> None:
    """The fast start: log row, first receipt and first effect in one autocommitted statement
    (``params`` as :func:`~sa_shardkit.saga.log.create_with_receipt` binds them)."""
    statement = guarded(_START_HEAD, _START_COUNTS, act_sql, _kind(version))
    execute(manager, shard_id, statement, {**params, "sk_version": version})


_CREATE_HEAD = CREATE_WITH_RECEIPT.split("), receipt AS (")[0] + ")"


def create(manager: ShardManager, shard_id: str, params: dict[str, Any], version: int | None) -> None:
    """Only the log row (a first step on another shard), in one autocommitted statement;
    :class:`FastMiss` when the id is taken (or the ring changed)."""
    statement = guarded(_CREATE_HEAD, "(SELECT count(*) FROM log) = 1", None, _kind(version), "log")
    execute(manager, shard_id, statement, {**params, "sk_version": version})


def step(
    manager: ShardManager,
    shard_id: str,
    key: StepInput,
    fused: tuple[str, Mapping[str, Any]],
    version: int | None,
) -> None:
    """A fused step's receipt and effect in one autocommitted statement."""
    statement = guarded(_STEP_HEAD, _STEP_COUNTS, fused[0], _kind(version))
    params = {
        **fused[1],
        "sk_saga_id": key.saga_id,
        "sk_step": key.step,
        "sk_digest": key.digest,
        "sk_shard_key": key.shard_key,
        "sk_version": version,
    }
    execute(manager, shard_id, statement, params)


_FINISH_HEAD = f"WITH fin AS ({FINISH_MANY} RETURNING 1)"


def finish(
    manager: ShardManager,
    shard_id: str,
    items: Sequence[tuple[str, str, Mapping[str, Any]]],
    version: int | None,
) -> None:
    """Deferred completion marks (:func:`~sa_shardkit.saga.log.finish_many`) in one autocommitted
    statement, fenced like a step (:class:`FastMiss` when the ring changed: use a transaction).
    Sent again on a dead kept connection is harmless: a mark applies only to an unfinished row."""
    statement = guarded(_FINISH_HEAD, "true", None, _kind(version), "fin")
    execute(manager, shard_id, statement, {**finish_params(items), "sk_version": version})


__all__ = [
    "KEPT",
    "NotSent",
    "execute",
    "FastMiss",
    "autocommit",
    "create",
    "fast_version",
    "finish",
    "guarded",
    "run_guarded",
    "start",
    "step",
]

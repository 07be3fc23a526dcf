"""Adding and removing shards online: the steps of a ring change, each safe to repeat.

1. **prepare**: a joining shard gets the schema and the reference tables' rows;
2. **start**: every shard (old and new members) is bumped to version ``v+1`` = (old ring, target
   ring), each under ``FOR UPDATE`` of its state row, before any row moves; routing keeps every key
   on its old shard until that key's batch is cut over;
3. **move**: each source shard is drained by a :class:`~.mover.SourceMover` (sources in parallel);
4. **finish**: every shard is bumped to ``v+2`` = (target ring, nothing in flight), and the
   reference tables of joining shards are refreshed.

Killed at any point, the same call (or :func:`resume`) reads the fleet's state and continues from
the step it reached; once the fleet routes by the target ring, running it again does nothing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import delete, insert, select

from ..config import ShardConfig
from ..errors import RebalanceError, UnknownShardError
from ..manager import ShardManager
from ..ring import HashRing
from .catalog import RingState, check_key_type, install_ring, load_ring_state, write_state
from .mover import MoveOptions, SourceMover, create_stages, drop_stages
from .plan import RebalancePlan, plan_rebalance, range_moves
from .progress import ProgressCallback, ProgressTracker
from .tables import TableSet, TableSource, table_set


@dataclass(frozen=True)
class RebalanceResult:
    """What a finished rebalance did."""

    old: HashRing
    new: HashRing
    version: int
    """The ring version the fleet routes by now."""
    rows_moved: int
    keys_moved: int
    batches: int
    rows_by_table: dict[str, int]
    seconds: float
    max_fence_seconds: float
    """Longest cut-over transaction: the longest a writer of a moving key could have waited."""

    @property
    def rows_per_second(self) -> float:
        return self.rows_moved / self.seconds if self.seconds > 0 else 0.0


def current_state(manager: ShardManager) -> RingState:
    """The fleet's stored ring state; the manager's configured ring is stored first if none is."""
    state = load_ring_state(manager)
    return state if state is not None else install_ring(manager)


def plan_change(manager: ShardManager, new_ring: HashRing, tables: TableSource) -> RebalancePlan:
    """The dry run: ranges and rows that would move from the stored ring to ``new_ring``."""
    state = current_state(manager)
    old = state.ring
    _require_configured(manager, new_ring)
    return plan_rebalance(manager, old, new_ring, table_set(tables))


def rebalance(
    manager: ShardManager,
    new_ring: HashRing,
    tables: TableSource,
    *,
    options: MoveOptions | None = None,
    progress: ProgressCallback | None = None,
    rows_expected: int | None = None,
) -> RebalanceResult:
    """Move the fleet from its stored ring to ``new_ring`` online (see the module docstring)."""
    options = options or MoveOptions()
    spec = table_set(tables)
    key_type = check_key_type(spec.key_sql_type)
    _require_configured(manager, new_ring)
    tracker = ProgressTracker(progress, rows_expected)
    state = current_state(manager)
    if state.in_flight:
        if state.target != new_ring:
            raise RebalanceError(
                f"a move to {state.target!r} (version {state.version}) is in flight; finish it first "
                "(shardkit rebalance --resume) before starting another"
            )
    elif state.ring == new_ring:
        manager.set_ring(new_ring)
        tracker.phase("done")
        return _result(state.ring, new_ring, state.version, tracker)
    else:
        tracker.phase("prepare")
        joining = [s for s in new_ring.shard_ids if s not in state.ring]
        _prepare(manager, spec, state.ring, joining)
        state = RingState(state.version + 1, state.ring, new_ring, key_type)
    write_state(manager, state, state.shard_ids)  # also completes a start that was interrupted
    tracker.phase("move")
    moving_from = {m.source for m in range_moves(state.ring, new_ring)}
    sources = [s for s in state.ring.shard_ids if s in moving_from]
    _drain(manager, state, spec, sources, options, tracker)
    tracker.phase("finish")
    joining = [s for s in new_ring.shard_ids if s not in state.ring]
    if joining:
        _copy_reference(manager, spec, state.ring.shard_ids[0], joining)
    final = RingState(state.version + 1, new_ring)
    write_state(manager, final, state.shard_ids)
    drop_stages(manager, spec, new_ring.shard_ids)
    manager.set_ring(new_ring)
    tracker.phase("done")
    return _result(state.ring, new_ring, final.version, tracker)


def resume(
    manager: ShardManager,
    tables: TableSource,
    *,
    options: MoveOptions | None = None,
    progress: ProgressCallback | None = None,
) -> RebalanceResult | None:
    """Finish the move in flight, if any (None when there is none)."""
    state = load_ring_state(manager)
    if state is None or state.target is None:
        return None
    return rebalance(manager, state.target, tables, options=options, progress=progress)


def add_shard(
    manager: ShardManager,
    shard: ShardConfig | str,
    tables: TableSource,
    *,
    weight: float | None = None,
    options: MoveOptions | None = None,
    progress: ProgressCallback | None = None,
) -> RebalanceResult:
    """Put a shard on the ring and move its share of the rows to it, online.

    ``shard`` is a :class:`ShardConfig` (its engine is opened if the manager lacks it) or the id of
    a shard the manager already has.
    """
    if isinstance(shard, ShardConfig):
        if shard.id not in manager.shard_ids:
            manager.add_shard(shard)
        shard_id, default_weight = shard.id, shard.weight
    else:
        shard_id, default_weight = shard, manager.config(shard).weight
    state = current_state_excluding(manager, shard_id)
    if state.in_flight:
        return rebalance(manager, _in_flight_target(state), tables, options=options, progress=progress)
    if shard_id in state.ring:
        return rebalance(manager, state.ring, tables, options=options, progress=progress)
    new_ring = state.ring.add_shard(shard_id, weight if weight is not None else default_weight)
    return rebalance(manager, new_ring, tables, options=options, progress=progress)


def remove_shard(
    manager: ShardManager,
    shard_id: str,
    tables: TableSource,
    *,
    options: MoveOptions | None = None,
    progress: ProgressCallback | None = None,
) -> RebalanceResult:
    """Drain a shard's rows to the remaining shards and take it off the ring, online."""
    manager.config(shard_id)
    state = current_state(manager)
    if state.in_flight:
        return rebalance(manager, _in_flight_target(state), tables, options=options, progress=progress)
    if shard_id not in state.ring:
        return rebalance(manager, state.ring, tables, options=options, progress=progress)
    return rebalance(manager, state.ring.remove_shard(shard_id), tables, options=options, progress=progress)


def current_state_excluding(manager: ShardManager, joining: str) -> RingState:
    """Like :func:`current_state`, but a first install never puts ``joining`` on the ring."""
    state = load_ring_state(manager)
    if state is not None:
        return state
    ring = manager.ring
    if joining in ring:
        ring = ring.remove_shard(joining)
    return install_ring(manager, ring)


def _in_flight_target(state: RingState) -> HashRing:
    assert state.target is not None
    return state.target


def _require_configured(manager: ShardManager, ring: HashRing) -> None:
    missing = [s for s in ring.shard_ids if s not in manager.shard_ids]
    if missing:
        raise UnknownShardError(
            f"shard(s) {', '.join(map(repr, missing))} are on the target ring but not configured: "
            "add them with manager.add_shard(ShardConfig(id=..., url=...))"
        )


def _prepare(manager: ShardManager, spec: TableSet, old: HashRing, joining: list[str]) -> None:
    """Schema and reference rows on joining shards, before any routing can reach them."""
    for shard_id in joining:
        engine = manager.engine(shard_id)
        for metadata in {t.metadata for t in spec.tables}:
            metadata.create_all(engine, tables=[t for t in spec.tables if t.metadata is metadata])
    if joining:
        _copy_reference(manager, spec, old.shard_ids[0], joining)


def _copy_reference(manager: ShardManager, spec: TableSet, source: str, targets: list[str]) -> None:
    """Make each target's reference tables equal to the source's (one transaction per target)."""
    if not spec.reference:
        return
    with manager.connect(source, write=False) as conn, conn.begin():
        data = {t.name: [dict(r._mapping) for r in conn.execute(select(t))] for t in spec.reference}
    for target in targets:
        with manager.connect(target) as conn, conn.begin():
            for table in reversed(spec.reference):
                conn.execute(delete(table))
            for table in spec.reference:
                rows = [{c.key: row[c.name] for c in table.c} for row in data[table.name]]
                if rows:
                    conn.execute(insert(table), rows)


def _drain(
    manager: ShardManager,
    state: RingState,
    spec: TableSet,
    sources: list[str],
    options: MoveOptions,
    tracker: ProgressTracker,
) -> None:
    """Drain every source shard, in parallel; the first failure is raised after all stop."""
    assert state.target is not None
    create_stages(manager, spec, state.target.shard_ids)
    movers = [SourceMover(manager, state, spec, s, options, tracker) for s in sources]
    if len(movers) == 1:
        movers[0].run()
        return
    with ThreadPoolExecutor(max_workers=min(4, len(movers)), thread_name_prefix="shardkit-mover") as pool:
        futures = [pool.submit(m.run) for m in movers]
        errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def _result(old: HashRing, new: HashRing, version: int, tracker: ProgressTracker) -> RebalanceResult:
    snap = tracker.snapshot("done")
    return RebalanceResult(
        old,
        new,
        version,
        snap.rows_moved,
        snap.keys_moved,
        snap.batches,
        dict(tracker.rows_by_table),
        snap.elapsed,
        snap.max_fence_seconds,
    )

"""Adding and removing shards online: the steps of a ring change, each safe to repeat.

1. **prepare**: a joining shard gets the schema and the reference tables' rows; the move record
   (options, joining shards' URLs without passwords, planned rows: :mod:`.record`) is stored;
2. **start**: every shard (old and new members) is bumped to version ``v+1`` = (old ring, target
   ring), each under ``FOR UPDATE`` of its state row, before any row moves; routing keeps every key
   on its old shard until that key's batch is cut over. Then the **start wait**: no copy is
   committed on a target until every live process must have re-read the ring (the ring recheck
   horizon, then every transaction begun before it ended: :func:`.catalog.wait_out_move_start`);
   a process that has not seen the move scatters without the ownership filter;
3. **move**: each source shard is drained by a :class:`~.mover.SourceMover` (sources in parallel);
   then rows positioned by another column's ring position (lookup rows: :mod:`.positioned`,
   :mod:`.lookup_tables`) go to their target-ring shards;
4. **finish**: every shard is bumped to ``v+2`` = (target ring, nothing in flight), the reference
   tables of joining shards are refreshed and the staging tables dropped on every shard of the move.

Killed at any point, the same call (or :func:`resume`) reads every shard's state and continues from
the step it reached -- including a finish that bumped only some shards (:class:`.catalog.FleetView`);
once the whole fleet routes by the target ring, running it again does nothing.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

from alembic.config import Config
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import OperationalError

from ..config import ShardConfig
from ..errors import ConfigError, RebalanceError, UnknownShardError
from ..manager import ShardManager
from ..ring import HashRing
from .catalog import (
    RingState,
    check_key_type,
    install_ring,
    move_started_at,
    read_fleet_state,
    wait_out_move_start,
    write_state,
)
from .control import MoveControl
from .fleet import FleetView
from .join import prepare_joining_shard
from .lookup_tables import register as _register_lookup_tables
from .mover import MoveOptions, SourceMover, drop_leftover_stages
from .plan import RebalancePlan, plan_rebalance, range_moves
from .positioned import (
    PositionedTable,
    finish_positioned,
    move_positioned,
    positioned_tables,
    prepare_positioned,
)
from .progress import ProgressCallback, ProgressTracker
from .receipt_keys import fill_receipt_keys, shards_with_receipts
from .record import MoveRecord, read_records, url_without_password, write_record
from .tables import TableSet, TableSource, table_set

_register_lookup_tables()


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
    phase_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per step (see :attr:`RebalanceProgress.phase_seconds`)."""
    finished_interrupted: bool = False
    """This run only completed the final version bump of a move that had moved every row."""
    positioned_rows: dict[str, int] = field(default_factory=dict)
    """Rows of tables placed by another column's ring position (lookup entries) this run moved,
    per table (:mod:`.positioned`); not counted in ``rows_moved``."""

    @property
    def start_wait_seconds(self) -> float:
        """The start wait (every process must see the move before a copy commits): a fixed cost of
        about ``SHARDKIT_RING_RECHECK_SECONDS``, whatever the rows."""
        return self.phase_seconds.get("start wait", 0.0)

    @property
    def rows_per_second(self) -> float:
        """Rows moved per second of the whole run (the start wait included)."""
        return self.rows_moved / self.seconds if self.seconds > 0 else 0.0

    @property
    def moving_rows_per_second(self) -> float:
        """Rows moved per second once moving could begin (the start wait left out)."""
        seconds = self.seconds - self.start_wait_seconds
        return self.rows_moved / seconds if seconds > 0 else 0.0


def fleet_view(manager: ShardManager) -> FleetView:
    """Every shard's stored state (the configured ring is stored first if none is)."""
    view = FleetView(read_fleet_state(manager))
    if view.newest is None:
        install_ring(manager)
        view = FleetView(read_fleet_state(manager))
    return view


def current_state(manager: ShardManager) -> RingState:
    """The fleet's stored ring state; the manager's configured ring is stored first if none is."""
    newest = fleet_view(manager).newest
    assert newest is not None
    return newest


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
    control: MoveControl | None = None,
    tracker: ProgressTracker | None = None,
    migrations: Config | None = None,
) -> RebalanceResult:
    """Move the fleet from its stored ring to ``new_ring`` online (see the module docstring).

    ``options``: for a new move, :class:`MoveOptions` (default ones when None); when resuming,
    None means the options the move was started with (stored in its record). ``migrations``: the
    project's Alembic config, to bring a joining shard to the fleet's revision first (required
    when the fleet uses Alembic and the new shard is not at its revision).
    """
    spec = table_set(tables)
    key_type = check_key_type(spec.key_sql_type)
    tracker = tracker or ProgressTracker(progress, rows_expected)
    tracker.phase("prepare")
    view = fleet_view(manager)
    newest = view.newest
    assert newest is not None
    moving = view.unfinished
    if moving is not None and moving.target != new_ring:
        raise RebalanceError(
            f"a move to {moving.target!r} (version {moving.version}) is in flight; finish it first "
            "(shardkit rebalance --resume) before starting another"
        )
    if moving is not None and not moving.in_flight:
        moving = None
    if moving is None and newest.ring == new_ring:
        if not view.split and not newest.in_flight:
            _require_configured(manager, new_ring)
            drop_leftover_stages(manager, manager.shard_ids)
            manager.set_ring(new_ring)
            tracker.phase("done")
            return _result(newest.ring, new_ring, newest.version, tracker)
    finishing = moving is not None and not newest.in_flight
    fresh = moving is None
    if moving is None:
        _require_configured(manager, new_ring)
        # receipts recorded before shard_key existed get their key, or nothing starts
        _fill_receipt_keys(manager, newest.ring, new_ring)
        joining = [s for s in new_ring.shard_ids if s not in newest.ring]
        _prepare(manager, spec, newest.ring, joining, migrations)
        moving = RingState(newest.version + 1, newest.ring, new_ring, key_type)
        options = options or MoveOptions()
        record = MoveRecord(
            moving.version,
            _options_dict(options),
            {s: url_without_password(manager.config(s).primary_url) for s in joining},
            tracker.rows_expected,
        )
        write_record(manager, record, moving.shard_ids)
    else:
        stored, counts = read_records(manager, moving.version, _configured(manager, moving.shard_ids))
        _configure_joining(manager, moving, stored)
        _require_configured(manager, new_ring)
        options = options or (_options_from(stored) if stored is not None else MoveOptions())
        tracker.resumed_from(counts.values(), stored.rows_expected if stored else None)
    if finishing:
        tracker.phase("finish")
        final = _finish(manager, spec, moving)
        tracker.phase("done")
        return _result(moving.ring, new_ring, final.version, tracker, finished_interrupted=True)
    tracker.phase("start")
    bumped = write_state(manager, moving, moving.shard_ids)  # also completes an interrupted start
    # no copy is committed on a target before every process routes by the move (a process with the
    # older ring scatters unfiltered: it would see a copy twice); a resumed move waits out the rest
    tracker.phase("start wait")
    started_at = time.time() if bumped else move_started_at(manager, moving)
    sources = _sources(moving.ring, new_ring)  # its CPU (the moved arcs) is spent inside the wait
    wait_out_move_start(manager, moving, started_at)
    tracker.phase("move")
    if not fresh:  # a move started before they could be filled (idempotent; a new move just did)
        fill_receipt_keys(manager, sources)
    _drain(manager, moving, spec, sources, options, tracker, control or MoveControl())
    # rows placed by another column's ring position (lookup rows, ...): after the keys, before the bump
    carried = positioned_tables(manager, spec)
    positioned = move_positioned(manager, moving, carried, sources, timeout=options.lock_timeout)
    tracker.phase("finish")
    final = _finish(manager, spec, moving, carried)
    tracker.phase("done")
    return _result(moving.ring, new_ring, final.version, tracker, positioned=positioned.rows)


def _fill_receipt_keys(manager: ShardManager, old: HashRing, new: HashRing) -> None:
    """Fill the move's sources' NULL receipt keys; the sources (the moved arcs: 10-25 ms of CPU
    at 5 x 2,048 vnodes) are only worked out when a shard of the old ring has receipts at all."""
    if shards_with_receipts(manager, old.shard_ids):
        fill_receipt_keys(manager, _sources(old, new))


def _sources(old: HashRing, new: HashRing) -> list[str]:
    """The shards losing keys from ``old`` to ``new``, in ring order."""
    moving_from = {m.source for m in range_moves(old, new)}
    return [s for s in old.shard_ids if s in moving_from]


def _finish(
    manager: ShardManager, spec: TableSet, moving: RingState, carried: list[PositionedTable] | None = None
) -> RingState:
    """The last step (every source drained): reference rows, the final bump, staging tables dropped.
    ``carried``: the positioned tables just moved (else they are looked up)."""
    assert moving.target is not None
    joining = [s for s in moving.target.shard_ids if s not in moving.ring]
    if joining:
        _copy_reference(manager, spec, moving.ring.shard_ids[0], joining)
    finish_positioned(manager, moving, positioned_tables(manager, spec) if carried is None else carried)
    final = RingState(moving.version + 1, moving.target)
    write_state(manager, final, moving.shard_ids)  # shards already bumped are kept as they are
    drop_leftover_stages(manager, _configured(manager, moving.shard_ids))  # of older versions
    manager.set_ring(moving.target)
    return final


def resume(
    manager: ShardManager,
    tables: TableSource,
    *,
    options: MoveOptions | None = None,
    progress: ProgressCallback | None = None,
    control: MoveControl | None = None,
    tracker: ProgressTracker | None = None,
) -> RebalanceResult | None:
    """Finish the move in flight, if any (None when there is none), with its stored options
    unless ``options`` is given. Joining shards the manager lacks are configured from the move
    record (their URL is stored without a password)."""
    view = fleet_view(manager)
    moving = view.unfinished
    if moving is None or moving.target is None:
        drop_leftovers(manager, view)  # a kill while the last step dropped them
        return None
    return rebalance(
        manager, moving.target, tables, options=options, progress=progress, control=control, tracker=tracker
    )


def drop_leftovers(manager: ShardManager, view: FleetView) -> dict[str, int]:
    """With no move in flight: drop staging tables a mover killed in its very last step left,
    on every shard of the last move (a joining shard the configuration lacks is reached through
    the move record). Returns ``{shard: tables dropped}``."""
    newest = view.newest
    if newest is None or view.unfinished is not None:
        return {}
    stored, _ = read_records(manager, newest.version - 1)
    if stored is not None:
        previous = RingState(stored.version, newest.ring, newest.ring)
        _configure_joining(manager, previous, stored)
    return drop_leftover_stages(manager, manager.shard_ids)


def _options_dict(options: MoveOptions) -> dict[str, float]:
    return {f.name: getattr(options, f.name) for f in fields(MoveOptions)}


def _options_from(record: MoveRecord) -> MoveOptions:
    known = {f.name: f.type for f in fields(MoveOptions)}
    values = {k: v for k, v in record.options.items() if k in known}
    if "batch_size" in values:
        values["batch_size"] = int(values["batch_size"])
    return MoveOptions(**values)  # type: ignore[arg-type]


def _configured(manager: ShardManager, shard_ids: tuple[str, ...] | list[str]) -> list[str]:
    return [s for s in shard_ids if s in manager.shard_ids]


def _configure_joining(manager: ShardManager, moving: RingState, record: MoveRecord | None) -> None:
    """Give the manager the joining shards it lacks, from the move record's stored URLs.

    Those URLs have no password (none is ever stored): libpq takes it from ``PGPASSWORD`` or
    ``~/.pgpass``. When the server asks for one and none is there, this raises a
    :class:`ConfigError` saying so (one line) before anything moves."""
    assert moving.target is not None
    for shard_id in moving.target.shard_ids:
        if shard_id in manager.shard_ids or record is None or shard_id not in record.joining:
            continue
        url = record.joining[shard_id]
        manager.add_shard(ShardConfig(id=shard_id, url=url, weight=moving.target.weights[shard_id]))
        try:
            with manager.engine(shard_id).connect():
                pass
        except OperationalError as error:
            if "password" not in str(error).lower():
                raise
            raise ConfigError(
                f"shard {shard_id!r} joins the move in flight, and its URL is stored without its "
                f"password ({url}): its server asks for one; set PGPASSWORD or a ~/.pgpass entry, or "
                f"configure {shard_id} with its password (shardkit rebalance --add {shard_id} URL)"
            ) from None


def add_shard(
    manager: ShardManager,
    shard: ShardConfig | str,
    tables: TableSource,
    *,
    weight: float | None = None,
    options: MoveOptions | None = None,
    progress: ProgressCallback | None = None,
    migrations: Config | None = None,
) -> RebalanceResult:
    """Put a shard on the ring and move its share of the rows to it, online.

    ``shard`` is a :class:`ShardConfig` (its engine is opened if the manager lacks it) or the id of
    a shard the manager already has. A move in flight (or one whose last step was interrupted) is
    finished instead. The new shard is first brought to the fleet's Alembic revision through
    ``migrations`` (the project's Alembic config) and given the reference rows.
    """
    new_ring = target_ring(manager, add=shard, weight=weight)
    assert new_ring is not None
    return rebalance(manager, new_ring, tables, options=options, progress=progress, migrations=migrations)


def remove_shard(
    manager: ShardManager,
    shard_id: str,
    tables: TableSource,
    *,
    options: MoveOptions | None = None,
    progress: ProgressCallback | None = None,
) -> RebalanceResult:
    """Drain a shard's rows to the remaining shards and take it off the ring, online."""
    new_ring = target_ring(manager, remove=shard_id)
    assert new_ring is not None
    return rebalance(manager, new_ring, tables, options=options, progress=progress)


def target_ring(
    manager: ShardManager,
    *,
    add: ShardConfig | str | None = None,
    weight: float | None = None,
    remove: str | None = None,
    ring: HashRing | None = None,
) -> HashRing | None:
    """The ring a request moves to: the unfinished move's target if there is one (it is finished
    first), else the stored ring with ``add`` put on / ``remove`` taken off, or ``ring``; None
    when nothing is asked and nothing is in flight (a resume with nothing to do)."""
    joining = None
    if isinstance(add, ShardConfig):
        if add.id not in manager.shard_ids:
            manager.add_shard(add)
        joining = add.id
    elif add is not None:
        joining = add
    if remove is not None:
        manager.config(remove)
    view = FleetView(read_fleet_state(manager))
    moving = view.unfinished
    if moving is not None and moving.target is not None:
        return moving.target
    state = view.newest or _install_without(manager, joining)
    if ring is not None:
        return ring
    if joining is not None:
        if joining in state.ring:
            return state.ring
        default = add.weight if isinstance(add, ShardConfig) else manager.config(joining).weight
        return state.ring.add_shard(joining, weight if weight is not None else default)
    if remove is not None:
        return state.ring.remove_shard(remove) if remove in state.ring else state.ring
    return None


def _install_without(manager: ShardManager, joining: str | None) -> RingState:
    """Store the configured ring (never with the shard being added on it)."""
    ring = manager.ring
    if joining is not None and joining in ring:
        ring = ring.remove_shard(joining)
    return install_ring(manager, ring)


def _require_configured(manager: ShardManager, ring: HashRing) -> None:
    missing = [s for s in ring.shard_ids if s not in manager.shard_ids]
    if missing:
        raise UnknownShardError(
            f"shard(s) {', '.join(map(repr, missing))} are on the target ring but not in this "
            "configuration: add their URLs to it (or pass --add ID URL again)"
        )


def _prepare(
    manager: ShardManager,
    spec: TableSet,
    old: HashRing,
    joining: list[str],
    migrations: Config | None = None,
) -> None:
    """Schema (the fleet's Alembic revision) and reference rows on joining shards, before any
    routing can reach them (:mod:`.join`); raises before anything moves when that fails."""
    for shard_id in joining:
        prepare_joining_shard(manager, shard_id, old.shard_ids, spec, migrations)
        prepare_positioned(manager, positioned_tables(manager, spec), shard_id)
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
    control: MoveControl,
) -> None:
    """Drain every source shard, in parallel; the first failure is raised after all stop."""
    assert state.target is not None
    movers = [SourceMover(manager, state, spec, s, options, tracker, control) for s in sources]
    if len(movers) == 1:
        movers[0].run()
        return
    with ThreadPoolExecutor(max_workers=min(4, len(movers)), thread_name_prefix="shardkit-mover") as pool:
        futures = [pool.submit(m.run) for m in movers]
        errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def _result(
    old: HashRing,
    new: HashRing,
    version: int,
    tracker: ProgressTracker,
    *,
    finished_interrupted: bool = False,
    positioned: dict[str, int] | None = None,
) -> RebalanceResult:
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
        snap.phase_seconds,
        finished_interrupted,
        dict(positioned or {}),
    )

"""Running a move in the background: start, watch progress, pause, resume, cancel, wait.

``start_rebalance`` resolves the request in the caller's thread (so a bad request raises there),
then runs the move in a daemon thread. The job's figures are the mover's own; another process sees
the same ones through :func:`move_status` (``shardkit rebalance --status``), which reads the move
record's counters that every cut-over updates in its own transaction.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..config import ShardConfig
from ..errors import RebalanceError
from ..manager import ShardManager
from ..ring import HashRing
from .catalog import read_fleet_state
from .control import MoveControl
from .fleet import FleetView
from .mover import MoveOptions
from .progress import ProgressCallback, ProgressTracker, RebalanceProgress
from .rebalancer import RebalanceResult, rebalance, resume, target_ring
from .record import SourceCounts, read_records
from .tables import TableSource


class RebalanceJob:
    """A move running in a background thread (see :func:`start_rebalance`)."""

    def __init__(
        self,
        manager: ShardManager,
        tables: TableSource,
        ring: HashRing | None,
        options: MoveOptions | None,
        progress: ProgressCallback | None,
    ) -> None:
        self.target = ring
        """The ring the job moves to (None: it finishes whatever move is in flight)."""
        self._control = MoveControl()
        self._tracker = ProgressTracker(progress)
        self._result: RebalanceResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(manager, tables, ring, options), name="shardkit-rebalance", daemon=True
        )
        self._thread.start()

    def _run(
        self, manager: ShardManager, tables: TableSource, ring: HashRing | None, options: MoveOptions | None
    ) -> None:
        try:
            if ring is None:
                self._result = resume(
                    manager, tables, options=options, control=self._control, tracker=self._tracker
                )
            else:
                self._result = rebalance(
                    manager, ring, tables, options=options, control=self._control, tracker=self._tracker
                )
        except BaseException as error:  # noqa: BLE001 - handed to wait()
            self._error = error

    def progress(self) -> RebalanceProgress:
        """The move's figures now (rows include what earlier runs of the same move cut over)."""
        self._tracker.paused = self._control.paused
        return self._tracker.snapshot()

    def pause(self) -> None:
        """Stop after the batch in flight (writers and readers are unaffected while paused)."""
        self._control.pause()

    def resume(self) -> None:
        """Continue a paused job."""
        self._control.resume()

    def cancel(self) -> None:
        """Stop after the batch in flight; the move stays in flight, consistent, until
        :func:`~sa_shardkit.rebalance.resume` (or a new job) finishes it. ``wait()`` then raises
        :class:`~sa_shardkit.errors.RebalanceCancelled`."""
        self._control.cancel()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> RebalanceResult | None:
        """The result once the move finished (None: nothing was in flight to resume); re-raises
        the move's error. Raises :class:`TimeoutError` if it is still running after ``timeout``."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the rebalance is still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result


def start_rebalance(
    manager: ShardManager,
    tables: TableSource,
    *,
    add: ShardConfig | str | None = None,
    weight: float | None = None,
    remove: str | None = None,
    ring: HashRing | None = None,
    options: MoveOptions | None = None,
    progress: ProgressCallback | None = None,
) -> RebalanceJob:
    """Start a move in the background: ``add`` a shard, ``remove`` one, move to ``ring``, or (none
    of them) finish the move in flight. A move in flight is finished first whatever is asked."""
    if sum(x is not None for x in (add, remove, ring)) > 1:
        raise RebalanceError("give at most one of add=, remove=, ring=")
    asked = add is not None or remove is not None or ring is not None
    target = target_ring(manager, add=add, weight=weight, remove=remove, ring=ring) if asked else None
    return RebalanceJob(manager, tables, target, options, progress)


@dataclass(frozen=True)
class MoveStatus:
    """The fleet's move as stored on the shards (what ``shardkit rebalance --status`` prints)."""

    version: int
    """The newest ring version any shard holds."""
    phase: str
    """``idle`` (nothing in flight), ``start`` (some shards not bumped yet), ``move``, or ``finish``
    (the final bump reached only some shards: ``resume`` completes it)."""
    rows_moved: int = 0
    keys_moved: int = 0
    batches: int = 0
    rows_expected: int | None = None
    per_shard: dict[str, SourceCounts] = field(default_factory=dict)
    lagging: tuple[str, ...] = ()
    """Shards at an older version than the newest."""


def move_status(manager: ShardManager) -> MoveStatus | None:
    """The stored move's figures (None before any ring is stored)."""
    view = FleetView(read_fleet_state(manager))
    newest = view.newest
    if newest is None:
        return None
    moving = view.unfinished
    lagging = tuple(view.lagging)
    if moving is None:
        return MoveStatus(newest.version, "idle", lagging=lagging)
    phase = "finish" if not newest.in_flight else ("start" if view.split else "move")
    record, counts = read_records(
        manager, moving.version, [s for s in moving.shard_ids if s in manager.shard_ids]
    )
    return MoveStatus(
        newest.version,
        phase,
        sum(c.rows_moved for c in counts.values()),
        sum(c.keys_moved for c in counts.values()),
        sum(c.batches for c in counts.values()),
        record.rows_expected if record else None,
        counts,
        lagging,
    )


__all__ = ["MoveStatus", "RebalanceJob", "move_status", "start_rebalance"]

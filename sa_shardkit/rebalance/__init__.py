"""Adding and removing shards online, with no row lost (see docs/concepts/rebalancing.md).

The fleet's ring lives in the shards themselves (:mod:`.catalog`); a move copies, verifies and
deletes one key batch at a time under a fence that only writers of the moving keys wait for
(:mod:`.mover`); every application process's :class:`~sa_shardkit.ShardManager` follows the stored
version by itself, without a restart (:mod:`sa_shardkit.placement`; ``RingRouter`` is a deprecated alias).
"""

from __future__ import annotations

from ..errors import RebalanceCancelled, StaleRingError
from .catalog import RingState, ShardState, install_ring, load_ring_state, read_fleet_state
from .control import MoveControl
from .fence import RingRouter
from .fleet import FleetView
from .job import MoveStatus, RebalanceJob, move_status, start_rebalance
from .mover import MoveOptions
from .plan import RangeMove, RebalancePlan, plan_rebalance, range_moves
from .progress import BatchReport, ProgressCallback, RebalanceProgress
from .rebalancer import (
    RebalanceResult,
    add_shard,
    current_state,
    plan_change,
    rebalance,
    remove_shard,
    resume,
    target_ring,
)
from .tables import ShardedTable, TableSet, table_set
from .verify import misplaced_rows

__all__ = [
    "BatchReport",
    "FleetView",
    "MoveControl",
    "MoveOptions",
    "MoveStatus",
    "ProgressCallback",
    "RangeMove",
    "RebalancePlan",
    "RebalanceCancelled",
    "RebalanceJob",
    "RebalanceProgress",
    "RebalanceResult",
    "RingRouter",
    "RingState",
    "ShardState",
    "ShardedTable",
    "StaleRingError",
    "TableSet",
    "add_shard",
    "current_state",
    "install_ring",
    "load_ring_state",
    "misplaced_rows",
    "move_status",
    "plan_change",
    "plan_rebalance",
    "range_moves",
    "read_fleet_state",
    "rebalance",
    "remove_shard",
    "resume",
    "start_rebalance",
    "table_set",
    "target_ring",
]

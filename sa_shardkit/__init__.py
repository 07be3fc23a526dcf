"""sa_shardkit: horizontal sharding for SQLAlchemy 2.x on PostgreSQL."""

from __future__ import annotations

from . import session_hooks as _session_hooks  # noqa: F401 - registers the flush hooks
from .budget import ConnectionBudget, PoolStats
from .config import ShardConfig, ShardSettings, settings_from_env, settings_from_file
from .declarative import ReferenceTable, Sharding, ShardKeyWarning, sharding_of
from .errors import (
    ConfigError,
    ConnectionBudgetError,
    CrossShardTransactionError,
    DuplicateKeyError,
    DuplicateShardError,
    EmptyRingError,
    FenceTimeoutError,
    InvalidShardKeyError,
    InvalidWeightError,
    LookupIndexError,
    MigrationError,
    NotShardedError,
    RebalanceError,
    RingError,
    SagaConflictError,
    SagaError,
    SagaInputError,
    SagaPendingError,
    SagaStepFailed,
    ScatterForbiddenError,
    ScatterWarning,
    SequenceError,
    ShardKeyChangeError,
    ShardKeyMissingError,
    ShardKitError,
    ShardUnavailableError,
    StaleRingError,
    TwoPhaseAbortedError,
    UnfilteredScatterError,
    UnknownShardError,
    UnsupportedScatterError,
)
from .events import QueryEvent, QueryListener, QueryMetrics, QueryStats
from .lint import LintReport, lint_files, lint_hook, lint_script_directory
from .lookups import Lookup
from .manager import ShardHealth, ShardManager
from .placement import Placement
from .prometheus import prometheus_text
from .rebalance import MoveOptions, RebalanceJob, add_shard, remove_shard, start_rebalance
from .replicas import ReplicaStatus
from .ring import DEFAULT_VNODES, HashRing, key_bytes, key_hash, moved_share
from .routing import Route, route_statement
from .saga import Saga, SagaOptions, SagaOutcome, Step, recover, run_saga
from .scatter import ScatterResult
from .sequences import SequenceAllocator, ShardSequence, create_sequence_tables, sequence_metadata
from .session import ShardedSession, set_shard_id
from .sessionmaker import ShardedSessionmaker

__version__ = "0.1.0"

__all__ = [
    "ConnectionBudget",
    "ConnectionBudgetError",
    "PoolStats",
    "DEFAULT_VNODES",
    "ConfigError",
    "CrossShardTransactionError",
    "DuplicateKeyError",
    "DuplicateShardError",
    "EmptyRingError",
    "FenceTimeoutError",
    "HashRing",
    "InvalidShardKeyError",
    "InvalidWeightError",
    "LintReport",
    "Lookup",
    "LookupIndexError",
    "MigrationError",
    "MoveOptions",
    "NotShardedError",
    "Placement",
    "QueryEvent",
    "QueryListener",
    "QueryMetrics",
    "QueryStats",
    "RebalanceError",
    "ReferenceTable",
    "ReplicaStatus",
    "RingError",
    "RebalanceJob",
    "Route",
    "Saga",
    "SagaConflictError",
    "SagaError",
    "SagaInputError",
    "SagaOptions",
    "SagaOutcome",
    "SagaPendingError",
    "SagaStepFailed",
    "ScatterResult",
    "SequenceAllocator",
    "SequenceError",
    "ShardSequence",
    "ShardConfig",
    "ShardHealth",
    "ShardKeyChangeError",
    "ShardKeyMissingError",
    "ShardKeyWarning",
    "ShardKitError",
    "ShardManager",
    "ShardSettings",
    "ShardUnavailableError",
    "StaleRingError",
    "ShardedSession",
    "ShardedSessionmaker",
    "Sharding",
    "Step",
    "TwoPhaseAbortedError",
    "UnknownShardError",
    "UnfilteredScatterError",
    "UnsupportedScatterError",
    "ScatterForbiddenError",
    "ScatterWarning",
    "add_shard",
    "create_sequence_tables",
    "key_bytes",
    "key_hash",
    "moved_share",
    "prometheus_text",
    "lint_files",
    "lint_hook",
    "lint_script_directory",
    "recover",
    "remove_shard",
    "start_rebalance",
    "route_statement",
    "run_saga",
    "settings_from_env",
    "sequence_metadata",
    "set_shard_id",
    "settings_from_file",
    "sharding_of",
]

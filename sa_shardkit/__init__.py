"""sa_shardkit: horizontal sharding for SQLAlchemy 2.x on PostgreSQL."""

from __future__ import annotations

from .config import ShardConfig, ShardSettings, settings_from_env, settings_from_file
from .declarative import ReferenceTable, Sharding, ShardKeyWarning, sharding_of
from .errors import (
    ConfigError,
    CrossShardTransactionError,
    DuplicateShardError,
    EmptyRingError,
    InvalidShardKeyError,
    InvalidWeightError,
    MigrationError,
    NotShardedError,
    RebalanceError,
    RingError,
    SagaConflictError,
    SagaError,
    SagaInputError,
    SagaPendingError,
    SagaStepFailed,
    ShardKeyChangeError,
    ShardKeyMissingError,
    ShardKitError,
    ShardUnavailableError,
    StaleRingError,
    TwoPhaseAbortedError,
    UnknownShardError,
    UnsupportedScatterError,
)
from .events import QueryEvent, QueryListener, QueryMetrics, QueryStats
from .lint import LintReport, lint_files, lint_hook, lint_script_directory
from .manager import ShardHealth, ShardManager
from .rebalance import MoveOptions, RingRouter, add_shard, remove_shard
from .replicas import ReplicaStatus
from .ring import DEFAULT_VNODES, HashRing, key_bytes, key_hash, moved_share
from .routing import Route, route_statement
from .saga import Saga, SagaOptions, SagaOutcome, Step, recover, run_saga
from .scatter import ScatterResult
from .session import ShardedSession, set_shard_id

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_VNODES",
    "ConfigError",
    "CrossShardTransactionError",
    "DuplicateShardError",
    "EmptyRingError",
    "HashRing",
    "InvalidShardKeyError",
    "InvalidWeightError",
    "LintReport",
    "MigrationError",
    "MoveOptions",
    "NotShardedError",
    "QueryEvent",
    "QueryListener",
    "QueryMetrics",
    "QueryStats",
    "RebalanceError",
    "ReferenceTable",
    "ReplicaStatus",
    "RingError",
    "RingRouter",
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
    "Sharding",
    "Step",
    "TwoPhaseAbortedError",
    "UnknownShardError",
    "UnsupportedScatterError",
    "add_shard",
    "key_bytes",
    "key_hash",
    "moved_share",
    "lint_files",
    "lint_hook",
    "lint_script_directory",
    "recover",
    "remove_shard",
    "route_statement",
    "run_saga",
    "settings_from_env",
    "set_shard_id",
    "settings_from_file",
    "sharding_of",
]

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
    TwoPhaseAbortedError,
    UnknownShardError,
    UnsupportedScatterError,
)
from .events import QueryEvent, QueryListener, QueryMetrics, QueryStats
from .lint import LintReport, lint_files, lint_hook, lint_script_directory
from .manager import ShardHealth, ShardManager
from .replicas import ReplicaStatus
from .ring import DEFAULT_VNODES, HashRing, key_bytes, key_hash
from .routing import Route, route_statement
from .saga import Saga, SagaOptions, SagaOutcome, Step, recover, run_saga
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
    "NotShardedError",
    "QueryEvent",
    "QueryListener",
    "QueryMetrics",
    "QueryStats",
    "RebalanceError",
    "ReferenceTable",
    "ReplicaStatus",
    "RingError",
    "Route",
    "Saga",
    "SagaConflictError",
    "SagaError",
    "SagaInputError",
    "SagaOptions",
    "SagaOutcome",
    "SagaPendingError",
    "SagaStepFailed",
    "ShardConfig",
    "ShardHealth",
    "ShardKeyChangeError",
    "ShardKeyMissingError",
    "ShardKeyWarning",
    "ShardKitError",
    "ShardManager",
    "ShardSettings",
    "ShardUnavailableError",
    "ShardedSession",
    "Sharding",
    "Step",
    "TwoPhaseAbortedError",
    "UnknownShardError",
    "UnsupportedScatterError",
    "key_bytes",
    "key_hash",
    "lint_files",
    "lint_hook",
    "lint_script_directory",
    "recover",
    "route_statement",
    "run_saga",
    "settings_from_env",
    "set_shard_id",
    "settings_from_file",
    "sharding_of",
]

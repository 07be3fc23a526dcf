"""sa_shardkit: horizontal sharding for SQLAlchemy 2.x on PostgreSQL."""

from __future__ import annotations

from .config import ShardConfig, ShardSettings, settings_from_env, settings_from_file
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
    ShardKeyMissingError,
    ShardKitError,
    ShardUnavailableError,
    UnknownShardError,
    UnsupportedScatterError,
)
from .manager import ShardHealth, ShardManager
from .ring import DEFAULT_VNODES, HashRing, key_bytes, key_hash
from .saga import Saga, SagaOptions, SagaOutcome, Step, recover, run_saga

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
    "MigrationError",
    "NotShardedError",
    "RebalanceError",
    "RingError",
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
    "ShardKeyMissingError",
    "ShardKitError",
    "ShardManager",
    "ShardSettings",
    "ShardUnavailableError",
    "Step",
    "UnknownShardError",
    "UnsupportedScatterError",
    "key_bytes",
    "key_hash",
    "recover",
    "run_saga",
    "settings_from_env",
    "settings_from_file",
]

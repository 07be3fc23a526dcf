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
    SagaError,
    ShardKeyMissingError,
    ShardKitError,
    ShardUnavailableError,
    UnknownShardError,
    UnsupportedScatterError,
)
from .manager import ShardHealth, ShardManager
from .ring import DEFAULT_VNODES, HashRing, key_bytes, key_hash

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
    "SagaError",
    "ShardConfig",
    "ShardHealth",
    "ShardKeyMissingError",
    "ShardKitError",
    "ShardManager",
    "ShardSettings",
    "ShardUnavailableError",
    "UnknownShardError",
    "UnsupportedScatterError",
    "key_bytes",
    "key_hash",
    "settings_from_env",
    "settings_from_file",
]

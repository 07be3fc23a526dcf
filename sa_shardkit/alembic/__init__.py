"""Alembic across shards: every revision runs on every shard, in turn, with a per-shard report.

``migrations/env.py`` stays a few lines::

    from alembic import context
    from sa_shardkit.alembic import run_migrations
    from myapp.models import Base

    run_migrations(Base.metadata)

From Python, ``upgrade("alembic.ini", "head")`` (and ``downgrade``/``stamp``/``current``) runs the
same env and returns the per-shard :class:`MigrationReport`; ``run_on_every_shard(manager, ddl)``
runs one ad-hoc statement shard by shard with the same stop-at-the-first-failure report.

Shards come from the ``[shardkit]`` section of ``alembic.ini`` or ``SHARD_<N>_URL`` env vars;
``-x shard=ID`` / ``-x shards=ID,ID`` narrow a run. See :mod:`sa_shardkit.alembic.environment`.
"""

from __future__ import annotations

from .api import alembic_config, current, downgrade, run_on_every_shard, stamp, upgrade
from .environment import MIGRATION_LOCK_ID, run_migrations
from .library import library_table_filter
from .plan import MigrationPlan, PreMigrateHook
from .report import MigrationReport, ShardMigrationError, ShardOutcome, ShardState
from .status import FleetStatus, RevisionState, ShardRevision, fleet_status
from .targets import requested_shards, select_shards, settings_from_alembic_config

__all__ = [
    "MIGRATION_LOCK_ID",
    "alembic_config",
    "current",
    "downgrade",
    "library_table_filter",
    "run_on_every_shard",
    "stamp",
    "upgrade",
    "FleetStatus",
    "MigrationPlan",
    "MigrationReport",
    "PreMigrateHook",
    "RevisionState",
    "ShardMigrationError",
    "ShardOutcome",
    "ShardRevision",
    "ShardState",
    "fleet_status",
    "requested_shards",
    "run_migrations",
    "select_shards",
    "settings_from_alembic_config",
]

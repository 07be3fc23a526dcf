"""Alembic environment for the shards: every revision runs on every shard (see sa_shardkit.alembic)."""

from logging.config import fileConfig

from alembic import context

from sa_shardkit.alembic import PreMigrateHook, run_migrations
from sa_shardkit.demo.models import Base

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)

# Called with the MigrationPlan of an upgrade/downgrade/stamp before any shard is touched;
# raise to stop the run (e.g. a migration linter behind `-x lint=1`).
before_migrate: list[PreMigrateHook] = []

run_migrations(Base.metadata, before_migrate=before_migrate)

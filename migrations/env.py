"""Alembic environment for the shards: every revision runs on every shard (see sa_shardkit.alembic)."""

from logging.config import fileConfig

from alembic import context

from sa_shardkit.alembic import PreMigrateHook, run_migrations
from sa_shardkit.demo.models import Base
from sa_shardkit.lint import lint_hook
from sa_shardkit.lookups import lookup_metadata
from sa_shardkit.saga import saga_metadata
from sa_shardkit.sequences import sequence_metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# Called with the MigrationPlan of an upgrade/downgrade/stamp before any shard is touched;
# raise to stop the run. lint_hook: `-x lint=1` (or `lint = true` in [shardkit]) lints the revisions
# the upgrade applies against these models and refuses unsafe ones unless `-x allow_unsafe=1`.
before_migrate: list[PreMigrateHook] = [lint_hook(models=Base)]

# The models' tables plus sa_shardkit's own (saga log, receipts, sequences, lookup state), so
# autogenerate never drops them.
run_migrations(
    [Base.metadata, saga_metadata, sequence_metadata, lookup_metadata], before_migrate=before_migrate
)

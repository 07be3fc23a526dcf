"""What a fleet-wide Alembic command is about to do, and the hook that may inspect or veto it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from alembic.config import Config
from alembic.script import ScriptDirectory


@dataclass(frozen=True)
class MigrationPlan:
    """One Alembic command, resolved against the fleet, before any shard is touched."""

    command: str
    """``upgrade``, ``downgrade``, ``stamp``, ``current``, ``revision``... (Alembic's command)."""
    shard_ids: tuple[str, ...]
    """The shards it runs on, in run order (configuration order; reversed for ``downgrade``)."""
    destination: str | None
    """The target revision argument (``head``, ``+1``, ``0002``...) or None for read-only commands."""
    starting: str | None
    """The starting revision of an offline ``start:end`` range, else None."""
    offline: bool
    """``--sql``: SQL is written out per shard, nothing connects."""
    config: Config
    script: ScriptDirectory
    x_args: Mapping[str, str]
    """Every ``-x key=value`` given on the command line (hooks may define their own keys)."""

    @property
    def changes_schema(self) -> bool:
        return self.command in ("upgrade", "downgrade")


class PreMigrateHook(Protocol):
    """Called once with the plan of an ``upgrade``/``downgrade``/``stamp``, before any shard is touched.

    Raise (preferably ``alembic.util.CommandError`` with a one-line reason) to stop the run: nothing
    has been executed on any shard at that point. A migration linter is the typical hook::

        def lint(plan: MigrationPlan) -> None:
            if plan.x_args.get("lint") == "1":
                check_revisions(plan.script)

        run_migrations(target_metadata, before_migrate=[lint])
    """

    def __call__(self, plan: MigrationPlan) -> None: ...

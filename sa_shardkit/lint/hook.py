"""Lint before ``alembic upgrade``: a ``before_migrate`` hook for :func:`sa_shardkit.alembic.run_migrations`.

``migrations/env.py``::

    run_migrations(Base.metadata, before_migrate=[lint_hook(models=Base)])

It runs when the command line says ``-x lint=1`` or the ``[shardkit]`` section of ``alembic.ini``
says ``lint = true`` (``-x lint=0`` turns it off again), lints exactly the revisions the upgrade is
about to apply on the selected shards (each shard's pending revisions, online; ``start:end``,
offline), and prints its decision either way. An unsafe revision stops the run before any shard is
touched, unless ``-x allow_unsafe=1``.
"""

from __future__ import annotations

from typing import Any

from alembic.util import CommandError

from ..alembic import MigrationPlan, PreMigrateHook, fleet_status, settings_from_alembic_config
from ..alembic.timeouts import migration_timeouts
from ..config import with_shards
from ..manager import ShardManager
from .findings import LintReport
from .output import render_text, summary_line
from .revisions import LintTarget, targets_for_fleet, targets_from_script_directory
from .runner import ModelsSpec, lint_targets

SECTION = "shardkit"


def _flag(value: str | None) -> bool | None:
    if value is None or not value.strip():
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


def lint_enabled(plan: MigrationPlan, default: bool = False) -> bool:
    """``-x lint=...`` if given, else ``lint = ...`` in ``[shardkit]``, else ``default``."""
    for value in (plan.x_args.get("lint"), plan.config.get_section_option(SECTION, "lint")):
        flag = _flag(value)
        if flag is not None:
            return flag
    return default


def planned_targets(plan: MigrationPlan) -> list[LintTarget]:
    """The revisions the upgrade will apply on at least one of the plan's shards."""
    destination = plan.destination or "heads"
    if plan.offline:
        return targets_from_script_directory(plan.script, lower=plan.starting, upper=destination)
    settings = settings_from_alembic_config(plan.config)
    selected = with_shards(settings, [s for s in settings.shards if s.id in plan.shard_ids])
    with ShardManager(selected) as manager:
        status = fleet_status(manager, plan.script)
    # An unreachable shard is reported (and the run stopped) by the env itself; lint the others.
    heads = [s.heads for s in status.shards if s.error is None]
    return targets_for_fleet(plan.script, heads or [()], upper=destination)


def lint_hook(models: ModelsSpec = None, *, default: bool = False, **options: Any) -> PreMigrateHook:
    """A hook that lints the revisions an ``upgrade`` applies and refuses unsafe ones.

    :param models: the models of the code being deployed (``"pkg.module:Base"``, a declarative
        base...); default: ``lint_models`` in ``[shardkit]``, else none (shard-key rules skipped).
    :param default: lint even without ``-x lint=1`` / ``lint = true``.
    :param options: passed to :func:`~sa_shardkit.lint.lint_targets` (``strict``, ``squawk_path``...).
    """

    def hook(plan: MigrationPlan) -> None:
        if plan.command not in ("upgrade", "downgrade") or not lint_enabled(plan, default):
            return
        if plan.command == "downgrade":
            plan.config.print_stdout("shardkit lint: downgrades are not linted -> downgrade proceeds")
            return
        spec = models if models is not None else plan.config.get_section_option(SECTION, "lint_models")
        # The env sets these timeouts on every shard (online, and at the top of each --sql script).
        env = migration_timeouts(plan.config, plan.x_args)
        report = lint_targets(planned_targets(plan), models=spec or None, **{**env, **options})
        decide(plan, report)

    return hook


def decide(plan: MigrationPlan, report: LintReport) -> None:
    """Print the report and the decision; raise ``CommandError`` to refuse an unsafe upgrade."""
    say = plan.config.print_stdout
    if report.findings or report.notes:
        say(render_text(report))
    if report.ok:
        say(f"shardkit lint: {summary_line(report)} -> upgrade proceeds")
        return
    unsafe = ", ".join(
        r.revision for r in report.revisions if any(f.severity.value == "error" for f in r.findings)
    )
    if _flag(plan.x_args.get("allow_unsafe")):
        say(f"shardkit lint: UNSAFE revision(s) {unsafe} applied anyway (-x allow_unsafe=1)")
        return
    say(f"shardkit lint: refusing the upgrade: unsafe revision(s) {unsafe}; no shard was touched")
    raise CommandError(
        f"shardkit lint refused the upgrade ({report.errors} error(s) in {unsafe}); "
        "fix the revision(s) or pass -x allow_unsafe=1 to apply anyway"
    )
